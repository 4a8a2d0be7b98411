"""`RopeConfig`: one typed, validated description of a model's RoPE.

Built directly, from a Hugging Face ``config.json`` dict or ``transformers`` config (``from_hf``), or from
GGUF metadata (``from_gguf``); ``to_hf`` gives back the ``rope_parameters`` form transformers reads.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from ropekit.methods import get_method, method_names

LAYOUTS = ("neox", "gptj")

# Fields that belong to one scaling method or another; anything set must be read by the chosen method.
METHOD_FIELDS = (
    "factor",
    "original_max_position",
    "attention_factor",
    "beta_fast",
    "beta_slow",
    "truncate",
    "mscale",
    "mscale_all_dim",
    "low_freq_factor",
    "high_freq_factor",
    "short_factor",
    "long_factor",
    "n_hat",
    "new_base",
)

# rope_type names of other tools that mean one of ours.
METHOD_ALIASES = {"su": "longrope", "dynamic_ntk": "dynamic", "ntk_aware": "ntk", "pi": "linear", "none": "default",
                  "abf": "base"}

# Keys of a transformers rope_parameters / rope_scaling dict, mapped to RopeConfig fields (None: handled apart).
HF_ROPE_KEYS = {
    "rope_type": None,
    "type": None,
    "rope_theta": None,
    "partial_rotary_factor": None,
    "factor": "factor",
    "original_max_position_embeddings": "original_max_position",
    "attention_factor": "attention_factor",
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "truncate": "truncate",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "short_factor": "short_factor",
    "long_factor": "long_factor",
}

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

    # ------------------------------------------------------------------ validation
    def __post_init__(self) -> None:
        set_ = lambda name, value: object.__setattr__(self, name, value)  # noqa: E731  (frozen dataclass)
        if not isinstance(self.method, str):
            raise ValueError(f"method: must be a method name (str), got {self.method!r}; accepted: "
                             f"{', '.join(method_names())}")
        method = METHOD_ALIASES.get(self.method, self.method)
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
        if method in ("ntk", "dynamic") and rotary_dim < 4:
            raise ValueError(f"rotary_dim: method {method!r} needs rotary_dim >= 4 (its base grows as "
                             f"s^(d/(d-2))), got {rotary_dim}")
        _check_number("base", self.base)
        if not self.base > 1.0:
            raise ValueError(f"base: must be > 1, got {self.base}")
        set_("base", float(self.base))
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: unknown channel layout {self.layout!r}; accepted: {', '.join(LAYOUTS)}")

        # A field set that the chosen method does not read is a mistake, not something to ignore.
        reads = set(spec.required) | set(spec.accepted)
        for name in METHOD_FIELDS:
            if getattr(self, name) is not None and name not in reads:
                if name == "original_max_position":
                    continue  # the trained length is a property of the model, harmless for every method
                users = [m for m in method_names() if name in _reads(m)]
                raise ValueError(
                    f"{name}: not used by method {method!r}; it is a parameter of: {', '.join(users)}"
                )
        for name in spec.required:
            if getattr(self, name) is None:
                raise ValueError(f"{name}: required by method {method!r} (required: {', '.join(spec.required)})")

        if self.factor is not None:
            _check_number("factor", self.factor)
            if self.factor < 1.0:
                raise ValueError(f"factor: must be >= 1 (the target length over the trained one), got {self.factor}")
            set_("factor", float(self.factor))
        for name in ("original_max_position", "max_position"):
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, minimum=1)
                set_(name, int(value))
        if self.original_max_position and self.max_position and self.max_position < self.original_max_position:
            raise ValueError(
                f"max_position: the target length ({self.max_position}) must be >= original_max_position "
                f"({self.original_max_position})"
            )
        for name in ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "low_freq_factor",
                     "high_freq_factor"):
            value = getattr(self, name)
            if value is not None:
                _check_number(name, value)
                if value <= 0 and name not in ("mscale", "mscale_all_dim"):
                    raise ValueError(f"{name}: must be > 0, got {value}")
                set_(name, float(value))
        if self.truncate is not None and not isinstance(self.truncate, bool):
            raise ValueError(f"truncate: must be true or false, got {self.truncate!r}")
        if self.beta_fast is not None and self.beta_slow is not None and self.beta_fast <= self.beta_slow:
            raise ValueError(f"beta_fast: must be > beta_slow ({self.beta_slow}), got {self.beta_fast}")
        low = 1.0 if self.low_freq_factor is None else self.low_freq_factor
        high = 4.0 if self.high_freq_factor is None else self.high_freq_factor
        if method == "llama3" and high <= low:
            raise ValueError(f"high_freq_factor: must be > low_freq_factor ({low}), got {high}")
        for name in ("short_factor", "long_factor"):
            value = getattr(self, name)
            if value is not None:
                if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                    raise ValueError(f"{name}: must be a list of {self.rotary_dim // 2} numbers, got {value!r}")
                value = tuple(float(v) for v in value)
                if len(value) != self.rotary_dim // 2:
                    raise ValueError(
                        f"{name}: needs rotary_dim/2 = {self.rotary_dim // 2} entries (one per pair), got {len(value)}"
                    )
                if any(not math.isfinite(v) or v <= 0 for v in value):
                    raise ValueError(f"{name}: every entry must be a finite number > 0")
                set_(name, value)
        if self.n_hat is not None:
            _check_int("n_hat", self.n_hat, minimum=0)
            set_("n_hat", int(self.n_hat))
        if self.new_base is not None:
            _check_number("new_base", self.new_base)
            if not self.new_base > 1.0:
                raise ValueError(f"new_base: must be > 1, got {self.new_base}")
            set_("new_base", float(self.new_base))

    # ------------------------------------------------------------------ derived
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
        """A copy with ``changes`` applied (and validated). Changing ``method`` clears the old method's fields."""
        if "method" in changes and changes["method"] != self.method:
            keep = {"original_max_position", "max_position"}
            cleared = {n: None for n in METHOD_FIELDS if n not in keep and n not in changes}
            changes = {**cleared, **changes}
            if "max_position" not in changes:
                # The old target belonged to the old method: derive the new one from factor * trained length.
                changes["max_position"] = None
                if self.original_max_position is None and self.max_position is not None:
                    changes.setdefault("original_max_position", self.max_position)
        return dataclasses.replace(self, **changes)

    def with_method(self, method: str, **params: Any) -> "RopeConfig":
        """This model's RoPE extended with ``method`` (the trained length stays)."""
        return self.replace(method=method, **params)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the set fields (lists for the factor tuples), for JSON reports."""
        out = {}
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = list(value) if isinstance(value, tuple) else value
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
        method = METHOD_ALIASES.get(method, method)
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
        reads = set(spec.required) | set(spec.accepted)
        for key, value in rope.items():
            if key not in HF_ROPE_KEYS:
                warn_once(f"rope_parameters: unknown key {key!r} ignored (known: {', '.join(HF_ROPE_KEYS)})")
                continue
            name = HF_ROPE_KEYS[key]
            if name is None or value is None:
                continue
            if name not in reads and name != "original_max_position":
                warn_once(f"rope_parameters: key {key!r} is not used by rope_type {method!r}; ignored")
                continue
            params[name] = value

        max_pos = d.get("max_position_embeddings", d.get("n_positions", d.get("n_ctx")))
        if method == "dynamic":
            # transformers' dynamic NTK takes max_position_embeddings as the trained length.
            if params.get("original_max_position") not in (None, max_pos):
                warn_once("rope_parameters: original_max_position_embeddings is not read by transformers' dynamic "
                          "scaling, which uses max_position_embeddings as the trained length; doing the same")
            params["original_max_position"] = max_pos
        elif method in ("yarn", "llama3", "longrope", "dynamic_yarn"):
            # Phi-3 keeps the trained length at the top level, and transformers gives it priority.
            top = d.get("original_max_position_embeddings")
            params["original_max_position"] = _first(top, params.get("original_max_position"), max_pos)
        elif method == "default":
            params.pop("original_max_position", None)
        original = params.get("original_max_position") or (max_pos if method == "default" else None)
        if original is None and method in ("yarn", "llama3", "longrope", "dynamic", "dynamic_yarn"):
            raise ValueError(f"max_position_embeddings: needed to know the trained length for rope_type {method!r}")
        if method in ("yarn", "longrope") and params.get("factor") is None and original:
            if max_pos is None:
                raise ValueError(f"factor: required by rope_type {method!r} (or max_position_embeddings)")
            params["factor"] = max_pos / original
        factor = params.get("factor")
        if method in ("linear", "ntk", "dynamic", "yarn", "llama3") and factor is None:
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
        if method == "dynamic" and factor:
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
        from ropekit.methods.ntk import ntk_base

        spec = get_method(self.method)
        params: dict[str, Any] = {"rope_theta": self.base}
        if self.method == "ntk":
            params = {"rope_type": "default", "rope_theta": ntk_base(self.base, self.factor, self.rotary_dim)}
        elif self.method == "base":
            params = {"rope_type": "default", "rope_theta": self.new_base}
        elif spec.hf_type is None:
            raise ValueError(
                f"method: transformers has no {self.method!r}; export one of: "
                f"{', '.join(m for m in method_names() if get_method(m).hf_type or m in ('ntk', 'base'))}"
            )
        else:
            params["rope_type"] = spec.hf_type
            reverse = {v: k for k, v in HF_ROPE_KEYS.items() if v}
            for name in spec.required + spec.accepted:
                value = getattr(self, name)
                if value is None or name == "n_hat":
                    continue
                if self.method == "dynamic" and name == "original_max_position":
                    continue  # transformers' dynamic reads the trained length from max_position_embeddings
                params[reverse[name]] = list(value) if isinstance(value, tuple) else value
            if self.n_hat:
                raise ValueError("n_hat: transformers' longrope has no unscaled leading positions; set n_hat=0")
            if self.method == "llama3":  # transformers requires both; ours default to Llama 3.1's 1 and 4
                params.setdefault("low_freq_factor", 1.0)
                params.setdefault("high_freq_factor", 4.0)
        if self.layout != "neox":
            warn_once("layout: transformers takes the channel layout from the model type, not the config; "
                      "this config only round-trips for gptj-layout model types")
        out: dict[str, Any] = {"rope_parameters": params, "rope_scaling": dict(params), "head_dim": self.head_dim}
        if self.rotary_dim != self.head_dim:
            out["partial_rotary_factor"] = self.rotary_dim / self.head_dim
            params["partial_rotary_factor"] = out["partial_rotary_factor"]
        if self.method == "dynamic":
            out["max_position_embeddings"] = self.original_max_position  # transformers' trained length for dynamic
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
        known = {"freq_base", "dimension_count", "scaling.type", "scaling.factor", "scaling.original_context_length",
                 "scaling.finetuned", "scaling.yarn_log_multiplier"}
        for k in meta:
            if k.startswith(f"{arch}.rope.") and k[len(arch) + 6:] not in known:
                warn_once(f"gguf: unknown key {k!r} ignored")
        gguf_methods = {"none": "default", "linear": "linear", "yarn": "yarn", "longrope": "longrope"}
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
            if method == "yarn" and meta.get(key("rope.scaling.yarn_log_multiplier")):
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
    """The scalar and string metadata of a GGUF file as ``{key: value}`` (arrays of numbers as lists)."""
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    from gguf import GGUFReader
    from gguf.constants import GGUFValueType

    reader = GGUFReader(str(path))
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
def _reads(method: str) -> set[str]:
    spec = get_method(method)
    return set(spec.required) | set(spec.accepted)


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum}, got {value}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


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
