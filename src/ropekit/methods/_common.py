"""Shared float64 maths for the scaling methods, and YaRN's ramp parameters, whose defaults that maths uses
(their one home: ``ropekit.methods.yarn`` and the GGUF reader import them from here)."""

from __future__ import annotations

import math

import torch

from ropekit.methods.registry import Param

BETA_FAST = Param("beta_fast", "float", "ramp starts at pairs turning this often in the trained length",
                  default=32.0, minimum=0.0, exclusive=True, hf_key="beta_fast", gguf_key="scaling.yarn_beta_fast")
BETA_SLOW = Param("beta_slow", "float", "ramp ends at pairs turning this often in the trained length",
                  default=1.0, minimum=0.0, exclusive=True, hf_key="beta_slow", gguf_key="scaling.yarn_beta_slow")
TRUNCATE = Param("truncate", "bool", "round the ramp bounds to whole pairs (floor/ceil)", default=True,
                 hf_key="truncate")


def default_inv_freq(base: float, rotary_dim: int) -> torch.Tensor:
    """RoPE's inverse frequencies base^(-2i/d), i = 0..d/2-1, as a (d/2,) float64 tensor."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    return 1.0 / (float(base) ** exponents)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude correction m(s, a) = 0.1 * a * ln(s) + 1 (1 for s <= 1)."""
    if scale <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_dim(num_rotations: float, dim: int, base: float, original_length: int) -> float:
    """The (fractional) pair index whose wavelength fits ``num_rotations`` turns into ``original_length``."""
    return (dim * math.log(original_length / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_correction_range(
    beta_fast: float, beta_slow: float, dim: int, base: float, original_length: int, truncate: bool
) -> tuple[float, float]:
    """Pair-index bounds [low, high] of YaRN's ramp, clamped to [0, dim - 1]."""
    low = yarn_correction_dim(beta_fast, dim, base, original_length)
    high = yarn_correction_dim(beta_slow, dim, base, original_length)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, dim - 1)


def linear_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """(n,) float64 ramp: 0 at index <= low, 1 at index >= high, linear between."""
    if low == high:
        high += 0.001  # the reference code's guard against a zero-width ramp
    ramp = (torch.arange(n, dtype=torch.float64) - low) / (high - low)
    return ramp.clamp(0.0, 1.0)


def yarn_inv_freq(cfg, factor: float) -> torch.Tensor:
    """NTK-by-parts blend: pairs with many turns in training keep their speed, slow pairs interpolate by 1/s."""
    dim = cfg.rotary_dim
    inv = default_inv_freq(cfg.base, dim)
    low, high = yarn_correction_range(
        cfg.beta_fast if cfg.beta_fast is not None else BETA_FAST.default,
        cfg.beta_slow if cfg.beta_slow is not None else BETA_SLOW.default,
        dim,
        cfg.base,
        cfg.original_max_position,
        TRUNCATE.default if cfg.truncate is None else cfg.truncate,
    )
    # gamma = 1 keeps the original frequency (extrapolation), gamma = 0 interpolates.
    gamma = 1.0 - linear_ramp(low, high, dim // 2)
    return (inv / factor) * (1.0 - gamma) + inv * gamma


def yarn_attention_scale(cfg, factor: float) -> float:
    """The final YaRN attention factor: explicit value, DeepSeek's mscale ratio, or 0.1 ln(s) + 1."""
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    if cfg.mscale and cfg.mscale_all_dim:
        return yarn_mscale(factor, cfg.mscale) / yarn_mscale(factor, cfg.mscale_all_dim)
    return yarn_mscale(factor)
