"""Fixed NTK-aware scaling (bloc97, 2023; discussed in YaRN, arXiv 2309.00071 section 3.1).

    base' = base * s^(d / (d - 2)),  inv_freq'_i = base'^(-2i/d)

The fastest pair keeps its speed and the slowest is slowed by exactly s. Attention scale 1.
transformers expresses it as plain RoPE with the new ``rope_theta``.
"""

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import MethodSpec, register


def ntk_base(base: float, factor: float, rotary_dim: int) -> float:
    """The NTK-aware base b * s^(d/(d-2))."""
    return float(base) * float(factor) ** (rotary_dim / (rotary_dim - 2))


def compute(cfg, seq_len=None):
    return default_inv_freq(ntk_base(cfg.base, cfg.factor, cfg.rotary_dim), cfg.rotary_dim), 1.0


SPEC = register(
    MethodSpec("ntk", compute, required=("factor",), summary="fixed NTK-aware base change b * s^(d/(d-2))")
)
