"""Position Interpolation (Chen et al. 2023, arXiv 2306.15595), transformers' ``linear``.

    inv_freq'_i = inv_freq_i / s

Positions are squeezed by the factor s so that L' = s L maps onto the trained range [0, L).
Short contexts lose resolution until fine-tuned (~1000 steps in the paper). Attention scale 1.
"""

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import FACTOR, ORIGINAL_MAX_POSITION, GGUFExport, MethodSpec, register


def compute(cfg, seq_len=None):
    return default_inv_freq(cfg.base, cfg.rotary_dim) / cfg.factor, 1.0


def to_gguf(cfg, freqs) -> GGUFExport:
    """llama.cpp's linear scaling: the factor, and the trained length where known."""
    keys = {FACTOR.gguf_key: float(cfg.factor)}
    if cfg.trained_length:
        keys[ORIGINAL_MAX_POSITION.gguf_key] = int(cfg.trained_length)
    return GGUFExport(keys=keys)


SPEC = register(
    MethodSpec("linear", compute, params=(FACTOR,), required=("factor",), hf_type="linear", gguf_type="linear",
               to_gguf=to_gguf,
               describe=lambda cfg: "positions squeezed by s (PI)", summary="Position Interpolation: inv_freq / s")
)
