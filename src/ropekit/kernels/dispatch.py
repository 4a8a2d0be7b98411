"""The dispatcher: ``ropekit.apply_rotary`` and ``ropekit.rotate``, which pick a backend and run it.

Layers (each imports only those before it): ``config``/``methods`` <- ``rotation`` (the float64 reference)
<- the kernels ``kernels.cpu``, ``kernels.triton_rope``, ``kernels.ops`` <- this module (and the
``ropekit.kernels`` package, which re-exports it) <- ``module`` (``RotaryEmbedding``).

Backends:
  * ``"reference"``: the pure-PyTorch reference (``ropekit.rotation``), float64 angles; the ground truth.
  * ``"cpu"``: cached float64-built cos/sin tables + one fused compiled pass (``ropekit.kernels.cpu``);
    CPU tensors only. The tables are kept in the caller's ``cache`` (a ``kernels.cpu.TableCache``:
    ``RotaryEmbedding`` and ``RopePatch`` pass their own), else in the one of the frequencies tensor.
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
import threading

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ropekit.kernels import cpu as cpu_path
from ropekit.kernels import triton_rope
from ropekit.rotation import (
    apply_rotary_reference,
    as_frequencies,
    check_qk,
    resolve_positions,
)
from ropekit.rotation import rotate as rotate_reference

Tensor = torch.Tensor

BACKENDS = ("auto", "reference", "cpu", "triton")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# q.numel() + k.numel() from which "auto" takes the cpu path. A judgement, not a measured crossover: small
# inputs (unit tests, toy models) skip the seconds of compiling the fused pass; real prefill sizes take it.
CPU_MIN_ELEMENTS = 1 << 18

# Fixed-point turns for the Triton kernel, per frequencies tensor (a weak key: an entry goes with its tensor,
# and no id of a freed tensor can serve another) and per device.
_turns_cache: WeakIdKeyDictionary = WeakIdKeyDictionary()
_turns_lock = threading.Lock()


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


def _turns(inv_freq64: Tensor, device: torch.device) -> Tensor:
    """Fixed-point turns of ``inv_freq64`` on ``device``, cached per (tensor, device).

    The cache holds ``inv_freq64`` weakly: its entries go when the tensor goes. On a hit nothing is
    copied or allocated (what CUDA-graph capture needs: fill the cache in a warm-up call before capturing);
    on a miss only device ops run (no host sync). The cached turns are normal tensors, also when made under
    ``torch.inference_mode()``: the custom op saves them for backward when autograd runs later.
    """
    if torch.compiler.is_compiling():
        return triton_rope.turns_fixed_point(inv_freq64.to(device))
    with _turns_lock:
        hit = _turns_cache.get(inv_freq64, {}).get(str(device))
    if hit is not None:
        return hit
    with torch.inference_mode(False):
        turns = triton_rope.turns_fixed_point(inv_freq64.to(device))
    with _turns_lock:
        per_device = _turns_cache.get(inv_freq64)
        if per_device is None:
            per_device = _turns_cache[inv_freq64] = {}
        return per_device.setdefault(str(device), turns)


def _positions(positions, batch: int, seq: int, device: torch.device, cu_seqlens: Tensor | None) -> Tensor:
    """(1|B, S) int64 positions; like ``rotation.resolve_positions`` but with no host read under compile."""
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
    cache: cpu_path.TableCache | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """``ropekit.apply_rotary`` with a backend choice, in-place mode and packed ``cu_seqlens``.

    Args: as ``ropekit.apply_rotary``, plus
        backend: "auto", "reference", "cpu" or "triton" (see the module docstring).
        inplace: rotate q and k in their own storage and return them (inference; not differentiable on
            the triton backend).
        cu_seqlens: (docs+1,) cumulative lengths of packed documents along the seq axis (instead of
            ``positions``): positions restart at 0 in each document.
        cache: where the cpu backend keeps its cos/sin tables between calls (see ``apply_rotary``).
    Returns:
        (q_rotated, k_rotated), shapes and dtypes of the inputs.
    """
    if q is None and k is None:
        raise ValueError("q, k: at least one tensor is needed")
    f = as_frequencies(freqs, seq_len)
    batch, seq = check_qk(q, k, f.rotary_dim, heads_first)
    if (inplace and not torch.compiler.is_compiling() and not torch.is_inference_mode_enabled()
            and any(t is not None and t.is_inference() for t in (q, k))):
        # Inference tensors (made under torch.inference_mode()) can only be written inside it: rotate them
        # there. They take no part in autograd, so nothing is lost.
        with torch.inference_mode():
            return apply_rotary_fast(q, k, f, positions, heads_first=heads_first, inverse=inverse,
                                     backend=backend, inplace=True, cu_seqlens=cu_seqlens, cache=cache)
    ref = q if q is not None else k
    numel = sum(t.numel() for t in (q, k) if t is not None)
    chosen = resolve_backend(backend, ref, numel)
    if chosen == "reference":
        pos = positions
        if cu_seqlens is not None:
            pos = _positions(positions, batch, seq, ref.device, cu_seqlens)
        out_q, out_k = apply_rotary_reference(q, k, f, pos, heads_first=heads_first, inverse=inverse)
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
        if cache is None and not torch.compiler.is_compiling():
            cache = cpu_path.cache_for(f.inv_freq64)
        cos, sin = cpu_path.tables(f, positions if cu_seqlens is None else None, pos, scale, inverse, cache)
        out_q, out_k = cpu_path.rotate_qk(q4, k4, cos, sin, rotary_dim=f.rotary_dim, interleaved=interleaved,
                                          heads_first=heads_first, inplace=inplace, cache=cache)
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

    turns = _turns(f.inv_freq64, pos.device)
    unscaled = f.unscaled_until if f.original_inv_freq64 is not None else 0
    turns0 = _turns(f.original_inv_freq64, pos.device) if unscaled else turns
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


def apply_rotary(
    q: Tensor | None,
    k: Tensor | None,
    freqs,
    positions: int | Tensor | None = None,
    *,
    heads_first: bool = True,
    inverse: bool = False,
    seq_len: int | None = None,
    backend: str = "auto",
    cache: cpu_path.TableCache | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Rotate q and k by their positions, on the backend ``backend`` picks (``ropekit.apply_rotary``).

    Args:
        q: (batch, q_heads, seq, head_dim) or (batch, seq, q_heads, head_dim) with ``heads_first=False``;
            None to skip.
        k: the same with k_heads (may differ from q_heads); None to skip.
        freqs: ``Frequencies`` (from ``ropekit.frequencies``) or a ``RopeConfig`` (resolved at ``seq_len``).
        positions: None, an int offset, (seq,) or (batch, seq) integer tensor.
        inverse: undo a rotation (rotate by -angle and divide by the attention scale).
        seq_len: current length for length-dependent methods when ``freqs`` is a RopeConfig.
        backend: "auto" (default), "reference", "cpu" or "triton" (see the module docstring).
        cache: a ``ropekit.kernels.cpu.TableCache`` in which the cpu backend keeps its cos/sin tables between
            calls (``RotaryEmbedding`` and ``RopePatch`` pass their own); None: the cache that lives as long as
            ``freqs``' tensors.
    Returns:
        (q_rotated, k_rotated), same shapes and dtypes as the inputs.
    """
    fast = dispatch_rotary(q, k, freqs, positions, heads_first=heads_first, inverse=inverse, seq_len=seq_len,
                           backend=backend, cache=cache)
    if fast is not None:
        return fast
    return apply_rotary_reference(q, k, freqs, positions, heads_first=heads_first, inverse=inverse, seq_len=seq_len)


def dispatch_rotary(q, k, freqs, positions, *, heads_first, inverse, seq_len, backend, cache=None):
    """The fast result of ``apply_rotary``, or None where the reference is to run."""
    check_backend(backend)
    ref = q if q is not None else k
    if backend == "reference" or not isinstance(ref, Tensor):
        return None
    numel = sum(t.numel() for t in (q, k) if isinstance(t, Tensor))
    if resolve_backend(backend, ref, numel) == "reference":
        return None
    return apply_rotary_fast(q, k, freqs, positions, heads_first=heads_first, inverse=inverse,
                             seq_len=seq_len, backend=backend, cache=cache)


def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "neox", conjugate: bool = False, *,
           backend: str = "auto") -> Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of ``x`` with given tables (``ropekit.rotate``).

    Args:
        x: (..., head_dim) any float dtype.
        cos, sin: half-size tables broadcastable to x[..., :rotary_dim//2], e.g. (batch|1, 1, seq, rotary_dim/2)
            for a heads-first x (batch, heads, seq, head_dim), or (batch|1, seq, 1, rotary_dim/2) heads-last.
        layout: "neox" or "gptj"; conjugate: rotate by -angle.
        backend: "auto" (the fused CPU pass for large 4-D float32/bf16/fp16 CPU inputs with 4-D float32
            tables shaped as above, else the reference), "reference" or "cpu". "triton" computes its angles
            from positions, not tables: use ``apply_rotary`` for it.
    Returns:
        Tensor like ``x``; the CPU pass gives the reference's values bit for bit. The tables are the caller's:
        nothing is cached for them (their pair forms are built per call).
    """
    check_backend(backend)
    if backend == "triton":
        raise ValueError("backend 'triton': the kernel computes its angles from positions, not from cos/sin "
                         "tables; use apply_rotary(q, k, freqs, positions, backend='triton')")
    if backend != "reference":
        heads_first = _table_axis(x, cos, sin)
        if heads_first is None:
            if backend == "cpu":
                raise ValueError(f"backend 'cpu': needs a 4-D x and 4-D float32 tables with a heads axis of 1, "
                                 f"got x {tuple(x.shape)}, cos {tuple(cos.shape)} ({cos.dtype})")
        elif resolve_backend(backend, x, x.numel()) == "cpu":
            axis = 1 if heads_first else 2
            c, s = cos.squeeze(axis), sin.squeeze(axis)
            if conjugate:
                s = -s
            return cpu_path.rotate_qk(x, None, c, s, rotary_dim=2 * c.shape[-1], interleaved=layout == "gptj",
                                      heads_first=heads_first)[0]
    return rotate_reference(x, cos, sin, layout, conjugate)


def _table_axis(x: Tensor, cos: Tensor, sin: Tensor) -> bool | None:
    """True/False: tables (B|1, 1, S, d/2) for heads-first / (B|1, S, 1, d/2) for heads-last 4-D x; None else."""
    if x.dim() != 4 or cos.dim() != 4 or cos.shape != sin.shape or cos.dtype != torch.float32:
        return None
    if 2 * cos.shape[-1] > x.shape[-1] or cos.shape[0] not in (1, x.shape[0]):
        return None
    if cos.shape[1] == 1 and cos.shape[2] == x.shape[2]:
        return True
    if cos.shape[2] == 1 and cos.shape[1] == x.shape[1]:
        return False
    return None
