"""The transformers model families ropekit can patch: their names, how their RoPE is laid out, where it lives.

Each family is a ``Family``: its ``model_type``, a human name, and ``tables``, the form in which its
``*RotaryEmbedding`` module hands sin/cos to its attention:

* ``"rotate_half"`` (Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2, GPT-NeoX): ``(cos, sin)``, each (batch, seq,
  rotary_dim) as ``cat(c, c)``, used as ``apply_rotary_pos_emb(q, k, cos, sin)`` on heads-first q, k.
* ``"gptj"`` (GPT-J, transformers >= 5.24): ``(sin, cos)``, each (batch, seq, rotary_dim/2), used as
  ``apply_rotary_pos_emb(x, sin, cos)`` once for k and once for q, heads-last (batch, seq, heads, rotary_dim).

``locate(model, family)`` finds the rotary modules, the modeling module whose ``apply_rotary_pos_emb`` the
attention calls, and the attention modules; a model built differently is refused with
``TransformersStructureError`` (a ValueError) naming the family and the installed transformers version.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType

from torch import nn

from ropekit.config import RopeConfig


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
)}

# model_type -> human name. Each is covered by tests on a tiny model (tests/test_hf_patch.py).
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
    """The one-line error for a model whose structure the patch does not know."""
    name = SUPPORTED_FAMILIES.get(family, family)
    return TransformersStructureError(
        f"{family}: {detail} in the {name} model of transformers {transformers_version()}; ropekit's patch was "
        f"tested on transformers {TRANSFORMERS_TESTED}: install a release in that range "
        f"(pip install \"transformers=={TRANSFORMERS_NEWEST_TESTED}\") or report this")


def unsupported_family_message(model_type: str | None) -> str:
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type in NO_ROPE_FAMILIES:
        return (f"model family {model_type!r} has no rotary position embeddings (RoPE); ropekit supports the "
                f"RoPE families: {supported}")
    return f"model family {model_type!r} is not supported by ropekit; supported families: {supported}"


def check_family(model_type: str | None) -> str:
    """Return ``model_type`` if ropekit can patch it, else raise ValueError naming the supported families."""
    if model_type not in FAMILIES:
        raise ValueError(unsupported_family_message(model_type))
    return model_type


def iter_supported_families() -> Iterator[tuple[str, str]]:
    """(model_type, description) for each supported family."""
    return iter(SUPPORTED_FAMILIES.items())


def model_rope_config(model: nn.Module) -> RopeConfig:
    """The RoPE a loaded transformers model computes (from its config; the layout from its family)."""
    return RopeConfig.from_hf(model.config)


def check_rope_matches(model: nn.Module, cfg: RopeConfig) -> None:
    """Refuse a cfg whose geometry (head_dim, rotary_dim, layout) differs from the model's."""
    model_cfg = model_rope_config(model)
    for name in ("head_dim", "rotary_dim", "layout"):
        want, got = getattr(model_cfg, name), getattr(cfg, name)
        if want != got:
            raise ValueError(f"cfg.{name}: the model has {name}={want!r}, the RopeConfig says {got!r}; build the "
                             f"config from the model (LoadedModel.rope or RopeConfig.from_hf(model.config))")


@dataclass
class Located:
    """Where a model's RoPE lives: what ``locate`` found."""

    family: Family
    rotary: list[tuple[nn.Module, str, nn.Module]]  # (parent, attribute name, the *RotaryEmbedding module)
    module: ModuleType  # the modeling module whose apply_rotary_pos_emb the attention calls
    attentions: list[nn.Module]


def rotary_modules(model: nn.Module) -> list[tuple[nn.Module, str, nn.Module]]:
    """(parent, name, child) for every ``*RotaryEmbedding`` child module of ``model``."""
    return [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
            if type(child).__name__.endswith(ROTARY_SUFFIX)]


def attention_modules(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The model's attention modules: instances of ``*Attention`` classes of its modeling module."""
    return [m for m in model.modules()
            if type(m).__module__ == module_name and type(m).__name__.endswith(ATTENTION_SUFFIXES)]


def locate(model: nn.Module, model_type: str) -> Located:
    """The rotary modules, modeling module and attention modules of ``model`` (a supported family)."""
    family = FAMILIES[check_family(model_type)]
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
    if module is None or not callable(getattr(module, "apply_rotary_pos_emb", None)):
        raise structure_error(model_type, f"the modeling module {module_name} has no apply_rotary_pos_emb")
    attentions = attention_modules(model, module_name)
    if not attentions:
        raise structure_error(model_type, f"found no *Attention modules from {module_name}")
    return Located(family, rotary, module, attentions)
