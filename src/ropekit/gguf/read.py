"""Reading a GGUF file: its metadata and RoPE tensors (``read_gguf``, cached), and the RoPE hyper-parameters
llama.cpp derives from them (``llama_cpp_hparams``), key by key as ``llama-model.cpp`` / ``llama-context.cpp`` do.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropekit.methods._common import BETA_FAST, BETA_SLOW, yarn_mscale
from ropekit.warn import warn_once

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
# llama.cpp's own defaults for the YaRN ramp: YaRN's (one home: ``ropekit.methods._common``).
YARN_BETA_FAST = BETA_FAST.default
YARN_BETA_SLOW = BETA_SLOW.default
# Architectures whose llama.cpp loader reads the YaRN ramp keys below from the file (llama-model.cpp: grok's
# and laguna's hparams read yarn_ext_factor / yarn_beta_fast / yarn_beta_slow; mistral3's read the betas its
# converter writes). Every other architecture runs llama.cpp's defaults (ext_factor from the scaling type,
# betas 32 / 1) whatever the file says: convert_hf_to_gguf.py writes them for any YaRN model.
YARN_KEY_ARCHS = frozenset({"grok", "laguna", "mistral3"})
YARN_ARCH_KEYS = ("scaling.yarn_ext_factor", "scaling.yarn_beta_fast", "scaling.yarn_beta_slow")


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



def read_gguf_metadata(path: Any) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file as ``{key: value}`` (arrays of numbers as lists), cached
    as ``read_gguf`` is (which also keeps the RoPE factor tensors)."""
    return dict(read_gguf(path).metadata)


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


def _first_set(value: Any, default: Any) -> Any:
    return default if value is None else value


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

    yarn_keys = {suffix: _key(meta, arch, f"rope.{suffix}") for suffix in YARN_ARCH_KEYS}
    if arch not in YARN_KEY_ARCHS:
        ignored = [f"{arch}.rope.{suffix} = {value}" for suffix, value in yarn_keys.items() if value is not None]
        if ignored:
            warn_once(f"gguf: {', '.join(ignored)} ignored: llama.cpp reads these keys only for "
                      f"{', '.join(sorted(YARN_KEY_ARCHS))} architectures and runs its defaults here (ext_factor "
                      f"from the scaling type, beta_fast {YARN_BETA_FAST:g}, beta_slow {YARN_BETA_SLOW:g}); "
                      f"read as llama.cpp runs the file (llama.cpp's --yarn-* flags set them when serving)")
        yarn_keys = dict.fromkeys(YARN_ARCH_KEYS)
    ext = float(_first_set(yarn_keys["scaling.yarn_ext_factor"], -1.0))
    if ext < 0:
        ext = 1.0 if scaling == "yarn" else 0.0
    beta_fast = float(_first_set(yarn_keys["scaling.yarn_beta_fast"], YARN_BETA_FAST))
    beta_slow = float(_first_set(yarn_keys["scaling.yarn_beta_slow"], YARN_BETA_SLOW))
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
