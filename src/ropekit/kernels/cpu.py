"""The fast CPU path: ropekit's float64-built cos/sin table (cached by its owner) + one fused, compiled pass.

Chosen by measurement (``ropekit bench``; the numbers are in benchmarks/README.md, "How the CPU path got
fast"). The reference builds several full-size float32 temporaries (slices, products, ``cat``); this path
reads q/k once and writes each output element once:

* ``rotate_pairs``, compiled with ``torch.compile`` (Inductor's C++ backend vectorises it), works on a view
  with the pair as its own axis, ``x * cos + flip(x) * (-sin, +sin)``, so every load is a contiguous vector
  load (the two-halves-and-``cat`` forms made Inductor gather element by element or write a temporary);
* one dynamic-shape compiled pass per variant (no compile per sequence length);
* out-of-place outputs come from a small pool of reusable buffers (fresh memory costs a page fault per
  4 KiB, which cost more than the rotation itself), else from huge-page-advised allocations;
* in place, a few heads at a time through a cache-sized scratch buffer.

Under an outer ``torch.compile`` the same functions are traced into the caller's graph instead.

Caches: the cos/sin tables live in a ``TableCache`` owned by what uses them (a ``RotaryEmbedding``, a
``RopePatch``, or, for a plain ``apply_rotary`` call, the frequencies tensor, through a weak reference: they go
when it goes); each holds a lock, since threads may share an owner. Module-global state is only what serves
compiled code and memory: the compiled passes, the output pool (each with a lock) and per-thread scratch.

Angles: the tables are ``ropekit.rotation.cos_sin`` (float64, rounded once to float32), exactly the
reference's; only the rotation arithmetic is reorganised (float32, the reference's compute dtype, with the
same products and sums per element).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
import threading
import types
import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch.utils.weak import WeakIdKeyDictionary

from ropekit.rotation import cos_sin

Tensor = torch.Tensor

# Tables up to this many bytes are cached (per frequencies, positions, scale, direction): a model calls
# RoPE once per layer with the same positions. Entries per TableCache (tables and their pair forms each).
TABLE_CACHE_BYTES = 64 * 2**20
TABLE_CACHE_ENTRIES = 8


# Out-of-place outputs are fresh allocations, and first-touching them page by page dominated the time
# (filling a new 64 MiB tensor: 16384 faults of 4 KiB, about 20 ms on a 2-core VM, four times the rotation).
# Two remedies, measured in benchmarks/README.md ("How the CPU path got fast"):
#  * a small pool of output buffers, reused once nothing refers to them any more (the storage's use count,
#    the liveness test PyTorch's CUDA-graph trees use for their outputs): in a model, layer n+1's rotated q
#    lands in layer n's, which attention has finished with. At most OUTPUT_POOL_BYTES are kept.
#  * outputs the pool cannot serve are advised onto transparent huge pages (2 MiB, 512x fewer faults), as
#    PyTorch's own THP_MEM_ALLOC_ENABLE=1 does for every allocation.
OUTPUT_POOL_BYTES = 256 * 2**20
HUGE_PAGE_MIN_BYTES = 4 * 2**20
_HUGE_PAGE = 2 * 2**20
_MADV_HUGEPAGE = 14


def _load_madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return madvise


_madvise = _load_madvise()


def _huge_page_empty_like(x: Tensor) -> Tensor:
    """``torch.empty_like(x)``; when large, its not-yet-touched pages advised onto transparent huge pages.

    Advice only: where THP is off ("never") or not Linux, madvise fails or is absent and nothing changes.
    """
    out = torch.empty_like(x)
    nbytes = out.untyped_storage().nbytes()
    if _madvise is not None and nbytes >= HUGE_PAGE_MIN_BYTES and out.device.type == "cpu":
        start = out.untyped_storage().data_ptr()
        first = -(-start // _HUGE_PAGE) * _HUGE_PAGE  # whole huge pages inside the buffer only
        last = (start + nbytes) // _HUGE_PAGE * _HUGE_PAGE
        if last > first:
            _madvise(first, last - first, _MADV_HUGEPAGE)
    return out


_pool: list[Tensor] = []  # flat buffers; a buffer is free when the pool's reference is its storage's only one
_pool_lock = threading.Lock()


def _storage_users(buf: Tensor) -> int:
    # The temporary UntypedStorage object counts once; the pool's own tensor once more.
    return torch._C._storage_Use_Count(buf.untyped_storage()._cdata) - 1


def empty_output(x: Tensor) -> Tensor:
    """An uninitialised tensor like ``x`` (shape, dtype; contiguous when x is) for an out-of-place result.

    Large contiguous outputs come from the output pool when a buffer of the same size is free, else from a
    fresh huge-page-advised allocation that joins the pool while it has room. Other tensors: ``empty_like``.
    Under ``torch.inference_mode()`` the pool serves inference-tensor buffers, outside it normal ones: an
    output is then what any operator would return in that mode (an inference tensor cannot be written
    outside inference mode, and a normal one viewed inside it cannot be written in place after).
    """
    if torch.compiler.is_compiling():  # traced into a caller's graph: Inductor owns the allocation
        return torch.empty_like(x)
    nbytes = x.numel() * x.element_size()
    if nbytes < HUGE_PAGE_MIN_BYTES or not x.is_contiguous() or x.device.type != "cpu":
        return torch.empty_like(x)
    inference = torch.is_inference_mode_enabled()
    with _pool_lock:
        for i, buf in enumerate(_pool):
            if (buf.dtype == x.dtype and buf.numel() == x.numel() and buf.is_inference() == inference
                    and _storage_users(buf) == 1):
                _pool.append(_pool.pop(i))  # most recently used last
                return buf.view(x.shape)
        flat = _huge_page_empty_like(x.reshape(-1))  # the pool keeps the base, callers get views of it
        # Make room by dropping free buffers, least recently used first (shapes of an earlier model or run).
        used = sum(b.numel() * b.element_size() for b in _pool)
        keep = []
        for buf in _pool:  # oldest first
            if used + nbytes > OUTPUT_POOL_BYTES and _storage_users(buf) == 1:
                used -= buf.numel() * buf.element_size()
            else:
                keep.append(buf)
        _pool[:] = keep
        if used + nbytes <= OUTPUT_POOL_BYTES:
            _pool.append(flat)
        return flat.view(x.shape)


def pair_view(x: Tensor, rotary_dim: int, interleaved: bool) -> Tensor:
    """x's rotary channels with the pair as its own axis: (..., 2, rotary_dim/2) neox, (..., rotary_dim/2, 2) gptj."""
    xr = x[..., :rotary_dim]
    return xr.unflatten(-1, (rotary_dim // 2, 2) if interleaved else (2, rotary_dim // 2))


def pair_tables(cos: Tensor, sin: Tensor, interleaved: bool) -> tuple[Tensor, Tensor]:
    """(..., rotary_dim/2) tables -> broadcastable to ``pair_view``: cos on both members, sin signed (-sin, +sin)."""
    axis = -1 if interleaved else -2
    return cos.unsqueeze(axis), torch.stack((-sin, sin), dim=axis)


def rotate_pairs(xp: Tensor, cos_p: Tensor, sin_p: Tensor, out_p: Tensor, interleaved: bool) -> Tensor:
    """The fused pass: ``out_p = xp * cos + partner * (∓sin)``, partner = xp with each pair swapped.

    xp, out_p: ``pair_view``s (must not overlap); cos_p, sin_p: ``pair_tables``, float32. Per element it is
    the reference's float32 arithmetic (x1*cos - x2*sin, x2*cos + x1*sin). Written over the pair axis with a
    flip, not as halves joined by cat: every load is then a contiguous vector load and every output element
    is written once, straight into ``out_p`` (the cat forms made Inductor gather element by element or go
    through a temporary; measurements in benchmarks/README.md).
    """
    xf = xp.float()
    partner = xf.flip(-1 if interleaved else -2)
    return out_p.copy_((xf * cos_p + partner * sin_p).to(out_p.dtype))


def fused_rotate(x: Tensor, cos_p: Tensor, sin_p: Tensor, out: Tensor, rotary_dim: int, interleaved: bool,
                 run=None) -> Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` into ``out`` and copy the rest (eager unless ``run``).

    x, out: (..., head_dim), same shape, not overlapping; cos_p, sin_p: ``pair_tables``, broadcastable to
    ``pair_view(x)``. ``run(xp, cos_p, sin_p, out_p, interleaved)`` is the pass to use (default: eager).
    """
    (run or rotate_pairs)(pair_view(x, rotary_dim, interleaved), cos_p, sin_p,
                          pair_view(out, rotary_dim, interleaved), interleaved)
    if rotary_dim < x.shape[-1]:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


# One compiled pass per variant (dtype, layout, autograd, rank, inference mode, contiguity), with dynamic shapes from the
# first call: no compile per new length (passkey prompts, for example, all differ in length), and the pair
# formulation vectorises as well with dynamic sizes as with static ones (measured: within noise). Each
# variant gets its own code object, so Dynamo's per-code recompile limit counts per variant.
_compiled_passes: dict[tuple, object] = {}
_failed: set[tuple] = set()
_compiled_lock = threading.Lock()  # threads may ask for the same variant at once: one compiled pass each


def _compiled(name: str):
    code = rotate_pairs.__code__.replace(co_name=name)
    fn = types.FunctionType(code, rotate_pairs.__globals__, code.co_name, rotate_pairs.__defaults__)
    return torch.compile(fn, fullgraph=True, dynamic=True)


def _pass_for(key: tuple, xp: Tensor, out_p: Tensor):
    key = key + (xp.is_contiguous(), out_p.is_contiguous())
    with _compiled_lock:
        if key not in _compiled_passes:
            _compiled_passes[key] = _compiled(f"rotate_pairs_{len(_compiled_passes)}")
        return _compiled_passes[key]


def _run(key: tuple, compile: bool, x: Tensor, cos_p: Tensor, sin_p: Tensor, out: Tensor, rotary_dim: int,
         interleaved: bool) -> Tensor:
    """``fused_rotate`` with the compiled pass for ``key`` (eager when off or after a failure)."""
    if not compile or key in _failed:
        return fused_rotate(x, cos_p, sin_p, out, rotary_dim, interleaved)

    def run(xp, cos_p, sin_p, out_p, interleaved_):
        return _pass_for(key, xp, out_p)(xp, cos_p, sin_p, out_p, interleaved_)
    try:
        return fused_rotate(x, cos_p, sin_p, out, rotary_dim, interleaved, run=run)
    except Exception as err:  # no C++ compiler...: say so once, run the same maths eagerly
        with _compiled_lock:
            _failed.add(key)
        warnings.warn(f"ropekit cpu backend: torch.compile failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); running the fused rotation eagerly "
                      f"for {key}", RuntimeWarning, stacklevel=3)
        return fused_rotate(x, cos_p, sin_p, out, rotary_dim, interleaved)


# In place, the pass cannot write where it still has to read (a pair's second member needs the first), so
# Inductor would rotate into a full-size temporary and copy back. Instead: a few heads at a time into a
# small reused scratch buffer that stays in cache, then copied back; memory traffic stays one read and one
# write of q and k.
INPLACE_CHUNK_BYTES = 4 * 2**20
_scratch = threading.local()  # per thread: two threads rotating in place must not share a scratch buffer


def _scratch_like(part: Tensor) -> Tensor:
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = OrderedDict()
    inference = torch.is_inference_mode_enabled()  # a buffer is written in the mode it was made in
    key = (tuple(part.shape), part.dtype, inference)
    buf = buffers.get(key)
    if buf is None:
        buf = buffers[key] = torch.empty(part.shape, dtype=part.dtype)
        while len(buffers) > 2:
            buffers.popitem(last=False)
    return buf


def _heads_per_chunk(heads: int, bytes_per_head: int) -> int:
    """The largest divisor of ``heads`` whose chunk fits INPLACE_CHUNK_BYTES (1 when one head is larger):
    equal chunks, so one scratch buffer serves every chunk."""
    best = 1
    for n in range(1, heads + 1):
        if heads % n == 0 and n * bytes_per_head <= INPLACE_CHUNK_BYTES:
            best = n
    return best


def _rotate_inplace(key: tuple, compile: bool, x: Tensor, cos_p: Tensor, sin_p: Tensor, rotary_dim: int,
                    interleaved: bool, heads_dim: int) -> Tensor:
    xr = x[..., :rotary_dim]  # pass-through channels stay where they are
    heads = xr.shape[heads_dim]
    n = _heads_per_chunk(heads, xr.numel() // max(heads, 1) * xr.element_size())
    for h0 in range(0, heads, n):
        part = xr.narrow(heads_dim, h0, n)
        part.copy_(_run(key, compile, part, cos_p, sin_p, _scratch_like(part), rotary_dim, interleaved))
    return x


def _normal_tensors():
    """A context in which new tensors are normal ones, also inside ``torch.inference_mode()``: what the caches
    keep must be usable in every mode (an inference tensor cannot be saved for backward outside it)."""
    return torch.inference_mode(False)


def _frequencies_key(freqs) -> tuple:
    """The frequencies' values as a hashable key (a few hundred bytes): equal frequencies share tables, and no
    object id (which a freed tensor hands on to the next) is ever part of a key."""
    def raw(t):
        return None if t is None else t.detach().to("cpu", torch.float64).numpy().tobytes()
    return raw(freqs.inv_freq64), raw(freqs.original_inv_freq64), int(freqs.unscaled_until)


def _storage_key(t: Tensor) -> tuple:
    try:
        version = t._version
    except RuntimeError:  # an inference tensor
        version = None
    return (t.data_ptr(), t.device, t.dtype, tuple(t.shape), t.stride(), version)


def _pair_tables(cos: Tensor, sin: Tensor, interleaved: bool, heads_first: bool) -> tuple[Tensor, Tensor]:
    """``pair_tables`` of (1|B, S, rotary_dim/2) tables, with a heads axis to broadcast over (heads-first
    (B, 1, S, ...), heads-last (B, S, 1, ...))."""
    axis = 1 if heads_first else 2
    return pair_tables(cos.unsqueeze(axis), sin.unsqueeze(axis), interleaved)


class TableCache:
    """float32 cos/sin tables, and their pair forms, kept between calls by the object that uses them.

    Owned by a ``RotaryEmbedding``, a ``RopePatch``, or (``cache_for``) a frequencies tensor; bounded (LRU,
    ``entries`` of each kind); thread-safe (one lock; tables are built outside it). A copy or an unpickled one
    starts empty: the tables are derived data.
    """

    def __init__(self, entries: int = TABLE_CACHE_ENTRIES) -> None:
        self.entries = entries
        self._lock = threading.Lock()
        self._tables: OrderedDict[tuple, tuple] = OrderedDict()
        self._pairs: OrderedDict[tuple, tuple] = OrderedDict()
        _all_caches.add(self)

    def __getstate__(self) -> dict:
        return {"entries": self.entries}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["entries"])

    def __deepcopy__(self, memo) -> TableCache:
        return TableCache(self.entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._tables) + len(self._pairs)

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()
            self._pairs.clear()

    def _put(self, store: OrderedDict, key: tuple, entry: tuple) -> None:
        with self._lock:
            store[key] = entry
            while len(store) > self.entries:
                store.popitem(last=False)

    def tables(self, freqs, positions: Tensor, scale: float, conjugate: bool) -> tuple[Tensor, Tensor]:
        """``tables``' result for these frequencies and positions, from the cache when an entry matches."""
        if torch.compiler.is_compiling():  # traced into the caller's graph: no Python-side cache
            cos, sin = cos_sin(freqs, positions, dtype=torch.float32, scale=scale)
            return cos, (-sin if conjugate else sin)
        key = (_frequencies_key(freqs), float(scale), bool(conjugate), tuple(positions.shape), positions.dtype,
               str(positions.device))
        with self._lock:
            hit = self._tables.get(key)
            if hit is not None and torch.equal(hit[0], positions):
                self._tables.move_to_end(key)
                return hit[1], hit[2]
        with _normal_tensors():
            cos, sin = cos_sin(freqs, positions, dtype=torch.float32, scale=scale)
            if conjugate:
                sin = -sin
            if 2 * cos.numel() * 4 <= TABLE_CACHE_BYTES:
                # The entry keeps a copy of the positions: a call with equal positions is served from it.
                self._put(self._tables, key, (positions.clone(), cos, sin))
        return cos, sin

    def pair_tables(self, cos: Tensor, sin: Tensor, interleaved: bool, heads_first: bool) -> tuple[Tensor, Tensor]:
        """``_pair_tables(cos, sin, ...)``, cached per table pair, as the tables themselves are."""
        if torch.compiler.is_compiling():
            return _pair_tables(cos, sin, interleaved, heads_first)
        # Keyed on the tables' storage (a caller may pass fresh views of the same tables on every call); the entry
        # holds the tables themselves, so the memory cannot be reused while cached. Inference tensors have no
        # version counter: ropekit's own tables are never written in place, so their address and layout decide.
        key = (_storage_key(cos), _storage_key(sin), interleaved, heads_first)
        with self._lock:
            hit = self._pairs.get(key)
            if hit is not None:
                self._pairs.move_to_end(key)
                return hit[2], hit[3]
        with _normal_tensors():
            cos_p, sin_p = _pair_tables(cos, sin, interleaved, heads_first)
        self._put(self._pairs, key, (cos, sin, cos_p, sin_p))
        return cos_p, sin_p


_all_caches: weakref.WeakSet[TableCache] = weakref.WeakSet()  # for cache_info / clear_cache only
# The caches of plain calls, each living as long as its frequencies tensor (a weak key: gone with the tensor).
_owned: WeakIdKeyDictionary = WeakIdKeyDictionary()
_owned_lock = threading.Lock()


def cache_for(owner: Tensor) -> TableCache:
    """The ``TableCache`` that lives as long as ``owner`` (a frequencies' ``inv_freq64``), for callers that
    hold no cache of their own (a plain ``apply_rotary``)."""
    with _owned_lock:
        cache = _owned.get(owner)
        if cache is None:
            cache = _owned[owner] = TableCache()
        return cache


def tables(freqs, positions_arg, positions: Tensor, scale: float, conjugate: bool,
           cache: TableCache | None = None) -> tuple[Tensor, Tensor]:
    """float32 (cos*scale, ±sin*scale), each positions.shape + (rotary_dim/2,), from the float64 reference.

    ``positions`` is the resolved (1|B, S) integer tensor. Cached in ``cache`` (None: the one of
    ``freqs.inv_freq64``, ``cache_for``) by value: by the frequencies' values, and an entry keeps a copy of the
    positions it was built for and serves a call whose positions are equal to it (an element-wise compare,
    much cheaper than the table, and on the CPU no device sync), so an edit in place, a reused ``id`` or an
    inference tensor (which has no version counter) cannot serve stale tables. ``positions_arg`` (what the
    caller passed) is not needed for the key and kept for the signature. The tables are normal tensors, also
    when built under ``torch.inference_mode()``, so one cache serves inference, no_grad and autograd.
    """
    if torch.compiler.is_compiling():  # traced into the caller's graph: no Python-side cache
        cos, sin = cos_sin(freqs, positions, dtype=torch.float32, scale=scale)
        return cos, (-sin if conjugate else sin)
    return (cache if cache is not None else cache_for(freqs.inv_freq64)).tables(freqs, positions, scale, conjugate)


@dataclass(frozen=True)
class PooledBuffer:
    """One buffer of the output pool: its address, its size in elements, and whether an output still uses it."""

    data_ptr: int
    numel: int
    in_use: bool


@dataclass(frozen=True)
class CacheInfo:
    """What the CPU path keeps between calls (``cache_info()``): pooled output buffers oldest first, the number of
    cached cos/sin tables and of compiled passes."""

    pool: tuple[PooledBuffer, ...]
    tables: int
    compiled_passes: int


def cache_info() -> CacheInfo:
    """A snapshot of the CPU path's caches, for memory accounting and tests (holds no reference to a buffer)."""
    with _pool_lock:
        pool = tuple(PooledBuffer(buf.data_ptr(), buf.numel(), _storage_users(buf) > 1) for buf in _pool)
    with _compiled_lock:
        compiled = len(_compiled_passes)
    return CacheInfo(pool=pool, tables=sum(len(c) for c in list(_all_caches)), compiled_passes=compiled)


def clear_cache() -> None:
    """Drop the cached cos/sin tables (of every ``TableCache``), the in-place scratch buffers and the output
    pool's free buffers."""
    for cache in list(_all_caches):
        cache.clear()
    _scratch.buffers = OrderedDict()  # this thread's; other threads' go with their threads
    with _pool_lock:
        _pool[:] = [buf for buf in _pool if _storage_users(buf) > 1]


def rotate_qk(
    q: Tensor | None,
    k: Tensor | None,
    cos: Tensor,
    sin: Tensor,
    *,
    rotary_dim: int,
    interleaved: bool,
    heads_first: bool,
    inplace: bool = False,
    compile: bool = True,
    cache: TableCache | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Rotate 4-D q and k with (1|B, S, rotary_dim/2) float32 tables; out of place unless ``inplace``.

    ``cache``: where the tables' pair forms are kept (the ``TableCache`` the tables came from); None: built
    for this call only (a caller's own tables, ``ropekit.rotate``)."""
    if cache is None:
        cos_p, sin_p = _pair_tables(cos, sin, interleaved, heads_first)
    else:
        cos_p, sin_p = cache.pair_tables(cos, sin, interleaved, heads_first)
    outs = []
    for x in (q, k):
        if x is None:
            outs.append(None)
        elif torch.compiler.is_compiling():  # traced into the caller's graph; Inductor plans the buffers
            rot = fused_rotate(x, cos_p, sin_p, torch.empty_like(x), rotary_dim, interleaved)
            outs.append(x.copy_(rot) if inplace else rot)
        else:
            grad = x.requires_grad and torch.is_grad_enabled()
            # Inference mode is part of the key: Dynamo guards on it, so each mode gets its own compiled code
            # (and its own recompile budget) instead of recompiling one back and forth.
            key = (x.dtype, interleaved, grad, x.dim(), torch.is_inference_mode_enabled())
            if inplace and not grad:
                outs.append(_rotate_inplace(key, compile, x, cos_p, sin_p, rotary_dim, interleaved,
                                            1 if heads_first else 2))
            else:
                # With autograd the output joins the graph (CopySlices on its base): never a pooled buffer.
                fresh = torch.empty_like(x) if grad else empty_output(x)
                out = _run(key, compile, x, cos_p, sin_p, fresh, rotary_dim, interleaved)
                outs.append(x.copy_(out) if inplace else out)
    return outs[0], outs[1]
