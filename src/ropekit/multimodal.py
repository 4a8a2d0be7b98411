"""Multi-axis RoPE for model builders: M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) and 2-D axial RoPE for ViTs.

A multi-axis RoPE rotates each rotary pair by one of several position streams (axes): M-RoPE has three,
(t, h, w); a vision transformer's axial RoPE two, (row, column). It is described by ``MultiAxisRope``: one
``RopeConfig`` per axis (the 1-D RoPE whose frequencies that axis's pairs take, and how it is extended), and
per rotary pair p the axis that rotates it (``pair_axis[p]``) and the pair of that axis's RoPE that gives its
frequency (``pair_index[p]``). Every layout below is such a table:

* ``mrope(cfg, section)`` (Qwen2-VL, Qwen2.5-VL; transformers ``mrope_section``): pairs split into
  contiguous blocks, the first ``section[0]`` pairs rotated by t, the next ``section[1]`` by h, the last
  ``section[2]`` by w; pair p keeps the 1-D RoPE's frequency p.
* ``mrope(cfg, section, interleaved=True)`` (Qwen3-VL, ``mrope_interleaved``): round robin, pair p is rotated
  by h if p % 3 == 1 and p < 3 * section[1], by w if p % 3 == 2 and p < 3 * section[2], by t otherwise.
* ``axial_rope(head_dim, style=...)`` for a patch grid (rows, columns):
  - ``"qwen2_vl"`` (the ViTs of Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the first half of the pairs rotated by the
    row, the second half by the column, both halves with the frequencies of a RoPE over rotary_dim/2 channels
    (base^(-4j/d)); rotate-half ("neox") channel layout.
  - ``"eva"`` (EVA-02 / timm ``RotaryEmbeddingCat``-style ViTs): the same frequencies and split, channels in
    interleaved pairs ("gptj": channels [0, d/2) for the row, [d/2, d) for the column, pairs (2i, 2i+1)).
  - ``"pixtral"`` (Pixtral's vision encoder): the 1-D RoPE over all rotary channels, its even-indexed
    frequencies to the row (first half of the pairs), its odd-indexed ones to the column (second half);
    rotate-half layout as in transformers' checkpoints.

Positions are integers, axis first: (axes, seq) shared by the batch or (axes, batch, seq) per row. ``None``
or an int offset mean text tokens (every axis at 0..seq-1 plus the offset), as M-RoPE gives text. Helpers
build the positions: ``mrope_positions`` (text and image/video grids, as Qwen2-VL's ``get_rope_index``),
``mrope_positions_from_token_types`` (the batched form on token types), ``patch_positions`` (a ViT's grids).

Angles are built in float64 from the integer positions, cos/sin rounded once to float32 (float64 for float64
inputs), the rotation runs through ``ropekit.rotate`` (the reference, or the fused CPU pass for large inputs).

Extension per axis (``MultiAxisRope.extend(method, factor, axes=...)``): each axis's RopeConfig is extended
on its own (its trained length: the text model's for M-RoPE axes, the trained grid side for a ViT axis).
* Every axis is the default, and the right choice for long text: M-RoPE text tokens advance t, h and w
  together, so a long context runs past the trained length on all three. It is also what transformers does
  with a Qwen2.5-VL config whose rope_parameters say ``yarn`` (one set of frequencies for all sections).
* ``axes=("t",)`` for long videos at trained resolutions: only the temporal positions outgrow training (but
  text after the video continues from the spatial extent under ``next_text="spatial"``, so keep the text
  within the trained length or extend every axis).
* ``axes=("row", "col")`` (both axial axes, the default) with a linear factor new_side/trained_side: a ViT run
  at a higher resolution, EVA-02's position interpolation (pt_seq_len / ft_seq_len); one axis alone for
  images stretched one way.
Each pair keeps its axis's attention scale (YaRN on t alone scales only the t pairs; extend every axis for a
global temperature). Length-dependent methods (dynamic NTK, dynamic YaRN, LongRoPE) are refused: their scale
follows "the sequence length", of which a multi-axis position has one per axis, and no published model says
which to take.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ropekit.config import LAYOUTS, RopeConfig
from ropekit.kernels.dispatch import check_backend
from ropekit.kernels.dispatch import rotate as rotate_tables
from ropekit.methods import frequencies as resolve_frequencies
from ropekit.rotation import broadcast_table, check_qk

Tensor = torch.Tensor

MROPE_AXES = ("t", "h", "w")
GRID_AXES = ("row", "col")
AXIAL_STYLES = ("qwen2_vl", "eva", "pixtral")
NEXT_TEXT_RULES = ("spatial", "max")


# ---------------------------------------------------------------------- the description
@dataclass(frozen=True)
class MultiAxisFrequencies:
    """A ``MultiAxisRope`` resolved: per rotary pair its axis, inverse frequency and attention scale.

    Attributes:
        pair_axis: (rotary_dim/2,) int64, the axis whose position rotates each pair.
        inv_freq64: (rotary_dim/2,) float64 inverse frequencies, radians per position step.
        scale64: (rotary_dim/2,) float64 attention scale of each pair (its axis's final attention factor).
        layout: "neox" or "gptj"; rotary_dim: channels rotated; n_axes: number of position axes.
    """

    pair_axis: Tensor
    inv_freq64: Tensor
    scale64: Tensor
    layout: str
    rotary_dim: int
    n_axes: int

    def to(self, device: torch.device | str) -> MultiAxisFrequencies:
        return dataclasses.replace(self, pair_axis=self.pair_axis.to(device), inv_freq64=self.inv_freq64.to(device),
                                   scale64=self.scale64.to(device))


@dataclass(frozen=True)
class MultiAxisRope:
    """A RoPE whose rotary pairs are rotated by different position axes (see the module docstring).

    Attributes:
        axes: axis names, e.g. ("t", "h", "w") or ("row", "col").
        configs: one RopeConfig per axis; pair p takes frequency ``pair_index[p]`` of
            ``frequencies(configs[pair_axis[p]])`` and that config's attention scale.
        pair_axis: per rotary pair, the index of the axis that rotates it.
        pair_index: per rotary pair, the pair of its axis's RoPE that gives its frequency.
        head_dim: channels per head (channels beyond 2 * len(pair_axis) pass through unrotated).
        layout: "neox" (pair p = channels p, p + rotary_dim/2) or "gptj" (pair p = channels 2p, 2p+1).
        kind: what built it ("mrope", "mrope_interleaved", "axial:qwen2_vl", ...), for messages.
    """

    axes: tuple[str, ...]
    configs: tuple[RopeConfig, ...]
    pair_axis: tuple[int, ...]
    pair_index: tuple[int, ...]
    head_dim: int
    layout: str = "neox"
    kind: str = "custom"

    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)
        set_("axes", tuple(str(a) for a in self.axes))
        set_("configs", tuple(self.configs))
        set_("pair_axis", tuple(int(a) for a in self.pair_axis))
        set_("pair_index", tuple(int(i) for i in self.pair_index))
        if len(self.axes) < 1 or len(set(self.axes)) != len(self.axes):
            raise ValueError(f"axes: need one or more distinct names, got {self.axes}")
        if len(self.configs) != len(self.axes):
            raise ValueError(f"configs: need one RopeConfig per axis ({len(self.axes)}), got {len(self.configs)}")
        for name, cfg in zip(self.axes, self.configs):
            if not isinstance(cfg, RopeConfig):
                raise ValueError(f"configs: axis {name!r} has {type(cfg).__name__}, expected a RopeConfig")
            if cfg.length_dependent:
                raise ValueError(
                    f"method: {cfg.method!r} (axis {name!r}) depends on the sequence length, which a multi-axis "
                    f"position has one of per axis; not supported here: use a static method (linear, ntk, yarn, "
                    f"llama3, base)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: unknown channel layout {self.layout!r}; accepted: {', '.join(LAYOUTS)}")
        if not self.pair_axis or len(self.pair_axis) != len(self.pair_index):
            raise ValueError(f"pair_axis, pair_index: need the same non-zero length, got {len(self.pair_axis)} "
                             f"and {len(self.pair_index)}")
        for p, (a, i) in enumerate(zip(self.pair_axis, self.pair_index)):
            if not 0 <= a < len(self.axes):
                raise ValueError(f"pair_axis: pair {p} names axis {a}, there are {len(self.axes)}")
            pairs = self.configs[a].rotary_dim // 2
            if not 0 <= i < pairs:
                raise ValueError(f"pair_index: pair {p} takes frequency {i} of axis {self.axes[a]!r}, whose RoPE "
                                 f"has {pairs} pairs")
        if isinstance(self.head_dim, bool) or int(self.head_dim) != self.head_dim or self.head_dim < self.rotary_dim:
            raise ValueError(f"head_dim: must be an integer >= rotary_dim {self.rotary_dim}, got {self.head_dim!r}")
        set_("head_dim", int(self.head_dim))

    @property
    def rotary_dim(self) -> int:
        return 2 * len(self.pair_axis)

    @property
    def n_axes(self) -> int:
        return len(self.axes)

    def axis(self, name: str | int) -> int:
        """The index of axis ``name`` (a name of ``axes`` or an index)."""
        if isinstance(name, int) and not isinstance(name, bool):
            if 0 <= name < self.n_axes:
                return name
        elif name in self.axes:
            return self.axes.index(name)
        raise ValueError(f"axes: unknown axis {name!r}; accepted: {', '.join(self.axes)}")

    def config(self, name: str | int) -> RopeConfig:
        """The RopeConfig of axis ``name``."""
        return self.configs[self.axis(name)]

    def pairs_of(self, name: str | int) -> list[int]:
        """The rotary pairs axis ``name`` rotates."""
        a = self.axis(name)
        return [p for p, ax in enumerate(self.pair_axis) if ax == a]

    def frequencies(self) -> MultiAxisFrequencies:
        """Resolve every axis's RoPE and pick each pair's frequency and scale (float64, on the CPU)."""
        resolved = [resolve_frequencies(cfg) for cfg in self.configs]
        for name, f in zip(self.axes, resolved):
            if f.unscaled_until:
                raise ValueError(f"method: axis {name!r} keeps leading positions unscaled (n_hat); not supported "
                                 f"for multi-axis RoPE")
        inv = torch.stack([resolved[a].inv_freq64[i] for a, i in zip(self.pair_axis, self.pair_index)])
        scale = torch.tensor([resolved[a].attention_scale for a in self.pair_axis], dtype=torch.float64)
        return MultiAxisFrequencies(pair_axis=torch.tensor(self.pair_axis, dtype=torch.long), inv_freq64=inv,
                                    scale64=scale, layout=self.layout, rotary_dim=self.rotary_dim,
                                    n_axes=self.n_axes)

    def extend(self, method: str, factor: float | None = None, *, axes: Iterable[str | int] | None = None,
               target_length: int | None = None, **params: Any) -> MultiAxisRope:
        """A copy with the RoPE of ``axes`` (default: every axis) extended by ``RopeConfig.extend``.

        Args:
            method, factor, target_length, params: as ``RopeConfig.extend``; the trained length of an axis is
                its config's (``original_max_position``: a text model's trained length for M-RoPE, the
                trained grid side for a ViT axis).
            axes: names (or indices) of the axes to extend; the others keep their RoPE.
        """
        chosen = range(self.n_axes) if axes is None else [self.axis(a) for a in ([axes] if isinstance(axes, str)
                                                                                   else axes)]
        chosen = set(chosen)
        if not chosen:
            raise ValueError("axes: name at least one axis to extend")
        configs = tuple(cfg.extend(method, factor, target_length=target_length, **params) if a in chosen else cfg
                        for a, cfg in enumerate(self.configs))
        return dataclasses.replace(self, configs=configs)

    def describe(self) -> str:
        per_axis = "; ".join(f"{name}: {len(self.pairs_of(name))} pairs, {cfg.method}"
                             + (f" x{cfg.factor:g}" if cfg.factor else "") for name, cfg in zip(self.axes, self.configs))
        return f"{self.kind} (head_dim {self.head_dim}, rotary_dim {self.rotary_dim}, {self.layout}): {per_axis}"


# ---------------------------------------------------------------------- builders
def mrope(cfg: RopeConfig, section: Sequence[int], *, interleaved: bool = False,
          axes: Sequence[str] = MROPE_AXES) -> MultiAxisRope:
    """M-RoPE over ``cfg`` (its frequencies, method, layout and rotary_dim), for positions (t, h, w).

    Args:
        cfg: the text model's RoPE (``RopeConfig``); every axis starts with it (a scaled cfg scales every axis,
            as transformers does).
        section: ``mrope_section``, pairs per axis, summing to cfg.rotary_dim / 2 (e.g. [16, 24, 24] for
            head_dim 128).
        interleaved: Qwen3-VL's round-robin layout (``mrope_interleaved``) instead of contiguous blocks.
    """
    if not isinstance(cfg, RopeConfig):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    section = _int_list("section", section)
    axes = tuple(axes)
    if len(section) != len(axes):
        raise ValueError(f"section: one entry per axis {axes}, got {section}")
    pairs = cfg.rotary_dim // 2
    if sum(section) != pairs:
        raise ValueError(f"section: must sum to rotary_dim/2 = {pairs} (pairs of rotary channels), got {section} "
                         f"(sum {sum(section)})")
    if interleaved:
        if len(axes) != 3:
            raise ValueError(f"interleaved: Qwen3-VL's layout has 3 axes (t, h, w), got {axes}")
        pair_axis = [0] * pairs
        for a in (1, 2):  # transformers / vLLM: x_t[..., a : 3 * section[a] : 3] = x_a[...]
            for p in range(a, min(3 * section[a], pairs), 3):
                pair_axis[p] = a
        kind = "mrope_interleaved"
    else:
        pair_axis = [a for a, n in enumerate(section) for _ in range(n)]
        kind = "mrope"
    return MultiAxisRope(axes=axes, configs=(cfg,) * len(axes), pair_axis=pair_axis, pair_index=range(pairs),
                         head_dim=cfg.head_dim, layout=cfg.layout, kind=kind)


def axial_rope(head_dim: int, *, base: float = 10000.0, style: str = "qwen2_vl", rotary_dim: int | None = None,
               grid: tuple[int, int] | None = None, layout: str | None = None) -> MultiAxisRope:
    """2-D axial RoPE for a vision transformer's patch grid, positions (row, col).

    Args:
        head_dim: channels per head.
        base: rope_theta.
        style: "qwen2_vl", "eva" or "pixtral" (see the module docstring).
        rotary_dim: channels rotated (default head_dim); a multiple of 4.
        grid: the trained (rows, cols) of patches, if known: each axis's trained length, which ``extend``
            needs (e.g. (24, 24) for 336-pixel images in 14-pixel patches).
        layout: override the style's channel layout ("neox" / "gptj").
    """
    if style not in AXIAL_STYLES:
        raise ValueError(f"style: unknown axial style {style!r}; accepted: {', '.join(AXIAL_STYLES)}")
    rd = head_dim if rotary_dim is None else rotary_dim
    if isinstance(rd, bool) or int(rd) != rd or rd < 4 or rd % 4:
        raise ValueError(f"rotary_dim: must be a multiple of 4 (two axes of channel pairs), got {rd!r}")
    rd = int(rd)
    quarter = rd // 4
    lengths = (None, None) if grid is None else tuple(_int_list("grid", grid, minimum=1))
    if len(lengths) != 2:
        raise ValueError(f"grid: (rows, cols), got {grid}")
    if style == "pixtral":
        # One RoPE over all rotary channels: even-indexed frequencies for rows, odd-indexed for columns.
        axis_dim = rd
        pair_index = [2 * j for j in range(quarter)] + [2 * j + 1 for j in range(quarter)]
    else:
        # Each axis a RoPE over half the rotary channels, the same frequencies for rows and columns.
        axis_dim = rd // 2
        pair_index = list(range(quarter)) * 2
    default_layout = "gptj" if style == "eva" else "neox"
    configs = tuple(RopeConfig(head_dim=axis_dim, base=base, max_position=n) for n in lengths)
    return MultiAxisRope(axes=GRID_AXES, configs=configs, pair_axis=[0] * quarter + [1] * quarter,
                         pair_index=pair_index, head_dim=head_dim, layout=layout or default_layout,
                         kind=f"axial:{style}")


def mrope_from_hf(config: Any, **overrides: Any) -> MultiAxisRope:
    """The M-RoPE of a Qwen2-VL / Qwen2.5-VL / Qwen3-VL (text) config: a ``config.json`` dict or a config object.

    Reads ``mrope_section`` and ``mrope_interleaved`` from ``rope_parameters`` (or ``rope_scaling``) of the config
    or of its ``text_config``; the rest (base, head_dim, scaling method) through ``RopeConfig.from_hf``.
    ``overrides`` go to ``RopeConfig.from_hf``.
    """
    d = _to_dict(config)
    if isinstance(d.get("text_config"), Mapping) and not (_rope_dict(d) or {}).get("mrope_section"):
        d = {**d, **_to_dict(d["text_config"])}
    rope = _rope_dict(d)
    if rope is None or rope.get("mrope_section") is None:
        raise ValueError("mrope_section: not found in rope_parameters / rope_scaling (nor in text_config): not an "
                         "M-RoPE config")
    rope = dict(rope)
    section = rope.pop("mrope_section")
    interleaved = bool(rope.pop("mrope_interleaved", False))
    for key in ("rope_type", "type"):
        if rope.get(key) == "mrope":  # older Qwen2-VL configs name the layout as the type: plain RoPE frequencies
            rope[key] = "default"
    d = {k: v for k, v in d.items() if k not in ("rope_parameters", "rope_scaling", "text_config", "vision_config")}
    d["rope_parameters"] = rope
    cfg = RopeConfig.from_hf(d, **overrides)
    return mrope(cfg, section, interleaved=interleaved)


# ---------------------------------------------------------------------- angles and the rotation
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


# ---------------------------------------------------------------------- positions
@dataclass(frozen=True)
class VisionGrid:
    """An image or video in an M-RoPE sequence: (t, h, w) patches before the spatial merge.

    ``time_interval``: temporal position step per frame group (1 for Qwen2-VL and for images; Qwen2.5-VL videos:
    ``tokens_per_second * second_per_grid_t``).
    """

    t: int
    h: int
    w: int
    time_interval: float = 1.0


def _vision_ids(grid: VisionGrid, start: int, merge: int) -> Tensor:
    """(3, t*h'*w') positions of one grid, as transformers' get_vision_position_ids (row-major over t, h, w)."""
    gt, gh, gw = grid.t, grid.h // merge, grid.w // merge
    # The temporal step is taken in float32 and truncated, as the Qwen2.5-VL processor and transformers do.
    t_ids = (torch.arange(gt, dtype=torch.float32) * float(grid.time_interval)).long() + start
    h_ids = torch.arange(gh) + start
    w_ids = torch.arange(gw) + start
    tt, hh, ww = torch.meshgrid(t_ids, h_ids, w_ids, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def mrope_positions(segments: Sequence[int | VisionGrid | Sequence[int]], *, spatial_merge_size: int = 1,
                    start: int = 0, next_text: str = "spatial") -> tuple[Tensor, int]:
    """(t, h, w) positions of one sequence of text runs and image/video grids, as Qwen2-VL's ``get_rope_index``.

    Args:
        segments: in order, an int n (n text tokens) or a ``VisionGrid`` / (t, h, w) tuple (one image or video
            of t x h x w patches, t*(h/m)*(w/m) tokens after the spatial merge m). Text tokens advance all three
            axes together; a grid's tokens take t/h/w grid indices offset by the position reached so far.
            For Qwen3-VL, pass each video frame as its own grid (t=1), as its processor separates frames by
            timestamp text.
        spatial_merge_size: m, patches merged per side before the language model (2 for Qwen2-VL).
        start: position of the first token.
        next_text: where text after a grid continues: "spatial" (start + max(h, w)/m, transformers 5) or "max"
            (one past the largest position the grid used, temporal included: the original Qwen2-VL code, vLLM
            and transformers 4). They differ only for videos whose temporal positions outrun h and w.
    Returns:
        (positions (3, seq) int64, the next free position).
    """
    if next_text not in NEXT_TEXT_RULES:
        raise ValueError(f"next_text: {next_text!r} not accepted; accepted: {', '.join(NEXT_TEXT_RULES)}")
    merge = _int_list("spatial_merge_size", [spatial_merge_size], minimum=1)[0]
    current = _int_list("start", [start], minimum=0)[0]
    parts = []
    for seg in segments:
        if isinstance(seg, int) and not isinstance(seg, bool):
            if seg < 0:
                raise ValueError(f"segments: a text run must have >= 0 tokens, got {seg}")
            parts.append((current + torch.arange(seg)).expand(3, seg))
            current += seg
            continue
        grid = seg if isinstance(seg, VisionGrid) else VisionGrid(*_int_list("segments", seg, minimum=1))
        if min(grid.t, grid.h, grid.w) < 1 or grid.h % merge or grid.w % merge:
            raise ValueError(f"segments: grid {grid} must have t, h, w >= 1 and h, w divisible by "
                             f"spatial_merge_size {merge}")
        ids = _vision_ids(grid, current, merge)
        parts.append(ids)
        if next_text == "spatial":
            current += max(grid.h, grid.w) // merge
        else:
            current = int(ids.max()) + 1
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, current


def mrope_positions_from_token_types(token_types: Tensor, image_grids: Tensor | Sequence | None = None,
                                     video_grids: Tensor | Sequence | None = None, *,
                                     attention_mask: Tensor | None = None, spatial_merge_size: int = 1,
                                     video_time_intervals: Sequence[float] | Tensor | None = None,
                                     split_video_frames: bool = False,
                                     next_text: str = "spatial") -> tuple[Tensor, Tensor]:
    """Batched M-RoPE positions from token types, as transformers' ``get_rope_index``.

    Args:
        token_types: (batch, seq) ints: 0 text, 1 image, 2 video (transformers' ``mm_token_type_ids``).
        image_grids, video_grids: (n, 3) (t, h, w) patch grids, consumed in order across the batch.
        attention_mask: (batch, seq); masked tokens are skipped (their positions are 0).
        spatial_merge_size: patches merged per side.
        video_time_intervals: per video, the temporal step (default 1, Qwen2-VL's). Qwen2.5-VL: pass
            tokens_per_second * second_per_grid_t per video (transformers takes second_per_grid_t = 1 when the
            processor gives none, so its default step there is tokens_per_second, not 1).
        split_video_frames: Qwen3-VL: each video frame is a grid of its own (t=1).
        next_text: see ``mrope_positions``.
    Returns:
        (positions (3, batch, seq) int64, deltas (batch, 1): max position + 1 - tokens, the offset that
        continues text positions when decoding, see ``mrope_decode_positions``).
    """
    if not isinstance(token_types, Tensor) or token_types.dim() != 2:
        raise ValueError("token_types: expected a (batch, seq) integer tensor (0 text, 1 image, 2 video)")
    images = [VisionGrid(*g) for g in _grid_rows("image_grids", image_grids)]
    videos = [VisionGrid(*g) for g in _grid_rows("video_grids", video_grids)]
    if video_time_intervals is not None:
        intervals = [float(x) for x in torch.as_tensor(video_time_intervals).flatten().tolist()]
        if len(intervals) != len(videos):
            raise ValueError(f"video_time_intervals: one per video ({len(videos)}), got {len(intervals)}")
        videos = [dataclasses.replace(v, time_interval=x) for v, x in zip(videos, intervals)]
    if split_video_frames:
        videos = [dataclasses.replace(v, t=1) for v in videos for _ in range(v.t)]
    grids = {1: iter(images), 2: iter(videos)}
    batch, seq = token_types.shape
    out = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = []
    for b in range(batch):
        types = token_types[b].cpu()
        keep = None if attention_mask is None else attention_mask[b].cpu().bool()
        if keep is not None:
            types = types[keep]
        segments = []
        for kind, run in itertools.groupby(types.tolist()):
            n = len(list(run))
            if kind == 0:
                segments.append(n)
                continue
            if kind not in grids:
                raise ValueError(f"token_types: unknown type {kind} (0 text, 1 image, 2 video)")
            try:
                grid = next(grids[kind])
            except StopIteration:
                raise ValueError(f"{'image' if kind == 1 else 'video'}_grids: fewer grids than runs of "
                                 f"{'image' if kind == 1 else 'video'} tokens") from None
            tokens = grid.t * (grid.h // spatial_merge_size) * (grid.w // spatial_merge_size)
            if tokens != n:
                raise ValueError(f"token_types: a run of {n} {'image' if kind == 1 else 'video'} tokens in row {b}, "
                                 f"but its grid {grid} gives {tokens} tokens")
            segments.append(grid)
        pos, _ = mrope_positions(segments, spatial_merge_size=spatial_merge_size, next_text=next_text)
        if keep is None:
            out[:, b] = pos
        else:
            out[:, b, keep] = pos
        deltas.append((int(pos.max()) + 1 if pos.numel() else 0) - pos.shape[1])
    return out.to(token_types.device), torch.tensor(deltas, device=token_types.device).unsqueeze(1)


def mrope_decode_positions(past_lengths: int | Tensor, new_tokens: int, deltas: Tensor) -> Tensor:
    """(3, batch, new_tokens) positions of text tokens decoded after a prompt.

    ``past_lengths``: tokens each row has seen so far, padding not counted (an int, or (batch,)); ``deltas``:
    (batch, 1) from ``mrope_positions_from_token_types``. Row b's i-th new token sits at
    past_lengths[b] + i + deltas[b] on every axis (the first one past the prompt's largest position).
    """
    past = torch.as_tensor(past_lengths, device=deltas.device).to(torch.long).reshape(-1, 1)
    steps = torch.arange(new_tokens, device=deltas.device).view(1, -1)
    return (past + steps + deltas.reshape(-1, 1).to(torch.long)).unsqueeze(0).expand(3, -1, -1)


def patch_positions(grids: Tensor | Sequence, spatial_merge_size: int = 1) -> Tensor:
    """(2, tokens) (row, col) positions of a ViT's patch grids, as transformers' vision position ids.

    ``grids``: (n, 3) (t, h, w) per image/video; each grid's patches come in order of m x m merge blocks
    (row-major over blocks, row-major inside a block), the (row, col) grid repeated for each of the t frames.
    With m = 1 that is plain row-major order (Pixtral's meshgrid).
    """
    merge = _int_list("spatial_merge_size", [spatial_merge_size], minimum=1)[0]
    parts = []
    for t, h, w in _grid_rows("grids", grids):
        if h % merge or w % merge:
            raise ValueError(f"grids: h {h} and w {w} must be divisible by spatial_merge_size {merge}")
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        parts.append(torch.stack([rows, cols]).repeat(1, t))
    return torch.cat(parts, dim=1) if parts else torch.zeros(2, 0, dtype=torch.long)


# ---------------------------------------------------------------------- small helpers
def _int_list(name: str, values: Any, minimum: int = 0) -> list[int]:
    if isinstance(values, Tensor):
        values = values.tolist()
    try:
        items = list(values)
    except TypeError:
        raise ValueError(f"{name}: expected a list of integers, got {values!r}") from None
    out = []
    for v in items:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or int(v) != v or v < minimum:
            raise ValueError(f"{name}: expected integers >= {minimum}, got {items}")
        out.append(int(v))
    return out


def _grid_rows(name: str, grids: Tensor | Sequence | None) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    rows = grids.tolist() if isinstance(grids, Tensor) else list(grids)
    out = []
    for row in rows:
        vals = _int_list(name, row, minimum=1)
        if len(vals) != 3:
            raise ValueError(f"{name}: expected (t, h, w) rows, got {row!r}")
        out.append(tuple(vals))
    return out


def _to_dict(config: Any) -> dict:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ValueError(f"config: expected a config.json dict or a transformers config, got {type(config).__name__}")


def _rope_dict(d: Mapping) -> Mapping | None:
    for key in ("rope_parameters", "rope_scaling"):
        value = d.get(key)
        if isinstance(value, Mapping):
            return value
    return None
