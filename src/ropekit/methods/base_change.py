"""Base-frequency change, "ABF" (Code Llama, arXiv 2308.12950: 1e4 -> 1e6; Llama-2-Long, arXiv 2309.16039).

    inv_freq'_i = new_base^(-2i/d)

"Base of RoPE Bounds Context Length" (arXiv 2405.14591) gives lower bounds on the base for a context
length (8k ~ 8.4e4, 32k ~ 6.4e5, 128k ~ 7.8e6); see ``suggested_base``. Attention scale 1.
"""

import math

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import GGUFExport, MethodSpec, Param, register

NEW_BASE = Param("new_base", "float", "the new rope_theta (e.g. 500000)", minimum=1.0, exclusive=True)

# (context length, lower bound on the base) from arXiv 2405.14591, table 1 / figure 4.
BASE_LOWER_BOUNDS = ((1_000, 4.3e3), (2_000, 1.6e4), (4_000, 2.7e4), (8_000, 8.4e4), (16_000, 3.1e5),
                     (32_000, 6.4e5), (64_000, 2.1e6), (128_000, 7.8e6), (256_000, 3.6e7), (512_000, 6.4e7),
                     (1_000_000, 5.1e8))


def suggested_base(length: int) -> float:
    """The paper's lower bound on the base for ``length`` tokens, log-interpolated between its points."""
    points = BASE_LOWER_BOUNDS
    if length <= points[0][0]:
        return points[0][1]
    for (l0, b0), (l1, b1) in zip(points, points[1:]):
        if length <= l1:
            t = (math.log(length) - math.log(l0)) / (math.log(l1) - math.log(l0))
            return math.exp(math.log(b0) + t * (math.log(b1) - math.log(b0)))
    return points[-1][1]


def compute(cfg, seq_len=None):
    return default_inv_freq(cfg.new_base, cfg.rotary_dim), 1.0


def to_hf(cfg) -> dict:
    return {"rope_type": "default", "rope_theta": cfg.new_base}


SPEC = register(
    MethodSpec("base", compute, params=(NEW_BASE,), required=("new_base",), to_hf=to_hf,
               to_gguf=lambda cfg, freqs: GGUFExport(freq_base=cfg.new_base),
               suggested_base=suggested_base, describe=lambda cfg: f"base -> {cfg.new_base:.4g}",
               label=lambda cfg: f"base {cfg.new_base:g}",
               summary="base-frequency change (ABF) to new_base")
)
