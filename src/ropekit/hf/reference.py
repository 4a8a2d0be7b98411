"""Independent references for parity checks (the tests and ``scripts/parity_report.py``).

* transformers' own RoPE driven from a config.json dict: every rotation here is transformers' code (the
  model's own rotary class and apply function), never a re-implementation;
* ``exact_*``: RoPE evaluated with mpmath (install ``mpmath``; the ``test`` extra has it), independent of
  ropekit's code, for the error of both sides.
"""

from __future__ import annotations

import copy
import importlib
import logging

import torch


def hf_config(config: dict):
    """The transformers config object for a config.json dict (its own class, via AutoConfig)."""
    from transformers import AutoConfig

    d = copy.deepcopy(config)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # yarn factor/implicit-factor notes
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _modeling(model_type: str):
    return importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")


def hf_inv_freq_and_scale(hf_cfg, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention_scaling) as its rotary module holds them after a call at ``seq_len``."""
    rot = hf_rotary_module(hf_cfg)
    if seq_len is not None:
        x = torch.zeros(1, dtype=torch.float32)
        rot(x, torch.tensor([[seq_len - 1]]))
    return rot.inv_freq.clone(), float(rot.attention_scaling)


def hf_rotary_module(hf_cfg):
    """The model's own ``<Model>RotaryEmbedding`` (GPT-J has none: see ``hf_rotate``)."""
    mod = _modeling(hf_cfg.model_type)
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and not n.startswith("_"))
    return cls(hf_cfg)


def hf_rotate(hf_cfg, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rot=None):
    """Rotate q, k (batch, heads, seq, head_dim) at ``positions`` (batch, seq) the way the model does.

    ``rot``: an existing rotary module (to keep transformers' dynamic state between calls).
    Returns (q_rotated, k_rotated) in (batch, heads, seq, head_dim).
    """
    mt = hf_cfg.model_type
    mod = _modeling(mt)
    if mt == "gptj":
        # GPTJAttention: a fixed sin/cos table over rotary_dim, gathered by position, interleaved pairs.
        rd = hf_cfg.rotary_dim
        table = mod.create_sinusoidal_positions(int(positions.max()) + 1, rd)
        sincos = table[positions]  # (batch, seq, rd)
        sin, cos = torch.split(sincos, rd // 2, dim=-1)
        out = []
        for t in (q, k):
            t = t.transpose(1, 2)  # GPT-J rotates (batch, seq, heads, head_dim)
            rot_part = mod.apply_rotary_pos_emb(t[..., :rd], sin, cos)
            out.append(torch.cat([rot_part, t[..., rd:]], dim=-1).transpose(1, 2))
        return out[0], out[1]
    rot = rot if rot is not None else hf_rotary_module(hf_cfg)
    if mt == "deepseek_v2":
        freqs_cis = rot(q, positions)
        return mod.apply_rotary_emb(q, k, freqs_cis)
    cos, sin = rot(q, positions)
    if mt == "deepseek_v3":
        # rope_interleave: pairs (2i, 2i+1) in, rotate-half order out (a fixed permutation of channels).
        return mod.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    return mod.apply_rotary_pos_emb(q, k, cos, sin)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Channel order (0, 2, 4, ..., 1, 3, 5, ...): how DeepSeek-V3's interleave path hands back its outputs."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def exact_inv_freq(base: float, rotary_dim: int, digits: int = 30) -> list:
    """RoPE's base^(-2i/d) as mpmath numbers at ``digits`` digits."""
    import mpmath

    mpmath.mp.dps = digits
    b = mpmath.mpf(base)
    return [b ** (-mpmath.mpf(2 * i) / rotary_dim) for i in range(rotary_dim // 2)]


def exact_llama3(cfg) -> list:
    """Llama 3.1's rule (reference.md) evaluated in mpmath, independent of ropekit's code."""
    import mpmath

    L, s = cfg.original_max_position, cfg.factor
    low, high = cfg.low_freq_factor or 1.0, cfg.high_freq_factor or 4.0
    out = []
    for inv in exact_inv_freq(cfg.base, cfg.rotary_dim):
        wavelength = 2 * mpmath.pi / inv
        if wavelength < L / high:
            out.append(inv)
        elif wavelength > L / low:
            out.append(inv / s)
        else:
            t = (L / wavelength - low) / (high - low)
            out.append((1 - t) * inv / s + t * inv)
    return out


def exact_yarn(cfg) -> tuple[list, object]:
    """YaRN (reference.md: floor/ceil ramp over pair index, beta_fast 32, beta_slow 1) in mpmath."""
    import mpmath

    d, b, L, s = cfg.rotary_dim, mpmath.mpf(cfg.base), cfg.original_max_position, mpmath.mpf(cfg.factor)

    def dim_for(beta):
        return d * mpmath.log(L / (2 * mpmath.pi * beta)) / (2 * mpmath.log(b))

    lo = max(int(mpmath.floor(dim_for(32))), 0)
    hi = min(int(mpmath.ceil(dim_for(1))), d - 1)
    out = []
    for i, inv in enumerate(exact_inv_freq(cfg.base, d)):
        ramp = min(max((mpmath.mpf(i) - lo) / (hi - lo), 0), 1)  # 0: keep speed, 1: interpolate
        out.append(inv / s * ramp + inv * (1 - ramp))
    return out, 0.1 * mpmath.log(s) + 1


def exact_rotate(x: torch.Tensor, positions, base: float, rotary_dim: int, layout: str = "neox",
                 digits: int = 30, inv_freq: list | None = None, scale: float = 1.0) -> torch.Tensor:
    """RoPE applied in float64 with angles and cos/sin from mpmath at ``digits`` digits.

    x: (seq, head_dim) (any float dtype, taken exactly into float64); positions: seq ints.
    inv_freq: mpmath inverse frequencies (default: base^(-2i/d), plain RoPE); scale multiplies cos and sin.
    Angles position * inv_freq_i are evaluated exactly enough that the only error left is the final float64
    rounding (~1e-16 relative).
    """
    import mpmath

    mpmath.mp.dps = digits
    half = rotary_dim // 2
    pos = [int(p) for p in positions]
    cos = torch.empty(len(pos), half, dtype=torch.float64)
    sin = torch.empty_like(cos)
    inv = inv_freq if inv_freq is not None else exact_inv_freq(base, rotary_dim, digits)
    m = mpmath.mpf(scale)
    for r, p in enumerate(pos):
        for i in range(half):
            a = p * inv[i]
            cos[r, i] = float(m * mpmath.cos(a))
            sin[r, i] = float(m * mpmath.sin(a))
    x = x.to(torch.float64)
    xr = x[..., :rotary_dim]
    if layout == "neox":
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x[..., rotary_dim:]], dim=-1)
