"""Checks shared by the fast-path tests (CPU and Triton)."""

import torch

import ropekit


def backward_through(backend: str, freqs, positions):
    """q (2, 3, 3, 16) and k (2, 1, 3, 16), fixed random values, rotated by ``backend`` and back-propagated from a
    fixed random upstream gradient; returns (q, k, q_rotated) with q.grad and k.grad filled."""
    torch.manual_seed(0)
    q = torch.randn(2, 3, 3, 16, requires_grad=True)
    k = torch.randn(2, 1, 3, 16, requires_grad=True)
    oq, ok = ropekit.apply_rotary(q, k, freqs, positions, backend=backend)
    torch.manual_seed(1)
    ((oq * torch.randn_like(oq)).sum() + (ok * torch.randn_like(ok)).sum()).backward()
    return q, k, oq
