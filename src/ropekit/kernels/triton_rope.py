"""The fused Triton RoPE kernel: q and k in one launch, angles computed in the kernel (no cos/sin table).

Angle precision. ``position * inv_freq`` reaches millions of radians, far beyond what float32 can hold
to 1e-6 rad. The kernel therefore works in *turns* in 64-bit fixed point: each pair's frequency in turns,
f = inv_freq / (2 pi), is stored as the int64 ``round(frac(f) * 2^64)`` (exact from the float64 value,
computed on the device without a host sync). ``position * F`` in int64 arithmetic wraps modulo 2^64, which
is exactly "angle mod one turn"; the top 32 bits, read as a signed int, are the reduced angle in
[-1/2, 1/2) turn. Converting those to float32 and scaling by 2 pi leaves an error of a few 1e-7 rad at any
position below 2^63 (measured against the float64 reference in tests: < 1e-6 rad at 4M positions, also
``ropekit.kernels.triton_rope.angle_error``), then cos/sin run on an argument already in [-pi, pi).

Shapes: q (B, Hq, S, D) heads-first or (B, S, Hq, D) heads-last (any strides), k the same with Hk heads,
positions (1|B, S) int64. One program per (batch, seq) token; it rotates every q and k head of that token.
"""

from __future__ import annotations

import math

import torch

try:  # Triton is optional: GPU users install it (``pip install ropekit[gpu]``); CI runs it interpreted.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None

TWO_PI = 2.0 * math.pi
HAVE_TRITON = triton is not None


def turns_fixed_point(inv_freq64: torch.Tensor) -> torch.Tensor:
    """(n,) float64 inverse frequencies -> (n,) int64 turns per position in 2^-64 fixed point.

    Signed form: the value g = f - round(f) in [-1/2, 1/2) turns, times 2^64 (exact: g has a 53-bit
    mantissa), so the int64 product ``position * F`` wraps to the angle modulo one turn.
    """
    f = inv_freq64.to(torch.float64) / TWO_PI
    g = f - torch.round(f)
    g = torch.where(g >= 0.5, g - 1.0, g)
    return torch.ldexp(g, torch.tensor(64, dtype=torch.int32, device=g.device)).to(torch.int64)


def reduced_angles(turns: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The kernel's angle computation in torch (for tests and error reports): float32 angles in [-pi, pi).

    turns: (n,) int64 from ``turns_fixed_point``; positions: any-shape int64 -> positions.shape + (n,).
    Relies on int64 multiplication wrapping modulo 2^64, as in the kernel.
    """
    prod = positions.to(torch.int64)[..., None] * turns
    top = torch.bitwise_right_shift(prod, 32)
    return top.to(torch.float32) * (TWO_PI / 2.0**32)


def angle_error(inv_freq64: torch.Tensor, positions: torch.Tensor) -> float:
    """Max |kernel angle - float64 reference angle| (radians, modulo 2 pi) over ``positions``."""
    ours = reduced_angles(turns_fixed_point(inv_freq64), positions).to(torch.float64)
    ref = positions.to(torch.float64)[..., None] * inv_freq64.to(torch.float64)
    diff = torch.remainder(ours - ref + math.pi, TWO_PI) - math.pi
    return float(diff.abs().max())


if HAVE_TRITON:

    def _rotate_heads_src(
        X, XO, base_x, base_o, shx, sdx, sho, sdo, H,
        c, s, i, mi,
        HALF: tl.constexpr, INTERLEAVED: tl.constexpr, BLOCK_H: tl.constexpr,
        PASS: tl.constexpr, PASS_BLOCK: tl.constexpr, ROT_D: tl.constexpr,
    ):
        """Rotate H heads of one token: x at X + base_x + h*shx + d*sdx, written to XO likewise."""
        if INTERLEAVED:
            d1 = 2 * i
            d2 = 2 * i + 1
        else:
            d1 = i
            d2 = i + HALF
        for h0 in range(0, H, BLOCK_H):
            hs = h0 + tl.arange(0, BLOCK_H)
            m = (hs < H)[:, None] & mi[None, :]
            px = X + base_x + hs[:, None] * shx
            po = XO + base_o + hs[:, None] * sho
            x1 = tl.load(px + d1[None, :] * sdx, mask=m, other=0.0)
            x2 = tl.load(px + d2[None, :] * sdx, mask=m, other=0.0)
            x1f = x1.to(tl.float32)
            x2f = x2.to(tl.float32)
            o1 = x1f * c[None, :] - x2f * s[None, :]
            o2 = x2f * c[None, :] + x1f * s[None, :]
            tl.store(po + d1[None, :] * sdo, o1.to(x1.dtype), mask=m)
            tl.store(po + d2[None, :] * sdo, o2.to(x1.dtype), mask=m)
            if PASS > 0:  # out of place with partial rotary: copy the pass-through channels
                j = tl.arange(0, PASS_BLOCK)
                mp = (hs < H)[:, None] & (j < PASS)[None, :]
                xp = tl.load(px + (ROT_D + j)[None, :] * sdx, mask=mp, other=0.0)
                tl.store(po + (ROT_D + j)[None, :] * sdo, xp, mask=mp)

    def _rope_kernel_src(
        Q, K, QO, KO, POS, TURNS, TURNS0,
        S, HQ, HK, n_hat, scale,
        sqb, sqs, sqh, sqd, sob, sos, soh, sod,
        skb, sks, skh, skd, stb, sts, sth, std, spb, sps,
        HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, ROT_D: tl.constexpr,
        INTERLEAVED: tl.constexpr, CONJ: tl.constexpr, HAS_NHAT: tl.constexpr,
        BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, PASS: tl.constexpr, PASS_BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        b = pid // S
        t = pid % S
        p = tl.load(POS + b * spb + t * sps).to(tl.int64)
        i = tl.arange(0, BLOCK_HALF)
        mi = i < HALF
        turns = tl.load(TURNS + i, mask=mi, other=0)
        if HAS_NHAT:  # LongRoPE: the first n_hat positions keep the original frequencies
            turns0 = tl.load(TURNS0 + i, mask=mi, other=0)
            turns = tl.where(p < n_hat, turns0, turns)
        top = (p * turns) >> 32  # int64 product wraps: angle mod one turn, in 2^-32 turn units
        angle = top.to(tl.float32) * 1.4629180792671596e-09  # 2 pi / 2^32
        c = tl.cos(angle) * scale
        s = tl.sin(angle) * scale
        if CONJ:
            s = -s
        b64 = b.to(tl.int64)
        t64 = t.to(tl.int64)
        _rotate_heads(Q, QO, b64 * sqb + t64 * sqs, b64 * sob + t64 * sos, sqh, sqd, soh, sod, HQ,
                      c, s, i, mi, HALF, INTERLEAVED, BLOCK_HQ, PASS, PASS_BLOCK, ROT_D)
        _rotate_heads(K, KO, b64 * skb + t64 * sks, b64 * stb + t64 * sts, skh, skd, sth, std, HK,
                      c, s, i, mi, HALF, INTERLEAVED, BLOCK_HK, PASS, PASS_BLOCK, ROT_D)


_KERNELS: dict[bool, tuple] = {}


def _kernel():
    """The jitted kernel, built on first use so that TRITON_INTERPRET set after import still counts."""
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)
    if interpret not in _KERNELS:
        _KERNELS[interpret] = (triton.jit(_rotate_heads_src), triton.jit(_rope_kernel_src))
    helper, kernel = _KERNELS[interpret]
    globals()["_rotate_heads"] = helper  # the kernel body calls the helper by this global name
    return kernel


def _bsh_strides(x: torch.Tensor, heads_first: bool) -> tuple[int, int, int, int]:
    """(batch, seq, head, dim) strides of a 4-D tensor in either layout."""
    sb, s1, s2, sd = x.stride()
    return (sb, s2, s1, sd) if heads_first else (sb, s1, s2, sd)


def launch(
    q: torch.Tensor,
    k: torch.Tensor,
    q_out: torch.Tensor,
    k_out: torch.Tensor,
    positions: torch.Tensor,
    turns: torch.Tensor,
    turns_unscaled: torch.Tensor | None,
    unscaled_until: int,
    scale: float,
    conjugate: bool,
    interleaved: bool,
    heads_first: bool,
    rotary_dim: int,
    copy_pass: bool,
) -> None:
    """Run the kernel. q, k, q_out, k_out: 4-D in the same layout (either may have 0 heads); positions (1|B, S).

    Writes q_out / k_out (which may be q / k themselves: in place). ``copy_pass``: also copy the channels
    beyond rotary_dim (out of place); in place they are left as they are.
    """
    if not HAVE_TRITON:
        raise RuntimeError("backend 'triton': triton is not installed (pip install triton)")
    hd = q.shape[-1]
    batch = q.shape[0]
    seq = q.shape[2] if heads_first else q.shape[1]
    hq = q.shape[1] if heads_first else q.shape[2]
    hk = k.shape[1] if heads_first else k.shape[2]
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(max(half, 1))
    n_pass = hd - rotary_dim if copy_pass else 0
    pass_block = triton.next_power_of_2(n_pass) if n_pass else 1
    budget = max(1, 2048 // block_half)
    block_hq = min(triton.next_power_of_2(max(hq, 1)), budget)
    block_hk = min(triton.next_power_of_2(max(hk, 1)), budget)
    if batch * seq == 0:
        return
    has_nhat = bool(unscaled_until) and turns_unscaled is not None
    t0 = turns_unscaled if has_nhat else turns
    grid = (batch * seq,)
    _kernel()[grid](
        q, k, q_out, k_out, positions, turns, t0,
        seq, hq, hk, int(unscaled_until), float(scale),
        *_bsh_strides(q, heads_first), *_bsh_strides(q_out, heads_first),
        *_bsh_strides(k, heads_first), *_bsh_strides(k_out, heads_first),
        positions.stride(0) if positions.shape[0] > 1 else 0, positions.stride(1),
        HALF=half, BLOCK_HALF=block_half, ROT_D=rotary_dim,
        INTERLEAVED=interleaved, CONJ=conjugate, HAS_NHAT=has_nhat,
        BLOCK_HQ=block_hq, BLOCK_HK=block_hk, PASS=n_pass, PASS_BLOCK=pass_block,
    )
