"""The fast CPU path: ropekit's float64-built cos/sin table (cached) + one fused, compiled rotation pass.

Chosen by measurement (``ropekit bench``): the reference builds several full-size float32 temporaries
(slices, products, ``cat``), the fused pass reads q/k once and writes the output once. The fused pass is
``torch.compile`` of ``fused_rotate`` (Inductor's C++ backend vectorises it); under an outer
``torch.compile`` the same function is traced into the caller's graph instead.

Angles: the tables are ``ropekit.rotation.cos_sin`` (float64, rounded once to float32), exactly the
reference's; only the rotation arithmetic is reorganised (float32, the reference's compute dtype).
"""

from __future__ import annotations

import types
import warnings
from collections import OrderedDict

import torch

Tensor = torch.Tensor

# Tables up to this many bytes are cached (per frequencies, positions, scale, direction): a model calls
# RoPE once per layer with the same positions.
TABLE_CACHE_BYTES = 64 * 2**20
TABLE_CACHE_ENTRIES = 8
_table_cache: "OrderedDict[tuple, tuple]" = OrderedDict()


def fused_rotate(x: Tensor, cos: Tensor, sin: Tensor, out: Tensor, rotary_dim: int, interleaved: bool,
                 copy_pass: bool) -> Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x`` into ``out`` (may be ``x``: in place).

    x, out: (..., head_dim), same shape; cos, sin: float32, broadcastable to (..., rotary_dim/2).
    ``copy_pass``: copy channels beyond rotary_dim (out of place with partial rotary).
    """
    half = rotary_dim // 2
    if interleaved:
        s1, s2 = slice(0, rotary_dim, 2), slice(1, rotary_dim, 2)
    else:
        s1, s2 = slice(0, half), slice(half, rotary_dim)
    x1 = x[..., s1].float()
    x2 = x[..., s2].float()
    o1 = (x1 * cos - x2 * sin).to(out.dtype)
    o2 = (x2 * cos + x1 * sin).to(out.dtype)
    out[..., s1] = o1
    out[..., s2] = o2
    if copy_pass:
        out[..., rotary_dim:] = x[..., rotary_dim:]
    return out


# One compiled function per variant (dtype, layout, pass-through copy, in place, autograd), each with its
# own code object: Dynamo's recompile limit counts per code object, and a variant then only recompiles
# when shapes or strides change (once, to dynamic shapes).
_compiled: dict[tuple, object] = {}
_failed: set[tuple] = set()


def _variant_fn(key: tuple):
    if key not in _compiled:
        code = fused_rotate.__code__.replace(co_name=f"fused_rotate_{len(_compiled)}")
        fn = types.FunctionType(code, fused_rotate.__globals__, code.co_name, fused_rotate.__defaults__)
        _compiled[key] = torch.compile(fn, fullgraph=True)
    return _compiled[key]


def _run(key: tuple, compile: bool, *args):
    """Run the fused pass compiled for ``key`` (eager under an outer compile, when off, or after a failure)."""
    if not compile or key in _failed or torch.compiler.is_compiling():
        return fused_rotate(*args)
    try:
        return _variant_fn(key)(*args)
    except Exception as err:  # no C++ compiler, recompile limit...: say so once, run the same maths eagerly
        _failed.add(key)
        warnings.warn(f"ropekit cpu backend: torch.compile failed ({type(err).__name__}: "
                      f"{str(err).splitlines()[0] if str(err) else ''}); running the fused rotation eagerly "
                      f"for {key}", RuntimeWarning, stacklevel=3)
        return fused_rotate(*args)


def _positions_key(positions) -> tuple | None:
    if positions is None:
        return ("range", 0)
    if isinstance(positions, int) and not isinstance(positions, bool):
        return ("range", positions)
    if isinstance(positions, Tensor):
        return ("tensor", id(positions), positions._version)
    return None


def tables(freqs, positions_arg, positions: Tensor, scale: float, conjugate: bool) -> tuple[Tensor, Tensor]:
    """float32 (cos*scale, ±sin*scale), each positions.shape + (rotary_dim/2,), from the float64 reference.

    ``positions_arg`` is what the caller passed (None / int / tensor): it keys the cache; ``positions`` the
    resolved (1|B, S) tensor. The cache holds references to the tensors it keys on (ids stay unique).
    """
    from ropekit.rotation import cos_sin

    pkey = None if torch.compiler.is_compiling() else _positions_key(positions_arg)
    key = None
    if pkey is not None:
        key = (id(freqs.inv_freq64), freqs.unscaled_until, float(scale), conjugate, tuple(positions.shape),
               str(positions.device), pkey)
        hit = _table_cache.get(key)
        if hit is not None and hit[0] is freqs.inv_freq64 and hit[1] is (
            positions_arg if isinstance(positions_arg, Tensor) else None
        ):
            _table_cache.move_to_end(key)
            return hit[2], hit[3]
    cos, sin = cos_sin(freqs, positions, dtype=torch.float32, scale=scale)
    if conjugate:
        sin = -sin
    if key is not None and 2 * cos.numel() * 4 <= TABLE_CACHE_BYTES:
        _table_cache[key] = (freqs.inv_freq64, positions_arg if isinstance(positions_arg, Tensor) else None,
                             cos, sin)
        while len(_table_cache) > TABLE_CACHE_ENTRIES:
            _table_cache.popitem(last=False)
    return cos, sin


def clear_cache() -> None:
    """Drop the cached cos/sin tables."""
    _table_cache.clear()


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
) -> tuple[Tensor | None, Tensor | None]:
    """Rotate 4-D q and k with (1|B, S, rotary_dim/2) float32 tables; out of place unless ``inplace``."""
    # (B, S, h) -> broadcast over heads: (B, 1, S, h) heads-first, (B, S, 1, h) heads-last.
    c = cos.unsqueeze(1) if heads_first else cos.unsqueeze(2)
    s = sin.unsqueeze(1) if heads_first else sin.unsqueeze(2)
    outs = []
    for x in (q, k):
        if x is None:
            outs.append(None)
            continue
        out = x if inplace else torch.empty_like(x)
        copy_pass = not inplace and rotary_dim < x.shape[-1]
        key = (x.dtype, interleaved, copy_pass, inplace, x.requires_grad and torch.is_grad_enabled(), x.dim())
        outs.append(_run(key, compile, x, c, s, out, rotary_dim, interleaved, copy_pass))
    return outs[0], outs[1]
