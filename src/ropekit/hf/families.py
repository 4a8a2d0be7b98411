"""Which transformers models ropekit can patch, found from each model's structure and transformers' own RoPE code.

Any model whose decoder holds a ``*RotaryEmbedding`` module and whose attention hands that module's tables to a
function of its modeling module (``apply_rotary_pos_emb``, ``apply_rotary_pos_emb_interleave``, DeepSeek-V2's
``apply_rotary_emb``, ...) is patched; there is no list of allowed families. ``locate(model)`` finds the rotary
modules, those functions and the attention modules; ``probe_tables`` calls each rotary module once (positions 0-3)
and compares its tables with ropekit's reading of the config (``LayeredRope.from_hf``): the form of the tables
(``cat(c, c)`` rotate-half, ``repeat_interleave`` for interleaved pairs, half size, GPT-J's ``(sin, cos)``, a
complex ``freqs_cis``) is taken from the match, and a model whose frequencies ropekit reads differently from its
own rotary module is refused with the numbers, before anything is changed.

``FAMILIES`` names the families with a human name (and their tiny-model tests in tests/test_hf_patch.py);
``rope_families()`` lists every causal-LM family of the installed transformers with a rotary module
(tests/test_hf_every_family_patched_or_refused.py builds a tiny model of each; ``scripts/family_table.py``
writes docs/families.md).
"""

from __future__ import annotations

import functools
import inspect
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ropekit.config import RopeConfig
from ropekit.layered import LayeredRope


@dataclass(frozen=True)
class Family:
    """A transformers model family ropekit patches: ``model_type``, a human name, its sin/cos form."""

    model_type: str
    name: str
    tables: str = "rotate_half"  # or "gptj", see the module docstring


FAMILIES: dict[str, Family] = {f.model_type: f for f in (
    Family("llama", "Llama (also SmolLM2, Llama 2/3, Code Llama, Vicuna, TinyLlama)"),
    Family("mistral", "Mistral"),
    Family("qwen2", "Qwen2 / Qwen2.5"),
    Family("qwen3", "Qwen3"),
    Family("phi3", "Phi-3 / Phi-3.5 / Phi-4-mini"),
    Family("gemma", "Gemma"),
    Family("gemma2", "Gemma 2"),
    Family("gpt_neox", "GPT-NeoX (Pythia, partial rotary)"),
    Family("gptj", "GPT-J (interleaved pairs, partial rotary)", tables="gptj"),
    Family("cohere", "Command-R (interleaved pairs)"),
    Family("glm4", "GLM-4 (interleaved pairs, partial rotary)"),
    Family("gemma3_text", "Gemma 3 (one RoPE per layer type)"),
    Family("deepseek_v3", "DeepSeek-V3 (MLA: decoupled rope head, interleaved)"),
    Family("smollm3", "SmolLM3 (NoPE layers left alone)"),
)}

# model_type -> human name of the families named in docs and errors. Any other family with a rotary module is
# patched too (tests/test_hf_every_family_patched_or_refused.py covers every one the installed transformers has).
SUPPORTED_FAMILIES: dict[str, str] = {k: f.name for k, f in FAMILIES.items()}

# Families with learned or ALiBi positions: a clear "no RoPE" message instead of "not supported".
NO_ROPE_FAMILIES = {"gpt2", "opt", "bloom", "gpt_bigcode", "falcon_mamba", "mamba", "mpt", "bert", "roberta",
                    "t5", "xglm", "biogpt", "ctrl", "transfo-xl", "xlnet", "openai-gpt", "distilbert"}

# The transformers releases the model tests passed on; pyproject.toml's floor is the first. Only used in
# error messages.
TRANSFORMERS_OLDEST_TESTED, TRANSFORMERS_NEWEST_TESTED = "5.13.0", "5.24.0"
TRANSFORMERS_TESTED = f"{TRANSFORMERS_OLDEST_TESTED} to {TRANSFORMERS_NEWEST_TESTED}"

ROTARY_SUFFIX = "RotaryEmbedding"
ATTENTION_SUFFIXES = ("Attention", "Attention2")


class TransformersStructureError(ValueError):
    """The installed transformers builds a model differently from what ropekit's patch expects."""


def transformers_version() -> str:
    """The installed transformers version ("not installed" without it)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - a required dependency
        return "not installed"
    return str(transformers.__version__)


def structure_error(family: str, detail: str) -> TransformersStructureError:
    """The one-line error for a model whose structure the patch cannot follow."""
    name = SUPPORTED_FAMILIES.get(family, family)
    if family in SUPPORTED_FAMILIES:
        advice = (f"; ropekit's patch was tested on transformers {TRANSFORMERS_TESTED}: install a release in that range "
                  f"(pip install \"transformers=={TRANSFORMERS_NEWEST_TESTED}\") or report this")
    else:
        advice = ", so ropekit does not patch it (docs/families.md lists every family and why)"
    return TransformersStructureError(f"{family}: {detail} in the {name} model of transformers "
                                      f"{transformers_version()}{advice}")


def unsupported_family_message(model_type: str | None) -> str:
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type in NO_ROPE_FAMILIES or has_rope(model_type) is False:
        return (f"model family {model_type!r} has no rotary position embeddings (RoPE); ropekit patches models "
                f"with RoPE, e.g. {supported}")
    return f"model family {model_type!r} is not supported by ropekit; families with RoPE: {supported}"


def check_family(model_type: str | None) -> str:
    """Return ``model_type`` unless it is known to have no RoPE (ValueError). Whether a model with RoPE can be
    patched is decided from its structure (``locate``), not from its name."""
    if model_type in NO_ROPE_FAMILIES or has_rope(model_type) is False:
        raise ValueError(unsupported_family_message(model_type))
    return model_type


def _modeling_file(model_type: str) -> str | None:
    try:
        import transformers
    except ImportError:  # pragma: no cover - a required dependency
        return None
    name = model_type.replace("-", "_")
    path = os.path.join(os.path.dirname(transformers.__file__), "models", name, f"modeling_{name}.py")
    return path if os.path.isfile(path) else None


@functools.lru_cache(maxsize=512)
def has_rope(model_type: str | None) -> bool | None:
    """True when the installed transformers' model of ``model_type`` has a rotary module, False when it has a
    modeling file without one, None when ropekit cannot tell (no such model type in transformers)."""
    if not model_type:
        return None
    path = _modeling_file(model_type)
    if path is None and model_type.endswith("_text"):
        path = _modeling_file(model_type[: -len("_text")])
    if path is None:
        return None
    with open(path, encoding="utf-8") as handle:
        return ROTARY_SUFFIX in handle.read()


def rope_families() -> list[str]:
    """Every causal-LM model type of the installed transformers whose modeling code has a rotary module."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return [mt for mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if has_rope(mt)]


def iter_supported_families() -> Iterator[tuple[str, str]]:
    """(model_type, description) for each supported family."""
    return iter(SUPPORTED_FAMILIES.items())


def model_rope_config(model: nn.Module) -> RopeConfig:
    """The RoPE a loaded transformers model computes (from its config; the layout from its modeling code).
    A model with one RoPE per layer type raises ValueError: use ``model_layered_rope``."""
    return RopeConfig.from_hf(model.config)


def model_layered_rope(model: nn.Module) -> LayeredRope:
    """Every layer's RoPE of a loaded transformers model (``LayeredRope.from_hf(model.config)``)."""
    return LayeredRope.from_hf(model.config)


def check_rope_matches(model: nn.Module, cfg: RopeConfig | LayeredRope) -> None:
    """Refuse a cfg whose geometry (head_dim, rotary_dim, layout) differs from the model's, per layer type."""
    model_rope = model_layered_rope(model)
    if isinstance(cfg, LayeredRope):
        if set(cfg.types) != set(model_rope.types):
            raise ValueError(f"cfg: layer types {', '.join(cfg.types)} differ from the model's "
                             f"{', '.join(model_rope.types)}; start from LayeredRope.from_hf(model.config)")
        pairs = [(key, model_rope[key], cfg[key]) for key in model_rope.types]
    else:
        if model_rope.single is None:
            raise ValueError(f"cfg: the model has one RoPE per layer type ({', '.join(model_rope.types)}); pass a "
                             f"LayeredRope (LayeredRope.from_hf(model.config), then .extend(...))")
        pairs = [(None, model_rope.single, cfg)]
    for key, model_cfg, given in pairs:
        for name in ("head_dim", "rotary_dim", "layout"):
            want, got = getattr(model_cfg, name), getattr(given, name)
            if want != got:
                where = f" ({key} layers)" if key else ""
                raise ValueError(f"cfg.{name}: the model has {name}={want!r}{where}, the RopeConfig says {got!r}; "
                                 f"build the config from the model (LoadedModel.rope or "
                                 f"RopeConfig.from_hf(model.config))")


# ---------------------------------------------------------------------- locating the RoPE in a model
ROUTED_PREFIXES = ("apply_rotary", "_apply_rotary")  # modeling-module functions that take the rotary tables
TABLE_FORMS = ("cat", "interleave", "half", "complex")
LAYER_NUMBER = re.compile(r"\.(\d+)(?:\.|$)")


@dataclass
class Tables:
    """How one rotary module hands its tables to the attention (found by ``probe_tables``).

    form: "cat" (cos, sin each (batch, seq, rotary_dim) as cat(c, c)), "interleave" (repeat_interleave(c, 2)),
    "half" (each (batch, seq, rotary_dim/2)), "complex" (one complex (batch, seq, rotary_dim/2) tensor, cos + i sin).
    sin_first: the module returns (sin, cos) (GPT-J). width: the last dimension of its tables.
    """

    form: str
    sin_first: bool = False
    width: int = 0


@dataclass(frozen=True)
class Pairing:
    """How a routed function of the modeling module rotates, found by calling it (``probe_functions``):
    ``layout`` "neox" or "gptj" (the channel pairs), ``heads_first`` (its default tensor order)."""

    layout: str
    heads_first: bool


@dataclass
class Located:
    """Where a model's RoPE lives: what ``locate`` found."""

    family: Family
    rotary: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute name, the *RotaryEmbedding module)
    module: ModuleType  # the modeling module whose apply_rotary_pos_emb the attention calls
    attentions: list[nn.Module]
    routed: tuple[str, ...] = ()  # names of the module's functions that take the tables
    layer_of: dict[int, int] = field(default_factory=dict)  # id(attention) -> its layer index
    tables: dict[int, dict[str | None, Tables]] = field(default_factory=dict)  # id(rotary) -> per layer type
    rotary_keys: dict[int, str | None] = field(default_factory=dict)  # id(rotary) -> its RoPE key (None: by call)
    functions: dict[str, Pairing | None] = field(default_factory=dict)  # routed name -> how it rotates (None: ?)


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every ``*RotaryEmbedding`` child module of ``model``."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith(ROTARY_SUFFIX)]


def attention_modules(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The model's attention modules: instances of ``*Attention`` classes of its modeling module."""
    return [m for m in model.modules()
            if type(m).__module__ == module_name and type(m).__name__.endswith(ATTENTION_SUFFIXES)]


def layer_index(model: nn.Module, attentions: list[nn.Module]) -> dict[int, int]:
    """id(attention) -> the index of its decoder layer (from its path, ``layers.3.self_attn``, or layer_idx)."""
    wanted = {id(a) for a in attentions}
    out: dict[int, int] = {}
    for name, module in model.named_modules():
        if id(module) in wanted:
            found = LAYER_NUMBER.findall("." + name)
            index = getattr(module, "layer_idx", None)
            out[id(module)] = int(found[-1]) if found else (int(index) if isinstance(index, int) else len(out))
    return out


def locate(model: nn.Module, model_type: str) -> Located:
    """The rotary modules, modeling module, routed functions and attention modules of ``model``."""
    family = FAMILIES.get(model_type) or Family(model_type, model_type)
    check_family(model_type)
    rotary = rotary_modules(model)
    if not rotary:
        if family.tables == "gptj":
            # transformers < 5.24 kept a fixed sin/cos table inside each GPTJAttention (embed_positions).
            raise structure_error(model_type, "GPT-J keeps its sin/cos in no GPTJRotaryEmbedding module (transformers "
                                              "before 5.24 kept a fixed table per attention, which ropekit's patch "
                                              "does not replace)")
        raise structure_error(model_type, f"found no *{ROTARY_SUFFIX} module")
    module_name = type(rotary[0][2]).__module__
    module = sys.modules.get(module_name)
    routed = tuple(name for name in dir(module) if name.startswith(ROUTED_PREFIXES)
                   and callable(getattr(module, name)) and not isinstance(getattr(module, name), type)) if module else ()
    if module is None or not callable(getattr(module, "apply_rotary_pos_emb", None)) and not routed:
        raise structure_error(model_type, f"the modeling module {module_name} has no apply_rotary_pos_emb")
    attentions = attention_modules(model, module_name)
    if not attentions:
        raise structure_error(model_type, f"found no *Attention modules from {module_name}")
    return Located(family, rotary, module, attentions, routed, layer_index(model, attentions))


# ---------------------------------------------------------------------- the rotary modules' tables
PROBE_POSITIONS = 4


def rotary_layer_types(rotary: nn.Module) -> tuple[str, ...] | None:
    """The layer types a per-type rotary module (Gemma 3: ``forward(x, position_ids, layer_type)``) serves."""
    try:
        params = inspect.signature(rotary.forward).parameters
    except (TypeError, ValueError):  # pragma: no cover
        return None
    if "layer_type" not in params:
        return None
    types = getattr(rotary, "layer_types", None)
    if types is None:
        types = getattr(getattr(rotary, "config", None), "layer_types", None)
    return tuple(sorted(set(types))) if types else None


def call_rotary(rotary: nn.Module, x: torch.Tensor, positions: torch.Tensor, layer_type: str | None = None):
    """The rotary module's output for ``positions`` (1, n), as the decoder calls it."""
    with torch.no_grad():
        if layer_type is not None:
            return rotary(x, positions, layer_type)
        return rotary(x, positions)


def ropekit_cos_sin(cfg: RopeConfig, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ropekit's (cos, sin), each (batch, seq, rotary_dim/2) float64, attention scale included."""
    from ropekit.methods import frequencies

    f = frequencies(cfg, int(positions.max()) + 1 if cfg.length_dependent else None)
    angles = positions.to(torch.float64)[..., None] * f.inv_freq64
    return torch.cos(angles) * f.attention_scale, torch.sin(angles) * f.attention_scale


def expand_tables(cos: torch.Tensor, sin: torch.Tensor, tables: Tables):
    """ropekit's half tables in the form ``tables`` describes (what the attention expects)."""
    if tables.form == "complex":
        return torch.complex(cos, sin)
    if tables.form == "cat":
        cos, sin = torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)
    elif tables.form == "interleave":
        cos, sin = cos.repeat_interleave(2, dim=-1), sin.repeat_interleave(2, dim=-1)
    return (sin, cos) if tables.sin_first else (cos, sin)


def table_tolerance(rotary: nn.Module) -> float:
    """How far a rotary module's tables may be from ropekit's float64 ones: 1e-3 relative, more when the module's
    buffers (inv_freq) were cast to half precision with the model (``model.to(torch.bfloat16)``), which changes
    the frequencies the model itself computes by up to a few eps."""
    dtypes = [b.dtype for b in rotary.buffers() if b.is_floating_point()]
    eps = max((torch.finfo(d).eps for d in dtypes), default=0.0)
    return max(1e-3, 8 * eps)


def match_tables(output: Any, cfg: RopeConfig, positions: torch.Tensor, tolerance: float = 1e-3
                 ) -> tuple[Tables | None, str]:
    """The form in which ``output`` (a rotary module's) holds ``cfg``'s RoPE at ``positions``, or (None, why)."""
    cos, sin = ropekit_cos_sin(cfg, positions)
    if isinstance(output, torch.Tensor) and output.is_complex():
        candidates = [Tables("complex", width=output.shape[-1])]
        got = [output]
    elif isinstance(output, (tuple, list)) and len(output) == 2 and all(isinstance(t, torch.Tensor) for t in output):
        width = output[0].shape[-1]
        candidates = [Tables(form, sin_first, width) for form in ("cat", "interleave", "half")
                      for sin_first in (False, True)]
        got = list(output)
    else:
        return None, f"its rotary module returns {type(output).__name__}, not (cos, sin) tables"
    closest = None
    for tables in candidates:
        want = expand_tables(cos, sin, tables)
        want = [want] if isinstance(want, torch.Tensor) else list(want)
        if any(w.shape[-1] != g.shape[-1] for w, g in zip(want, got)):
            continue
        errors = []
        for w, g in zip(want, got):
            w = torch.view_as_real(w) if w.is_complex() else w
            g = torch.view_as_real(g) if g.is_complex() else g
            if g.numel() != w.numel():
                errors.append(float("inf"))
                continue
            g = g.detach().to(torch.float64).reshape(w.shape)
            # float32 tables: relative to each value, so that slow pairs (tiny sin) count as much as fast ones.
            errors.append(float(((g - w).abs() / (w.abs() + 1e-6)).max()))
        error = max(errors)
        if error < tolerance:
            return tables, ""
        if closest is None or error < closest[0]:
            closest = (error, tables.form)
    if closest is None:
        return None, (f"its rotary module's tables have {got[0].shape[-1]} channels, ropekit's rotary_dim is "
                      f"{cfg.rotary_dim}")
    return None, (f"its rotary module computes other frequencies than ropekit reads from the config "
                  f"({cfg.method}, base {cfg.base:g}, rotary_dim {cfg.rotary_dim}): relative difference "
                  f"{closest[0]:.2g} at positions 0-{PROBE_POSITIONS - 1}")


def probe_tables(located: Located, model_rope: LayeredRope, dtype: torch.dtype, device: torch.device) -> None:
    """Fill ``located.tables`` / ``rotary_keys``: call each rotary module at positions 0-3 and match its tables
    with ropekit's reading of the config. Raises ``TransformersStructureError`` when nothing matches."""
    model_type = located.family.model_type
    positions = torch.arange(PROBE_POSITIONS, device=device)[None]
    x = torch.zeros(1, PROBE_POSITIONS, 1, dtype=torch.float32, device=device)
    for _, _, rotary in located.rotary:
        per_type = rotary_layer_types(rotary)
        keys: list[str | None] = list(per_type) if per_type else [None]
        found: dict[str | None, Tables] = {}
        for layer_type in keys:
            if layer_type is not None and layer_type not in model_rope.types:
                continue  # a type without RoPE here (e.g. Beam's NoPE full-attention layers)
            try:
                output = call_rotary(rotary, x, positions, layer_type)
            except Exception as exc:  # noqa: BLE001 - any failure means a rotary module of another form
                raise structure_error(model_type, f"its {type(rotary).__name__} could not be called as "
                                                  f"forward(x, position_ids): {type(exc).__name__}: {exc}") from None
            if layer_type is not None:
                candidates = [layer_type]
            else:
                candidates = list(model_rope.types)
            why = ""
            for key in candidates:
                tables, why = match_tables(output, model_rope[key], positions, table_tolerance(rotary))
                if tables is not None:
                    found[layer_type] = tables
                    if layer_type is None:
                        located.rotary_keys[id(rotary)] = key
                    break
            else:
                raise structure_error(model_type, why or "its rotary module serves no RoPE of the config")
        located.tables[id(rotary)] = found


def probe_functions(located: Located, model_rope: LayeredRope, device: torch.device) -> None:
    """Fill ``located.functions``: call each routed function of the modeling module with random q, k and the
    first rotary module's own tables, and find which pairing (rotate-half or interleaved) and tensor order
    reproduce its output with ropekit. The layout comes from transformers' code, not from a list of families:
    a model may rotate with two functions (DeepSeek-V3.2: its indexer rotate-half, its attention interleaved)."""
    import dataclasses

    from ropekit.methods import frequencies
    from ropekit.rotation import apply_rotary_reference

    rotary = located.rotary[0][2]
    per_type = rotary_layer_types(rotary)
    layer_type = next((t for t in (per_type or ()) if t in model_rope.types), None)
    key = layer_type or located.rotary_keys.get(id(rotary)) or model_rope.types[0]
    cfg = model_rope[key]
    positions = torch.arange(PROBE_POSITIONS, device=device)[None]
    x = torch.zeros(1, PROBE_POSITIONS, 1, dtype=torch.float32, device=device)
    tables = call_rotary(rotary, x, positions, layer_type)
    tables = tuple(tables) if isinstance(tables, (tuple, list)) else (tables,)
    gen = torch.Generator(device="cpu").manual_seed(0)
    # heads == seq == 4: both tensor orders broadcast, so the output tells which one the function assumes.
    q = torch.randn(1, PROBE_POSITIONS, PROBE_POSITIONS, cfg.rotary_dim, generator=gen).to(device)
    k = torch.randn(1, PROBE_POSITIONS, PROBE_POSITIONS, cfg.rotary_dim, generator=gen).to(device)
    f = frequencies(cfg, PROBE_POSITIONS if cfg.length_dependent else None)
    # half-precision tables (a model cast with .to(bf16)) rotate a few eps off; q is N(0, 1), |q| < ~4.5
    tolerance = max(1e-4, 4 * table_tolerance(rotary))
    for fn_name in located.routed:
        fn = getattr(located.module, fn_name)
        fn = getattr(fn, "__wrapped__", fn)
        out = None
        for args in ((q, k, *tables), (q, *tables)):
            try:
                with torch.no_grad():
                    out = fn(*args)
                break
            except Exception:  # noqa: BLE001, S112 - another signature: try the next form
                continue
        got = out[0] if isinstance(out, (tuple, list)) else out
        located.functions[fn_name] = None
        if not isinstance(got, torch.Tensor) or got.shape != q.shape:
            continue
        got = got.detach().to(torch.float64)
        for layout in ("neox", "gptj"):
            for heads_first in (True, False):
                want = apply_rotary_reference(q.double(), None, dataclasses.replace(f, layout=layout), positions,
                                              heads_first=heads_first)[0]
                variants = [want]
                if layout == "gptj":  # DeepSeek's interleave path hands back rotate-half channel order
                    variants.append(torch.cat([want[..., 0::2], want[..., 1::2]], dim=-1))
                if any(float((got - w).abs().max()) < tolerance for w in variants):
                    located.functions[fn_name] = Pairing(layout, heads_first)
                    break
            if located.functions[fn_name] is not None:
                break
