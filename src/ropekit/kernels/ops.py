"""``torch.library`` custom ops around the Triton kernel, so ``torch.compile`` and CUDA graphs see one op.

* ``ropekit::rope(q, k, ...) -> (q_out, k_out)``: out of place, differentiable (backward = the transpose
  rotation: -angle, the same scale).
* ``ropekit::rope_(q, k, ...)``: in place (mutates q and k), for inference; not differentiable.

k may have zero heads (q only); q likewise. Tensors are 4-D in one layout (see ``triton_rope.launch``).
"""

from __future__ import annotations

import contextlib

import torch

from ropekit.kernels import triton_rope

Tensor = torch.Tensor


def _device_guard(x: Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


@torch.library.custom_op("ropekit::rope", mutates_args=())
def rope(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    turns: Tensor,
    turns_unscaled: Tensor,
    unscaled_until: int,
    scale: float,
    conjugate: bool,
    interleaved: bool,
    heads_first: bool,
    rotary_dim: int,
) -> tuple[Tensor, Tensor]:
    q_out = torch.empty_like(q)
    k_out = torch.empty_like(k)
    with _device_guard(q):
        triton_rope.launch(q, k, q_out, k_out, positions, turns, turns_unscaled, unscaled_until, scale,
                           conjugate, interleaved, heads_first, rotary_dim, copy_pass=True)
    return q_out, k_out


@rope.register_fake
def _rope_fake(q, k, positions, turns, turns_unscaled, unscaled_until, scale, conjugate, interleaved,
               heads_first, rotary_dim):
    return torch.empty_like(q), torch.empty_like(k)


def _setup_context(ctx, inputs, output):
    q, k, positions, turns, turns_unscaled, unscaled_until, scale, conjugate, interleaved, heads_first, rd = inputs
    ctx.save_for_backward(positions, turns, turns_unscaled)
    ctx.flags = (unscaled_until, scale, conjugate, interleaved, heads_first, rd)
    ctx.shapes = (q.shape, q.dtype, k.shape, k.dtype)


def _backward(ctx, grad_q, grad_k):
    positions, turns, turns_unscaled = ctx.saved_tensors
    unscaled_until, scale, conjugate, interleaved, heads_first, rd = ctx.flags
    q_shape, q_dtype, k_shape, k_dtype = ctx.shapes
    if grad_q is None:
        grad_q = torch.zeros(q_shape, dtype=q_dtype, device=positions.device)
    if grad_k is None:
        grad_k = torch.zeros(k_shape, dtype=k_dtype, device=positions.device)
    # (s R(theta))^T = s R(-theta): the same kernel with the sign of the angle flipped.
    gq, gk = rope(grad_q, grad_k, positions, turns, turns_unscaled, unscaled_until, scale, not conjugate,
                  interleaved, heads_first, rd)
    return gq, gk, None, None, None, None, None, None, None, None, None


rope.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("ropekit::rope_", mutates_args=("q", "k"))
def rope_(
    q: Tensor,
    k: Tensor,
    positions: Tensor,
    turns: Tensor,
    turns_unscaled: Tensor,
    unscaled_until: int,
    scale: float,
    conjugate: bool,
    interleaved: bool,
    heads_first: bool,
    rotary_dim: int,
) -> None:
    with _device_guard(q):
        triton_rope.launch(q, k, q, k, positions, turns, turns_unscaled, unscaled_until, scale,
                           conjugate, interleaved, heads_first, rotary_dim, copy_pass=False)


@rope_.register_fake
def _rope_inplace_fake(q, k, positions, turns, turns_unscaled, unscaled_until, scale, conjugate, interleaved,
                       heads_first, rotary_dim):
    return None
