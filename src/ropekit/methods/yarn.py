"""YaRN / NTK-by-parts (Peng et al. 2023, arXiv 2309.00071; reference code jquesnelle/yarn).

With r_i = L / lambda_i (turns of pair i in the trained length) and a ramp gamma over pair index between
the pairs that turn beta_fast and beta_slow times (floor/ceil unless ``truncate`` is False):

    inv_freq'_i = (1 - gamma_i) * inv_freq_i / s + gamma_i * inv_freq_i
    attention scale = attention_factor, else m(s, mscale) / m(s, mscale_all_dim) (DeepSeek), else 0.1 ln(s) + 1

where m(s, a) = 0.1 a ln(s) + 1. The scale multiplies cos and sin, so logits scale by its square.
"""

from ropekit.methods._common import yarn_attention_scale, yarn_inv_freq
from ropekit.methods.registry import MethodSpec, register

YARN_FIELDS = ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")


def compute(cfg, seq_len=None):
    return yarn_inv_freq(cfg, cfg.factor), yarn_attention_scale(cfg, cfg.factor)


SPEC = register(
    MethodSpec(
        "yarn",
        compute,
        required=("factor", "original_max_position"),
        accepted=YARN_FIELDS,
        hf_type="yarn",
        summary="YaRN: NTK-by-parts ramp plus attention temperature",
    )
)
