"""``MultiAxisRotaryEmbedding``: the nn.Module form, owning its per-device frequencies and (cos, sin) cache."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ropekit.kernels.dispatch import check_backend
from ropekit.kernels.dispatch import rotate as rotate_tables
from ropekit.multimodal.layout import MultiAxisFrequencies, MultiAxisRope
from ropekit.multimodal.rotate import _rotate, _tables, axis_positions, multi_axis_cos_sin
from ropekit.rotation import check_qk

Tensor = torch.Tensor

TABLE_CACHE_ENTRIES = 4  # per module: a model calls each layer's RoPE with the same positions


class MultiAxisRotaryEmbedding(nn.Module):
    """RoPE for q and k with multi-axis positions: M-RoPE (t, h, w) or 2-D axial (row, col).

    Args:
        rope: a ``MultiAxisRope`` (``mrope(...)``, ``axial_rope(...)``, ``mrope_from_hf(...)``).
        heads_first: inputs are (batch, heads, seq, head_dim) if True, (batch, seq, heads, head_dim) if False.
        backend: "auto" (default), "reference" or "cpu" (see ``ropekit.rotate``).
        check_positions: raise for a position >= its axis's target length (every axis needs one).

    Call as ``rope(q, k, positions)`` -> ``(q_rotated, k_rotated)``; positions as ``apply_multi_axis_rotary``.
    The module holds no parameters and persists no buffers: frequencies are derived from the configs in float64
    on the CPU and moved to the input's device on use (``model.to(bfloat16)`` cannot touch them).
    """

    def __init__(self, rope: MultiAxisRope, *, heads_first: bool = True, backend: str = "auto",
                 check_positions: bool = False) -> None:
        super().__init__()
        if not isinstance(rope, MultiAxisRope):
            raise ValueError(f"rope: expected a MultiAxisRope (mrope(...), axial_rope(...)), got {type(rope).__name__}")
        check_backend(backend)
        if backend == "triton":
            raise ValueError("backend 'triton': the kernel computes 1-D angles from positions; multi-axis RoPE "
                             "rotates with tables: use 'auto', 'reference' or 'cpu'")
        limits = [cfg.target_length for cfg in rope.configs]
        if check_positions and any(n is None for n in limits):
            missing = [a for a, n in zip(rope.axes, limits) if n is None]
            raise ValueError(f"check_positions: axes {', '.join(missing)} have no target length (set "
                             f"max_position or original_max_position, or axial_rope(grid=...))")
        self.rope = rope
        self.heads_first = heads_first
        self.backend = backend
        self.check_positions = bool(check_positions)
        self._limits = torch.tensor([n if n is not None else 0 for n in limits], dtype=torch.long)
        self._freqs = rope.frequencies()
        self._by_device: dict[str, MultiAxisFrequencies] = {"cpu": self._freqs}
        # (shape, dtype, inverse) -> (positions copy, cos, sin): a model's layers share one module and call it
        # with the same positions; served by value (an element-wise compare), so a reused or edited tensor
        # cannot get stale tables. CPU positions only (the compare needs no device sync there).
        self._tables: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def max_positions(self) -> dict[str, int | None]:
        """Each axis's target length (positions on it run 0..n-1), None where its config has none."""
        return {a: cfg.target_length for a, cfg in zip(self.rope.axes, self.rope.configs)}

    def frequencies(self, device: torch.device | str = "cpu") -> MultiAxisFrequencies:
        key = str(device)
        hit = self._by_device.get(key)
        if hit is not None:
            return hit
        if torch.compiler.is_compiling():  # never fill a cache inside a graph (it would be guarded on)
            return self._freqs.to(device)
        with torch.inference_mode(False):  # normal tensors: the cache serves autograd calls later
            self._by_device[key] = self._freqs.to(device)
        return self._by_device[key]

    def forward(self, q: Tensor | None, k: Tensor | None, positions: int | Tensor | None = None
                ) -> tuple[Tensor | None, Tensor | None]:
        """Rotate q and k (shapes and positions as ``apply_multi_axis_rotary``)."""
        ref = q if q is not None else k
        if ref is None:
            raise ValueError("q, k: at least one tensor is needed")
        freqs = self.frequencies(ref.device)
        batch, seq = check_qk(q, k, freqs.rotary_dim, self.heads_first)
        pos = self._check_bound(axis_positions(positions, freqs.n_axes, batch, seq, ref.device))
        return _rotate(q, k, freqs, pos, self.heads_first, False, self.backend, tables=self._cached_tables)

    def _cached_tables(self, freqs: MultiAxisFrequencies, pos: Tensor, dtype: torch.dtype, inverse: bool):
        if torch.compiler.is_compiling() or pos.device.type != "cpu":
            return _tables(freqs, pos, dtype, inverse)
        key = (tuple(pos.shape), dtype, inverse)
        hit = self._tables.get(key)
        if hit is not None and torch.equal(hit[0], pos):
            return hit[1], hit[2]
        with torch.inference_mode(False):  # normal tensors: the cache serves every mode, autograd included
            cos, sin = _tables(freqs, pos, dtype, inverse)
            self._tables[key] = (pos.clone(), cos, sin)
        while len(self._tables) > TABLE_CACHE_ENTRIES:
            self._tables.pop(next(iter(self._tables)))
        return cos, sin

    def cos_sin(self, positions: Tensor, *, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """Half-size (cos, sin) tables for (axes, [batch,] seq) positions, scale included: (1|batch, seq, rotary_dim/2)."""
        if not isinstance(positions, Tensor) or positions.dim() not in (2, 3):
            raise ValueError("positions: expected an integer tensor (axes, seq) or (axes, batch, seq)")
        batch = positions.shape[1] if positions.dim() == 3 else 1
        pos = self._check_bound(axis_positions(positions, self.rope.n_axes, batch, positions.shape[-1],
                                               positions.device))
        return multi_axis_cos_sin(self.frequencies(positions.device), pos, dtype=dtype)

    def rerotate(self, k: Tensor, delta: int | Sequence[int] | Tensor) -> Tensor:
        """Shift already-rotated keys by ``delta`` positions: an int (every axis, as text decoding moves) or one
        per axis; a pure rotation (the attention scale already in ``k`` stays)."""
        freqs = self.frequencies(k.device)
        if isinstance(delta, int) and not isinstance(delta, bool):
            delta = [delta] * freqs.n_axes
        d = torch.as_tensor(delta, device=k.device)
        if d.is_floating_point() or d.dtype == torch.bool or d.shape != (freqs.n_axes,):
            raise ValueError(f"delta: an int or {freqs.n_axes} integers (one per axis), got {delta!r}")
        angle = d.to(torch.long)[freqs.pair_axis].to(torch.float64) * freqs.inv_freq64  # (pairs,)
        compute = torch.float64 if k.dtype == torch.float64 else torch.float32
        cos, sin = torch.cos(angle).to(compute), torch.sin(angle).to(compute)
        return rotate_tables(k, cos, sin, freqs.layout, backend="reference")

    def _check_bound(self, pos: Tensor) -> Tensor:
        if self.check_positions and pos.numel():
            limits = self._limits.to(pos.device).view(-1, 1, 1)
            if torch.compiler.is_compiling() or pos.device.type != "cpu":
                torch._assert_async((pos < limits).all(), "positions: beyond an axis's max position")
            else:
                over = (pos >= limits).flatten(1).any(1)
                if bool(over.any()):
                    a = int(over.nonzero()[0])
                    raise ValueError(f"positions: {int(pos[a].max())} on axis {self.rope.axes[a]!r} is beyond its max "
                                     f"position {int(self._limits[a])} (check_positions=True)")
        return pos

    def extra_repr(self) -> str:
        return f"{self.rope.describe()}, heads_first={self.heads_first}, backend={self.backend}"
