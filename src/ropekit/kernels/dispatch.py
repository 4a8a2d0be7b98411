"""Backend choice and the fast-path entry point behind ``ropekit.apply_rotary(..., backend=...)``.

Backends:
  * ``"reference"``: the pure-PyTorch reference (``ropekit.rotation``), float64 angles; the ground truth.
  * ``"cpu"``: cached float64-built cos/sin tables + one fused compiled pass (``ropekit.kernels.cpu``);
    CPU tensors only.
  * ``"triton"``: the fused Triton kernel, angles computed in the kernel, no table at any length
    (``ropekit.kernels.triton_rope``, registered as the custom op ``ropekit::rope``); CUDA tensors, or CPU
    tensors when ``TRITON_INTERPRET=1`` (tests).
  * ``"auto"`` (default): "triton" for CUDA float16/bfloat16/float32 when Triton is installed; "cpu" for CPU
    float16/bfloat16/float32 inputs of at least ``CPU_MIN_ELEMENTS`` elements (below that, compile and call
    overheads outweigh the gain); the reference otherwise (float64, other devices, small CPU inputs).

An explicitly named backend that cannot take the inputs raises ``ValueError`` saying why.
"""

from __future__ import annotations

import os

import torch

from ropekit.kernels import cpu as cpu_path
from ropekit.kernels import triton_rope

Tensor = torch.Tensor

BACKENDS = ("auto", "reference", "cpu", "triton")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# q.numel() + k.numel() from which "auto" takes the cpu path. A judgement, not a measured crossover: small
# inputs (unit tests, toy models) skip the seconds of compiling the fused pass; real prefill sizes take it.
CPU_MIN_ELEMENTS = 1 << 18

_turns_cache: dict[int, tuple[Tensor, Tensor]] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; accepted: {', '.join(BACKENDS)}")


def resolve_backend(backend: str, ref: Tensor, numel: int) -> str:
    """The backend that will run for inputs like ``ref`` (q.numel() + k.numel() = ``numel``).

    Raises ValueError when an explicitly named backend cannot take these inputs.
    """
    check_backend(backend)
    device, dtype = ref.device.type, ref.dtype
    if backend == "auto":
        if dtype not in FAST_DTYPES:
            return "reference"
        if device == "cuda" and triton_rope.HAVE_TRITON:
            return "triton"
        if device == "cpu" and numel >= CPU_MIN_ELEMENTS:
            return "cpu"
        return "reference"
    if backend == "reference":
        return backend
    if dtype not in FAST_DTYPES:
        raise ValueError(f"backend {backend!r}: dtype {dtype} not supported (float32, bfloat16, float16); "
                         "use backend='reference' for float64")
    if backend == "cpu" and device != "cpu":
        raise ValueError(f"backend 'cpu': inputs are on {ref.device}; use 'triton' or 'auto' for accelerators")
    if backend == "triton":
        if not triton_rope.HAVE_TRITON:
            raise ValueError("backend 'triton': triton is not installed (pip install triton)")
        if device != "cuda" and not (device == "cpu" and _interpreting()):
            raise ValueError(f"backend 'triton': needs CUDA tensors (or TRITON_INTERPRET=1 on CPU), got {ref.device}")
    return backend


def _turns(inv_freq64: Tensor) -> Tensor:
    """Fixed-point turns of ``inv_freq64``, cached per tensor (device ops only: no host sync)."""
    if torch.compiler.is_compiling():
        return triton_rope.turns_fixed_point(inv_freq64)
    hit = _turns_cache.get(id(inv_freq64))
    if hit is not None and hit[0] is inv_freq64:
        return hit[1]
    turns = triton_rope.turns_fixed_point(inv_freq64)
    if len(_turns_cache) > 64:
        _turns_cache.clear()
    _turns_cache[id(inv_freq64)] = (inv_freq64, turns)
    return turns


def _positions(positions, batch: int, seq: int, device: torch.device, cu_seqlens: Tensor | None) -> Tensor:
    """(1|B, S) int64 positions; like ``rotation.resolve_positions`` but with no host read under compile."""
    from ropekit.rotation import resolve_positions

    if cu_seqlens is not None:
        if positions is not None:
            raise ValueError("positions, cu_seqlens: pass one or the other")
        return positions_from_cu_seqlens_async(cu_seqlens, seq).to(device)[None]
    if isinstance(positions, Tensor) and positions.dim() > 0 and torch.compiler.is_compiling():
        if positions.is_floating_point() or positions.dtype == torch.bool:
            raise ValueError(f"positions: must be an integer tensor (token indices), got dtype {positions.dtype}")
        pos = positions if positions.dim() == 2 else positions[None]
        if pos.dim() != 2 or pos.shape[-1] != seq or pos.shape[0] not in (1, batch):
            raise ValueError(f"positions: expected shape ({seq},) or ({batch}, {seq}), got {tuple(positions.shape)}")
        torch._assert_async(pos.min() >= 0, "positions: must be >= 0")
        return pos.to(device=device, dtype=torch.long)
    return resolve_positions(positions, batch, seq, device)


def positions_from_cu_seqlens_async(cu_seqlens: Tensor, total: int) -> Tensor:
    """(total,) positions restarting at 0 at each cu_seqlens boundary, with no host read (``total`` known)."""
    cu = cu_seqlens.to(torch.long)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens: must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    idx = torch.arange(total, device=cu.device)
    doc = torch.searchsorted(cu, idx, right=True) - 1
    return idx - cu[doc.clamp(0, cu.numel() - 1)]


def apply_rotary_fast(
    q: Tensor | None,
    k: Tensor | None,
    freqs,
    positions: int | Tensor | None = None,
    *,
    heads_first: bool = True,
    inverse: bool = False,
    seq_len: int | None = None,
    backend: str = "auto",
    inplace: bool = False,
    cu_seqlens: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``ropekit.apply_rotary`` with a backend choice, in-place mode and packed ``cu_seqlens``.

    Args: as ``ropekit.apply_rotary``, plus
        backend: "auto", "reference", "cpu" or "triton" (see the module docstring).
        inplace: rotate q and k in their own storage and return them (inference; not differentiable on
            the triton backend).
        cu_seqlens: (docs+1,) cumulative lengths of packed documents along the seq axis (instead of
            ``positions``): positions restart at 0 in each document.
    Returns:
        (q_rotated, k_rotated), shapes and dtypes of the inputs.
    """
    from ropekit.rotation import _as_frequencies, _check_qk, apply_rotary

    if q is None and k is None:
        raise ValueError("q, k: at least one tensor is needed")
    f = _as_frequencies(freqs, seq_len)
    batch, seq = _check_qk(q, k, f.rotary_dim, heads_first)
    ref = q if q is not None else k
    numel = sum(t.numel() for t in (q, k) if t is not None)
    chosen = resolve_backend(backend, ref, numel)
    if chosen == "reference":
        pos = positions
        if cu_seqlens is not None:
            pos = _positions(positions, batch, seq, ref.device, cu_seqlens)
        out_q, out_k = apply_rotary(q, k, f, pos, heads_first=heads_first, inverse=inverse, backend="reference")
        if inplace:
            out_q = None if q is None else q.copy_(out_q)
            out_k = None if k is None else k.copy_(out_k)
        return out_q, out_k
    pos = _positions(positions, batch, seq, ref.device, cu_seqlens)
    scale = 1.0 / f.attention_scale if inverse else f.attention_scale
    interleaved = f.layout == "gptj"
    q4 = None if q is None else (q if q.dim() == 4 else q.unsqueeze(0))
    k4 = None if k is None else (k if k.dim() == 4 else k.unsqueeze(0))
    if chosen == "cpu":
        cos, sin = cpu_path.tables(f, positions if cu_seqlens is None else None, pos, scale, inverse)
        out_q, out_k = cpu_path.rotate_qk(q4, k4, cos, sin, rotary_dim=f.rotary_dim, interleaved=interleaved,
                                          heads_first=heads_first, inplace=inplace)
    else:
        out_q, out_k = _triton(q4, k4, f, pos, scale, inverse, interleaved, heads_first, inplace)
    if ref.dim() == 3:
        out_q = None if out_q is None else out_q[0]
        out_k = None if out_k is None else out_k[0]
    return out_q, out_k


def _empty_heads(like: Tensor, heads_first: bool) -> Tensor:
    shape = list(like.shape)
    shape[1 if heads_first else 2] = 0
    return like.new_empty(shape)


def _triton(q, k, f, pos, scale, conjugate, interleaved, heads_first, inplace):
    from ropekit.kernels import ops

    turns = _turns(f.inv_freq64.to(pos.device))
    unscaled = f.unscaled_until if f.original_inv_freq64 is not None else 0
    turns0 = _turns(f.original_inv_freq64.to(pos.device)) if unscaled else turns
    qq = q if q is not None else _empty_heads(k, heads_first)
    kk = k if k is not None else _empty_heads(q, heads_first)
    args = (pos, turns, turns0, int(unscaled), float(scale), bool(conjugate), interleaved, heads_first,
            f.rotary_dim)
    if inplace:
        ops.rope_(qq, kk, *args)
        out_q, out_k = qq, kk
    else:
        out_q, out_k = ops.rope(qq, kk, *args)
    return (out_q if q is not None else None), (out_k if k is not None else None)


def dispatch_rotary(q, k, freqs, positions, *, heads_first, inverse, seq_len, backend):
    """Hook at the top of ``ropekit.apply_rotary``: the fast result, or None to run the reference."""
    check_backend(backend)
    ref = q if q is not None else k
    if backend == "reference" or not isinstance(ref, Tensor):
        return None
    numel = sum(t.numel() for t in (q, k) if isinstance(t, Tensor))
    if resolve_backend(backend, ref, numel) == "reference":
        return None
    return apply_rotary_fast(q, k, freqs, positions, heads_first=heads_first, inverse=inverse,
                             seq_len=seq_len, backend=backend)
