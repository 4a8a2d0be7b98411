"""Llama 3.1 scaling (Meta, "The Llama 3 Herd of Models", arXiv 2407.21783; transformers' ``llama3``).

With wavelength lambda_i = 2 pi / inv_freq_i, trained length L, factor s, low/high frequency factors a/b:

    lambda_i < L / b:   unchanged
    lambda_i > L / a:   inv_freq_i / s
    otherwise:          (1 - t) inv_freq_i / s + t inv_freq_i,  t = (L / lambda_i - a) / (b - a)

Attention scale 1. Llama 3.1: s = 8, a = 1, b = 4, L = 8192; Llama 3.2 uses s = 32. Llama 4 sets a = b = 1: no
blend band, every pair with wavelength > L divided by s, the others kept.
"""

import math
from types import SimpleNamespace
from typing import Any

import torch

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import FACTOR, ORIGINAL_MAX_POSITION, GGUFExport, MethodSpec, Param, register

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


def to_gguf(cfg, freqs) -> GGUFExport:
    """As convert_hf_to_gguf.py writes Llama 3.1: per-pair divisors of the plain frequencies (``rope_freqs``), and
    the trained length where known."""
    plain = default_inv_freq(cfg.base, cfg.rotary_dim)
    keys = {ORIGINAL_MAX_POSITION.gguf_key: int(cfg.trained_length)} if cfg.trained_length else {}
    return GGUFExport(keys=keys, tensors={"rope_freqs": tuple((plain / freqs.inv_freq64).tolist())})


def from_gguf(base: float, n_rot: int, divisors: tuple[float, ...], original: int | None) -> dict[str, Any] | None:
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
            low = LOW_FREQ_FACTOR.default  # Llama 4's band (low == high), then Llama 3.1's
            candidates += [(int(original), low, low), (int(original), low, HIGH_FREQ_FACTOR.default)]
        else:
            fast, slow = wavelength[ff <= 1.0 + 1e-5], wavelength[ff >= s * (1.0 - 1e-5)]
            below = float(fast.max()) if fast.size else 0.0
            above = float(slow.min()) if slow.size else math.inf
            length = 2 ** math.ceil(math.log2(max(below, 1.0)))  # trained lengths are powers of two
            length = length * 2 if length <= below else length
            if length < above:
                candidates.append((length, LOW_FREQ_FACTOR.default, LOW_FREQ_FACTOR.default))
    for length, low, high in candidates:
        if not (length >= 1 and high >= low > 0):
            continue
        for lo, hi in ((round(low, 4), round(high, 4)), (low, high)):
            if not hi >= lo > 0:
                continue
            # compute reads these fields only (a RopeConfig would import ropekit.config, which imports the methods).
            cfg = SimpleNamespace(base=base, rotary_dim=n_rot, factor=s, original_max_position=length,
                                  low_freq_factor=lo, high_freq_factor=hi)
            got = compute(cfg, None)[0].numpy()
            if np.allclose(got, inv / ff, rtol=1e-6, atol=0):  # exact to float32 divisors, else per-pair factors
                return {"factor": s, "original_max_position": length,
                        "low_freq_factor": None if lo == LOW_FREQ_FACTOR.default else lo,
                        "high_freq_factor": None if hi == HIGH_FREQ_FACTOR.default else hi}
    return None


SPEC = register(
    MethodSpec(
        "llama3",
        compute,
        params=(FACTOR, ORIGINAL_MAX_POSITION, LOW_FREQ_FACTOR, HIGH_FREQ_FACTOR),
        required=("factor", "original_max_position"),
        hf_type="llama3",
        hf_defaults=("low_freq_factor", "high_freq_factor"),  # transformers requires both
        to_gguf=to_gguf,
        from_gguf=from_gguf,
        check=check,
        describe=lambda cfg: "fast pairs kept, slow pairs / s, blend between",
        summary="Llama 3.1: keep fast pairs, divide slow pairs by s, blend between",
    )
)
