"""Dynamic YaRN (Peng et al. 2023, arXiv 2309.00071 section 3.3).

YaRN with the factor taken from the current length l instead of fixed:

    s(l) = max(1, l / L),  then YaRN's frequencies and attention scale at s(l)

``factor`` is optional and only sets the default target length L' = factor * L. Length-dependent: see
``RotaryEmbedding``'s KV-cache policy.
"""

from ropekit.methods._common import default_inv_freq, yarn_attention_scale, yarn_inv_freq
from ropekit.methods.registry import FACTOR, ORIGINAL_MAX_POSITION, MethodSpec, register
from ropekit.methods.yarn import YARN_PARAMS, check_attention_scale, check_betas


def compute(cfg, seq_len):
    scale = max(1.0, seq_len / cfg.original_max_position)
    if scale == 1.0:
        return default_inv_freq(cfg.base, cfg.rotary_dim), yarn_attention_scale(cfg, 1.0)
    return yarn_inv_freq(cfg, scale), yarn_attention_scale(cfg, scale)


def check(cfg) -> None:
    """The ramp's bounds; the attention scale at the longest length the config says it runs to (the factor, or
    the target length over the trained one), the scale it reaches last."""
    check_betas(cfg)
    target = cfg.target_length
    factor = cfg.factor if cfg.factor is not None else (
        target / cfg.original_max_position if target and cfg.original_max_position else None)
    check_attention_scale(cfg, factor)


SPEC = register(
    MethodSpec(
        "dynamic_yarn",
        compute,
        params=(ORIGINAL_MAX_POSITION, FACTOR) + YARN_PARAMS,
        required=("original_max_position",),
        length_dependent=True,
        not_exportable="transformers has no dynamic YaRN (its factor follows the current length)",
        check=check,
        describe=lambda cfg: "yarn with s from the length (shown at the target)",
        summary="YaRN with s = max(1, l/L) from the current length",
    )
)
