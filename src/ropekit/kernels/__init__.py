"""Fast RoPE and the dispatcher in front of it.

* ``cpu``: the fused compiled CPU pass over float64-built cos/sin tables; ``triton_rope`` + ``ops``: the fused
  Triton kernel (angles computed in the kernel) and its ``torch.library`` custom ops. Kernels import the
  reference layer (``ropekit.rotation``) and nothing above it.
* ``dispatch``: ``apply_rotary`` / ``rotate`` (``ropekit.apply_rotary`` / ``ropekit.rotate``) pick a backend;
  ``apply_rotary_fast`` adds in-place mode and packed ``cu_seqlens``; ``resolve_backend`` tells which backend
  "auto" picks. This package re-exports the dispatcher, so it sits on the dispatcher's layer.
"""

from ropekit.kernels.dispatch import BACKENDS, apply_rotary, apply_rotary_fast, resolve_backend, rotate

__all__ = ["BACKENDS", "apply_rotary", "apply_rotary_fast", "resolve_backend", "rotate"]
