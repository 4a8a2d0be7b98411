"""Dynamic NTK scaling (emozilla, 2023), transformers' ``dynamic``.

For the current sequence length l and trained length L:

    l <= L:  unchanged
    l >  L:  base' = base * (s * l / L - (s - 1))^(d / (d - 2))

The base grows with the sequence, so the rotation depends on the length: see ``RotaryEmbedding``'s
KV-cache policy. Attention scale 1.
"""

from ropekit.methods._common import default_inv_freq
from ropekit.methods.ntk import check_rotary_dim
from ropekit.methods.registry import FACTOR, ORIGINAL_MAX_POSITION, MethodSpec, register


def dynamic_base(base: float, factor: float, rotary_dim: int, seq_len: int, original_length: int) -> float:
    """The dynamic NTK base for a sequence of ``seq_len`` tokens (unchanged up to the trained length)."""
    length = max(int(seq_len), int(original_length))
    growth = factor * length / original_length - (factor - 1)
    return float(base) * growth ** (rotary_dim / (rotary_dim - 2))


def compute(cfg, seq_len):
    base = dynamic_base(cfg.base, cfg.factor, cfg.rotary_dim, seq_len, cfg.original_max_position)
    return default_inv_freq(base, cfg.rotary_dim), 1.0


SPEC = register(
    MethodSpec(
        "dynamic",
        compute,
        params=(FACTOR, ORIGINAL_MAX_POSITION),
        required=("factor", "original_max_position"),
        length_dependent=True,
        hf_type="dynamic",
        hf_trained_from_max_position=True,
        check=check_rotary_dim,
        describe=lambda cfg: "base grows with the length (shown at the target)",
        summary="dynamic NTK: the base grows with the current length",
    )
)
