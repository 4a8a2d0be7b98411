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
    import torch

    pairing = {(-2.0, -3.0, 0.0, 1.0): "neox", (-1.0, 0.0, -3.0, 2.0): "gptj"}
    # The language model's own rotate function first: a multimodal module can carry the vision tower's
    # rotate_half beside it (GLM-4V / GLM-OCR: rotate_half_llm; ERNIE 4.5 VL: rotate_half_text).
    for name in ("rotate_half_llm", "rotate_half_text", "rotate_half"):
        rotate_half = getattr(module, name, None)
        if callable(rotate_half):
            try:
                out = rotate_half(torch.arange(4.0)).tolist()
            except Exception:  # noqa: BLE001 - a rotate_half of another signature
                return None
            return pairing.get(tuple(out))
    # No rotate_half: the rotation itself, turned by a quarter (cos 0, sin 1). Llama 4 / DeepSeek-V2 multiply
    # complex pairs (x[2i] + i x[2i+1]) by freqs_cis; others rotate x[..., ::2] against x[..., 1::2] in place.
    x = torch.arange(4.0).reshape(1, 1, 1, 4)
    apply_complex = getattr(module, "apply_rotary_emb", None)
    if callable(apply_complex):
        try:
            out = apply_complex(x, x, torch.full((1, 1, 2), 1j, dtype=torch.complex64))[0].flatten().tolist()
            return pairing.get(tuple(out))
        except Exception:  # noqa: BLE001 - an apply_rotary_emb of another signature
            pass
    apply_real = getattr(module, "_apply_rotary_emb", None)
    if callable(apply_real):
        try:
            out = apply_real(x, torch.zeros(1, 1, 1, 2), torch.ones(1, 1, 1, 2)).flatten().tolist()
            return pairing.get(tuple(out))
        except Exception:  # noqa: BLE001 - an _apply_rotary_emb of another signature
            pass
    return None
