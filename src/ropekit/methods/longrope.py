"""LongRoPE (Ding et al. 2024, arXiv 2402.13753; reference code microsoft/LongRoPE; Phi-3's ``longrope``).

Per-pair rescale factors lambda_i, found by evolutionary search (``ropekit.search``):

    inv_freq'_i = inv_freq_i / lambda_i
    lambda = short_factor for sequences up to L tokens, long_factor for longer ones
    attention scale = attention_factor, else sqrt(1 + ln(s) / ln(L)) for s > 1 (Phi-3-mini-128k: 1.1902)

LongRoPE keeps the first n_hat positions at the original rotation (``n_hat``; 0 turns it off).
The short/long choice is made once per sequence from its length (never per chunk), see
``RotaryEmbedding``'s KV-cache policy.
"""

import math

import torch

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import Frequencies, MethodSpec, register


def attention_scale(cfg) -> float:
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    factor = cfg.factor if cfg.factor is not None else cfg.target_length / cfg.original_max_position
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(cfg.original_max_position))


def compute(cfg, seq_len):
    original = default_inv_freq(cfg.base, cfg.rotary_dim)
    factors = cfg.long_factor if seq_len > cfg.original_max_position else cfg.short_factor
    inv = original / torch.tensor(factors, dtype=torch.float64)
    return Frequencies(
        inv_freq64=inv,
        attention_scale=attention_scale(cfg),
        unscaled_until=int(cfg.n_hat or 0),
        original_inv_freq64=original if cfg.n_hat else None,
    )


SPEC = register(
    MethodSpec(
        "longrope",
        compute,
        required=("short_factor", "long_factor", "original_max_position"),
        accepted=("factor", "attention_factor", "n_hat"),
        length_dependent=True,
        hf_type="longrope",
        summary="LongRoPE: searched per-pair factors (short/long), first n_hat positions unscaled",
    )
)
