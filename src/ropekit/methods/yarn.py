"""YaRN / NTK-by-parts (Peng et al. 2023, arXiv 2309.00071; reference code jquesnelle/yarn).

With r_i = L / lambda_i (turns of pair i in the trained length) and a ramp gamma over pair index between
the pairs that turn beta_fast and beta_slow times (floor/ceil unless ``truncate`` is False):

    inv_freq'_i = (1 - gamma_i) * inv_freq_i / s + gamma_i * inv_freq_i
    attention scale = attention_factor, else m(s, mscale) / m(s, mscale_all_dim) (DeepSeek), else 0.1 ln(s) + 1

where m(s, a) = 0.1 a ln(s) + 1. The scale multiplies cos and sin, so logits scale by its square.
"""

import math

from ropekit.methods._common import (  # noqa: F401  (BETA_FAST, BETA_SLOW, TRUNCATE: defined with the ramp maths)
    BETA_FAST,
    BETA_SLOW,
    TRUNCATE,
    yarn_attention_scale,
    yarn_inv_freq,
    yarn_mscale,
)
from ropekit.methods.registry import (
    ATTENTION_FACTOR,
    FACTOR,
    ORIGINAL_MAX_POSITION,
    GGUFExport,
    MethodSpec,
    Param,
    register,
)
MSCALE = Param("mscale", "float", "DeepSeek: mscale of the attention factor m(s, mscale) / m(s, mscale_all_dim)",
               hf_key="mscale")
MSCALE_ALL_DIM = Param("mscale_all_dim", "float", "DeepSeek: mscale_all_dim of the attention factor",
                       hf_key="mscale_all_dim")
# The parameters YaRN and dynamic YaRN share (besides factor and the trained length).
YARN_PARAMS = (BETA_FAST, BETA_SLOW, TRUNCATE, ATTENTION_FACTOR, MSCALE, MSCALE_ALL_DIM)
YARN_FIELDS = tuple(p.field for p in YARN_PARAMS)


def check_betas(cfg) -> None:
    """The ramp runs from the fast bound down to the slow one (shared with ``dynamic_yarn``)."""
    if cfg.beta_fast is not None and cfg.beta_slow is not None and cfg.beta_fast <= cfg.beta_slow:
        raise ValueError(f"beta_fast: must be > beta_slow ({cfg.beta_slow}), got {cfg.beta_fast}")


def check_attention_scale(cfg, factor: float | None) -> None:
    """DeepSeek's ratio m(s, mscale) / m(s, mscale_all_dim) at the factor ``factor`` must be a positive finite
    number, as ``attention_factor`` must be: the two fields together give the scale that multiplies cos and sin.
    (Only where the ratio is what the method uses: both set and non-zero, no explicit attention factor.)"""
    if factor is None or cfg.attention_factor is not None or not (cfg.mscale and cfg.mscale_all_dim):
        return
    top, bottom = yarn_mscale(factor, cfg.mscale), yarn_mscale(factor, cfg.mscale_all_dim)
    scale = top / bottom if bottom else math.inf
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"mscale, mscale_all_dim: give an attention scale of {top:.4g} / {bottom:.4g} = "
                         f"{scale:.4g} at factor {factor:g} (each is 0.1 x value x ln(factor) + 1); it must be a "
                         f"positive finite number, as an attention factor must")


def check_yarn(cfg) -> None:
    """YaRN's checks across fields: the ramp's bounds, the attention scale at the factor."""
    check_betas(cfg)
    check_attention_scale(cfg, cfg.factor)


def compute(cfg, seq_len=None):
    return yarn_inv_freq(cfg, cfg.factor), yarn_attention_scale(cfg, cfg.factor)


def to_gguf(cfg, freqs) -> GGUFExport:
    """llama.cpp's yarn: factor, trained length, the ramp's bounds where not its defaults; the attention scale
    over the 0.1 ln s + 1 llama.cpp applies itself."""
    if cfg.truncate is False:
        raise ValueError("truncate: llama.cpp always rounds YaRN's ramp bounds to whole pairs (floor/ceil); "
                         "set truncate=true")
    s = float(cfg.factor)
    keys = {FACTOR.gguf_key: s, ORIGINAL_MAX_POSITION.gguf_key: int(cfg.original_max_position)}
    for param in (BETA_FAST, BETA_SLOW):
        value = getattr(cfg, param.field)
        if value is not None and value != param.default:
            keys[param.gguf_key] = float(value)
    return GGUFExport(keys=keys, attention_relative_to=yarn_mscale(s, 1.0))


SPEC = register(
    MethodSpec(
        "yarn",
        compute,
        params=(FACTOR, ORIGINAL_MAX_POSITION) + YARN_PARAMS,
        required=("factor", "original_max_position"),
        hf_type="yarn",
        hf_factor_from_lengths=True,
        gguf_type="yarn",
        to_gguf=to_gguf,
        check=check_yarn,
        describe=lambda cfg: "NTK-by-parts ramp + temperature",
        summary="YaRN: NTK-by-parts ramp plus attention temperature",
    )
)
