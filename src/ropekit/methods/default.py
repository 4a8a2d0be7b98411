"""Plain RoPE (RoFormer, Su et al. 2021, arXiv 2104.09864).

    inv_freq_i = base^(-2i/d),  i = 0 .. d/2 - 1,  angle(m, i) = m * inv_freq_i

No scaling; attention scale 1.
"""

from ropekit.methods._common import default_inv_freq
from ropekit.methods.registry import GGUFExport, MethodSpec, register


def compute(cfg, seq_len=None):
    return default_inv_freq(cfg.base, cfg.rotary_dim), 1.0


SPEC = register(
    MethodSpec("default", compute, hf_type="default", gguf_type="none", to_gguf=lambda cfg, freqs: GGUFExport(),
               unscaled=True,
               summary="plain RoPE, no scaling")
)
