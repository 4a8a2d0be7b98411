"""What the installed transformers says about a model type, for reading its ``config.json``: its config class's
attribute aliases and defaults (``CONFIG_MAPPING``), and the channel pairing its modeling code's ``rotate_half``
rotates (the one place ropekit imports transformers' modeling modules to read a config).

Every lookup answers None / empty without transformers or for a model type it does not know. Pure lookups with no
ropekit import, so ``ropekit.hf.config_map`` (and through it ``RopeConfig.from_hf``) can use them: the layer
table puts this module beside the core.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any


@functools.lru_cache(maxsize=256)
def _hf_attribute_map_cached(model_type: str) -> tuple[tuple[str, str], ...]:
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001 - transformers missing, or a model type it does not know
        return ()
    wanted = ("head_dim", "hidden_size", "num_attention_heads", "num_hidden_layers", "max_position_embeddings",
              "rope_theta", "partial_rotary_factor")
    return tuple((a, t) for a, t in (getattr(cls, "attribute_map", None) or {}).items() if a in wanted)


def _hf_attribute_map(model_type: Any) -> dict[str, str]:
    return dict(_hf_attribute_map_cached(model_type)) if isinstance(model_type, str) and model_type else {}


@functools.lru_cache(maxsize=256)
def _hf_default_theta(model_type: str | None) -> Any:
    """The rope_theta transformers assumes for ``model_type`` when a config gives none (a number, or Gemma 3's
    {"global", "local"} / {layer type: theta}); None without transformers or for an unknown model type."""
    if not model_type:
        return None
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001 - transformers missing, or a model type it does not know
        return None
    return getattr(cls, "default_theta", None)


def _hf_class_default(model_type: str | None, name: str, present: bool = False) -> Any:
    """The default of config field ``name`` in transformers' config class for ``model_type`` (None if unknown);
    ``present=True``: whether the class has that field at all."""
    if not model_type:
        return False if present else None
    try:
        from transformers import CONFIG_MAPPING
        cls = CONFIG_MAPPING[model_type]
    except Exception:  # noqa: BLE001 - transformers missing, or a model type it does not know
        return False if present else None
    fields = getattr(cls, "__dataclass_fields__", {})
    if present:
        return name in fields or hasattr(cls, name)
    if name in fields and fields[name].default is not dataclasses.MISSING:
        return fields[name].default
    value = getattr(cls, name, None)
    return value if isinstance(value, (int, float, str)) else None


@functools.lru_cache(maxsize=256)
def _probe_layout(model_type: str | None) -> str | None:
    if not model_type:
        return None
    import importlib

    name = model_type.replace("-", "_")
    try:
        module = importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except Exception:  # noqa: BLE001 - no transformers, or no such model in it
        module = None
    if module is None and name.endswith("_text"):
        return _probe_layout(name[: -len("_text")])
    if module is None:
        return None
    if callable(getattr(module, "rotate_every_two", None)):
        return "gptj"
    rotate_half = getattr(module, "rotate_half", None)
    if not callable(rotate_half):
        return None
    import torch

    try:
        out = rotate_half(torch.arange(4.0)).tolist()
    except Exception:  # noqa: BLE001 - a rotate_half of another signature
        return None
    return {(-2.0, -3.0, 0.0, 1.0): "neox", (-1.0, 0.0, -3.0, 2.0): "gptj"}.get(tuple(out))

