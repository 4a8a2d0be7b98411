"""`RopeConfig`: one typed, validated description of a model's RoPE.

Built directly, from a Hugging Face ``config.json`` dict or ``transformers`` config (``from_hf``), or from
GGUF metadata (``from_gguf``); ``to_hf`` gives back the ``rope_parameters`` form transformers reads.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

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

_warned: set[str] = set()


def warn_once(message: str) -> None:
    """Emit ``message`` as a UserWarning the first time it is seen in this process."""
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=3)


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
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{name}: must be a finite number, got {value}")
        if not isinstance(method, str):
            raise ValueError(f"method: must be a method name (str), got {method!r}; accepted: "
                             f"{', '.join(method_names())}")
        spec = get_method(method)
        name = spec.name
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
        ``partial_rotary_factor``, ``rotary_pct``, ``rotary_dim``, ``rotary_emb_base``. Per-layer dicts
        (Gemma 3) need ``layer_type``. ``overrides`` set RopeConfig fields directly (e.g. ``layout``).
        Unknown keys warn once; missing or contradictory ones raise ValueError naming the field.
        """
        d = _as_dict(config)
        head_dim = _hf_head_dim(d)
        rope = _hf_rope_dict(d, layer_type)

        rope_type = rope.get("rope_type")
        legacy_type = rope.get("type")
        if rope_type is not None and legacy_type is not None and rope_type != legacy_type:
            raise ValueError(f"rope_type: {rope_type!r} contradicts type: {legacy_type!r}")
        method = rope_type or legacy_type or "default"
        if not isinstance(method, str):
            raise ValueError(f"rope_type: must be a string, got {method!r}; accepted: {', '.join(method_names())}")
        method = canonical_name(method)
        if method not in method_names():
            raise ValueError(f"rope_type: {method!r} is not supported; accepted: {', '.join(method_names())}")
        spec = get_method(method)

        base = _hf_base(d, rope)
        partial = _first(rope.get("partial_rotary_factor"), d.get("partial_rotary_factor"), d.get("rotary_pct"))
        if d.get("rotary_dim") is not None:
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

        layout = "gptj" if d.get("model_type") in GPTJ_LAYOUT_MODEL_TYPES else "neox"
        if d.get("rope_interleave") is False:
            layout = "neox"  # DeepSeek-V3 with rope_interleave off: rotate-half weights
        kwargs = dict(head_dim=head_dim, rotary_dim=rotary_dim, base=base, layout=layout, method=method,
                      max_position=max_position, **params)
        kwargs.update(overrides)
        return cls(**kwargs)

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
    def from_gguf(cls, source: Any, *, layout: str = "transformers", **overrides: Any) -> "RopeConfig":
        """Read RoPE from a GGUF file path or a dict of its metadata.

        Reads ``general.architecture`` then ``<arch>.rope.freq_base``, ``.rope.dimension_count``,
        ``.rope.scaling.type/factor/original_context_length``, ``.context_length``, ``.attention.head_count``,
        ``.attention.key_length`` and ``.embedding_length``.

        ``layout="transformers"`` (default) describes the model as transformers loads it (it un-permutes
        llama-family q/k weights to rotate-half, so "neox"); ``layout="file"`` gives llama.cpp's pairing
        for the weights as stored (interleaved for llama-family architectures).
        """
        meta = read_gguf_metadata(source) if not isinstance(source, Mapping) else dict(source)
        arch = meta.get("general.architecture")
        if not arch:
            raise ValueError("general.architecture: missing from the GGUF metadata")
        key = lambda suffix: f"{arch}.{suffix}"  # noqa: E731
        heads = meta.get(key("attention.head_count"))
        if isinstance(heads, (list, tuple)):
            heads = max(heads)
        head_dim = meta.get(key("attention.key_length"))
        if head_dim is None:
            embed = meta.get(key("embedding_length"))
            if not embed or not heads:
                raise ValueError(f"{arch}.attention.head_count / {arch}.embedding_length: needed for the head size")
            head_dim = int(embed) // int(heads)
        rotary_dim = meta.get(key("rope.dimension_count"), head_dim)
        base = meta.get(key("rope.freq_base"), 10000.0)
        context = meta.get(key("context_length"))
        scaling = meta.get(key("rope.scaling.type"), "none")
        known = {"freq_base", "dimension_count", "scaling.type", "scaling.finetuned"} | {
            p.gguf_key for p, _ in parameters() if p.gguf_key}
        for k in meta:
            if k.startswith(f"{arch}.rope.") and k[len(arch) + 6:] not in known:
                warn_once(f"gguf: unknown key {k!r} ignored")
        gguf_methods = {get_method(m).gguf_type: m for m in method_names() if get_method(m).gguf_type}
        if scaling not in gguf_methods:
            raise ValueError(f"{arch}.rope.scaling.type: {scaling!r} is not supported; accepted: "
                             f"{', '.join(gguf_methods)}")
        method = gguf_methods[scaling]
        kwargs: dict[str, Any] = dict(head_dim=int(head_dim), rotary_dim=int(rotary_dim), base=float(base),
                                      method=method)
        original = meta.get(key("rope.scaling.original_context_length"))
        if method != "default":
            kwargs["factor"] = float(meta.get(key("rope.scaling.factor"), 0) or 0) or None
            if kwargs["factor"] is None:
                raise ValueError(f"{arch}.rope.scaling.factor: required for scaling type {scaling!r}")
            kwargs["original_max_position"] = int(original or context)
            if "mscale_all_dim" in get_method(method).reads and meta.get(key("rope.scaling.yarn_log_multiplier")):
                # llama.cpp stores DeepSeek's 0.1 * mscale_all_dim as the log multiplier.
                kwargs["mscale_all_dim"] = float(meta[key("rope.scaling.yarn_log_multiplier")]) / 0.1
                kwargs["mscale"] = kwargs["mscale_all_dim"]
        else:
            kwargs["original_max_position"] = int(context) if context else None
        if context:
            kwargs["max_position"] = max(int(context), int(round((kwargs.get("factor") or 1) *
                                                                  (kwargs["original_max_position"] or 0))))
        if layout == "transformers":
            kwargs["layout"] = "neox"
        elif layout == "file":
            kwargs["layout"] = "gptj" if arch in GGUF_INTERLEAVED_ARCHS else "neox"
        else:
            raise ValueError(f"layout: {layout!r} not accepted for GGUF; accepted: transformers, file")
        kwargs.update(overrides)
        return cls(**kwargs)


# llama.cpp's LLAMA_ROPE_TYPE_NORM architectures: q/k weights stored for interleaved pairs.
GGUF_INTERLEAVED_ARCHS = {"llama", "llama4", "baichuan", "deci", "mistral", "granite", "granitemoe", "minicpm",
                          "xverse", "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2", "plm",
                          "bitnet", "t5", "jais", "nemotron", "exaone", "chameleon", "solar"}


def read_gguf_metadata(path: Any) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file as ``{key: value}`` (arrays of numbers as lists).

    Parsing a GGUF header takes seconds (its tokenizer arrays); the result is kept per (file, size, mtime), so a
    command that checks the config before loading the weights reads it once.
    """
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    stat = path.stat()
    return dict(_gguf_metadata(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    reader = GGUFReader(path)
    out: dict[str, Any] = {}
    for name, fld in reader.fields.items():
        if not fld.types or name.startswith("tokenizer."):
            continue
        kind = fld.types[0]
        if kind == GGUFValueType.STRING:
            out[name] = bytes(fld.parts[fld.data[0]]).decode("utf-8", errors="replace")
        elif kind == GGUFValueType.ARRAY:
            if len(fld.types) > 1 and fld.types[1] != GGUFValueType.STRING:
                out[name] = [fld.parts[i].tolist()[0] for i in fld.data]
        else:
            out[name] = fld.parts[fld.data[0]].tolist()[0]
    return out


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


def _hf_rope_dict(d: Mapping[str, Any], layer_type: str | None) -> dict[str, Any]:
    new, old = d.get("rope_parameters"), d.get("rope_scaling")
    rope = new if new else old
    if new and old:
        t_new = new.get("rope_type", new.get("type"))
        t_old = old.get("rope_type", old.get("type"))
        if t_new and t_old and t_new != t_old:
            raise ValueError(f"rope_parameters: rope_type {t_new!r} contradicts rope_scaling's {t_old!r}")
    rope = dict(rope or {})
    layer_types = set(d.get("layer_types") or ()) | {"full_attention", "sliding_attention"}
    nested = [k for k, v in rope.items() if k in layer_types and isinstance(v, Mapping)]
    if nested:
        if layer_type is None:
            raise ValueError(f"layer_type: this config has one RoPE per layer type; pass one of: {', '.join(nested)}")
        if layer_type not in nested:
            raise ValueError(f"layer_type: {layer_type!r} not in this config; accepted: {', '.join(nested)}")
        rope = dict(rope[layer_type])
    elif layer_type is not None:
        raise ValueError(f"layer_type: {layer_type!r} given but the config has one RoPE for all layers")
    return rope


def _hf_base(d: Mapping[str, Any], rope: Mapping[str, Any]) -> float:
    inside, top, neox = rope.get("rope_theta"), d.get("rope_theta"), d.get("rotary_emb_base")
    if inside is not None and top is not None and float(inside) != float(top):
        raise ValueError(f"rope_theta: {top} at the top level contradicts {inside} in rope_parameters")
    base = _first(inside, top, neox, 10000.0)
    _check_number("rope_theta", base)
    return float(base)
