"""GGUF in and out: a model's RoPE as llama.cpp reads it from a GGUF file, and a GGUF copy with a new RoPE.

Reading (``read_rope``, ``rope_fields``; ``RopeConfig.from_gguf`` builds the config from them) follows llama.cpp's
own semantics (``llama-model.cpp`` / ``llama-context.cpp`` / ggml's ``rope_yarn``), key by key:

* ``<arch>.rope.freq_base`` (default 10000), ``.rope.dimension_count`` (default the head size).
* ``.rope.scaling.type``: none / linear / yarn / longrope; llama.cpp's default when absent is ``linear``, which
  with no ``.rope.scaling.factor`` scales nothing. The factor divides every frequency (``freq_scale = 1/factor``)
  unless the type is ``none``.
* ``.rope.scaling.original_context_length`` (default ``.context_length``): YaRN's ramp and the LongRoPE
  long/short switch are measured against it.
* YaRN: ``.rope.scaling.yarn_ext_factor`` (default 1 for yarn, else 0: how much of the ramp is mixed in),
  ``.yarn_beta_fast`` / ``.yarn_beta_slow`` (32 / 1), ``.yarn_log_multiplier`` (DeepSeek's mscale_all_dim),
  ``.yarn_attn_factor``. The cos/sin multiplier llama.cpp ends with is ``(0.1 ln s + 1)`` (or DeepSeek's ratio)
  times ``.rope.scaling.attn_factor``.
* ``.rope.scaling.attn_factor`` (default 1): multiplies cos and sin for every scaling type (Phi-3 stores its
  LongRoPE factor sqrt(1 + ln s / ln L) here).
* Tensors ``rope_freqs.weight`` (Llama 3.1: one divisor per pair; llama.cpp divides each frequency by it) and
  ``rope_factors_long.weight`` / ``rope_factors_short.weight`` (Phi-3 LongRoPE; llama.cpp uses the long ones when
  the context it is given, ``-c``, exceeds the original length).
* ``.rope.freq_base_swa`` / ``.rope.dimension_count_swa``: the sliding-window layers' RoPE (Gemma 3 files carry no
  key: llama.cpp fixes their base at 10000 without scaling, and so does ropekit).
* ``.rope.dimension_sections``: M-RoPE (Qwen2-VL). Text tokens have t = h = w positions, where M-RoPE is plain
  RoPE, so the text RoPE is read and the sections are kept on ``GGUFRope.sections``.

Per-pair divisors are recognised as Llama 3 scaling where they are exactly that (``llama3``); any other static
divisors are kept exactly as ``longrope`` with equal short and long factors.

Writing (``rope_plan`` + ``write_gguf``): every tensor is copied byte for byte and every metadata key is kept,
except the RoPE keys and factor tensors, which are set the way ``convert_hf_to_gguf.py`` writes the same
transformers ``rope_parameters`` (``llama3`` -> ``rope_freqs``, ``longrope`` -> ``rope_factors_long/short``,
``yarn`` / ``linear`` -> ``rope.scaling.*``, ``ntk`` / ``base`` -> a new ``rope.freq_base``). What llama.cpp cannot
express (dynamic scaling, LongRoPE's n_hat, YaRN without the floor/ceil ramp) is refused before any work. The
atomic, never-overwriting file handling lives in ``ropekit.hf.export_gguf``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from ropekit.warn import warn_once
from ropekit.methods import get_method, method_names
from ropekit.methods._common import default_inv_freq, yarn_mscale

if TYPE_CHECKING:  # pragma: no cover
    from ropekit.config import RopeConfig

# Tensor names (GGUF stores one tensor shared by every layer).
ROPE_FREQS = "rope_freqs.weight"
ROPE_FACTORS_LONG = "rope_factors_long.weight"
ROPE_FACTORS_SHORT = "rope_factors_short.weight"
ROPE_TENSORS = (ROPE_FREQS, ROPE_FACTORS_LONG, ROPE_FACTORS_SHORT)

# llama.cpp's scaling types (LLAMA_ROPE_SCALING_TYPES); a file without the key means "linear".
SCALING_TYPES = ("none", "linear", "yarn", "longrope")
# Every key after ``<arch>.rope.`` llama.cpp reads (llama-arch.cpp), and ``scale_linear``, the factor's old name.
ROPE_KEYS = ("dimension_count", "dimension_count_swa", "dimension_sections", "freq_base", "freq_base_swa",
             "freq_base_per_layer", "scale_linear", "scaling.type", "scaling.factor", "scaling.alpha",
             "scaling.attn_factor", "scaling.original_context_length", "scaling.finetuned",
             "scaling.yarn_log_multiplier", "scaling.yarn_ext_factor", "scaling.yarn_attn_factor",
             "scaling.yarn_beta_fast", "scaling.yarn_beta_slow")
# Architectures whose llama.cpp loader fixes the sliding-window layers' RoPE (base 10000, no scaling)
# whatever the file says.
SWA_FIXED_BASE = {"gemma3": 10000.0, "gemma-embedding": 10000.0}
# llama.cpp's "llama" loader reads rope_factors_long/short when rope.scaling.type is longrope (llama-model.cpp);
# gguf-py's per-architecture tensor lists do not say so.
LONGROPE_ARCHS_EXTRA = {"llama"}
# llama.cpp's own defaults for the YaRN ramp.
YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0
LAYER_TYPES = ("full_attention", "sliding_attention")

_REL_TOL = 1e-6  # float32 metadata: values equal within this are the same


# ---------------------------------------------------------------------- reading the file
@dataclass(frozen=True)
class GGUFFile:
    """The parts of a GGUF file ropekit reads: metadata (tokenizer arrays left out) and the RoPE tensors.

    Attributes:
        metadata: ``{key: value}``; strings, numbers, bools, lists of numbers.
        rope_tensors: ``{tensor name: tuple of floats}`` for ``ROPE_TENSORS`` present in the file.
    """

    metadata: dict[str, Any]
    rope_tensors: dict[str, tuple[float, ...]] = field(default_factory=dict)


def read_gguf(path: str | Path) -> GGUFFile:
    """Metadata and RoPE tensors of the GGUF file at ``path`` (cached per file, size and mtime).

    Parsing a GGUF header takes seconds (its tokenizer arrays), so a command that checks the config before
    loading the weights reads it once. Raises FileNotFoundError for a missing file; the gguf package's own
    errors (ValueError, struct errors...) for a damaged one.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return _read_cached(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _read_cached(path: str, size: int, mtime_ns: int) -> GGUFFile:
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    reader = GGUFReader(path)
    meta: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if not fld.types or name.startswith(("tokenizer.", "GGUF.")):
            continue
        kind = fld.types[0]
        if kind == GGUFValueType.STRING:
            meta[name] = bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
        elif kind == GGUFValueType.ARRAY:
            if len(fld.types) > 1 and fld.types[1] != GGUFValueType.STRING:
                meta[name] = [fld.parts[i].tolist()[0] for i in fld.data]
        else:
            meta[name] = fld.parts[fld.data[0]].tolist()[0]
    tensors = {}
    for tensor in reader.tensors:
        if tensor.name in ROPE_TENSORS:
            tensors[tensor.name] = tuple(float(v) for v in tensor.data.astype("float64").reshape(-1))
    return GGUFFile(meta, tensors)


def _source(source: Any) -> GGUFFile:
    """A path, a ``GGUFFile`` or a metadata mapping (tensors given under their names, e.g. ``rope_freqs.weight``)."""
    if isinstance(source, GGUFFile):
        return source
    if isinstance(source, Mapping):
        meta = {k: v for k, v in source.items() if k not in ROPE_TENSORS}
        tensors = {k: tuple(float(x) for x in v) for k, v in source.items() if k in ROPE_TENSORS and v is not None}
        return GGUFFile(meta, tensors)
    return read_gguf(source)


# ---------------------------------------------------------------------- llama.cpp's hyper-parameters
@dataclass(frozen=True)
class LlamaCppRope:
    """The RoPE hyper-parameters llama.cpp derives from a GGUF file (names as in llama_hparams / llama_cparams).

    ``freq_scale`` is 1/factor; ``ext_factor`` the share of YaRN's ramp mixed in; ``attn_factor`` the final
    cos/sin multiplier (everything llama.cpp multiplies in, the kernel's own YaRN term included); ``freq_factors``
    per-pair divisors or None.
    """

    arch: str
    head_dim: int
    n_rot: int
    freq_base: float
    scaling_type: str
    freq_scale: float
    n_ctx_train: int | None
    n_ctx_orig: int | None
    ext_factor: float
    beta_fast: float
    beta_slow: float
    attn_factor: float
    rope_freqs: tuple[float, ...] | None
    factors_long: tuple[float, ...] | None
    factors_short: tuple[float, ...] | None
    log_mul: float


def _key(meta: Mapping[str, Any], arch: str, suffix: str, default: Any = None) -> Any:
    value = meta.get(f"{arch}.{suffix}")
    return default if value is None else value


def llama_cpp_hparams(source: Any, *, swa: bool = False) -> LlamaCppRope:
    """What llama.cpp makes of ``source``'s RoPE metadata (full-attention layers, or ``swa`` ones).

    ``source``: a GGUF path, a ``GGUFFile`` or a metadata mapping. Raises ValueError naming the key at fault.
    """
    src = _source(source)
    meta = src.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError("general.architecture: missing from the GGUF metadata")
    heads = meta.get(f"{arch}.attention.head_count")
    if isinstance(heads, (list, tuple)):
        heads = max(heads)
    head_dim = meta.get(f"{arch}.attention.key_length")
    if head_dim is None:
        embed = meta.get(f"{arch}.embedding_length")
        if not embed or not heads:
            raise ValueError(f"{arch}.attention.head_count / {arch}.embedding_length: needed for the head size")
        head_dim = int(embed) // int(heads)
    n_rot = int(_key(meta, arch, "rope.dimension_count", head_dim))
    base = float(_key(meta, arch, "rope.freq_base", 10000.0))
    scaling = _key(meta, arch, "rope.scaling.type", None)
    if scaling is not None and scaling not in SCALING_TYPES:
        raise ValueError(f"{arch}.rope.scaling.type: {scaling!r} is not supported; accepted: "
                         f"{', '.join(SCALING_TYPES)}")
    factor = float(_key(meta, arch, "rope.scaling.factor", 0.0) or _key(meta, arch, "rope.scale_linear", 0.0) or 0.0)
    if scaling in ("linear", "yarn") and not factor:
        raise ValueError(f"{arch}.rope.scaling.factor: required for scaling type {scaling!r}")
    scaling = scaling or "linear"  # llama.cpp's default; without a factor it scales nothing
    if factor and factor < 0:
        raise ValueError(f"{arch}.rope.scaling.factor: must be > 0, got {factor}")
    freq_scale = 1.0 if (scaling == "none" or not factor) else 1.0 / factor
    context = meta.get(f"{arch}.context_length")
    context = int(context) if context else None
    original = _key(meta, arch, "rope.scaling.original_context_length", None)
    original = int(original) if original else context

    ext = float(_key(meta, arch, "rope.scaling.yarn_ext_factor", -1.0))
    if ext < 0:
        ext = 1.0 if scaling == "yarn" else 0.0
    beta_fast = float(_key(meta, arch, "rope.scaling.yarn_beta_fast", YARN_BETA_FAST))
    beta_slow = float(_key(meta, arch, "rope.scaling.yarn_beta_slow", YARN_BETA_SLOW))
    log_mul = float(_key(meta, arch, "rope.scaling.yarn_log_multiplier", 0.0))
    rope_attn = float(_key(meta, arch, "rope.scaling.attn_factor", 1.0))
    attn = float(_key(meta, arch, "rope.scaling.yarn_attn_factor", 1.0))
    if ext != 0:
        # llama-context.cpp replaces the attention factor by the YaRN one (the file's yarn_attn_factor is
        # discarded) and divides the kernel's own 1 + 0.1 ln s back out; what is left on cos/sin:
        s = 1.0 / freq_scale
        if log_mul != 0:
            mscale = log_mul if (arch == "deepseek2" and log_mul != 1.0) else 1.0
            attn = yarn_mscale(s, mscale) / yarn_mscale(s, log_mul)
        else:
            attn = yarn_mscale(s, 1.0)
    attn *= rope_attn

    if swa:
        n_rot = int(_key(meta, arch, "rope.dimension_count_swa", n_rot))
        fixed = SWA_FIXED_BASE.get(arch)
        base = float(_key(meta, arch, "rope.freq_base_swa", fixed if fixed is not None else base))
        if fixed is not None:
            freq_scale, ext, attn, scaling = 1.0, 0.0, 1.0, "none"

    pairs = n_rot // 2
    tensors = {}
    for name in ROPE_TENSORS:
        values = src.rope_tensors.get(name)
        if values is None:
            continue
        if len(values) != pairs:
            raise ValueError(f"{name}: needs rope.dimension_count/2 = {pairs} entries (one per pair), "
                             f"got {len(values)}")
        if any(not math.isfinite(v) or v <= 0 for v in values):
            raise ValueError(f"{name}: every entry must be a finite number > 0")
        tensors[name] = tuple(values)
    return LlamaCppRope(
        arch=arch, head_dim=int(head_dim), n_rot=n_rot, freq_base=base, scaling_type=scaling,
        freq_scale=freq_scale, n_ctx_train=context, n_ctx_orig=original, ext_factor=ext, beta_fast=beta_fast,
        beta_slow=beta_slow, attn_factor=attn, rope_freqs=None if swa else tensors.get(ROPE_FREQS),
        factors_long=None if swa else tensors.get(ROPE_FACTORS_LONG),
        factors_short=None if swa else tensors.get(ROPE_FACTORS_SHORT), log_mul=log_mul)


# ---------------------------------------------------------------------- GGUF -> RopeConfig fields
@dataclass(frozen=True)
class GGUFRope:
    """A GGUF file's RoPE, as ``RopeConfig`` keyword arguments (``RopeConfig(**rope.full)``; no ``layout``, which
    ``RopeConfig.from_gguf`` sets).

    Attributes:
        arch: ``general.architecture``.
        full: the RoPE of the full-attention layers (all layers when ``sliding`` is None).
        sliding: the sliding-window layers' RoPE where it differs from ``full``, else None.
        sections: M-RoPE's ``rope.dimension_sections`` (pairs per t/h/w/extra section), else None.
    """

    arch: str
    full: dict[str, Any]
    sliding: dict[str, Any] | None = None
    sections: tuple[int, ...] | None = None

    def per_layer_type(self) -> dict[str, dict[str, Any]]:
        """``{"full_attention": ..., ["sliding_attention": ...]}``, the names transformers' ``layer_types`` use."""
        out = {"full_attention": self.full}
        if self.sliding is not None:
            out["sliding_attention"] = self.sliding
        return out


def _close(a: float, b: float, rel: float = _REL_TOL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def read_rope(source: Any) -> GGUFRope:
    """The RoPE of a GGUF file (path, ``GGUFFile`` or metadata mapping) as llama.cpp runs it.

    Raises ValueError naming the key at fault, for what ropekit cannot express too (a fractional
    ``yarn_ext_factor``, per-pair divisors combined with YaRN, one base per layer). Unknown ``<arch>.rope.``
    keys warn once.
    """
    src = _source(source)
    meta = src.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError("general.architecture: missing from the GGUF metadata")
    known = set(ROPE_KEYS)
    for k in meta:
        if k.startswith(f"{arch}.rope.") and k[len(arch) + 6:] not in known:
            warn_once(f"gguf: unknown key {k!r} ignored")
    if _key(meta, arch, "rope.freq_base_per_layer") is not None:
        raise ValueError(f"{arch}.rope.freq_base_per_layer: one base per layer is not supported by ropekit")
    full = _to_fields(llama_cpp_hparams(src))
    sliding = None
    if meta.get(f"{arch}.attention.sliding_window"):
        swa = _to_fields(llama_cpp_hparams(src, swa=True))
        if swa != full:
            sliding = swa
    sections = _key(meta, arch, "rope.dimension_sections")
    if sections is not None:
        sections = tuple(int(s) for s in sections)
        if sum(sections) > full["rotary_dim"] // 2:
            raise ValueError(f"{arch}.rope.dimension_sections: {list(sections)} add up to more than the "
                             f"{full['rotary_dim'] // 2} rotary pairs")
    return GGUFRope(arch=arch, full=full, sliding=sliding, sections=sections)


def rope_fields(source: Any, *, layer_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """(architecture, RopeConfig keyword arguments) of a GGUF file: its only RoPE, or that of ``layer_type``
    ("full_attention" / "sliding_attention") when the sliding-window layers have their own (then required, as
    in ``RopeConfig.from_hf``). M-RoPE sections warn once (the text RoPE is read)."""
    rope = read_rope(source)
    if rope.sections is not None:
        warn_once(f"gguf: {rope.arch}.rope.dimension_sections {list(rope.sections)} (M-RoPE): read as the text "
                   f"RoPE (t = h = w positions, where M-RoPE is plain RoPE); ropekit.gguf.read_rope(...).sections "
                   f"keeps the sections")
    types = rope.per_layer_type()
    if layer_type is None:
        if rope.sliding is not None:
            raise ValueError(f"layer_type: this GGUF has one RoPE per layer type; pass one of: {', '.join(types)}")
        return rope.arch, dict(rope.full)
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type: {layer_type!r} not accepted; accepted: {', '.join(LAYER_TYPES)}")
    return rope.arch, dict(types.get(layer_type, rope.full))


def _to_fields(hp: LlamaCppRope) -> dict[str, Any]:
    """RopeConfig fields that rotate as llama.cpp does with ``hp`` (frequencies and the cos/sin multiplier)."""
    arch = hp.arch
    kwargs: dict[str, Any] = {"head_dim": hp.head_dim, "rotary_dim": hp.n_rot, "base": hp.freq_base}
    s = 1.0 / hp.freq_scale
    original, context = hp.n_ctx_orig, hp.n_ctx_train
    if hp.ext_factor not in (0.0, 1.0):
        raise ValueError(f"{arch}.rope.scaling.yarn_ext_factor: {hp.ext_factor:g} mixes YaRN's ramp in part; "
                         f"ropekit expresses 0 (no ramp) and 1 (YaRN)")
    yarn = hp.ext_factor == 1.0 and s > 1.0

    def done(method: str, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        fields = {**kwargs, "method": method, **params}
        if method == "default":
            fields["original_max_position"] = context
            fields["max_position"] = context
        else:
            fields.setdefault("original_max_position", original)
            trained = fields["original_max_position"]
            target = fields.get("factor") and trained and round(fields["factor"] * trained)
            fields["max_position"] = max(x for x in (context, target, trained, 1) if x)
        return fields

    if hp.factors_long is not None or hp.factors_short is not None:
        if hp.factors_long is None or hp.factors_short is None:
            missing = ROPE_FACTORS_SHORT if hp.factors_short is None else ROPE_FACTORS_LONG
            raise ValueError(f"{missing}: missing; LongRoPE needs both rope_factors_long and rope_factors_short")
        if yarn:
            raise ValueError(f"{arch}.rope.scaling.type: yarn on top of rope_factors_long/short is not supported")
        if not original:
            raise ValueError(f"{arch}.rope.scaling.original_context_length: needed for LongRoPE factors")
        # A linear factor (freq_scale) divides on top of the per-pair factors.
        long = tuple(v * s for v in hp.factors_long)
        short = tuple(v * s for v in hp.factors_short)
        lr_factor = context / original if context and context > original else None
        default_scale = _longrope_default_scale(lr_factor, original)
        return done("longrope", short_factor=short, long_factor=long, factor=lr_factor,
                    attention_factor=None if _close(hp.attn_factor, default_scale) else hp.attn_factor)

    if hp.rope_freqs is not None:
        if yarn:
            raise ValueError(f"{arch}.rope.scaling.type: yarn on top of the rope_freqs tensor (per-pair divisors) "
                             f"is not supported")
        divisors = tuple(v * s for v in hp.rope_freqs)
        return _from_divisors(divisors, hp, done)

    if yarn:
        if not original:
            raise ValueError(f"{arch}.rope.scaling.original_context_length / {arch}.context_length: YaRN needs "
                             f"the original length")
        derived = yarn_mscale(s, 1.0)
        return done("yarn", factor=s,
                    beta_fast=None if hp.beta_fast == YARN_BETA_FAST else hp.beta_fast,
                    beta_slow=None if hp.beta_slow == YARN_BETA_SLOW else hp.beta_slow,
                    attention_factor=None if _close(hp.attn_factor, derived) else hp.attn_factor)
    return _from_divisors((s,) * (hp.n_rot // 2), hp, done)


def _longrope_default_scale(factor: float | None, original: int | None) -> float:
    if not factor or factor <= 1.0 or not original:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def _from_divisors(divisors: tuple[float, ...], hp: LlamaCppRope, done) -> dict[str, Any]:
    """Per-pair divisors (and hp's attention factor) as plain RoPE, linear, llama3 or, exactly, longrope."""
    first = divisors[0]
    uniform = all(_close(v, first) for v in divisors)
    if uniform and _close(hp.attn_factor, 1.0):
        if _close(first, 1.0):
            return done("default")
        if first > 1.0:
            return done("linear", factor=first)
    if _close(hp.attn_factor, 1.0):
        llama3 = _llama3_params(hp.freq_base, hp.n_rot, divisors, hp.n_ctx_orig if _has_original(hp) else None)
        if llama3 is not None:
            return done("llama3", **llama3)
    if not hp.n_ctx_orig:
        raise ValueError(f"{hp.arch}.context_length: needed to describe per-pair rope factors")
    # Any other static divisors: LongRoPE with one set of factors is the same rotation at every length.
    return done("longrope", short_factor=divisors, long_factor=divisors, attention_factor=hp.attn_factor)


def _has_original(hp: LlamaCppRope) -> bool:
    return hp.n_ctx_orig is not None and hp.n_ctx_orig != hp.n_ctx_train


def _llama3_params(base: float, n_rot: int, divisors: tuple[float, ...],
                   original: int | None) -> dict[str, Any] | None:
    """(factor, original length, low/high frequency factors) of Llama 3 scaling that gives ``divisors``, or None.

    convert_hf_to_gguf.py writes 1 for fast pairs, s for slow ones and 1 / ((1 - t)/s + t) between, with
    t = (L / wavelength - low) / (high - low). The blend is linear in 1/wavelength, so two blended pairs fix
    L/(high - low) and low/(high - low); with the trained length L unknown (Llama 3.1 files do not store it),
    low = 1 (Llama 3.1's) fixes the rest: the rotation depends on L/low and L/high only.
    """
    import numpy as np

    ff = np.asarray(divisors, dtype=np.float64)
    s = float(ff.max())
    if s <= 1.0 + 1e-6 or ff.min() < 1.0 - 1e-6:
        return None
    inv = default_inv_freq(base, n_rot).numpy()
    wavelength = 2 * math.pi / inv
    smooth = (1.0 / ff - 1.0 / s) / (1.0 - 1.0 / s)
    blended = (ff > 1.0 + 1e-5) & (ff < s * (1.0 - 1e-5))
    candidates: list[tuple[int, float, float]] = []
    if blended.sum() >= 2:
        slope, intercept = np.polyfit(1.0 / wavelength[blended], smooth[blended], 1)
        a, b = float(slope), float(-intercept)
        if a > 0:
            lengths = [original] if original else ([round(a / b)] if b > 0 else [])
            for length in lengths:
                span = length / a
                low = b * span
                candidates.append((int(length), low, low + span))
    else:
        # No blended pair: Llama 4's low == high (the band is one wavelength, L / low), or a band no pair falls in.
        if original:
            candidates += [(int(original), 1.0, 1.0), (int(original), 1.0, 4.0)]
        else:
            fast, slow = wavelength[ff <= 1.0 + 1e-5], wavelength[ff >= s * (1.0 - 1e-5)]
            below = float(fast.max()) if fast.size else 0.0
            above = float(slow.min()) if slow.size else math.inf
            length = 2 ** math.ceil(math.log2(max(below, 1.0)))  # trained lengths are powers of two
            length = length * 2 if length <= below else length
            if length < above:
                candidates.append((length, 1.0, 1.0))
    for length, low, high in candidates:
        if not (length >= 1 and high >= low > 0):
            continue
        for lo, hi in ((round(low, 4), round(high, 4)), (low, high)):
            if not hi >= lo > 0:
                continue
            # The llama3 method reads these fields only (a RopeConfig would import ropekit.config, which imports us).
            cfg = SimpleNamespace(base=base, rotary_dim=n_rot, factor=s, original_max_position=length,
                                  low_freq_factor=lo, high_freq_factor=hi)
            got = get_method("llama3").compute(cfg, None)[0].numpy()
            if np.allclose(got, inv / ff, rtol=1e-5, atol=0):
                return {"factor": s, "original_max_position": length,
                        "low_freq_factor": None if lo == 1.0 else lo, "high_freq_factor": None if hi == 4.0 else hi}
    return None


# ---------------------------------------------------------------------- RopeConfig -> GGUF
@dataclass(frozen=True)
class RopePlan:
    """The changes that give a GGUF file a new RoPE.

    Attributes:
        set_keys: ``{key: (value, GGUF value type name)}`` to set (kept in place when the key exists).
        remove_keys: keys to drop (old scaling keys).
        set_tensors: ``{tensor name: float32 values}`` to write (added, or replacing the file's).
        remove_tensors: RoPE tensors to drop.
        serve_flags: llama.cpp flags needed besides the file (``--yarn-beta-fast 16`` where llama.cpp does not
            read the key for this architecture), as a list of strings.
        context_length: the context to serve it with (``-c``).
    """

    set_keys: dict[str, tuple[Any, str]]
    remove_keys: frozenset[str]
    set_tensors: dict[str, tuple[float, ...]]
    remove_tensors: frozenset[str]
    serve_flags: tuple[str, ...] = ()
    context_length: int | None = None


def _arch_tensors(arch: str) -> set[str]:
    """GGUF tensor base names llama.cpp may find in ``arch`` files (gguf-py's per-architecture list)."""
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    for key, name in MODEL_ARCH_NAMES.items():
        if name == arch:
            return {TENSOR_NAMES[t] for t in MODEL_TENSORS.get(key, [])}
    return set()


def rope_plan(cfg: RopeConfig, source: Any) -> RopePlan:
    """How to write ``cfg`` into the GGUF ``source`` (path, ``GGUFFile`` or metadata mapping) for llama.cpp.

    Checks everything that can be checked without touching a tensor: the geometry matches the file's, llama.cpp
    can express the method, the architecture takes the factor tensors. Raises ValueError (one line, starting
    with the field or ``method:``) otherwise.
    """
    if not all(hasattr(cfg, name) for name in ("method", "head_dim", "rotary_dim", "base", "target_length")):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    src = _source(source)
    meta = src.metadata
    hp = llama_cpp_hparams(src)
    arch = hp.arch
    for name, mine, theirs in (("head_dim", cfg.head_dim, hp.head_dim), ("rotary_dim", cfg.rotary_dim, hp.n_rot)):
        if mine != theirs:
            raise ValueError(f"cfg.{name}: the GGUF file has {theirs}, the RopeConfig says {mine}")
    if hp.log_mul:
        raise ValueError(f"{arch}.rope.scaling.yarn_log_multiplier: the file's attention uses DeepSeek-style YaRN "
                         f"scaling (MLA); exporting another RoPE into it is not supported")
    window = meta.get(f"{arch}.attention.sliding_window")
    if window and (arch in SWA_FIXED_BASE or _key(meta, arch, "rope.freq_base_swa") is not None) and cfg.is_scaled:
        raise ValueError(f"{arch}: its sliding-window layers have a RoPE of their own, which the GGUF export "
                         f"does not write; only the plain RoPE can be exported for this file")
    spec = get_method(cfg.method)
    if spec.length_dependent and cfg.method != "longrope":
        raise ValueError(f"method: llama.cpp has no {cfg.method!r} (its RoPE does not change with the sequence "
                         f"length); export one of: {', '.join(gguf_exportable_methods())}")
    if cfg.method == "longrope" and cfg.n_hat:
        raise ValueError("n_hat: llama.cpp rotates every position with the LongRoPE factors; set n_hat=0")
    if cfg.method == "yarn" and cfg.truncate is False:
        raise ValueError("truncate: llama.cpp always rounds YaRN's ramp bounds to whole pairs (floor/ceil); "
                         "set truncate=true")

    prefix = f"{arch}.rope."
    scaling_keys = {k for k in meta if k.startswith(prefix + "scaling.") or k == prefix + "scale_linear"}
    set_keys: dict[str, tuple[Any, str]] = {}
    set_tensors: dict[str, tuple[float, ...]] = {}
    flags: list[str] = []
    tensor_names = _arch_tensors(arch)
    target = cfg.target_length
    original = cfg.trained_length
    base = cfg.base

    def attn_key(value: float, relative_to: float = 1.0) -> None:
        ratio = value / relative_to
        if not _close(ratio, 1.0, 1e-7):
            set_keys[prefix + "scaling.attn_factor"] = (ratio, "FLOAT32")

    freqs = _frequencies(cfg)
    if cfg.method == "default":
        attn_key(freqs.attention_scale)
    elif cfg.method in ("ntk", "base") and _is_plain(cfg, freqs):
        base = cfg.new_base if cfg.method == "base" else _ntk_base(cfg)
    elif cfg.method == "linear":
        set_keys[prefix + "scaling.type"] = ("linear", "STRING")
        set_keys[prefix + "scaling.factor"] = (float(cfg.factor), "FLOAT32")
        if original:
            set_keys[prefix + "scaling.original_context_length"] = (int(original), "UINT32")
        attn_key(freqs.attention_scale)
    elif cfg.method == "yarn":
        s = float(cfg.factor)
        set_keys[prefix + "scaling.type"] = ("yarn", "STRING")
        set_keys[prefix + "scaling.factor"] = (s, "FLOAT32")
        set_keys[prefix + "scaling.original_context_length"] = (int(cfg.original_max_position), "UINT32")
        for key, value, default, flag in (("yarn_beta_fast", cfg.beta_fast, YARN_BETA_FAST, "--yarn-beta-fast"),
                                          ("yarn_beta_slow", cfg.beta_slow, YARN_BETA_SLOW, "--yarn-beta-slow")):
            if value is not None and value != default:
                # convert_hf_to_gguf.py writes the key; llama.cpp reads it for a few architectures only.
                set_keys[prefix + "scaling." + key] = (float(value), "FLOAT32")
                flags += [flag, f"{value:g}"]
        attn_key(freqs.attention_scale, yarn_mscale(s, 1.0))
    elif cfg.method == "longrope":
        if not (tensor_names & {"rope_factors_long", "rope_factors_short"} or arch in LONGROPE_ARCHS_EXTRA):
            raise ValueError(f"method: llama.cpp's {arch!r} models take no rope_factors_long/short tensors, so "
                             f"LongRoPE cannot be exported for them")
        set_keys[prefix + "scaling.type"] = ("longrope", "STRING")
        set_keys[prefix + "scaling.original_context_length"] = (int(cfg.original_max_position), "UINT32")
        set_keys[prefix + "scaling.attn_factor"] = (float(freqs.attention_scale), "FLOAT32")
        set_tensors[ROPE_FACTORS_LONG] = tuple(cfg.long_factor)
        set_tensors[ROPE_FACTORS_SHORT] = tuple(cfg.short_factor)
    elif not spec.length_dependent and freqs.unscaled_until == 0:
        # llama3, and any other static method: per-pair divisors of the plain frequencies, as
        # convert_hf_to_gguf.py writes Llama 3.1's rope_freqs, and the cos/sin multiplier.
        if "rope_freqs" not in tensor_names:
            raise ValueError(f"method: llama.cpp's {arch!r} models take no rope_freqs tensor, so {cfg.method!r} "
                             f"cannot be exported for them")
        plain = default_inv_freq(cfg.base, cfg.rotary_dim)
        divisors = (plain / freqs.inv_freq64).tolist()
        set_tensors[ROPE_FREQS] = tuple(divisors)
        if original and cfg.method == "llama3":
            set_keys[prefix + "scaling.original_context_length"] = (int(original), "UINT32")
        attn_key(freqs.attention_scale)
    else:
        raise ValueError(f"method: llama.cpp cannot express {cfg.method!r}; export one of: "
                         f"{', '.join(gguf_exportable_methods())}")
    set_keys[prefix + "freq_base"] = (float(base), "FLOAT32")
    if target:
        set_keys[f"{arch}.context_length"] = (int(target), "UINT32")
    remove_keys = frozenset(k for k in scaling_keys if k not in set_keys)
    remove_tensors = frozenset(n for n in ROPE_TENSORS if n in src.rope_tensors and n not in set_tensors)
    return RopePlan(set_keys=set_keys, remove_keys=remove_keys, set_tensors=set_tensors,
                    remove_tensors=remove_tensors, serve_flags=tuple(flags), context_length=target)


def _frequencies(cfg: RopeConfig):
    from ropekit.methods import frequencies

    return frequencies(cfg)


def _ntk_base(cfg: RopeConfig) -> float:
    from ropekit.methods.ntk import ntk_base

    return ntk_base(cfg.base, cfg.factor, cfg.rotary_dim)


def _is_plain(cfg: RopeConfig, freqs) -> bool:
    return _close(freqs.attention_scale, 1.0)


def gguf_exportable_methods() -> list[str]:
    """Methods ``rope_plan`` can write (llama.cpp has no length-dependent scaling but LongRoPE's)."""
    return [m for m in method_names() if not get_method(m).length_dependent or m == "longrope"]


def serve_command(path: str | Path, plan: RopePlan) -> str:
    """The llama.cpp command that serves the written file at its new length."""
    parts = ["llama-server", "-m", str(path)]
    if plan.context_length:
        parts += ["-c", str(plan.context_length)]
    parts += list(plan.serve_flags)
    return " ".join(parts)


# ---------------------------------------------------------------------- writing
def write_gguf(source: str | Path, plan: RopePlan, out_path: str | Path) -> Path:
    """Write ``source`` with ``plan`` applied to ``out_path`` (the caller makes it atomic; see
    ``ropekit.hf.export_gguf``). Every other key and every tensor's bytes are copied unchanged, in order."""
    import numpy as np
    from gguf import GGUFReader, GGUFWriter
    from gguf.constants import GGMLQuantizationType, GGUFValueType, Keys

    reader = GGUFReader(str(source))
    arch_field = reader.get_field(Keys.General.ARCHITECTURE)
    arch = arch_field.contents() if arch_field is not None else None
    if not arch:
        raise ValueError("general.architecture: missing from the GGUF metadata")
    writer = GGUFWriter(str(out_path), arch=arch, endianess=reader.endianess)
    writer.data_alignment = reader.alignment
    pending = dict(plan.set_keys)
    for name, fld in reader.fields.items():
        if name == Keys.General.ARCHITECTURE or name.startswith("GGUF.") or name in plan.remove_keys:
            continue
        kind = fld.types[0]
        sub = fld.types[-1] if kind == GGUFValueType.ARRAY else None
        if name in pending:
            value, _ = pending.pop(name)
            if kind == GGUFValueType.STRING or isinstance(value, str):
                kind = GGUFValueType.STRING
            writer.add_key_value(name, value, kind)
            continue
        writer.add_key_value(name, fld.contents(), kind, sub_type=sub)
    for name, (value, kind) in pending.items():
        writer.add_key_value(name, value, GGUFValueType[kind])

    new_tensors = {name: np.asarray(values, dtype=np.float32) for name, values in plan.set_tensors.items()}
    kept = [t for t in reader.tensors if t.name not in plan.remove_tensors and t.name not in new_tensors]
    # convert_hf_to_gguf.py puts the RoPE factor tensors first; llama.cpp finds tensors by name.
    for name, data in new_tensors.items():
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes, GGMLQuantizationType.F32)
    for tensor in kept:
        writer.add_tensor_info(tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes,
                               tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for data in new_tensors.values():
        writer.write_tensor_data(data)
    for tensor in kept:
        writer.write_tensor_data(tensor.data, tensor_endianess=reader.endianess)
    writer.close()
    return Path(out_path)
