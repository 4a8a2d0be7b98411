"""``LayeredRope``: a model's RoPE layer by layer, one ``RopeConfig`` per layer type and which layers use which
(Gemma 2/3/4 sliding and full layers, SmolLM3 / Llama 4 NoPE layers); read from a transformers config, extended
and written back as one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.config import RopeConfig


SLIDING_LAYER_WORDS = ("sliding", "chunked", "local")  # layer types that only see a window of the sequence


@dataclass(frozen=True)
class LayeredRope:
    """A model's RoPE layer by layer: one ``RopeConfig`` per layer type, and which layers use which.

    Gemma 2/3/4, gpt-oss, OLMo 3, ... name each layer's type (``layer_types``); Gemma 3/4 give each type its own
    RoPE (sliding layers: base 10k, no scaling; full layers: base 1M, linear x8 on Gemma-3-27B). SmolLM3 and
    Llama 4 leave some layers without RoPE (NoPE). A model with one RoPE everywhere is a ``LayeredRope`` with one
    entry (``single``).

    Attributes:
        ropes: ((key, RopeConfig), ...): the layer types that have RoPE ("all" when the config names no types).
        layers: per layer, its key in ``ropes``, or None for a layer without RoPE (empty: the config does not
            say how many layers it has; every layer then uses the single RoPE).
        per_type: the config writes one rope_parameters per layer type (so the export does too).
        changed: the keys the ``extend`` that made this value changed (empty for a config as read).
    """

    ropes: tuple[tuple[str, RopeConfig], ...]
    layers: tuple[str | None, ...] = ()
    per_type: bool = False
    changed: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        ropes = dict(self.ropes)
        if not ropes or len(ropes) != len(self.ropes):
            raise ValueError("ropes: need one RopeConfig per layer type, each type once")
        for key, cfg in ropes.items():
            if not isinstance(cfg, RopeConfig):
                raise ValueError(f"ropes: {key!r} is a {type(cfg).__name__}, not a RopeConfig")
        for i, key in enumerate(self.layers):
            if key is not None and key not in ropes:
                raise ValueError(f"layers: layer {i} has type {key!r}, which has no RoPE here; types: "
                                 f"{', '.join(ropes)}")
        for key in self.changed:
            if key not in ropes:
                raise ValueError(f"changed: {key!r} is not a layer type of this model")

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_hf(cls, config: Any, **overrides: Any) -> "LayeredRope":
        """Every layer's RoPE from a ``config.json`` dict or a transformers config (see ``RopeConfig.from_hf``).

        ``layers`` follows the config's ``layer_types`` (Gemma 3's older ``sliding_window_pattern``), its NoPE
        layers (``no_rope_layers``, SmolLM3 / Llama 4) and layers that transformers' code leaves without RoPE
        (``STRUCTURAL_NOPE``); non-attention layers of hybrid models (``linear_attention``, ``mamba``) have None.
        """
        from ropekit.hf.config_map import _hf_rope_table, _hf_view, _per_type_view, _type_view

        d = _hf_view(config)
        table = _hf_rope_table(d)
        view = _per_type_view(d, table)
        ropes = tuple((key, RopeConfig._from_hf_rope(_type_view(view, table, key), dict(rope), overrides))
                      for key, rope in table.ropes.items() if rope is not None)
        if not ropes:
            raise ValueError("rope_parameters: no layer of this config has RoPE")
        return cls(ropes, table.layers or (), table.per_type)

    def __getitem__(self, key: str) -> RopeConfig:
        ropes = dict(self.ropes)
        if key not in ropes:
            raise KeyError(f"{key!r}: not a layer type with RoPE here; types: {', '.join(ropes)}")
        return ropes[key]

    @property
    def types(self) -> tuple[str, ...]:
        """The keys of ``ropes``, in order."""
        return tuple(key for key, _ in self.ropes)

    @property
    def single(self) -> RopeConfig | None:
        """The one RopeConfig every RoPE layer uses, or None when the layer types differ."""
        distinct = {cfg for _, cfg in self.ropes}
        return next(iter(distinct)) if len(distinct) == 1 else None

    def layers_of(self, key: str) -> tuple[int, ...]:
        """Indices of the layers of type ``key`` (all layers for a config that does not list them)."""
        self[key]
        return tuple(i for i, k in enumerate(self.layers) if k == key)

    @property
    def rope_layers(self) -> tuple[int, ...]:
        """Indices of the layers that have RoPE."""
        return tuple(i for i, k in enumerate(self.layers) if k is not None)

    @property
    def nope_layers(self) -> tuple[int, ...]:
        """Indices of the layers without RoPE (left alone by every patch and extension)."""
        return tuple(i for i, k in enumerate(self.layers) if k is None)

    @property
    def changed_layers(self) -> tuple[int, ...]:
        """Indices of the layers whose RoPE the ``extend`` that made this value changed."""
        return tuple(i for i, k in enumerate(self.layers) if k is not None and k in self.changed)

    def for_layer(self, index: int) -> RopeConfig | None:
        """Layer ``index``'s RopeConfig (None: the layer has no RoPE)."""
        if not self.layers:
            return self.single if self.single is not None else self[self.types[0]]
        key = self.layers[index]
        return None if key is None else self[key]

    # ------------------------------------------------------------------ changing
    def default_extend_types(self) -> tuple[str, ...]:
        """The layer types ``extend`` changes unless told: the ones that see the whole sequence. Sliding-window
        layers (Gemma 3's local layers) never attend further than their window, so their RoPE stays."""
        full = tuple(k for k in self.types if not any(w in k for w in SLIDING_LAYER_WORDS))
        return full or self.types

    def extend(self, method: str, factor: float | None = None, *, layer_types: Any = None,
               **params: Any) -> "LayeredRope":
        """``RopeConfig.extend`` on the RoPE of ``layer_types`` (default: ``default_extend_types()``); the
        result's ``changed`` / ``changed_layers`` say which layers it changed. Other arguments as
        ``RopeConfig.extend``."""
        chosen = self.default_extend_types() if layer_types is None else (
            (layer_types,) if isinstance(layer_types, str) else tuple(layer_types))
        for key in chosen:
            if key not in self.types:
                raise ValueError(f"layer_types: {key!r} is not a layer type with RoPE here; accepted: "
                                 f"{', '.join(self.types)}")
        ropes = tuple((key, cfg.extend(method, factor, **params) if key in chosen else cfg)
                      for key, cfg in self.ropes)
        return LayeredRope(ropes, self.layers, self.per_type, tuple(k for k in self.types if k in chosen))

    def replace_rope(self, key: str, cfg: RopeConfig) -> "LayeredRope":
        """A copy with layer type ``key``'s RoPE set to ``cfg`` (recorded in ``changed``)."""
        self[key]
        ropes = tuple((k, cfg if k == key else c) for k, c in self.ropes)
        return LayeredRope(ropes, self.layers, self.per_type, (key,))

    # ------------------------------------------------------------------ writing
    def to_hf(self) -> dict[str, Any]:
        """The config keys transformers reads back to these RoPEs: ``RopeConfig.to_hf`` for one RoPE; for one
        per layer type, ``rope_parameters`` as {layer type: parameters} (Gemma 3/4 form) and the longest
        ``max_position_embeddings`` of them."""
        if not self.per_type:
            single = self.single
            if single is None:
                raise ValueError("ropes: several RoPEs, but this config writes one rope_parameters for all layers")
            return single.to_hf()
        params: dict[str, Any] = {}
        lengths = []
        out: dict[str, Any] = {}
        for key, cfg in self.ropes:
            hf = cfg.to_hf()
            params[key] = hf["rope_parameters"]
            if hf.get("max_position_embeddings") is not None:
                lengths.append(hf["max_position_embeddings"])
            out["head_dim"] = hf["head_dim"]
        out["rope_parameters"] = params
        if lengths:
            out["max_position_embeddings"] = max(lengths)
        return out

    def to_dict(self) -> dict[str, Any]:
        """{"ropes": {type: RopeConfig.to_dict()}, "layers": [...], "per_type": ..., "changed": [...]}."""
        return {"ropes": {k: c.to_dict() for k, c in self.ropes}, "layers": list(self.layers),
                "per_type": self.per_type, "changed": list(self.changed)}

    def describe(self) -> str:
        """One line per layer type: its layers and its RoPE."""
        lines = []
        for key, cfg in self.ropes:
            layers = self.layers_of(key) if self.layers else ()
            where = f"layers {_ranges(layers)}" if layers else "all layers"
            mark = " (changed)" if key in self.changed else ""
            lines.append(f"{key}: {where}: {cfg.method} base {cfg.base:g}"
                         + (f" factor {cfg.factor:g}" if cfg.factor else "") + mark)
        if self.nope_layers:
            lines.append(f"no RoPE: layers {_ranges(self.nope_layers)}")
        return "\n".join(lines)


def _ranges(indices: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5"."""
    out, start, prev = [], None, None
    for i in indices:
        if start is None:
            start = prev = i
        elif i == prev + 1:
            prev = i
        else:
            out.append(f"{start}-{prev}" if prev != start else f"{start}")
            start = prev = i
    if start is not None:
        out.append(f"{start}-{prev}" if prev != start else f"{start}")
    return ", ".join(out)
