"""Fixed NTK-aware scaling (bloc97, 2023; discussed in YaRN, arXiv 2309.00071 section 3.1).

    base' = base * s^(d / (d - 2)),  inv_freq'_i = base'^(-2i/d)

The fastest pair keeps its speed and the slowest is slowed by exactly s. Attention scale 1.
transformers expresses it as plain RoPE with the new ``rope_theta``.
"""

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import FACTOR, GGUFExport, MethodSpec, register


def ntk_base(base: float, factor: float, rotary_dim: int) -> float:
    """The NTK-aware base b * s^(d/(d-2))."""
    return float(base) * float(factor) ** (rotary_dim / (rotary_dim - 2))


def compute(cfg, seq_len=None):
    return default_inv_freq(ntk_base(cfg.base, cfg.factor, cfg.rotary_dim), cfg.rotary_dim), 1.0


def check_rotary_dim(cfg) -> None:
    """The base grows as s^(d/(d-2)): d = 2 divides by zero (shared with ``dynamic``)."""
    if cfg.rotary_dim < 4:
        raise ValueError(f"rotary_dim: method {cfg.method!r} needs rotary_dim >= 4 (its base grows as "
                         f"s^(d/(d-2))), got {cfg.rotary_dim}")


def to_hf(cfg) -> dict:
    # transformers has no fixed NTK type, but plain RoPE with the NTK base is the same rotation.
    return {"rope_type": "default", "rope_theta": ntk_base(cfg.base, cfg.factor, cfg.rotary_dim)}


def to_gguf(cfg, freqs) -> GGUFExport:
    # llama.cpp has no NTK type either: plain RoPE at the NTK base.
    return GGUFExport(freq_base=ntk_base(cfg.base, cfg.factor, cfg.rotary_dim))


SPEC = register(
    MethodSpec("ntk", compute, params=(FACTOR,), required=("factor",), to_hf=to_hf, to_gguf=to_gguf,
               check=check_rotary_dim,
               describe=lambda cfg: f"base -> {ntk_base(cfg.base, cfg.factor, cfg.rotary_dim):.4g}",
               summary="fixed NTK-aware base change b * s^(d/(d-2))")
)
