"""ropekit: Rotary Position Embeddings and context-window extension for PyTorch models."""

from ropekit.config import RopeConfig
from ropekit.layered import LayeredRope
from ropekit.kernels.dispatch import apply_rotary, rotate
from ropekit.methods import Frequencies, frequencies, get_method, method_names, parameters
from ropekit.module import RotaryEmbedding
from ropekit.multimodal import (
    MultiAxisRope,
    MultiAxisRotaryEmbedding,
    VisionGrid,
    apply_multi_axis_rotary,
    axial_rope,
    mrope,
    mrope_decode_positions,
    mrope_from_hf,
    mrope_positions,
    mrope_positions_from_token_types,
    patch_positions,
)
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
    "LayeredRope",
    "MultiAxisRope",
    "MultiAxisRotaryEmbedding",
    "RopeConfig",
    "RotaryEmbedding",
    "VisionGrid",
    "apply_multi_axis_rotary",
    "apply_rotary",
    "axial_rope",
    "cos_sin",
    "frequencies",
    "get_method",
    "layout_permutation",
    "method_names",
    "mrope",
    "mrope_decode_positions",
    "mrope_from_hf",
    "mrope_positions",
    "mrope_positions_from_token_types",
    "parameters",
    "patch_positions",
    "permute_qk_weight",
    "positions_from_cu_seqlens",
    "positions_from_offsets",
    "reapply_frequencies",
    "rerotate",
    "rotate",
    "rotation_angles",
]
