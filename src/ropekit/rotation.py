"""The rotation itself: the pure-PyTorch reference path every fast kernel is tested against.

This module is the reference layer: it imports only ``config`` and ``methods`` (never ``kernels``). The public
``ropekit.apply_rotary`` / ``ropekit.rotate``, which pick a backend, are in ``ropekit.kernels.dispatch``; the
checks and helpers they share with the reference (``check_qk``, ``as_frequencies``, ``resolve_positions``,
``broadcast_table``) live here.

Angles are built in float64 from integer positions and float64 inverse frequencies, cos/sin are taken
in float64 and rounded once to float32 (float64 for float64 inputs), and the rotation runs in float32
whatever the input dtype; the output has the input's dtype.

Shapes: q and k are (batch, heads, seq, head_dim) when ``heads_first`` (the default) or
(batch, seq, heads, head_dim) otherwise; a 3-D tensor is one unbatched sequence. q and k may have
different head counts (GQA/MQA). Positions are None (0..seq-1), an int offset (KV-cache decoding),
a (seq,) tensor shared by the batch, or a (batch, seq) tensor per row (packed documents restart at 0).
"""

from __future__ import annotations

import torch

from ropekit.config import LAYOUTS, RopeConfig
from ropekit.methods import Frequencies, frequencies

Tensor = torch.Tensor


# ---------------------------------------------------------------------- positions
def positions_from_offsets(offsets: Tensor, seq_len: int) -> Tensor:
    """(batch,) integer offsets -> (batch, seq_len) positions offset + 0..seq_len-1."""
    return offsets.to(torch.long)[:, None] + torch.arange(seq_len, device=offsets.device)


def positions_from_cu_seqlens(cu_seqlens: Tensor) -> Tensor:
    """Packed documents: cumulative lengths [0, n1, n1+n2, ...] -> (total,) positions restarting at 0 each."""
    cu = cu_seqlens.to(torch.long)
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"cu_seqlens: must be 1-D with at least 2 entries, got shape {tuple(cu.shape)}")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths < 0).any()) or int(cu[0]) != 0:
        raise ValueError("cu_seqlens: must start at 0 and be non-decreasing")
    total = int(cu[-1])
    starts = torch.repeat_interleave(cu[:-1], lengths, output_size=total)
    return torch.arange(total, device=cu.device) - starts


def resolve_positions(positions: int | Tensor | None, batch: int, seq_len: int, device: torch.device) -> Tensor:
    """Normalise ``positions`` to an integer tensor of shape (1, seq) or (batch, seq), checked."""
    if positions is None:
        return torch.arange(seq_len, device=device)[None]
    compiling = torch.compiler.is_compiling()
    if isinstance(positions, Tensor) and positions.dim() == 0:
        if compiling and not (positions.is_floating_point() or positions.is_complex()
                              or positions.dtype == torch.bool):
            # A 0-d offset tensor under torch.compile: no host read (it would break the graph).
            torch._assert_async(positions >= 0, "positions: offset must be >= 0")
            return (positions.to(device=device, dtype=torch.long) + torch.arange(seq_len, device=device))[None]
        positions = int(positions)
    if isinstance(positions, bool) or isinstance(positions, float):
        raise ValueError(f"positions: must be integers, got {positions!r}")
    if isinstance(positions, int):
        if positions < 0:
            raise ValueError(f"positions: offset must be >= 0, got {positions}")
        return (positions + torch.arange(seq_len, device=device))[None]
    if not isinstance(positions, Tensor):
        raise ValueError(f"positions: expected None, an int offset or an integer tensor, got {type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions: must be an integer tensor (token indices), got dtype {positions.dtype}")
    if positions.dim() == 1:
        positions = positions[None]
    if positions.dim() != 2 or positions.shape[-1] != seq_len or positions.shape[0] not in (1, batch):
        raise ValueError(
            f"positions: expected shape ({seq_len},) or ({batch}, {seq_len}) for batch {batch} and seq {seq_len}, "
            f"got {tuple(positions.shape)}"
        )
    positions = positions.to(device=device)
    if compiling:  # no host read inside a compiled graph (it would break it): checked in the graph instead
        if positions.numel():
            torch._assert_async(positions.min() >= 0, "positions: must be >= 0")
    elif positions.device.type == "cpu":
        if positions.numel() and int(positions.min()) < 0:
            raise ValueError(f"positions: must be >= 0, got minimum {int(positions.min())}")
    elif positions.numel():
        torch._assert_async(positions.min() >= 0, "positions: must be >= 0")  # no host sync on accelerators
    return positions.to(torch.long)


# ---------------------------------------------------------------------- angles and tables
def rotation_angles(freqs: Frequencies, positions: Tensor) -> Tensor:
    """float64 angles position * inv_freq, shape positions.shape + (rotary_dim/2,)."""
    inv = freqs.inv_freq64.to(positions.device)
    pos = positions.to(torch.float64)[..., None]
    angles = pos * inv
    if freqs.unscaled_until:
        original = freqs.original_inv_freq64.to(positions.device)
        angles = torch.where(pos < freqs.unscaled_until, pos * original, angles)
    return angles


def cos_sin(freqs: Frequencies, positions: Tensor, dtype: torch.dtype = torch.float32, scale: float | None = None):
    """(cos, sin) of the rotation angles times the attention scale, each positions.shape + (rotary_dim/2,).

    Computed in float64 and rounded once to ``dtype`` (float32 unless asked otherwise).
    ``scale`` overrides ``freqs.attention_scale``.
    """
    angles = rotation_angles(freqs, positions)
    s = freqs.attention_scale if scale is None else scale
    return (torch.cos(angles) * s).to(dtype), (torch.sin(angles) * s).to(dtype)


# ---------------------------------------------------------------------- the rotation
def rotate(x: Tensor, cos: Tensor, sin: Tensor, layout: str = "neox", conjugate: bool = False) -> Tensor:
    """Rotate the first 2 * cos.shape[-1] channels of ``x`` pairwise; later channels pass through.

    Args:
        x: (..., head_dim) any float dtype.
        cos, sin: half-size tables broadcastable to x[..., :rotary_dim//2].
        layout: "neox" (pair i = i, i + d/2) or "gptj" (pair i = 2i, 2i+1).
        conjugate: rotate by -angle (the transpose; with scaled tables this is the backward pass).
    Returns:
        Tensor like ``x``.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout: unknown channel layout {layout!r}; accepted: {', '.join(LAYOUTS)}")
    half = cos.shape[-1]
    rd = 2 * half
    if rd > x.shape[-1]:
        raise ValueError(f"rotary_dim {rd} is larger than the head_dim {x.shape[-1]} of the input")
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    xr = x[..., :rd].to(compute)
    cos, sin = cos.to(compute), sin.to(compute)
    if conjugate:
        sin = -sin
    if layout == "neox":
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    out = out.to(x.dtype)
    if rd < x.shape[-1]:
        out = torch.cat((out, x[..., rd:]), dim=-1)
    return out


def check_qk(q: Tensor, k: Tensor | None, rotary_dim: int, heads_first: bool) -> tuple[int, int]:
    """Validate q/k (either may be None) against ``rotary_dim`` and each other; return (batch, seq)."""
    for name, t in (("q", q), ("k", k)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() not in (3, 4):
            layout = "(batch, heads, seq, head_dim)" if heads_first else "(batch, seq, heads, head_dim)"
            raise ValueError(f"{name}: expected a 4-D tensor {layout} (or 3-D without batch), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name}: must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape[-1] < rotary_dim:
            raise ValueError(f"{name}: head_dim {t.shape[-1]} is smaller than rotary_dim {rotary_dim}")
    seq_axis = -2 if heads_first else -3
    ref = q if q is not None else k
    if q is not None and k is not None:
        if q.dim() != k.dim() or q.shape[-1] != k.shape[-1] or q.shape[seq_axis] != k.shape[seq_axis] or (
            q.dim() == 4 and q.shape[0] != k.shape[0]
        ):
            raise ValueError(
                f"q {tuple(q.shape)} and k {tuple(k.shape)}: must agree in batch, seq and head_dim "
                f"(only the head count may differ)"
            )
    batch = ref.shape[0] if ref.dim() == 4 else 1
    return batch, ref.shape[seq_axis]


def broadcast_table(t: Tensor, ndim: int, heads_first: bool) -> Tensor:
    """(B|1, S, d/2) table -> broadcastable to the input layout."""
    t = t.unsqueeze(-3) if heads_first else t.unsqueeze(-2)  # add the heads axis
    if ndim == 3:
        t = t[0]
    return t


def as_frequencies(freqs: Frequencies | RopeConfig, seq_len: int | None) -> Frequencies:
    """``freqs`` itself, or a RopeConfig resolved at ``seq_len`` (see ``ropekit.frequencies``)."""
    if isinstance(freqs, RopeConfig):
        return frequencies(freqs, seq_len)
    if isinstance(freqs, Frequencies):
        return freqs
    raise ValueError(f"freqs: expected Frequencies or RopeConfig, got {type(freqs).__name__}")


def apply_rotary_reference(
    q: Tensor | None,
    k: Tensor | None,
    freqs: Frequencies | RopeConfig,
    positions: int | Tensor | None = None,
    *,
    heads_first: bool = True,
    inverse: bool = False,
    seq_len: int | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Rotate q and k by their positions: the float64-angle reference (``ropekit.apply_rotary`` with
    ``backend="reference"``).

    Args:
        q: (batch, q_heads, seq, head_dim) or (batch, seq, q_heads, head_dim) with ``heads_first=False``;
            None to skip.
        k: the same with k_heads (may differ from q_heads); None to skip.
        freqs: ``Frequencies`` (from ``ropekit.frequencies``) or a ``RopeConfig`` (resolved at ``seq_len``).
        positions: None, an int offset, (seq,) or (batch, seq) integer tensor.
        inverse: undo a rotation (rotate by -angle and divide by the attention scale).
        seq_len: current length for length-dependent methods when ``freqs`` is a RopeConfig.
    Returns:
        (q_rotated, k_rotated), same shapes and dtypes as the inputs.
    """
    if q is None and k is None:
        raise ValueError("q, k: at least one tensor is needed")
    f = as_frequencies(freqs, seq_len)
    batch, seq = check_qk(q, k, f.rotary_dim, heads_first)
    ref = q if q is not None else k
    pos = resolve_positions(positions, batch, seq, ref.device)
    compute = torch.float64 if ref.dtype == torch.float64 else torch.float32
    scale = 1.0 / f.attention_scale if inverse else f.attention_scale
    cos, sin = cos_sin(f, pos, dtype=compute, scale=scale)
    cos = broadcast_table(cos, ref.dim(), heads_first)
    sin = broadcast_table(sin, ref.dim(), heads_first)
    out_q = None if q is None else rotate(q, cos, sin, f.layout, conjugate=inverse)
    out_k = None if k is None else rotate(k, cos, sin, f.layout, conjugate=inverse)
    return out_q, out_k


def apply_rotary(q, k, freqs, positions=None, *, heads_first: bool = True, inverse: bool = False,
                 seq_len: int | None = None, backend: str = "reference"):
    """``apply_rotary_reference`` under its old import path, for older callers (``ropekit.kernels.bench``).

    Only ``backend="reference"``: ``ropekit.apply_rotary`` (``ropekit.kernels.dispatch``) picks backends.
    """
    if backend != "reference":
        raise ValueError(f"backend: ropekit.rotation.apply_rotary is the reference only, got {backend!r}; "
                         f"use ropekit.apply_rotary to choose a backend")
    return apply_rotary_reference(q, k, freqs, positions, heads_first=heads_first, inverse=inverse, seq_len=seq_len)


def rerotate(
    k: Tensor,
    delta: int | Tensor,
    freqs: Frequencies | RopeConfig,
    *,
    positions: int | Tensor | None = None,
    heads_first: bool = True,
) -> Tensor:
    """Shift already-rotated keys by ``delta`` positions (sliding a KV cache), without un-rotating them.

    A pure rotation by delta * inv_freq: the attention scale already in ``k`` stays as it is. Partial
    rotary and layout are respected. With LongRoPE's unscaled leading positions the shift depends on
    where a key sits, so pass the keys' current ``positions``; they are then moved to positions + delta.

    Args:
        k: (batch, heads, seq, head_dim) (or heads-last with ``heads_first=False``).
        delta: int; or an integer tensor: (batch,) one shift per row, (seq,) one per key, or anything
            broadcastable to (batch, seq). A 1-D tensor with batch == seq is refused as ambiguous.
    """
    f = as_frequencies(freqs, None)
    batch, seq = check_qk(None, k, f.rotary_dim, heads_first)
    if isinstance(delta, Tensor):
        if delta.is_floating_point():
            raise ValueError(f"delta: must be an integer tensor, got dtype {delta.dtype}")
        delta_t = delta.to(device=k.device, dtype=torch.long)
        if delta_t.dim() == 1 and delta_t.numel() > 1 and batch == seq:
            raise ValueError(f"delta: a 1-D tensor is ambiguous when batch == seq ({batch}); pass ({batch}, 1) for "
                             f"one shift per row or (1, {seq}) for one per key")
        if delta_t.dim() == 1 and delta_t.numel() == batch:
            delta_t = delta_t[:, None]  # one shift per row
        try:
            delta_t = torch.broadcast_to(delta_t, (batch, seq))
        except RuntimeError:
            raise ValueError(f"delta: shape {tuple(delta.shape)} does not broadcast to (batch, seq) = ({batch}, {seq}); "
                             f"accepted: an int, ({batch},) per row, ({seq},) per key, or ({batch}, {seq})") from None
    elif isinstance(delta, int) and not isinstance(delta, bool):
        delta_t = torch.full((1, seq), delta, dtype=torch.long, device=k.device)
    else:
        raise ValueError(f"delta: must be an int or an integer tensor, got {delta!r}")
    compute = torch.float64 if k.dtype == torch.float64 else torch.float32
    if f.unscaled_until:
        if positions is None:
            raise ValueError("positions: required to re-rotate with LongRoPE's unscaled leading positions (n_hat)")
        old = resolve_positions(positions, batch, seq, k.device)
        new = old + delta_t
        angle = rotation_angles(f, new) - rotation_angles(f, old)
    else:
        angle = delta_t.to(torch.float64)[..., None] * f.inv_freq64.to(k.device)
    cos = broadcast_table(torch.cos(angle).to(compute), k.dim(), heads_first)
    sin = broadcast_table(torch.sin(angle).to(compute), k.dim(), heads_first)
    return rotate(k, cos, sin, f.layout)


def reapply_frequencies(
    k: Tensor,
    old: Frequencies,
    new: Frequencies,
    positions: int | Tensor | None = None,
    *,
    heads_first: bool = True,
) -> Tensor:
    """Move keys rotated with ``old`` frequencies to ``new`` ones at the same positions.

    For dynamic methods whose scale changed as the sequence grew: k_new = R_new(p) R_old(p)^-1 k, attention
    scales included.
    """
    if old.rotary_dim != new.rotary_dim or old.layout != new.layout:
        raise ValueError("old, new: frequencies must have the same rotary_dim and layout")
    unrotated = apply_rotary_reference(None, k, old, positions, heads_first=heads_first, inverse=True)[1]
    return apply_rotary_reference(None, unrotated, new, positions, heads_first=heads_first)[1]


# ---------------------------------------------------------------------- checkpoint conversion
def layout_permutation(head_dim: int, rotary_dim: int | None = None, src: str = "gptj", dst: str = "neox") -> Tensor:
    """Index ``perm`` of one head's channels such that ``x_dst = x_src[..., perm]``.

    Pass-through channels (beyond rotary_dim) keep their place.
    """
    rd = head_dim if rotary_dim is None else rotary_dim
    for name, value in (("src", src), ("dst", dst)):
        if value not in LAYOUTS:
            raise ValueError(f"{name}: unknown channel layout {value!r}; accepted: {', '.join(LAYOUTS)}")
    if rd % 2 or rd > head_dim:
        raise ValueError(f"rotary_dim: must be even and <= head_dim {head_dim}, got {rd}")
    half = rd // 2
    # Where the first/second member of pair i lives in each layout.
    slots = {"neox": (torch.arange(half), torch.arange(half) + half),
             "gptj": (2 * torch.arange(half), 2 * torch.arange(half) + 1)}
    perm = torch.arange(head_dim)
    a_dst, b_dst = slots[dst]
    a_src, b_src = slots[src]
    perm[a_dst] = a_src
    perm[b_dst] = b_src
    return perm


def permute_qk_weight(
    weight: Tensor, num_heads: int, head_dim: int, rotary_dim: int | None = None, src: str = "gptj", dst: str = "neox"
) -> Tensor:
    """Permute the output rows of a q or k projection (weight (heads*head_dim, in) or bias (heads*head_dim,))
    from one channel layout to the other, so that a model keeps its attention scores under the new layout."""
    if weight.shape[0] != num_heads * head_dim:
        raise ValueError(
            f"weight: first dimension must be num_heads * head_dim = {num_heads * head_dim}, got {weight.shape[0]}"
        )
    perm = layout_permutation(head_dim, rotary_dim, src, dst).to(weight.device)
    rows = (torch.arange(num_heads, device=weight.device)[:, None] * head_dim + perm[None]).reshape(-1)
    return weight[rows].clone()
