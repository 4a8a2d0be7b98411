"""Fast RoPE: a fused Triton kernel (GPU) and a fused compiled CPU path, behind ``ropekit.apply_rotary``.

``apply_rotary_fast`` adds in-place mode and packed ``cu_seqlens``; ``resolve_backend`` tells which backend
"auto" picks. See ``ropekit.kernels.dispatch`` for the rules.
"""

from ropekit.kernels.dispatch import BACKENDS, apply_rotary_fast, resolve_backend

__all__ = ["BACKENDS", "apply_rotary_fast", "resolve_backend"]
