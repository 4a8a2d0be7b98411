"""`RopeConfig`: one typed, validated description of a model's RoPE; `LayeredRope`: a model's RoPE layer by layer.

Built directly, from a Hugging Face ``config.json`` dict or ``transformers`` config (``from_hf``), or from
GGUF metadata (``from_gguf``); ``to_hf`` gives back the ``rope_parameters`` form transformers reads. A model
with one RoPE per layer type (Gemma 3/4), layers without RoPE (SmolLM3, Llama 4) or a multimodal wrapper
(``text_config``) is read whole by ``LayeredRope.from_hf``; ``RopeConfig.from_hf`` refuses to pick one of
several RoPEs. The channel layout comes from the model's own transformers code (``hf_layout``).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from ropekit.warn import warn_once
from ropekit.methods import (
    METHOD_ALIASES,  # noqa: F401  (re-exported: ropekit.config.METHOD_ALIASES)
    canonical_name,
    get_method,
    hf_rope_keys,
    method_fields,
    method_names,
    parameters,
    read_factors_file,
    readers,
)
from ropekit.methods.registry import check_int as _check_int
from ropekit.methods.registry import check_number as _check_number

LAYOUTS = ("neox", "gptj")

# Keys of a transformers rope_parameters dict that are not method parameters (None: handled apart).
HF_FIXED_KEYS = {"rope_type": None, "type": None, "rope_theta": None, "partial_rotary_factor": None}


def hf_keys() -> dict[str, str | None]:
    """Keys of a transformers rope_parameters / rope_scaling dict -> RopeConfig fields (None: handled apart)."""
    return {**HF_FIXED_KEYS, **hf_rope_keys()}


# Snapshots of the registry at import, for older imports; ropekit itself calls the functions, which also see
# methods registered later. METHOD_FIELDS: fields that belong to one method or another (anything set must be
# read by the chosen method). HF_ROPE_KEYS: see ``hf_keys``.
METHOD_FIELDS = method_fields()
HF_ROPE_KEYS = hf_keys()
# RopeConfig fields every method has; all others are method parameters.
_CORE_FIELDS = ("head_dim", "rotary_dim", "base", "layout", "method", "max_position", "extra")

# Model types whose checkpoints pair channels (2i, 2i+1) in transformers.
# DeepSeek V2/V3 checkpoints pair (2i, 2i+1) too (V2 rotates complex pairs; V3's rope_interleave path reads
# interleaved pairs and hands back rotate-half order, the same scores under a fixed channel permutation).
GPTJ_LAYOUT_MODEL_TYPES = {"gptj", "codegen", "deepseek_v2", "deepseek_v3"}

@dataclass(frozen=True)
class RopeConfig:
    """A model's RoPE and how to scale it.

    Attributes:
        head_dim: channels per attention head.
        rotary_dim: channels rotated (partial rotary: < head_dim; the rest pass through). Default head_dim.
        base: rope_theta, the base of the inverse frequencies.
        layout: "neox" (rotate-half: pair i = channels i, i + d/2) or "gptj" (interleaved: 2i, 2i+1).
        method: scaling method name, see ``ropekit.method_names()``.
        factor: scale s = L' / L (>= 1).
        original_max_position: L, the length the model was trained at.
        max_position: L', the target length; default factor * L.
        attention_factor, beta_fast, beta_slow, truncate, mscale, mscale_all_dim: YaRN parameters.
        low_freq_factor, high_freq_factor: Llama-3 parameters (defaults 1 and 4).
        short_factor, long_factor: LongRoPE per-pair factors, rotary_dim/2 each.
        n_hat: LongRoPE's count of leading positions kept at the original rotation.
        new_base: the base of the ``base`` (ABF) method.
        extra: ((name, value), ...) parameters of methods registered elsewhere that have no field here; read
            them as attributes (``cfg.name``). ``extend`` and ``replace`` put such names here themselves.

    Every method parameter (type, default, bounds, help) is declared by its method: ``ropekit.methods.parameters()``.
    """

    head_dim: int
    rotary_dim: int | None = None
    base: float = 10000.0
    layout: str = "neox"
    method: str = "default"
    factor: float | None = None
    original_max_position: int | None = None
    max_position: int | None = None
    attention_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    truncate: bool | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    low_freq_factor: float | None = None
    high_freq_factor: float | None = None
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    n_hat: int | None = None
    new_base: float | None = None
    extra: tuple[tuple[str, Any], ...] = ()

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not fields: parameters of methods registered outside this file.
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            extra = object.__getattribute__(self, "extra")
        except AttributeError:
            raise AttributeError(name) from None
        for key, value in extra:
            if key == name:
                return value
        if name in method_fields():
            return None
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        if not isinstance(self.method, str):
            raise ValueError(f"method: must be a method name (str), got {self.method!r}; accepted: "
                             f"{', '.join(method_names())}")
        method = canonical_name(self.method)
        set_("method", method)
        spec = get_method(method)

        _check_int("head_dim", self.head_dim, minimum=2)
        set_("head_dim", int(self.head_dim))
        if self.rotary_dim is None and self.head_dim % 2:
            raise ValueError(f"head_dim: {self.head_dim} is odd, so it cannot all rotate in pairs; "
                             f"set an even rotary_dim < head_dim (partial rotary)")
        rotary_dim = self.head_dim if self.rotary_dim is None else self.rotary_dim
        _check_int("rotary_dim", rotary_dim, minimum=2)
        if rotary_dim % 2:
            raise ValueError(f"rotary_dim: must be even (channels rotate in pairs), got {rotary_dim}")
        if rotary_dim > self.head_dim:
            raise ValueError(f"rotary_dim: must be <= head_dim ({self.head_dim}), got {rotary_dim}")
        set_("rotary_dim", int(rotary_dim))
        _check_number("base", self.base)
        if not self.base > 1.0:
            raise ValueError(f"base: must be > 1, got {self.base}")
        set_("base", float(self.base))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: unknown channel layout {self.layout!r}; accepted: {', '.join(LAYOUTS)}")

        extra = dict(self.extra or ())
        if len(extra) != len(self.extra or ()):
            raise ValueError("extra: a parameter is given twice")
        known = {p.field: p for p, _ in parameters()}
        for name in extra:
            if name in _field_names():
                raise ValueError(f"{name}: is a RopeConfig field; set it directly, not in extra")
            if name not in known:
                raise ValueError(f"{name}: not a parameter of any registered method")
        for name in _field_names():
            if name not in _CORE_FIELDS and name not in known and getattr(self, name) is not None:
                raise ValueError(f"{name}: not a parameter of any registered method")

        # A field set that the chosen method does not read is a mistake, not something to ignore.
        for name in known:
            if getattr(self, name) is not None and name not in spec.reads:
                if name == "original_max_position":
                    continue  # the trained length is a property of the model, harmless for every method
                raise ValueError(
                    f"{name}: not used by method {method!r}; it is a parameter of: {', '.join(readers(name))}"
                )
        for name in spec.required:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required by method {method!r} (required: {', '.join(spec.required)})")
        # Each parameter's type and bounds, as its method declares them; values normalised (float, tuple, ...).
        for name, param in known.items():
            value = getattr(self, name)
            if value is None:
                continue
            value = param.check(value, pairs=self.rotary_dim // 2)
            if name in extra:
                extra[name] = value
            else:
                set_(name, value)
        set_("extra", tuple(sorted(extra.items())))
        if self.max_position is not None:
            _check_int("max_position", self.max_position, minimum=1)
            set_("max_position", int(self.max_position))
        if self.original_max_position and self.max_position and self.max_position < self.original_max_position:
            raise ValueError(
                f"max_position: the target length ({self.max_position}) must be >= original_max_position "
                f"({self.original_max_position})"
            )
        if spec.check is not None:
            spec.check(self)  # checks across fields (beta_fast > beta_slow, ...)

    # ------------------------------------------------------------------ derived
    @property
    def trained_length(self) -> int | None:
        """L, the length the model was trained at: ``original_max_position``, else ``max_position`` for an
        unscaled model (None when neither says it). The one definition every part of ropekit uses."""
        if self.original_max_position is not None:
            return self.original_max_position
        return None if self.is_scaled else self.max_position

    def require_trained_length(self) -> int:
        """``trained_length``, or a ValueError naming ``original_max_position`` when the config does not say it."""
        if not self.trained_length:
            raise ValueError("original_max_position: the config does not say the length the model was trained at; "
                             "pass it (--original-length)")
        return int(self.trained_length)

    @property
    def target_length(self) -> int | None:
        """L': ``max_position`` if set, else factor * L, else L (None if neither length is known)."""
        if self.max_position is not None:
            return self.max_position
        if self.original_max_position is not None:
            return int(round((self.factor or 1.0) * self.original_max_position))
        return None

    @property
    def is_scaled(self) -> bool:
        """True when the method changes plain RoPE (``default`` does not)."""
        return self.method != "default"

    @property
    def length_dependent(self) -> bool:
        """True for methods whose rotation depends on the current sequence length."""
        return get_method(self.method).length_dependent

    def replace(self, **changes: Any) -> "RopeConfig":
        """A copy with ``changes`` applied (and validated). Changing ``method`` clears the old method's fields.

        Parameters of methods registered elsewhere (no field of their own) may be given by name too.
        """
        if "method" in changes and canonical_name(changes["method"]) != self.method:
            keep = {"original_max_position"}
            cleared = {n: None for n in method_fields() if n not in keep and n not in changes}
            changes = {**cleared, **changes}
            if "max_position" not in changes:
                # The old target belonged to the old method: derive the new one from factor * trained length.
                changes["max_position"] = None
                if self.original_max_position is None and self.max_position is not None:
                    changes.setdefault("original_max_position", self.max_position)
        extra = dict(self.extra)
        for name in [n for n in changes if n not in _field_names()]:
            value = changes.pop(name)
            if value is None:
                extra.pop(name, None)
            else:
                extra[name] = value
        changes["extra"] = tuple(sorted(extra.items()))
        return dataclasses.replace(self, **changes)

    def with_method(self, method: str, **params: Any) -> "RopeConfig":
        """``replace(method=method, **params)``: the trained length stays; kept for older callers.

        Prefer ``extend``, which also derives the target length from the factor and checks every parameter.
        """
        return self.replace(method=method, **params)

    def extend(self, method: str, factor: float | None = None, *, target_length: int | None = None,
               factors_file: Any = None, **params: Any) -> "RopeConfig":
        """This model's RoPE extended with ``method``: the one library call for "extend this RoPE".

        Args:
            method: a name of ``ropekit.method_names()`` (aliases such as "pi", "ntk_aware" accepted).
            factor: the scale s = target length / trained length (``trained_length``).
            target_length: L'; the factor is then L' / trained length (both given: they must agree).
            factors_file: a LongRoPE factors JSON (``ropekit.methods.read_factors_file``); values given in
                ``params`` win over the file's.
            params: RopeConfig fields the method reads (``beta_fast=16``, ``new_base=5e5``,
                ``original_max_position=4096`` to override the trained length, ...); None values are ignored.
        Returns:
            A validated RopeConfig with ``max_position`` = the target length (factor x trained length, or
            ``target_length``) and ``original_max_position`` = the trained length, where known. Parameters of
            the current method are kept when ``method`` is the same one, cleared otherwise.
        Raises:
            ValueError: starting with the field at fault (``factor: ...``, ``new_base: ...``,
                ``short_factor: ...``, ``target_length: ...``, ``factors_file: ...``).
            FileNotFoundError: ``factors_file`` does not exist.
        """
        for name, value in [("factor", factor), ("target_length", target_length), *params.items()]:
            if isinstance(value, float):
                _check_number(name, value)  # the registry's one finiteness rule
        if not isinstance(method, str):
            raise ValueError(f"method: must be a method name (str), got {method!r}; accepted: "
                             f"{', '.join(method_names())}")
        spec = get_method(method)
        name = spec.name
        if self.method == "proportional" and name != "proportional" and (self.rotated_fraction or 1.0) < 1.0:
            raise ValueError(f"method: this RoPE is proportional (only part of its pairs rotate); {name!r} would "
                             f"rotate the others too; extend it with 'proportional' (its factor)")
        fields = set(method_fields())
        given = {k: v for k, v in params.items() if v is not None}
        for fld in given:
            if fld == "max_position":
                raise ValueError("max_position: pass target_length (or factor) to extend")
            if fld not in fields:
                raise ValueError(f"{fld}: not a parameter of any method; accepted: {', '.join(sorted(fields))}")
            if fld not in spec.reads and fld != "original_max_position":
                raise ValueError(f"{fld}: not used by method {name!r}; it is a parameter of: "
                                 f"{', '.join(readers(fld))}")
        if factors_file is not None:
            list_params = [p.field for p in spec.params if p.type == "float_list"]
            if not list_params:
                users = [m for m in method_names() if any(p.type == "float_list" for p in get_method(m).params)]
                raise ValueError(f"factors_file: only used by method {', '.join(users)}, not {name}")
            from_file = read_factors_file(factors_file)
            given = {**{k: v for k, v in from_file.items() if k in spec.reads}, **given}
        if factor is not None and "factor" not in spec.reads:
            _check_number("factor", factor)
            if not (float(factor) == 1.0 and not spec.required):
                raise ValueError(f"factor: method {name!r} takes {', '.join(spec.required)}, not a factor"
                                 if spec.required else f"factor: method {name!r} ({spec.summary}) takes no factor")
            factor = None
        if factor is not None:
            given["factor"] = factor

        trained = given.get("original_max_position", self.trained_length)
        if target_length is not None:
            _check_int("target_length", target_length, minimum=1)
            target_length = int(target_length)
            if trained is not None and target_length < trained:
                raise ValueError(f"target_length: must be >= the trained length {trained}, got {target_length}")
            if "factor" in spec.reads:
                if trained is None:
                    raise ValueError("target_length: the trained length is unknown (set original_max_position), "
                                     "so the factor cannot be derived from it")
                if "factor" in given:
                    _check_number("factor", given["factor"])
                    if round(float(given["factor"]) * trained) != target_length:
                        raise ValueError(f"target_length: {target_length} disagrees with factor {given['factor']:g} "
                                         f"x trained length {trained} = {round(float(given['factor']) * trained)}")
                else:
                    given["factor"] = target_length / trained
        if "factor" in spec.reads and given.get("factor") is None and not (
                name == self.method and self.factor is not None):
            raise ValueError(f"factor: required by method {name!r} (the target length over the trained length "
                             f"{trained or '?'}; or give target_length)")
        if "original_max_position" in spec.required and trained is None:
            raise ValueError(f"original_max_position: required by method {name!r}; the config does not say its "
                             f"trained length")
        keep = {} if name != self.method else {f: getattr(self, f) for f in spec.reads}
        for param in spec.params:
            value = given.get(param.field, keep.get(param.field))
            if param.field in spec.required and value is None and param.field != "original_max_position":
                size = f"; rotary_dim/2 = {self.rotary_dim // 2} numbers" if param.type == "float_list" else ""
                raise ValueError(f"{param.field}: required by method {name!r} ({param.help}{size})")
        new_factor = given.get("factor", keep.get("factor"))
        if target_length is None and new_factor is not None and trained is not None:
            _check_number("factor", new_factor)
            target_length = int(round(float(new_factor) * trained))  # the target follows the new factor
        changes = {f: None for f in fields}
        changes.update(keep)
        changes.update(given)
        changes.update(method=name, original_max_position=trained, max_position=target_length)
        return self.replace(**changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the set fields (lists for the factor tuples), for JSON reports."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_") or f.name == "extra":
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
        for name, value in self.extra:
            out[name] = list(value) if isinstance(value, tuple) else value
        return out

    # ------------------------------------------------------------------ Hugging Face
    @classmethod
    def from_hf(cls, config: Any, *, layer_type: str | None = None, **overrides: Any) -> "RopeConfig":
        """Read a ``config.json`` dict or a ``transformers`` config object.

        Accepts ``rope_parameters`` (newer) and ``rope_scaling`` (older) dicts, ``rope_type`` or ``type``,
        ``rope_theta`` at the top level or inside, ``head_dim`` (wins over hidden_size / heads),
        ``partial_rotary_factor``, ``rotary_pct``, ``rotary_dim``, ``rotary_emb_base``; a multimodal checkpoint's
        ``text_config``. A config with one RoPE per layer type (Gemma 3/4: ``rope_parameters`` per type, or the
        older ``rope_local_base_freq``) needs ``layer_type``, or read all of them with ``LayeredRope.from_hf``.
        ``overrides`` set RopeConfig fields directly (e.g. ``layout``). Unknown keys warn once; missing or
        contradictory ones raise ValueError naming the field.
        """
        d = _hf_view(config)
        table = _hf_rope_table(d)
        ropes = {key: rope for key, rope in table.ropes.items() if rope is not None}
        distinct = {repr(sorted(rope.items())) for rope in ropes.values()}
        if table.per_type and len(distinct) > 1:
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
        return cls._from_hf_rope(_type_view(_per_type_view(d, table), table, layer_type), rope, overrides)

    @classmethod
    def _from_hf_rope(cls, d: Mapping[str, Any], rope: dict[str, Any], overrides: Mapping[str, Any]) -> "RopeConfig":
        """One RoPE: ``rope`` (a rope_parameters dict) within the model config ``d``."""
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
        if method == "proportional":
            # Gemma 4: partial_rotary_factor says how many pairs turn, over the exponents of the whole head.
            if partial is not None and partial != 1:
                extra_params["rotated_fraction"] = partial
            partial = None
        if d.get("rotary_dim") is not None and method != "proportional":
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
        elif method == "default":
            params.pop("original_max_position", None)
        original = params.get("original_max_position") or (max_pos if method == "default" else None)
        if original is None and "original_max_position" in spec.required:
            raise ValueError(f"max_position_embeddings: needed to know the trained length for rope_type {method!r}")
        if spec.hf_factor_from_lengths and params.get("factor") is None and original:
            if max_pos is None:
                raise ValueError(f"factor: required by rope_type {method!r} (or max_position_embeddings)")
            params["factor"] = max_pos / original
        factor = params.get("factor")
        if "factor" in spec.required and factor is None:
            raise ValueError(f"factor: required by rope_type {method!r} in rope_parameters")
        if method != "default" and original:
            params.setdefault("original_max_position", original)
        if method == "default" and original:
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
        kwargs.update(overrides)
        fields = _field_names()
        extra_params.update({k: kwargs.pop(k) for k in list(kwargs) if k not in fields})
        cfg = cls(**kwargs)
        return cfg.replace(**extra_params) if extra_params else cfg

    def to_hf(self) -> dict[str, Any]:
        """The config keys transformers reads back to this same RoPE.

        Returns ``{"rope_parameters": {...}, "rope_scaling": {...}, "max_position_embeddings": ...,
        "head_dim": ..., ["partial_rotary_factor": ...]}``. Methods transformers lacks but can express
        (``ntk``, ``base``) become plain RoPE with the new ``rope_theta``; the rest (``dynamic_yarn``,
        LongRoPE's ``n_hat``, the gptj layout) raise ValueError.
        """
        spec = get_method(self.method)
        params: dict[str, Any] = {"rope_theta": self.base}
        if spec.to_hf is not None:
            params = spec.to_hf(self)  # a method transformers lacks, written as one it has (e.g. a new rope_theta)
        elif spec.hf_type is None:
            raise ValueError(f"method: transformers has no {self.method!r} ({spec.not_exportable}); export one of: "
                             f"{', '.join(method_names(exportable=True))}")
        else:
            params["rope_type"] = spec.hf_type
            for param in spec.params:
                value = getattr(self, param.field)
                if value is None and param.field in spec.hf_defaults:
                    value = param.default
                if value is None:
                    continue
                if param.hf_key is None:
                    if value != param.default:
                        raise ValueError(f"{param.field}: transformers' {spec.hf_type} has no {param.field} "
                                         f"({param.help}); set {param.field}={param.default}")
                    continue
                if spec.hf_trained_from_max_position and param.field == "original_max_position":
                    continue  # transformers reads this method's trained length from max_position_embeddings
                params[param.hf_key] = list(value) if isinstance(value, tuple) else value
        if self.layout != "neox":
            warn_once("layout: transformers takes the channel layout from the model type, not the config; "
                      "this config only round-trips for gptj-layout model types")
        out: dict[str, Any] = {"rope_parameters": params, "rope_scaling": dict(params), "head_dim": self.head_dim}
        if self.rotary_dim != self.head_dim:
            out["partial_rotary_factor"] = self.rotary_dim / self.head_dim
            params["partial_rotary_factor"] = out["partial_rotary_factor"]
        if spec.hf_trained_from_max_position:
            out["max_position_embeddings"] = self.original_max_position  # transformers' trained length for it
        elif self.target_length is not None:
            out["max_position_embeddings"] = self.target_length
        return out

    # ------------------------------------------------------------------ GGUF
    @classmethod
    def from_gguf(cls, source: Any, *, layout: str = "transformers", layer_type: str | None = None,
                  **overrides: Any) -> "RopeConfig":
        """Read RoPE from a GGUF file path or a dict of its metadata, as llama.cpp runs it.

        Reads ``general.architecture`` then ``<arch>.rope.freq_base``, ``.rope.dimension_count``,
        ``.rope.scaling.type/factor/original_context_length/attn_factor``, the ``.rope.scaling.yarn_*`` keys,
        ``.rope.freq_base_swa`` / ``.rope.dimension_count_swa``, ``.context_length``, ``.attention.head_count``,
        ``.attention.key_length``, ``.embedding_length``, and the tensors ``rope_freqs`` (Llama 3.1, read as
        ``llama3`` where the divisors are exactly that) and ``rope_factors_long/short`` (Phi-3, ``longrope``).
        A dict may carry those tensors under their names (``"rope_freqs.weight": [...]``). See ``ropekit.gguf``.

        ``layout="transformers"`` (default) describes the model as transformers loads it (it un-permutes
        llama-family q/k weights to rotate-half, so "neox"); ``layout="file"`` gives llama.cpp's pairing
        for the weights as stored (interleaved for llama-family architectures). ``layer_type``
        ("full_attention" / "sliding_attention") picks one RoPE of a file whose sliding-window layers have
        their own (required there, as in ``from_hf``).
        """
        from ropekit.gguf import rope_fields

        if layout not in ("transformers", "file"):
            raise ValueError(f"layout: {layout!r} not accepted for GGUF; accepted: transformers, file")
        arch, fields = rope_fields(source, layer_type=layer_type)
        fields["layout"] = "gptj" if layout == "file" and arch in GGUF_INTERLEAVED_ARCHS else "neox"
        fields.update(overrides)
        return cls(**fields)


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


# llama.cpp's LLAMA_ROPE_TYPE_NORM architectures: q/k weights stored for interleaved pairs.
GGUF_INTERLEAVED_ARCHS = {"llama", "llama4", "baichuan", "deci", "mistral", "granite", "granitemoe", "minicpm",
                          "xverse", "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2", "plm",
                          "bitnet", "t5", "jais", "nemotron", "exaone", "chameleon", "solar"}


def read_gguf_metadata(path: Any) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file as ``{key: value}`` (arrays of numbers as lists).

    Parsing a GGUF header takes seconds (its tokenizer arrays); the result is kept per (file, size, mtime), so a
    command that checks the config before loading the weights reads it once (``ropekit.gguf.read_gguf``, which
    also keeps the RoPE factor tensors).
    """
    from ropekit.gguf import read_gguf

    return dict(read_gguf(path).metadata)


def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """``read_gguf_metadata`` for an already resolved file (kept for older imports)."""
    from ropekit.gguf import _read_cached

    return dict(_read_cached(path, size, mtime_ns).metadata)


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1)
def _field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(RopeConfig))


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
# only its sliding layers when it has any. tests/test_every_family.py checks these against the models' forwards.
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


def _hf_base(d: Mapping[str, Any], rope: Mapping[str, Any]) -> float:
    inside, top, neox = rope.get("rope_theta"), d.get("rope_theta"), d.get("rotary_emb_base")
    if inside is not None and top is not None and float(inside) != float(top):
        raise ValueError(f"rope_theta: {top} at the top level contradicts {inside} in rope_parameters")
    default = _hf_default_theta(d.get("model_type"))
    base = _first(inside, top, neox, default if isinstance(default, (int, float)) else None, 10000.0)
    _check_number("rope_theta", base)
    return float(base)
