"""transformers ``config.json`` -> ``RopeConfig`` fields: the translation ``RopeConfig.from_hf`` and
``LayeredRope.from_hf`` are thin entry points to.

Reads ``rope_parameters`` / ``rope_scaling`` (per layer type too: Gemma 3/4), the head size, partial rotary, the
trained and target lengths, the layer table (``layer_types``, NoPE layers) and the channel layout; checks the shape
fields (``check_hf_config``). It returns plain dicts and never imports ``ropekit.config`` (which calls it), so the
two stay out of each other's way; what transformers itself says about a model type comes from
``ropekit.hf.config_probe``. The layer table puts this module beside the core for that reason: it is the core's
reading of an outside format, as ``ropekit.gguf.to_config`` is for GGUF.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ropekit.hf.config_probe import _hf_attribute_map, _hf_class_default, _hf_default_theta, _probe_layout
from ropekit.methods import canonical_name, get_method, hf_keys, method_names
from ropekit.methods.registry import check_number as _check_number
from ropekit.warn import warn_once

# Model types whose checkpoints pair channels (2i, 2i+1) in transformers.
# DeepSeek V2/V3 checkpoints pair (2i, 2i+1) too (V2 rotates complex pairs; V3's rope_interleave path reads
# interleaved pairs and hands back rotate-half order, the same scores under a fixed channel permutation).
GPTJ_LAYOUT_MODEL_TYPES = {"gptj", "codegen", "deepseek_v2", "deepseek_v3"}


def hf_rope_dict(config: Any, layer_type: str | None = None) -> tuple[Mapping[str, Any], dict[str, Any]]:
    """(the model config as one RoPE's reader sees it, that RoPE's rope_parameters dict) of a ``config.json`` dict
    or transformers config; ``layer_type`` as in ``RopeConfig.from_hf``, which builds the config from them."""
    d = _hf_view(config)
    table = _hf_rope_table(d)
    ropes = {key: rope for key, rope in table.ropes.items() if rope is not None}
    distinct = {repr(sorted(rope.items())) for rope in ropes.values()}
    # One RoPE per layer type: a layer_type picks its own, even when every type's is the same (transformers v5
    # writes the nested form so for every model with layer types).
    if table.per_type and (len(distinct) > 1 or layer_type is not None):
        if layer_type is None:
            raise ValueError(f"layer_type: this config has one RoPE per layer type; pass one of: "
                             f"{', '.join(sorted(ropes))} (or read them all with LayeredRope.from_hf)")
        if layer_type not in table.ropes:
            raise ValueError(f"layer_type: {layer_type!r} not in this config; accepted: "
                             f"{', '.join(sorted(ropes))}")
        if table.ropes[layer_type] is None:
            raise ValueError(f"layer_type: the {layer_type!r} layers have no RoPE; accepted: "
                             f"{', '.join(sorted(ropes))}")
        rope = dict(table.ropes[layer_type])
    else:
        if layer_type is not None:
            raise ValueError(f"layer_type: {layer_type!r} given but the config has one RoPE for all layers")
        if not ropes:
            raise ValueError("rope_parameters: no layer of this config has RoPE")
        rope = dict(next(iter(ropes.values())))
    return _type_view(_per_type_view(d, table), table, layer_type), rope


def hf_rope_fields(d: Mapping[str, Any], rope: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """One RoPE: ``rope`` (a rope_parameters dict) within the model config ``d``, as (RopeConfig keyword
    arguments, parameters of methods without a field of their own, set after with ``replace``)."""
    head_dim = _hf_head_dim(d)

    rope_type = rope.get("rope_type")
    legacy_type = rope.get("type")
    if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
        raise ValueError(f"rope_type: {rope_type!r} contradicts type: {legacy_type!r}")
    method = rope_type or legacy_type or "default"
    if method == "mrope":
        # Qwen2-VL's old form: plain RoPE whose pairs follow the (t, h, w) position axes by mrope_section
        # (``hf_mrope_section``); the frequencies are the default ones (transformers reads it so too).
        method = "default"
    if not isinstance(method, str):
        raise ValueError(f"rope_type: must be a string, got {method!r}; accepted: {', '.join(method_names())}")
    method = canonical_name(method)
    if method not in method_names():
        raise ValueError(f"rope_type: {method!r} is not supported; accepted: {', '.join(method_names())}")
    spec = get_method(method)

    base = _hf_base(d, rope)
    partial = _first(rope.get("partial_rotary_factor"), d.get("partial_rotary_factor"), d.get("rotary_pct"))
    extra_params: dict[str, Any] = {}
    if spec.hf_partial_rotary is not None:
        # Gemma 4's proportional: partial_rotary_factor says how many pairs turn, over the exponents of the whole head.
        if partial is not None and partial != 1:
            extra_params[spec.hf_partial_rotary] = partial
        partial = None
    if d.get("rotary_dim") is not None and spec.hf_partial_rotary is None:
        rotary_dim = int(d["rotary_dim"])
    elif partial is not None:
        _check_number("partial_rotary_factor", partial)
        if not 0 < partial <= 1:
            raise ValueError(f"partial_rotary_factor: must be in (0, 1], got {partial}")
        rotary_dim = int(head_dim * partial)
    else:
        rotary_dim = head_dim

    params: dict[str, Any] = {}
    keys = hf_keys()
    for key, value in rope.items():
        if key in HF_MROPE_KEYS:
            continue  # M-RoPE's position axes: read by hf_mrope_section
        if key not in keys:
            warn_once(f"rope_parameters: unknown key {key!r} ignored (known: {', '.join(keys)})")
            continue
        name = keys[key]
        if name is None or value is None:
            continue
        if name not in spec.reads and name != "original_max_position":
            warn_once(f"rope_parameters: key {key!r} is not used by rope_type {method!r}; ignored")
            continue
        params[name] = value

    max_pos = d.get("max_position_embeddings", d.get("n_positions", d.get("n_ctx")))
    if spec.hf_trained_from_max_position:
        # transformers' dynamic NTK takes max_position_embeddings as the trained length.
        if params.get("original_max_position") not in (None, max_pos):
            warn_once("rope_parameters: original_max_position_embeddings is not read by transformers' dynamic "
                      "scaling, which uses max_position_embeddings as the trained length; doing the same")
        params["original_max_position"] = max_pos
    elif "original_max_position" in spec.required:
        # Phi-3 keeps the trained length at the top level, and transformers gives it priority.
        top = d.get("original_max_position_embeddings")
        params["original_max_position"] = _first(top, params.get("original_max_position"), max_pos)
    elif spec.unscaled:
        params.pop("original_max_position", None)
    original = params.get("original_max_position") or (max_pos if spec.unscaled else None)
    if original is None and "original_max_position" in spec.required:
        raise ValueError(f"max_position_embeddings: needed to know the trained length for rope_type {method!r}")
    if spec.hf_factor_from_lengths and params.get("factor") is None and original:
        if max_pos is None:
            raise ValueError(f"factor: required by rope_type {method!r} (or max_position_embeddings)")
        params["factor"] = max_pos / original
    factor = params.get("factor")
    if "factor" in spec.required and factor is None:
        raise ValueError(f"factor: required by rope_type {method!r} in rope_parameters")
    if method == "yarn" and factor is not None and max_pos is not None and original:
        # transformers' own check (_validate_yarn_rope_parameters): the factor should be the ratio of the two
        # lengths; it warns, and uses the explicit factor, as ropekit does.
        implicit = max_pos / original
        if implicit != factor and implicit != 1:
            warn_once(f"rope_parameters: the YaRN factor {factor} does not match the ratio implied by the lengths "
                      f"(max_position_embeddings / original_max_position_embeddings = {max_pos} / {original} = "
                      f"{implicit}); using the explicit factor {factor}, as transformers does (it warns the same)")
    if not spec.unscaled and original:
        params.setdefault("original_max_position", original)
    if spec.unscaled and original:
        params["original_max_position"] = original
    if max_pos is not None and original and factor:
        # A config that already states a longer length (Llama 3.2: 131072 with factor 32 over 8192) means it;
        # one that kept the trained length (Qwen2.5 + yarn) reaches factor * L.
        max_position = int(max_pos) if int(max_pos) > int(original) else int(round(factor * original))
    elif max_pos is not None:
        max_position = max(int(max_pos), int(original or 0))
    else:
        max_position = None
    if spec.hf_trained_from_max_position and factor:
        max_position = int(round(factor * original))

    layout = hf_layout(d)
    kwargs = dict(head_dim=head_dim, rotary_dim=rotary_dim, base=base, layout=layout, method=method,
                  max_position=max_position, **params)
    return kwargs, extra_params


def _first(*values: Any) -> Any:
    for v in values:
        if v is not None:
            return v
    return None


def _as_dict(config: Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):
        d = config.to_dict()
        # transformers >= 5 keeps the live, standardized dict on the object.
        if getattr(config, "rope_parameters", None) is not None:
            d["rope_parameters"] = dict(config.rope_parameters)
        return d
    raise TypeError(f"config: expected a config.json dict or a transformers config, got {type(config).__name__}")


def _hf_head_dim(d: Mapping[str, Any]) -> int:
    if d.get("qk_rope_head_dim") is not None:
        # DeepSeek MLA: only the qk_rope_head_dim channels carry RoPE (transformers sets head_dim to it too).
        return int(d["qk_rope_head_dim"])
    if d.get("head_dim") is not None:
        return int(d["head_dim"])
    hidden = _first(d.get("hidden_size"), d.get("n_embd"), d.get("d_model"))
    heads = _first(d.get("num_attention_heads"), d.get("n_head"), d.get("num_heads"))
    if hidden is None or heads is None:
        raise ValueError("head_dim: not given, and hidden_size / num_attention_heads are missing to derive it")
    if hidden % heads:
        raise ValueError(f"head_dim: hidden_size {hidden} is not divisible by num_attention_heads {heads}")
    return int(hidden) // int(heads)


# Keys of an M-RoPE rope_parameters dict (Qwen2/2.5/3-VL): the position axis each pair follows, not frequencies.
HF_MROPE_KEYS = ("mrope_section", "mrope_interleaved")

# Layers that transformers' code (not the config) leaves without RoPE: model_type -> (layer type without RoPE,
# only when the config sets a sliding window). Cohere 2, AFMoE and Flint rotate only their sliding layers; EXAONE 4
# only its sliding layers when it has any. tests/test_hf_every_family_patched_or_refused.py checks these against
# the models' forwards.
STRUCTURAL_NOPE: dict[str, tuple[str, bool]] = {
    "cohere2": ("full_attention", False),
    "cohere2_moe": ("full_attention", False),
    "exaone4": ("full_attention", True),
    "exaone_moe": ("full_attention", True),
    "kolibri1": ("full_attention", True),
    "afmoe": ("full_attention", False),
    "flint": ("full_attention", False),
}

# Layer types whose layers are not attention (so have no RoPE) although they sit in ``layer_types``.
_NON_ROPE_TYPE_WORDS = ("linear", "mamba", "conv", "recurrent", "mlp", "deltanet")


def _is_rope_layer_type(layer_type: str) -> bool:
    return not any(word in layer_type for word in _NON_ROPE_TYPE_WORDS)


# Config fields that give a model's shape and its RoPE's geometry: when present (not null), a positive integer.
HF_SHAPE_FIELDS = ("hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "num_hidden_layers",
                   "max_position_embeddings", "original_max_position_embeddings", "n_embd", "n_head", "n_layer",
                   "n_positions", "n_ctx", "d_model", "num_heads", "rotary_dim", "qk_rope_head_dim",
                   "global_head_dim")
# Config fields that hold a RoPE's parameters: an object (dict) or null.
HF_ROPE_FIELDS = ("rope_parameters", "rope_scaling")


def check_hf_config(config: Mapping[str, Any], prefix: str = "") -> None:
    """ValueError naming the first field of a ``config.json`` dict that no model can be built from: a shape field
    (``HF_SHAPE_FIELDS``) that is not a positive integer, a ``rope_parameters`` / ``rope_scaling`` that is not an
    object; ``text_config`` too (``text_config.hidden_size: ...``). Fields that are absent or null are not
    checked here (the readers say what they miss)."""
    for key in HF_SHAPE_FIELDS:
        value = config.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            kind = "a string" if isinstance(value, str) else f"a {type(value).__name__}"
            raise ValueError(f"{prefix}{key}: must be a positive integer, got {value!r} ({kind})")
        if value < 1:
            raise ValueError(f"{prefix}{key}: must be a positive integer, got {value}")
    for key in HF_ROPE_FIELDS:
        value = config.get(key)
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f'{prefix}{key}: must be an object like {{"rope_type": "yarn", "factor": 2.0}} '
                             f"(or null), got {value!r}")
    text = config.get("text_config")
    if isinstance(text, Mapping):
        check_hf_config(text, f"{prefix}text_config.")


def _hf_view(config: Any) -> dict[str, Any]:
    """The config dict that describes the text model: a multimodal checkpoint's ``text_config`` when the top
    level has no RoPE of its own (Gemma 3, Mistral-Small-3.1, Llama 4, Qwen2.5-VL's newer form). Raises
    ValueError naming a field that no model can be built from (``check_hf_config``)."""
    d = _as_dict(config)
    check_hf_config(d)
    text = d.get("text_config")
    if hasattr(text, "to_dict"):
        text = _as_dict(text)
    own = ("rope_parameters", "rope_scaling", "rope_theta", "head_dim", "hidden_size", "n_embd", "d_model")
    if isinstance(text, Mapping) and not any(d.get(k) is not None for k in own):
        inner = dict(text)
        inner.setdefault("model_type", d.get("model_type"))
        d = inner
    return _with_aliases(d)


def _with_aliases(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` plus the standard names its transformers config class maps to its own (JetMoe: head_dim is
    ``kv_channels``), so that every reader finds them under one name."""
    aliases = _hf_attribute_map(d.get("model_type"))
    missing = {alias: d[target] for alias, target in aliases.items() if d.get(alias) is None and target in d}
    return {**d, **missing} if missing else d



@dataclass(frozen=True)
class _RopeTable:
    """A config's RoPE per layer: ``ropes`` {key: rope_parameters dict, None for layers without RoPE};
    ``layers`` per layer its key (None: no RoPE), or None when the config does not say its layers;
    ``per_type``: the config gives one rope_parameters per layer type."""

    ropes: dict[str, dict[str, Any] | None]
    layers: tuple[str | None, ...] | None
    per_type: bool


def _hf_rope_table(d: Mapping[str, Any]) -> _RopeTable:
    new, old = d.get("rope_parameters"), d.get("rope_scaling")
    if new and old and isinstance(new, Mapping) and isinstance(old, Mapping):
        t_new = new.get("rope_type", new.get("type"))
        t_old = old.get("rope_type", old.get("type"))
        if t_new and t_old and t_new != t_old and not _nested_keys(d, new):
            raise ValueError(f"rope_parameters: rope_type {t_new!r} contradicts rope_scaling's {t_old!r}")
    rope = dict((new if new else old) or {})
    layer_types = d.get("layer_types")
    n_layers = d.get("num_hidden_layers", d.get("n_layer"))
    nested = _nested_keys(d, rope)
    defaults = _hf_default_theta(d.get("model_type"))
    ropes: dict[str, dict[str, Any] | None]
    if nested:
        ropes = {k: (dict(rope[k]) if rope[k] is not None else None) for k in nested}
        per_type = True
    elif "rope_local_base_freq" in d or (isinstance(defaults, Mapping) and "local" in defaults):
        # Gemma 3's config.json: rope_theta / rope_scaling for the full layers, rope_local_base_freq (plain RoPE)
        # for the sliding ones; transformers turns it into one rope_parameters per type the same way.
        full = dict(rope)
        full.setdefault("rope_theta", _first(d.get("rope_theta"), (defaults or {}).get("global")))
        local = {"rope_type": "default",
                 "rope_theta": _first(d.get("rope_local_base_freq"), (defaults or {}).get("local"), 10000.0)}
        ropes = {"full_attention": full, "sliding_attention": local}
        per_type = True
        if layer_types is None and n_layers:
            pattern = int(_first(d.get("sliding_window_pattern"), d.get("_sliding_window_pattern"), 6))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
    else:
        ropes, per_type = {}, False
    if per_type:
        for key, value in ropes.items():
            if value is not None and value.get("rope_theta") is None and isinstance(defaults, Mapping):
                value["rope_theta"] = _first(defaults.get(key), d.get("rope_theta"))
        if layer_types is None and n_layers:
            # Gemma 4 writes no layer_types when they are the default: 5 sliding, 1 full, the last one full.
            pattern = int(_first(d.get("sliding_window_pattern"), 6))
            layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n_layers)]
            if str(d.get("model_type", "")).startswith("gemma4"):
                layer_types[-1] = "full_attention"
        if layer_types is None:
            raise ValueError("layer_types: the config has one RoPE per layer type but does not say each layer's type")
        layers = [t if t in ropes and ropes[t] is not None else None for t in layer_types]
    elif layer_types:
        ropes = {"all": rope}
        layers = ["all" if _is_rope_layer_type(t) else None for t in layer_types]
    elif n_layers:
        ropes = {"all": rope}
        layers = ["all"] * int(n_layers)
    else:
        ropes = {"all": rope}
        layers = None
    if layers is not None:
        flags = d.get("no_rope_layers") or None
        interval = _first(d.get("no_rope_layer_interval"), _hf_class_default(d.get("model_type"),
                                                                             "no_rope_layer_interval"))
        if flags is None and interval and (d.get("no_rope_layer_interval") is not None or
                                           _hf_class_default(d.get("model_type"), "no_rope_layers", True)):
            # SmolLM3 / Llama 4 write no list when it is the default: a NoPE layer every ``interval`` layers.
            flags = [int((i + 1) % int(interval) != 0) for i in range(len(layers))]
        if flags is not None:
            # SmolLM3 / Llama 4: 1 = the layer uses RoPE, 0 = NoPE.
            if len(flags) != len(layers):
                raise ValueError(f"no_rope_layers: {len(flags)} entries for {len(layers)} layers")
            layers = [key if flag else None for key, flag in zip(layers, flags)]
        rule = STRUCTURAL_NOPE.get(d.get("model_type"))
        if rule is not None and layer_types and (not rule[1] or d.get("sliding_window") is not None):
            layers = [None if t == rule[0] else key for key, t in zip(layers, layer_types)]
    return _RopeTable(ropes, tuple(layers) if layers is not None else None, per_type)


def _per_type_view(d: Mapping[str, Any], table: _RopeTable) -> Mapping[str, Any]:
    """``d`` for reading one type's RoPE: with one RoPE per type the top-level rope_theta belongs to one of them
    (Gemma 3's full layers) and is already in that type's parameters."""
    return {k: v for k, v in d.items() if k != "rope_theta"} if table.per_type else d


def _type_view(d: Mapping[str, Any], table: _RopeTable, key: str | None) -> Mapping[str, Any]:
    """``d`` with the head size of layer type ``key`` where it differs (Gemma 4: ``global_head_dim`` for the
    full-attention layers, written per layer in ``per_layer_config``)."""
    if key is None or not table.layers:
        return d
    per_layer = d.get("per_layer_config") or {}
    first = next((i for i, k in enumerate(table.layers) if k == key), None)
    override = None
    if first is not None and isinstance(per_layer, Mapping):
        entry = per_layer.get(first, per_layer.get(str(first)))
        if isinstance(entry, Mapping):
            override = entry.get("head_dim")
    if override is None and key == "full_attention" and d.get("global_head_dim") is not None:
        override = d["global_head_dim"]
    return {**d, "head_dim": override} if override is not None else d


def _nested_keys(d: Mapping[str, Any], rope: Mapping[str, Any]) -> list[str]:
    """The keys of a rope_parameters dict that are layer types (Gemma 3/4 form), in order."""
    known = set(d.get("layer_types") or ()) | {"full_attention", "sliding_attention", "chunked_attention"}
    return [k for k, v in rope.items() if k in known and (isinstance(v, Mapping) or v is None)]



def hf_mrope_section(config: Any) -> tuple[int, ...] | None:
    """The M-RoPE sections of a Qwen2/2.5/3-VL config (pairs per position axis t, h, w), or None."""
    d = _hf_view(config)
    for rope in (d.get("rope_parameters"), d.get("rope_scaling")):
        if isinstance(rope, Mapping) and rope.get("mrope_section") is not None:
            return tuple(int(v) for v in rope["mrope_section"])
    return None


def hf_layout(config: Any) -> str:
    """The channel pairing transformers' model of this config rotates: "gptj" (interleaved) or "neox".

    From the model's own code where the installed transformers has it: its ``rotate_half`` applied to
    (0, 1, 2, 3) tells the pairing ((-2, -3, 0, 1): halves; (-1, 0, -3, 2): interleaved). DeepSeek's
    interleaved paths are switched by the config (``rope_interleave``; V2 always).
    """
    d = config if isinstance(config, Mapping) else _as_dict(config)
    model_type = d.get("model_type")
    if d.get("rope_interleave") is False:
        return "neox"  # DeepSeek-V3 with rope_interleave off: rotate-half weights
    if d.get("rope_interleave") is True:
        return "gptj"  # MLA models (DeepSeek-V3, Youtu, ...) whose rope head pairs (2i, 2i+1)
    if model_type in GPTJ_LAYOUT_MODEL_TYPES:
        return "gptj"
    return _probe_layout(model_type) or "neox"



def _hf_base(d: Mapping[str, Any], rope: Mapping[str, Any]) -> float:
    inside, top, neox = rope.get("rope_theta"), d.get("rope_theta"), d.get("rotary_emb_base")
    if inside is not None and top is not None and float(inside) != float(top):
        raise ValueError(f"rope_theta: {top} at the top level contradicts {inside} in rope_parameters")
    default = _hf_default_theta(d.get("model_type"))
    base = _first(inside, top, neox, default if isinstance(default, (int, float)) else None, 10000.0)
    _check_number("rope_theta", base)
    return float(base)
