"""Llama 3.1 scaling (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783; transformers' ``llama3``).

With wavelength lambda_i = 2 pi / inv_freq_i, trained length L, factor s, low/high frequency factors a/b:

    lambda_i < L / b:   unchanged
    lambda_i > L / a:   inv_freq_i / s
    otherwise:          (1 - t) inv_freq_i / s + t inv_freq_i,  t = (L / lambda_i - a) / (b - a)

Attention scale 1. Llama 3.1: s = 8, a = 1, b = 4, L = 8192; Llama 3.2 uses s = 32.
"""

import math

import torch

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import MethodSpec, register


def compute(cfg, seq_len=None):
    inv = default_inv_freq(cfg.base, cfg.rotary_dim)
    low = 1.0 if cfg.low_freq_factor is None else cfg.low_freq_factor
    high = 4.0 if cfg.high_freq_factor is None else cfg.high_freq_factor
    length = cfg.original_max_position
    wavelength = 2 * math.pi / inv
    smooth = (length / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv / cfg.factor + smooth * inv
    out = torch.where(wavelength > length / low, inv / cfg.factor, inv)
    medium = (wavelength >= length / high) & (wavelength <= length / low)
    return torch.where(medium, blended, out), 1.0


SPEC = register(
    MethodSpec(
        "llama3",
        compute,
        required=("factor", "original_max_position"),
        accepted=("low_freq_factor", "high_freq_factor"),
        hf_type="llama3",
        summary="Llama 3.1: keep fast pairs, divide slow pairs by s, blend between",
    )
)
