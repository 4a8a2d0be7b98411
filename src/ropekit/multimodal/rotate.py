"""Multi-axis angles and the rotation: positions normalised per axis, float64 angles, (cos, sin) tables.

Angles are built in float64 from the integer positions, cos/sin rounded once to float32 (float64 for float64
inputs), the rotation runs through ``ropekit.rotate`` (the reference, or the fused CPU pass for large inputs).
"""

from __future__ import annotations

import torch

from ropekit.kernels.dispatch import rotate as rotate_tables
from ropekit.multimodal.layout import MultiAxisFrequencies, MultiAxisRope
from ropekit.rotation import broadcast_table, check_qk

Tensor = torch.Tensor


def axis_positions(positions: int | Tensor | None, n_axes: int, batch: int, seq: int,
                   device: torch.device | str) -> Tensor:
    """Normalise ``positions`` to an int64 (n_axes, 1|batch, seq) tensor, checked.

    None: text tokens 0..seq-1 on every axis; an int: the same plus an offset; a tensor (n_axes, seq) or
    (n_axes, batch, seq) of integers >= 0.
    """
    if positions is None or (isinstance(positions, int) and not isinstance(positions, bool)):
        offset = 0 if positions is None else positions
        if offset < 0:
            raise ValueError(f"positions: offset must be >= 0, got {offset}")
        return (offset + torch.arange(seq, device=device)).view(1, 1, seq).expand(n_axes, 1, seq)
    if not isinstance(positions, Tensor):
        raise ValueError(f"positions: expected None, an int offset or an integer tensor (axes, [batch,] seq), got "
                         f"{type(positions).__name__}")
    if positions.is_floating_point() or positions.is_complex() or positions.dtype == torch.bool:
        raise ValueError(f"positions: must be an integer tensor (token indices), got dtype {positions.dtype}")
    pos = positions[:, None] if positions.dim() == 2 else positions
    if pos.dim() != 3 or pos.shape[0] != n_axes or pos.shape[-1] != seq or pos.shape[1] not in (1, batch):
        raise ValueError(f"positions: expected shape ({n_axes}, {seq}) or ({n_axes}, {batch}, {seq}) (axis first) "
                         f"for {n_axes} axes, batch {batch} and seq {seq}, got {tuple(positions.shape)}")
    pos = pos.to(device=device, dtype=torch.long)
    if pos.numel():
        if torch.compiler.is_compiling() or pos.device.type != "cpu":  # no host read in a graph or on a GPU
            torch._assert_async(pos.min() >= 0, "positions: must be >= 0")
        elif int(pos.min()) < 0:
            raise ValueError(f"positions: must be >= 0, got minimum {int(pos.min())}")
    return pos


def multi_axis_angles(freqs: MultiAxisFrequencies, positions: Tensor) -> Tensor:
    """float64 angles, shape (1|batch, seq, rotary_dim/2): pair p at positions[pair_axis[p]] * inv_freq[p]."""
    per_pair = positions.index_select(0, freqs.pair_axis.to(positions.device))  # (pairs, B, S)
    return per_pair.movedim(0, -1).to(torch.float64) * freqs.inv_freq64.to(positions.device)


def multi_axis_cos_sin(freqs: MultiAxisFrequencies, positions: Tensor, dtype: torch.dtype = torch.float32,
                       inverse: bool = False) -> tuple[Tensor, Tensor]:
    """(cos, sin) times each pair's attention scale (divided, with ``inverse``), each (1|batch, seq, rotary_dim/2).

    ``positions``: int64 (axes, 1|batch, seq) (see ``axis_positions``). Computed in float64, rounded once.
    """
    angles = multi_axis_angles(freqs, positions)
    scale = freqs.scale64.to(positions.device)
    if inverse:
        scale = 1.0 / scale
    return (torch.cos(angles) * scale).to(dtype), (torch.sin(angles) * scale).to(dtype)


def apply_multi_axis_rotary(q: Tensor | None, k: Tensor | None, rope: MultiAxisRope | MultiAxisFrequencies,
                            positions: int | Tensor | None = None, *, heads_first: bool = True,
                            inverse: bool = False, backend: str = "auto") -> tuple[Tensor | None, Tensor | None]:
    """Rotate q and k by their multi-axis positions (the functional form of ``MultiAxisRotaryEmbedding``).

    Args:
        q: (batch, q_heads, seq, head_dim), or (batch, seq, q_heads, head_dim) with ``heads_first=False``, or
            3-D without batch; None to skip.
        k: the same with k_heads; None to skip.
        rope: a ``MultiAxisRope`` or its resolved ``MultiAxisFrequencies``.
        positions: None / int offset (text tokens), or an integer (axes, seq) or (axes, batch, seq) tensor.
        inverse: undo the rotation (rotate by -angle, divide by the attention scale).
        backend: "auto", "reference" or "cpu" (``ropekit.rotate``); angles always come from float64 tables.
    Returns:
        (q_rotated, k_rotated), shapes and dtypes of the inputs.
    """
    if q is None and k is None:
        raise ValueError("q, k: at least one tensor is needed")
    freqs = rope.frequencies() if isinstance(rope, MultiAxisRope) else rope
    if not isinstance(freqs, MultiAxisFrequencies):
        raise ValueError(f"rope: expected a MultiAxisRope or MultiAxisFrequencies, got {type(rope).__name__}")
    batch, seq = check_qk(q, k, freqs.rotary_dim, heads_first)
    ref = q if q is not None else k
    pos = axis_positions(positions, freqs.n_axes, batch, seq, ref.device)
    return _rotate(q, k, freqs, pos, heads_first, inverse, backend)


def _rotate(q, k, freqs: MultiAxisFrequencies, pos: Tensor, heads_first: bool, inverse: bool, backend: str,
            tables=None):
    """The rotation itself, on checked inputs and normalised (axes, 1|batch, seq) positions.

    ``tables(freqs, pos, dtype, inverse)`` gives the (cos, sin) tables (default: computed here).
    """
    ref = q if q is not None else k
    compute = torch.float64 if ref.dtype == torch.float64 else torch.float32
    cos, sin = (tables or _tables)(freqs, pos, compute, inverse)
    cos = broadcast_table(cos, ref.dim(), heads_first)
    sin = broadcast_table(sin, ref.dim(), heads_first)
    out = tuple(None if t is None else rotate_tables(t, cos, sin, freqs.layout, conjugate=inverse, backend=backend)
                for t in (q, k))
    return out[0], out[1]


def _tables(freqs: MultiAxisFrequencies, pos: Tensor, dtype: torch.dtype, inverse: bool) -> tuple[Tensor, Tensor]:
    return multi_axis_cos_sin(freqs, pos, dtype=dtype, inverse=inverse)
