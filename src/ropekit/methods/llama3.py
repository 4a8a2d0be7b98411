"""Llama 3.1 scaling (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783; transformers' ``llama3``).

With wavelength lambda_i = 2 pi / inv_freq_i, trained length L, factor s, low/high frequency factors a/b:

    lambda_i < L / b:   unchanged
    lambda_i > L / a:   inv_freq_i / s
    otherwise:          (1 - t) inv_freq_i / s + t inv_freq_i,  t = (L / lambda_i - a) / (b - a)

Attention scale 1. Llama 3.1: s = 8, a = 1, b = 4, L = 8192; Llama 3.2 uses s = 32. Llama 4 sets a = b = 1: no
blend band, every pair with wavelength > L divided by s, the others kept.
"""

import math

import torch

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import FACTOR, ORIGINAL_MAX_POSITION, MethodSpec, Param, register

LOW_FREQ_FACTOR = Param("low_freq_factor", "float", "pairs with wavelength > L / low_freq_factor are divided by s",
                        default=1.0, minimum=0.0, exclusive=True, hf_key="low_freq_factor")
HIGH_FREQ_FACTOR = Param("high_freq_factor", "float", "pairs with wavelength < L / high_freq_factor keep their speed",
                         default=4.0, minimum=0.0, exclusive=True, hf_key="high_freq_factor")


def compute(cfg, seq_len=None):
    inv = default_inv_freq(cfg.base, cfg.rotary_dim)
    low, high = _low_high(cfg)
    length = cfg.original_max_position
    wavelength = 2 * math.pi / inv
    # low == high (Llama 4): the blend band is the single wavelength L / low; a pair exactly there keeps
    # inv / s (transformers would give NaN there; no real base hits it exactly).
    smooth = (length / wavelength - low) / (high - low) if high > low else torch.zeros_like(inv)
    blended = (1 - smooth) * inv / cfg.factor + smooth * inv
    out = torch.where(wavelength > length / low, inv / cfg.factor, inv)
    medium = (wavelength >= length / high) & (wavelength <= length / low)
    return torch.where(medium, blended, out), 1.0


def _low_high(cfg) -> tuple[float, float]:
    low = LOW_FREQ_FACTOR.default if cfg.low_freq_factor is None else cfg.low_freq_factor
    high = HIGH_FREQ_FACTOR.default if cfg.high_freq_factor is None else cfg.high_freq_factor
    return low, high


def check(cfg) -> None:
    low, high = _low_high(cfg)
    if high < low:
        raise ValueError(f"high_freq_factor: must be >= low_freq_factor ({low}), got {high}")


SPEC = register(
    MethodSpec(
        "llama3",
        compute,
        params=(FACTOR, ORIGINAL_MAX_POSITION, LOW_FREQ_FACTOR, HIGH_FREQ_FACTOR),
        required=("factor", "original_max_position"),
        hf_type="llama3",
        hf_defaults=("low_freq_factor", "high_freq_factor"),  # transformers requires both
        check=check,
        describe=lambda cfg: "fast pairs kept, slow pairs / s, blend between",
        summary="Llama 3.1: keep fast pairs, divide slow pairs by s, blend between",
    )
)
