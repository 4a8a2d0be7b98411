"""ropekit: Rotary Position Embeddings and context-window extension for PyTorch models."""

from ropekit.config import RopeConfig
from ropekit.kernels.dispatch import apply_rotary, rotate
from ropekit.methods import Frequencies, frequencies, get_method, method_names, parameters
from ropekit.module import RotaryEmbedding
from ropekit.rotation import (
    cos_sin,
    layout_permutation,
    permute_qk_weight,
    positions_from_cu_seqlens,
    positions_from_offsets,
    reapply_frequencies,
    rerotate,
    rotation_angles,
)

__version__ = "0.1.0"

__all__ = [
    "Frequencies",
    "RopeConfig",
    "RotaryEmbedding",
    "apply_rotary",
    "cos_sin",
    "frequencies",
    "get_method",
    "layout_permutation",
    "method_names",
    "parameters",
    "permute_qk_weight",
    "positions_from_cu_seqlens",
    "positions_from_offsets",
    "reapply_frequencies",
    "rerotate",
    "rotate",
    "rotation_angles",
]
