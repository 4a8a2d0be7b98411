"""LongRoPE (Ding et al. 2024, arXiv 2402.13753; reference code microsoft/LongRoPE; Phi-3's ``longrope``).

Per-pair rescale factors lambda_i, found by evolutionary search (``ropekit.search``):

    inv_freq'_i = inv_freq_i / lambda_i
    lambda = short_factor for sequences up to L tokens, long_factor for longer ones
    attention scale = attention_factor, else sqrt(1 + ln(s) / ln(L)) for s > 1 (Phi-3-mini-128k: 1.1902)

LongRoPE keeps the first n_hat positions at the original rotation (``n_hat``; 0 turns it off).
The short/long choice is made once per sequence from its length (never per chunk), see
``RotaryEmbedding``'s KV-cache policy.
"""

import json
import math
from pathlib import Path
from typing import Any

import torch

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import (
    ATTENTION_FACTOR,
    FACTOR,
    ORIGINAL_MAX_POSITION,
    Frequencies,
    GGUFExport,
    MethodSpec,
    Param,
    register,
)

SHORT_FACTOR = Param("short_factor", "float_list", "per-pair divisors for sequences up to the trained length",
                     minimum=0.0, exclusive=True, flag="--factors-file", hf_key="short_factor")
LONG_FACTOR = Param("long_factor", "float_list", "per-pair divisors for sequences longer than the trained length",
                    minimum=0.0, exclusive=True, flag="--factors-file", hf_key="long_factor")
N_HAT = Param("n_hat", "int", "leading positions kept at the original rotation (0: none)", default=0, minimum=0)


def default_attention_scale(factor: float | None, original: int | None) -> float:
    """sqrt(1 + ln(s) / ln(L)) for s > 1, else 1: the scale when no attention_factor is given (the GGUF reader
    compares a file's with it)."""
    if not factor or factor <= 1.0 or not original:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def attention_scale(cfg) -> float:
    if cfg.attention_factor is not None:
        return float(cfg.attention_factor)
    factor = cfg.factor if cfg.factor is not None else cfg.target_length / cfg.original_max_position
    return default_attention_scale(factor, cfg.original_max_position)


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


def to_gguf(cfg, freqs) -> GGUFExport:
    """llama.cpp's longrope: both factor tensors, the trained length (the long/short switch), the attention
    factor always (llama.cpp derives none for it)."""
    if cfg.n_hat:
        raise ValueError("n_hat: llama.cpp rotates every position with the LongRoPE factors; set n_hat=0")
    return GGUFExport(keys={ORIGINAL_MAX_POSITION.gguf_key: int(cfg.original_max_position),
                            "scaling.attn_factor": float(freqs.attention_scale)},
                      tensors={"rope_factors_long": tuple(cfg.long_factor),
                               "rope_factors_short": tuple(cfg.short_factor)})


def read_factors_file(path: str | Path) -> dict[str, Any]:
    """LongRoPE factors from JSON: {"short_factor": [...], "long_factor": [...], ["n_hat": int], ["factor": s],
    ["attention_factor": a]}. A transformers-style {"rope_parameters": {...}} or {"rope_scaling": {...}} wrapper
    is accepted too. Returns those keys (RopeConfig fields), unchecked; errors start with ``factors_file:``.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"factors_file: {p} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"factors_file: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        data = data.get("rope_parameters") or data.get("rope_scaling") or data
    if not isinstance(data, dict) or "short_factor" not in data or "long_factor" not in data:
        raise ValueError(f"factors_file: {p} must hold a JSON object with 'short_factor' and 'long_factor' lists")
    out = {"short_factor": data["short_factor"], "long_factor": data["long_factor"]}
    for key in ("n_hat", "factor", "attention_factor"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


SPEC = register(
    MethodSpec(
        "longrope",
        compute,
        params=(SHORT_FACTOR, LONG_FACTOR, ORIGINAL_MAX_POSITION, FACTOR, ATTENTION_FACTOR, N_HAT),
        required=("short_factor", "long_factor", "original_max_position"),
        length_dependent=True,
        needs_searched_factors=True,
        hf_type="longrope",
        hf_factor_from_lengths=True,
        gguf_type="longrope",
        to_gguf=to_gguf,
        describe=lambda cfg: "the model's per-pair factors (long)",
        summary="LongRoPE: searched per-pair factors (short/long), first n_hat positions unscaled",
    )
)
