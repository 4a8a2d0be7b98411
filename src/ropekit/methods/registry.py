"""The method registry and the `Frequencies` result every method returns.

A scaling method is a function ``compute(cfg, seq_len) -> Frequencies`` registered under a name together
with the config fields it requires and accepts. Frequencies are computed in float64 and exposed both as
float64 (for the angle maths) and float32 (the public ``inv_freq``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ropekit.config import RopeConfig


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


@dataclass(frozen=True)
class MethodSpec:
    """A registered scaling method.

    Attributes:
        name: registry name (``--method``).
        compute: ``(cfg, seq_len) -> (inv_freq64, attention_scale)`` or a full ``Frequencies``.
        required: RopeConfig fields that must be set.
        accepted: further RopeConfig fields the method reads (optional).
        length_dependent: the result depends on the current sequence length (dynamic methods).
        hf_type: the ``rope_type`` transformers uses for it, or None where transformers has no such method.
        summary: one line for help texts.
    """

    name: str
    compute: Callable[..., object]
    required: tuple[str, ...] = ()
    accepted: tuple[str, ...] = ()
    length_dependent: bool = False
    hf_type: str | None = None
    summary: str = ""


_REGISTRY: dict[str, MethodSpec] = {}


def register(spec: MethodSpec) -> MethodSpec:
    """Add ``spec`` to the registry (names are unique)."""
    if spec.name in _REGISTRY:
        raise ValueError(f"scaling method {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def get_method(name: str) -> MethodSpec:
    """The spec registered as ``name``; a ValueError lists the accepted names otherwise."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"method: unknown scaling method {name!r}; accepted: {', '.join(method_names())}") from None


def method_names() -> list[str]:
    """All registered method names, in registration order."""
    return list(_REGISTRY)
