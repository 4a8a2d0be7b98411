"""Multi-axis RoPE layouts: ``MultiAxisRope`` (per rotary pair its axis and frequency) and its builders.

The tables of M-RoPE (``mrope``, contiguous or Qwen3-VL's interleaved sections), 2-D axial RoPE for ViTs
(``axial_rope``: qwen2_vl, eva, pixtral) and ``mrope_from_hf``; ``MultiAxisRope.frequencies`` resolves one
into ``MultiAxisFrequencies``. The package docstring (``ropekit.multimodal``) describes every layout.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ropekit.config import LAYOUTS, RopeConfig
from ropekit.methods import frequencies as resolve_frequencies

Tensor = torch.Tensor

MROPE_AXES = ("t", "h", "w")
GRID_AXES = ("row", "col")
AXIAL_STYLES = ("qwen2_vl", "eva", "pixtral")


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
