"""Proportional RoPE (Gemma 4's global layers; transformers' ``proportional``).

Only the first ``rotated_fraction`` of the pairs rotate, but with the exponents of the full head:

    inv_freq_i = base^(-2i / d) / s    for i < floor(rotated_fraction * d / 2)
    inv_freq_i = 0                     for the other pairs (they pass through unrotated)

with d = rotary_dim (the whole head: the pairs are (i, i + d/2) over all of it, unlike partial rotary, which
rotates the first channels only). Attention scale 1. Extending such a RoPE with another method would start
rotating the still pairs, so ``RopeConfig.extend`` keeps it to ``proportional`` (its ``factor``).
"""

import math

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import FACTOR, MethodSpec, Param, register

ROTATED_FRACTION = Param("rotated_fraction", "float",
                         "share of the pairs that rotate; the rest have frequency 0 (transformers' "
                         "partial_rotary_factor under proportional RoPE)", default=1.0, minimum=0.0, exclusive=True)


def rotated_pairs(cfg) -> int:
    fraction = 1.0 if cfg.rotated_fraction is None else cfg.rotated_fraction
    return int(fraction * cfg.rotary_dim // 2)


def compute(cfg, seq_len=None):
    inv = default_inv_freq(cfg.base, cfg.rotary_dim)
    inv[rotated_pairs(cfg):] = 0.0
    return inv / (cfg.factor or 1.0), 1.0


def check(cfg) -> None:
    fraction = 1.0 if cfg.rotated_fraction is None else cfg.rotated_fraction
    if fraction > 1.0 or not math.isfinite(fraction):
        raise ValueError(f"rotated_fraction: must be in (0, 1], got {fraction}")


def check_extend(cfg, method: str) -> None:
    """Another method would start rotating the still pairs: a proportional RoPE extends only as itself."""
    if (cfg.rotated_fraction or 1.0) < 1.0:
        raise ValueError(f"method: this RoPE is proportional (only part of its pairs rotate); {method!r} would "
                         f"rotate the others too; extend it with 'proportional' (its factor)")


def to_hf(cfg) -> dict:
    out = {"rope_type": "proportional", "rope_theta": cfg.base}
    if cfg.factor is not None and cfg.factor != 1.0:
        out["factor"] = cfg.factor
    if cfg.rotated_fraction is not None and cfg.rotated_fraction != 1.0:
        out["partial_rotary_factor"] = cfg.rotated_fraction
    return out


SPEC = register(
    MethodSpec(
        "proportional",
        compute,
        params=(FACTOR, ROTATED_FRACTION),
        to_hf=to_hf,
        hf_partial_rotary="rotated_fraction",
        check=check,
        check_extend=check_extend,
        comparable=False,
        describe=lambda cfg: f"{rotated_pairs(cfg)} of {cfg.rotary_dim // 2} pairs rotate (proportional)",
        summary="Gemma 4 proportional RoPE: the first pairs rotate at full-head exponents, the rest stay still",
    )
)
