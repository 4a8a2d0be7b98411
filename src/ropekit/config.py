"""`RopeConfig`: one typed, validated description of a model's RoPE, and ``extend``, the one call that scales it.

Built directly, from a Hugging Face ``config.json`` dict or ``transformers`` config (``from_hf``), or from
GGUF metadata (``from_gguf``); ``to_hf`` gives back the ``rope_parameters`` form transformers reads. ``from_hf``
and ``from_gguf`` are thin entry points: the translations live in ``ropekit.hf.config_map`` and
``ropekit.gguf.to_config``. A model with one RoPE per layer type (Gemma 3/4), layers without RoPE (SmolLM3,
Llama 4) or a multimodal wrapper (``text_config``) is read whole by ``ropekit.layered.LayeredRope.from_hf``;
``RopeConfig.from_hf`` refuses to pick one of several RoPEs.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, Mapping

from ropekit.warn import warn_once
from ropekit.methods import (  # noqa: F401  (METHOD_ALIASES, HF_FIXED_KEYS, hf_keys: re-exported here)
    HF_FIXED_KEYS,
    METHOD_ALIASES,
    canonical_name,
    get_method,
    hf_keys,
    method_fields,
    method_names,
    parameters,
    read_factors_file,
    readers,
)
from ropekit.methods.registry import check_int as _check_int
from ropekit.methods.registry import check_number as _check_number

LAYOUTS = ("neox", "gptj")

# Snapshots of the registry at import, for older imports; ropekit itself calls the functions, which also see
# methods registered later. METHOD_FIELDS: fields that belong to one method or another (anything set must be
# read by the chosen method). HF_ROPE_KEYS: see ``hf_keys``.
METHOD_FIELDS = method_fields()
HF_ROPE_KEYS = hf_keys()
# RopeConfig fields every method has; all others are method parameters.
_CORE_FIELDS = ("head_dim", "rotary_dim", "base", "layout", "method", "max_position", "extra")


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
        """True when the method changes plain RoPE (``default`` does not: ``MethodSpec.unscaled``)."""
        return not get_method(self.method).unscaled

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
        own = get_method(self.method)
        if own.check_extend is not None and name != own.name:
            own.check_extend(self, name)  # e.g. a proportional RoPE's still pairs must stay still
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
        from ropekit.hf.config_map import hf_rope_dict

        d, rope = hf_rope_dict(config, layer_type)
        return cls._from_hf_rope(d, rope, overrides)

    @classmethod
    def _from_hf_rope(cls, d: Mapping[str, Any], rope: dict[str, Any], overrides: Mapping[str, Any]) -> "RopeConfig":
        """One RoPE: ``rope`` (a rope_parameters dict) within the model config ``d``."""
        from ropekit.hf.config_map import hf_rope_fields

        kwargs, extra_params = hf_rope_fields(d, rope)
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
        from ropekit.gguf.to_config import GGUF_INTERLEAVED_ARCHS, rope_fields

        if layout not in ("transformers", "file"):
            raise ValueError(f"layout: {layout!r} not accepted for GGUF; accepted: transformers, file")
        arch, fields = rope_fields(source, layer_type=layer_type)
        fields["layout"] = "gptj" if layout == "file" and arch in GGUF_INTERLEAVED_ARCHS else "neox"
        fields.update(overrides)
        return cls(**fields)


def read_gguf_metadata(path: Any) -> dict[str, Any]:
    """The scalar and string metadata of a GGUF file as ``{key: value}`` (arrays of numbers as lists).

    Parsing a GGUF header takes seconds (its tokenizer arrays); the result is kept per (file, size, mtime), so a
    command that checks the config before loading the weights reads it once (``ropekit.gguf.read_gguf``, which
    also keeps the RoPE factor tensors).
    """
    from ropekit.gguf.read import read_gguf

    return dict(read_gguf(path).metadata)


def _gguf_metadata(path: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """``read_gguf_metadata`` for an already resolved file (kept for older imports)."""
    from ropekit.gguf.read import _read_cached

    return dict(_read_cached(path, size, mtime_ns).metadata)


# ---------------------------------------------------------------------- helpers
@functools.lru_cache(maxsize=1)
def _field_names() -> frozenset[str]:
    return frozenset(f.name for f in dataclasses.fields(RopeConfig))

