"""``RopeConfig`` -> GGUF: the keys and factor tensors that give a GGUF file a new RoPE (``rope_plan``), as
``convert_hf_to_gguf.py`` writes the same transformers ``rope_parameters``; what llama.cpp cannot express is
refused here, before any work. ``write_gguf`` applies a plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ropekit.gguf.read import ROPE_TENSORS, SWA_FIXED_BASE, _key, _source, llama_cpp_hparams
from ropekit.gguf.to_config import _close
from ropekit.methods import GGUFExport, get_method, method_names
from ropekit.methods._common import default_inv_freq

if TYPE_CHECKING:  # pragma: no cover
    from ropekit.config import RopeConfig

# llama.cpp's "llama" loader reads rope_factors_long/short when rope.scaling.type is longrope (llama-model.cpp);
# gguf-py's per-architecture tensor lists do not say so.
LONGROPE_ARCHS_EXTRA = {"llama"}
# Keys convert_hf_to_gguf.py writes but llama.cpp reads for a few architectures only: the flag that sets each when
# serving (``RopePlan.serve_flags``).
SERVE_FLAGS = {"scaling.yarn_beta_fast": "--yarn-beta-fast", "scaling.yarn_beta_slow": "--yarn-beta-slow"}


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
    if spec.length_dependent and spec.to_gguf is None:
        raise ValueError(f"method: llama.cpp has no {cfg.method!r} (its RoPE does not change with the sequence "
                         f"length); export one of: {', '.join(gguf_exportable_methods())}")

    prefix = f"{arch}.rope."
    scaling_keys = {k for k in meta if k.startswith(prefix + "scaling.") or k == prefix + "scale_linear"}
    set_keys: dict[str, tuple[Any, str]] = {}
    set_tensors: dict[str, tuple[float, ...]] = {}
    flags: list[str] = []
    tensor_names = _arch_tensors(arch)
    target = cfg.target_length

    freqs = _frequencies(cfg)
    if spec.to_gguf is not None:
        export = spec.to_gguf(cfg, freqs)  # the method's own mapping (raises for what llama.cpp cannot express)
    elif not spec.length_dependent and freqs.unscaled_until == 0:
        # Any other static method: per-pair divisors of the plain frequencies, as convert_hf_to_gguf.py writes
        # Llama 3.1's rope_freqs, and the cos/sin multiplier.
        plain = default_inv_freq(cfg.base, cfg.rotary_dim)
        export = GGUFExport(tensors={"rope_freqs": tuple((plain / freqs.inv_freq64).tolist())})
    else:
        raise ValueError(f"method: llama.cpp cannot express {cfg.method!r}; export one of: "
                         f"{', '.join(gguf_exportable_methods())}")
    if {"rope_factors_long", "rope_factors_short"} & set(export.tensors) and not (
            tensor_names & {"rope_factors_long", "rope_factors_short"} or arch in LONGROPE_ARCHS_EXTRA):
        raise ValueError(f"method: llama.cpp's {arch!r} models take no rope_factors_long/short tensors, so "
                         f"LongRoPE cannot be exported for them")
    if "rope_freqs" in export.tensors and "rope_freqs" not in tensor_names:
        raise ValueError(f"method: llama.cpp's {arch!r} models take no rope_freqs tensor, so {cfg.method!r} "
                         f"cannot be exported for them")
    if spec.gguf_type not in (None, "none"):
        set_keys[prefix + "scaling.type"] = (spec.gguf_type, "STRING")
    for key, value in export.keys.items():
        kind = "STRING" if isinstance(value, str) else "UINT32" if isinstance(value, int) else "FLOAT32"
        set_keys[prefix + key] = (value, kind)
        if key in SERVE_FLAGS:
            flags += [SERVE_FLAGS[key], f"{value:g}"]
    ratio = freqs.attention_scale / export.attention_relative_to
    if "scaling.attn_factor" not in export.keys and not _close(ratio, 1.0, 1e-7):
        set_keys[prefix + "scaling.attn_factor"] = (ratio, "FLOAT32")
    for name, values in export.tensors.items():
        set_tensors[f"{name}.weight"] = tuple(values)
    base = cfg.base if export.freq_base is None else export.freq_base
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


def gguf_exportable_methods() -> list[str]:
    """Methods ``rope_plan`` can write (llama.cpp has no length-dependent scaling but those with a ``to_gguf``:
    LongRoPE's)."""
    return [m for m in method_names() if not get_method(m).length_dependent or get_method(m).to_gguf is not None]


def serve_command(path: str | Path, plan: RopePlan) -> str:
    """The llama.cpp command that serves the written file at its new length."""
    parts = ["llama-server", "-m", str(path)]
    if plan.context_length:
        parts += ["-c", str(plan.context_length)]
    parts += list(plan.serve_flags)
    return " ".join(parts)
