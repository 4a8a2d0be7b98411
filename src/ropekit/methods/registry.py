"""The method registry: each scaling method's maths, parameters and properties, as data.

A scaling method is one module in ``ropekit/methods/`` that calls ``register(MethodSpec(...))``. The spec
says everything the rest of ropekit needs to know about the method: the function that computes its
frequencies, the ``RopeConfig`` fields it reads (``Param``: type, default, bounds, help text, CLI flag,
Hugging Face and GGUF keys), whether it depends on the sequence length, how it is exported to transformers,
whether ``ropekit compare`` runs it and how ``ropekit inspect`` describes it. Every list of methods, every
method option of the CLI and every config key map is derived from the registry.

Frequencies are computed in float64 and exposed both as float64 (for the angle maths) and float32 (the
public ``inv_freq``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# A ``ropekit.config.RopeConfig`` in the hints below: that module imports this one, so this one does not import
# it back, not even for type hints (the methods read a config's fields, never its class).
RopeConfig = Any


@dataclass(frozen=True)
class Frequencies:
    """What a scaling method resolves to for one sequence length.

    Attributes:
        inv_freq64: (rotary_dim/2,) float64 inverse frequencies, radians per position.
        attention_scale: the *final* factor that multiplies cos and sin (so q·k scales by its square).
            Never re-derive it downstream.
        layout: "neox" (rotate-half) or "gptj" (interleaved).
        rotary_dim: channels rotated; channels beyond it pass through.
        unscaled_until: positions ``< unscaled_until`` use ``original_inv_freq64`` instead
            (LongRoPE's n_hat); 0 means never.
        original_inv_freq64: (rotary_dim/2,) float64 unscaled inverse frequencies, or None.
        seq_len: the sequence length these frequencies were resolved for (length-dependent methods), or None.
    """

    inv_freq64: torch.Tensor
    attention_scale: float
    layout: str = "neox"
    rotary_dim: int = 0
    unscaled_until: int = 0
    original_inv_freq64: torch.Tensor | None = None
    seq_len: int | None = None
    _inv_freq32: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The scale multiplies cos and sin: zero, negative or non-finite turns attention into noise, silently.
        try:
            good = not isinstance(self.attention_scale, bool) and 0 < float(self.attention_scale) < math.inf
        except (TypeError, ValueError):
            good = False
        if not good:
            raise ValueError(f"attention_scale: must be a positive finite number (it multiplies cos and sin), "
                             f"got {self.attention_scale!r}")
        object.__setattr__(self, "inv_freq64", self.inv_freq64.to(torch.float64))
        if self.rotary_dim == 0:
            object.__setattr__(self, "rotary_dim", 2 * self.inv_freq64.numel())
        object.__setattr__(self, "_inv_freq32", self.inv_freq64.to(torch.float32))

    @property
    def inv_freq(self) -> torch.Tensor:
        """(rotary_dim/2,) float32 inverse frequencies."""
        return self._inv_freq32

    @property
    def wavelengths(self) -> torch.Tensor:
        """(rotary_dim/2,) float64 wavelengths 2*pi/inv_freq, in tokens."""
        return 2 * torch.pi / self.inv_freq64

    def to(self, device: torch.device | str) -> "Frequencies":
        """A copy with its tensors on ``device`` (dtypes kept: float64 stays float64)."""
        return Frequencies(
            inv_freq64=self.inv_freq64.to(device),
            attention_scale=self.attention_scale,
            layout=self.layout,
            rotary_dim=self.rotary_dim,
            unscaled_until=self.unscaled_until,
            original_inv_freq64=None if self.original_inv_freq64 is None else self.original_inv_freq64.to(device),
            seq_len=self.seq_len,
        )


# ---------------------------------------------------------------------- parameters
PARAM_TYPES = ("float", "int", "bool", "float_list")


@dataclass(frozen=True)
class Param:
    """One ``RopeConfig`` field a method reads.

    Attributes:
        field: the RopeConfig field name (also the name error messages start with).
        type: "float", "int", "bool" or "float_list" (one positive number per rotary pair: rotary_dim/2).
        help: one line for ``--help`` and docs.
        default: the value the method uses when the field is unset (None: required, or derived, see help).
        minimum: lower bound, or None; ``exclusive`` makes it strict (> instead of >=). For float_list it
            bounds every entry.
        exclusive: see ``minimum``.
        flag: the CLI option that sets it (``--beta-fast``); several fields may share one (``--factors-file``).
        hf_key: its key in a transformers ``rope_parameters`` dict, or None where transformers has none.
        gguf_key: its GGUF metadata key after ``<arch>.rope.``, or None where GGUF has none (the methods'
            ``to_gguf`` write it there).
        bound_note: words appended to a bound error, saying why the bound holds.
    """

    field: str
    type: str
    help: str
    default: Any = None
    minimum: float | None = None
    exclusive: bool = False
    flag: str | None = None
    hf_key: str | None = None
    gguf_key: str | None = None
    bound_note: str = ""

    def __post_init__(self) -> None:
        if self.type not in PARAM_TYPES:
            raise ValueError(f"type: {self.type!r} not accepted; accepted: {', '.join(PARAM_TYPES)}")
        if self.flag is None:
            object.__setattr__(self, "flag", "--" + self.field.replace("_", "-"))

    def check(self, value: Any, *, pairs: int) -> Any:
        """``value`` checked against the type and bounds and normalised (float / int / bool / tuple of floats).

        ``pairs`` (rotary_dim/2) is the length of a float_list. Raises ValueError starting with ``field:``.
        """
        name = self.field
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{name}: must be true or false, got {value!r}")
            return value
        if self.type == "int":
            check_int(name, value, minimum=-math.inf)
            value = int(value)
        elif self.type == "float":
            check_number(name, value)
            value = float(value)
        else:
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ValueError(f"{name}: must be a list of {pairs} numbers, got {value!r}")
            try:
                value = tuple(float(v) for v in value)
            except (TypeError, ValueError):
                raise ValueError(f"{name}: must be a list of {pairs} numbers, got {value!r}") from None
            if len(value) != pairs:
                raise ValueError(f"{name}: needs rotary_dim/2 = {pairs} entries (one per pair), got {len(value)}")
            if any(not math.isfinite(v) or not self._in_bounds(v) for v in value):
                raise ValueError(f"{name}: every entry must be a finite number {self._bound_text()}")
            return value
        if not self._in_bounds(value):
            note = f" {self.bound_note}" if self.bound_note else ""
            raise ValueError(f"{name}: must be {self._bound_text()}{note}, got {value}")
        return value

    def _in_bounds(self, value: float) -> bool:
        if self.minimum is None:
            return True
        return value > self.minimum if self.exclusive else value >= self.minimum

    def _bound_text(self) -> str:
        if self.minimum is None:
            return ""
        return f"{'>' if self.exclusive else '>='} {self.minimum:g}"


def check_int(name: str, value: Any, minimum: float) -> None:
    """ValueError ``name: ...`` unless ``value`` is an integer (an integral float counts) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum:g}, got {value}")


def check_number(name: str, value: Any) -> None:
    """ValueError ``name: ...`` unless ``value`` is a finite int or float (not a bool).

    The one finiteness rule: every float parameter of a method (``Param.check``), ``RopeConfig.extend``'s
    arguments and every float option of the CLI (``ropekit.cli``, with the flag as ``name``) go through it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")


# Parameters more than one method reads. A method's own parameters live in its module.
FACTOR = Param("factor", "float", "scale s = target length / trained length", minimum=1.0,
               bound_note="(the target length over the trained one)", flag="--factor", hf_key="factor",
               gguf_key="scaling.factor")
ORIGINAL_MAX_POSITION = Param("original_max_position", "int",
                              "trained context length L (default: the model's)", minimum=1,
                              flag="--original-length", hf_key="original_max_position_embeddings",
                              gguf_key="scaling.original_context_length")
ATTENTION_FACTOR = Param("attention_factor", "float",
                         "final cos/sin multiplier (default: derived from the factor)", minimum=0.0,
                         exclusive=True, hf_key="attention_factor")


# ---------------------------------------------------------------------- GGUF
@dataclass(frozen=True)
class GGUFExport:
    """What a method writes into a GGUF file for llama.cpp (``MethodSpec.to_gguf``), in llama.cpp's terms.

    Attributes:
        keys: ``{key after "<arch>.rope.": value}`` besides ``scaling.type`` (``MethodSpec.gguf_type``);
            str, int or float values, written as STRING, UINT32, FLOAT32.
        tensors: ``{tensor base name ("rope_freqs", "rope_factors_long", ...): one value per pair}``.
        freq_base: a new ``rope.freq_base`` (the method is plain RoPE at another base), or None: the config's.
        attention_relative_to: the cos/sin multiplier llama.cpp already applies for these keys (YaRN's
            0.1 ln s + 1); the rest of the method's attention scale is written as ``scaling.attn_factor``
            (unless ``keys`` sets it).
    """

    keys: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, tuple[float, ...]] = field(default_factory=dict)
    freq_base: float | None = None
    attention_relative_to: float = 1.0


# ---------------------------------------------------------------------- methods
@dataclass(frozen=True)
class MethodSpec:
    """A registered scaling method.

    Attributes:
        name: registry name (``--method``).
        compute: ``(cfg, seq_len) -> (inv_freq64, attention_scale)`` or a full ``Frequencies``.
        params: every ``Param`` the method reads (RopeConfig fields), required ones included.
        required: names of ``params`` that must be set.
        length_dependent: the result depends on the current sequence length (dynamic methods).
        hf_type: the ``rope_type`` transformers reads this method's parameters as, or None where transformers
            has no such method.
        to_hf: for a method transformers lacks but can express otherwise: ``cfg -> rope_parameters`` dict
            (e.g. plain RoPE with another ``rope_theta``). None: written as ``hf_type`` with its params.
        not_exportable: why transformers cannot load it, when neither ``hf_type`` nor ``to_hf`` is set.
        hf_defaults: params written with their default when unset (transformers requires them).
        hf_trained_from_max_position: transformers takes this method's trained length from
            ``max_position_embeddings`` (its dynamic NTK), not ``original_max_position_embeddings``.
        hf_factor_from_lengths: transformers derives a missing factor as max_position_embeddings / trained.
        hf_partial_rotary: the param transformers' ``partial_rotary_factor`` sets for this rope_type instead of
            the rotary dimension (Gemma 4's proportional: ``rotated_fraction``), or None.
        gguf_type: llama.cpp's ``rope.scaling.type`` for it ("none" for plain RoPE), or None where llama.cpp
            has none: written by the GGUF export, and the method a file of that type reads as.
        to_gguf: ``(cfg, Frequencies) -> GGUFExport``: how the GGUF export writes it (ValueError naming the
            field llama.cpp cannot express). None: a static method is written as per-pair divisors
            (``rope_freqs``), a length-dependent one is refused.
        from_gguf: ``(base, rotary_dim, divisors, trained length or None) -> params or None``: recognises a GGUF
            file's per-pair divisors (``rope_freqs``, read at ``base``) as this method, with these params.
        comparable: ``ropekit compare`` runs it.
        unscaled: plain RoPE, no scaling at any length: ``compare`` plans it as the model's own frequencies
            (``RopeConfig.with_method``), not at a factor.
        needs_searched_factors: its per-pair factors come from a search (``ropekit search``) or the model's
            config, never from the factor alone: ``compare`` runs it only with such factors, also beside a
            model that already uses it.
        suggested_base: for a method that replaces the base instead of scaling by a factor: ``target length
            -> the new_base it picks``; ``compare`` plans it so (and skips it when that is not above the model's).
        describe: ``cfg -> str``, a few words ``ropekit inspect`` shows for the method at that config.
        label: ``cfg -> str``, how a report names a run of it (``run_label``); None: "name xfactor".
        check: ``cfg -> None``, checks across fields (ValueError naming the field), after each param's own.
        check_extend: ``(cfg, other method name) -> None``: ValueError when a config of this method cannot be
            extended with another method (``RopeConfig.extend``), or None.
        summary: one line for help texts.
    """

    name: str
    compute: Callable[..., object]
    params: tuple[Param, ...] = ()
    required: tuple[str, ...] = ()
    length_dependent: bool = False
    hf_type: str | None = None
    to_hf: Callable[["RopeConfig"], dict] | None = None
    not_exportable: str = ""
    hf_defaults: tuple[str, ...] = ()
    hf_trained_from_max_position: bool = False
    hf_factor_from_lengths: bool = False
    hf_partial_rotary: str | None = None
    gguf_type: str | None = None
    to_gguf: Callable[[RopeConfig, Frequencies], GGUFExport] | None = None
    from_gguf: Callable[[float, int, tuple, int | None], dict | None] | None = None
    comparable: bool = True
    unscaled: bool = False
    needs_searched_factors: bool = False
    suggested_base: Callable[[int], float] | None = None
    describe: Callable[["RopeConfig"], str] | None = None
    label: Callable[["RopeConfig"], str] | None = None
    check: Callable[["RopeConfig"], None] | None = None
    check_extend: Callable[["RopeConfig", str], None] | None = None
    summary: str = ""

    def __post_init__(self) -> None:
        names = [p.field for p in self.params]
        if len(set(names)) != len(names):
            raise ValueError(f"params: {self.name!r} lists a parameter twice: {names}")
        missing = [r for r in self.required if r not in names]
        if missing:
            raise ValueError(f"required: {', '.join(missing)} not among the params of {self.name!r}")
        if not self.summary:
            raise ValueError(f"summary: method {self.name!r} needs a one-line summary")
        if not (self.hf_type or self.to_hf or self.not_exportable):
            raise ValueError(f"not_exportable: method {self.name!r} has no hf_type or to_hf; say why it "
                             f"cannot be exported")

    @property
    def accepted(self) -> tuple[str, ...]:
        """Names of the optional params."""
        return tuple(p.field for p in self.params if p.field not in self.required)

    @property
    def reads(self) -> tuple[str, ...]:
        """Names of every param (required first as listed in ``params``)."""
        return tuple(p.field for p in self.params)

    @property
    def exportable(self) -> bool:
        """transformers can load a checkpoint with this method (``hf_type`` or ``to_hf``)."""
        return self.hf_type is not None or self.to_hf is not None

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.field == name:
                return p
        raise ValueError(f"{name}: not a parameter of method {self.name!r}")

    def description(self, cfg: "RopeConfig") -> str:
        """What ``ropekit inspect`` says about this method at ``cfg`` (``describe``, else the summary)."""
        return self.describe(cfg) if self.describe is not None else self.summary


_REGISTRY: dict[str, MethodSpec] = {}

# rope_type names of other tools that mean one of ours.
METHOD_ALIASES = {"su": "longrope", "dynamic_ntk": "dynamic", "ntk_aware": "ntk", "pi": "linear", "none": "default",
                  "abf": "base"}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (names are unique; a parameter shared with other methods must be the same
    ``Param``, so that its flag, bounds and keys have one meaning)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"scaling method {spec.name!r} is already registered")
    known = {p.field: p for p, _ in parameters()}
    for p in spec.params:
        if p.field in known and known[p.field] != p:
            raise ValueError(f"params: {p.field!r} of {spec.name!r} differs from the one other methods read; "
                             f"share that Param")
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> MethodSpec:
    """Remove and return the method ``name`` (tests register toy methods and take them out again)."""
    spec = get_method(name)
    del _REGISTRY[name]
    return spec


def canonical_name(name: str) -> str:
    """``name`` with other tools' aliases (``pi``, ``su``, ...) mapped to the registry name (unchecked)."""
    return METHOD_ALIASES.get(name, name) if isinstance(name, str) else name


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name`` (aliases accepted); a ValueError lists the accepted names otherwise."""
    try:
        return _REGISTRY[canonical_name(name)]
    except (KeyError, TypeError):
        raise ValueError(f"method: unknown scaling method {name!r}; accepted: {', '.join(method_names())}") from None


def method_names(*, comparable: bool | None = None, exportable: bool | None = None,
                 length_dependent: bool | None = None) -> list[str]:
    """Registered method names, in registration order; each keyword given keeps only methods with that value."""
    out = []
    for name, spec in _REGISTRY.items():
        if comparable is not None and spec.comparable != comparable:
            continue
        if exportable is not None and spec.exportable != exportable:
            continue
        if length_dependent is not None and spec.length_dependent != length_dependent:
            continue
        out.append(name)
    return out


def parameters() -> list[tuple[Param, tuple[str, ...]]]:
    """Every method parameter once, with the names of the methods that read it, in first-registered order.

    For building CLI options once: ``for param, methods in parameters(): add_option(param.flag, ...)``.
    """
    seen: dict[str, tuple[Param, list[str]]] = {}
    for name, spec in _REGISTRY.items():
        for p in spec.params:
            seen.setdefault(p.field, (p, []))[1].append(name)
    return [(p, tuple(users)) for p, users in seen.values()]


def readers(field_name: str) -> list[str]:
    """Names of the methods that read RopeConfig field ``field_name``."""
    return [name for name, spec in _REGISTRY.items() if field_name in spec.reads]


def method_fields() -> tuple[str, ...]:
    """Every RopeConfig field some method reads (each once)."""
    return tuple(p.field for p, _ in parameters())


def run_label(cfg: RopeConfig) -> str:
    """How reports name a run of ``cfg``: its method's ``label`` hook, else "yarn x2" (the name alone unscaled)."""
    spec = get_method(cfg.method)
    if spec.label is not None:
        return spec.label(cfg)
    return cfg.method if cfg.factor is None else f"{cfg.method} x{cfg.factor:g}"


def baseline_label(cfg: RopeConfig) -> str:
    """How reports name the model's own RoPE ``cfg``: "default", or "yarn (model's own)" for a scaled one."""
    return cfg.method if get_method(cfg.method).unscaled else f"{cfg.method} (model's own)"


def hf_rope_keys() -> dict[str, str]:
    """transformers ``rope_parameters`` key -> RopeConfig field, for every parameter that has one."""
    return {p.hf_key: p.field for p, _ in parameters() if p.hf_key}


# Keys of a transformers rope_parameters dict that are not method parameters (None: handled apart).
HF_FIXED_KEYS = {"rope_type": None, "type": None, "rope_theta": None, "partial_rotary_factor": None}


def hf_keys() -> dict[str, str | None]:
    """Keys of a transformers rope_parameters / rope_scaling dict -> RopeConfig fields (None: handled apart)."""
    return {**HF_FIXED_KEYS, **hf_rope_keys()}
