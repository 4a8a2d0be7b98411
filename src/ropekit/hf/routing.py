"""How a patched model's rotation reaches ropekit: the per-forward ``RotaryCall`` carried by the tables, the
``RopekitRotaryAdapter`` that stands in for a model's rotary module and returns those tables, and the router
installed around the modeling module's ``apply_rotary_pos_emb`` that rotates from the call they carry.

The state all of them read (RoPEs, sequence state, the probe's findings, the table cache) is the
``RopePatch``'s (``ropekit.hf.patch``), which builds them; it is passed in as ``patch`` (typed ``Any`` here, so
that this module need not import the one that imports it).
"""

from __future__ import annotations

import dataclasses
import inspect
import weakref
from typing import Any

import torch
from torch import nn

import ropekit
from ropekit.hf.families import Tables, expand_tables, structure_error


class RotaryCall:
    """One forward's rotation, carried by the tables the adapter returned to the router.

    Attributes: ``positions`` ((batch|1, seq) int64), ``backend``, ``patch`` (whose RoPEs and sequence state
    it uses), ``freqs`` (the frequencies of the patch's main RoPE; ``freqs_for(key)`` for a layer type's),
    ``rotations`` (how many tensors the router rotated with it).
    """

    __slots__ = ("_freqs", "backend", "patch", "positions", "rotations")

    def __init__(self, patch: Any, positions: torch.Tensor, backend: str) -> None:
        self.patch = patch
        self.positions = positions
        self.backend = backend
        self.rotations = 0
        self._freqs: dict[str, Any] = {}

    def freqs_for(self, key: str):
        """The frequencies of RoPE ``key`` for this forward (its sequence state: frozen length, ...)."""
        if key not in self._freqs:
            self._freqs[key] = self.patch._frequencies(key, self.positions)
        return self._freqs[key]

    @property
    def freqs(self):
        return self.freqs_for(self.patch.main_key)

    def rotate(self, name: str, heads_first_default: bool | None, *args, **kwargs):
        """Rotate what a routed function was called with: ``(q, k, tables..., [unsqueeze_dim])`` or
        ``(x, tables...)`` (GPT-J, gpt-oss' inner function): the tensors before the first table."""
        values = list(args)
        first_table = next(i for i, v in enumerate(values) if call_of(v) is not None) \
            if any(call_of(v) is not None for v in values) else len(values)
        tensors = [v for v in values[:first_table] if isinstance(v, torch.Tensor)]
        for key in ("q", "k", "x", "xq", "xk", "query", "key", "tensor"):
            if key in kwargs and isinstance(kwargs[key], torch.Tensor):
                tensors.append(kwargs[key])
        if not 1 <= len(tensors) <= 2:
            raise structure_error(self.patch.family, f"{name} was called with {len(tensors)} tensors to rotate")
        unsqueeze = kwargs.get("unsqueeze_dim")
        if unsqueeze is None:
            # Older releases put an unused position_ids before unsqueeze_dim: the int among the rest is the axis.
            unsqueeze = next((v for v in values[first_table:] if isinstance(v, int) and not isinstance(v, bool)),
                             None)
        pairing = self.patch._located.functions.get(name)
        if pairing is None and self.patch._located.functions:
            raise structure_error(self.patch.family, f"{name} rotates in a way ropekit's probe did not recognise "
                                                     f"(neither rotate-half nor interleaved pairs)")
        if pairing is not None:
            heads_first_default = pairing.heads_first
        heads_first = _heads_first(tensors[0], self.positions, unsqueeze, heads_first_default)
        layer = self.patch._current_layer()
        key = self.patch._key_for_layer(layer)
        self.rotations += len(tensors)
        self.patch._note_rotation(layer)
        q = tensors[0]
        k = tensors[1] if len(tensors) == 2 else None
        freqs = self.freqs_for(key)
        if pairing is not None and pairing.layout != freqs.layout:
            # The function the attention called pairs channels its own way (transformers' code decides).
            freqs = dataclasses.replace(freqs, layout=pairing.layout)
        out = ropekit.apply_rotary(q, k, freqs, self.positions, heads_first=heads_first, backend=self.backend,
                                   cache=self.patch.table_cache)
        return out if k is not None else out[0]


def _heads_first(tensor: torch.Tensor, positions: torch.Tensor, unsqueeze: int | None, default: bool | None) -> bool:
    """Whether ``tensor`` is (batch, heads, seq, dim) (True) or (batch, seq, heads, dim) (False)."""
    if unsqueeze is not None:
        if unsqueeze not in (1, 2):
            raise ValueError(f"unsqueeze_dim: {unsqueeze!r} is neither 1 (heads first) nor 2 (heads last)")
        return unsqueeze == 1
    seq = positions.shape[-1]
    first, last = tensor.dim() == 4 and tensor.shape[2] == seq, tensor.dim() == 4 and tensor.shape[1] == seq
    if first != last:
        return first
    return True if default is None else default


def call_of(tables: Any) -> RotaryCall | None:
    """The ``RotaryCall`` a tensor made by a ``RopekitRotaryAdapter`` carries (None for any other value)."""
    return getattr(tables, "ropekit_call", None) if isinstance(tables, torch.Tensor) else None


class RopekitRotaryAdapter(nn.Module):
    """Stands in for one of a model's ``*RotaryEmbedding`` modules; holds no parameters or buffers.

    ``forward(x, position_ids[, layer_type])`` returns ropekit's tables (float64 angles rounded once to float32)
    in the form the replaced module had (``Tables``: rotate-half ``cat(c, c)``, interleaved, half size, GPT-J's
    ``(sin, cos)``, complex), for the RoPE of ``layer_type`` (or the one the replaced module served), so code
    reading them sees the right values; the router rotates from the ``RotaryCall`` they carry.
    """

    def __init__(self, patch: Any, tables: dict[str | None, Tables], key: str | None,
                 replaced: nn.Module | None = None) -> None:
        super().__init__()
        self.patch = patch
        self.tables = tables
        self.key = key
        # Plain attributes the decoder may read off its rotary module (Granite-SWA keys its tables by
        # config.rope_parameters["rope_theta"]; Gemma 3 reads layer_types).
        for name in ("config", "layer_types", "rope_type"):
            value = getattr(replaced, name, None)
            if value is not None and not isinstance(value, (nn.Module, torch.Tensor)):
                object.__setattr__(self, name, value)

    @property
    def gptj_order(self) -> bool:
        return any(t.sin_first for t in self.tables.values())

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, layer_type: str | None = None,
                **kwargs):
        if position_ids is None:
            raise ValueError("position_ids: required by the ropekit rotary adapter")
        if position_ids.dim() > 2:
            raise ValueError(f"position_ids: {tuple(position_ids.shape)}: 3-D (t, h, w) positions (M-RoPE) reach "
                             f"the rotary module; ropekit's patch rotates 1-D positions only")
        call = self.patch._call_for(position_ids)
        key = layer_type if layer_type in self.patch.ropes else (self.key or self.patch.main_key)
        tables = self.tables.get(layer_type, self.tables.get(None) or next(iter(self.tables.values())))
        freqs = call.freqs_for(key)
        cos, sin = ropekit.cos_sin(freqs, call.positions, dtype=torch.float32)
        out = expand_tables(cos, sin, tables)
        for t in ([out] if isinstance(out, torch.Tensor) else out):
            t.ropekit_call = call
        return out

    def extra_repr(self) -> str:
        return f"ropekit {self.patch.rope.extra_repr()}, backend={self.patch.backend}"


def _install_router(module, name: str, patch: Any) -> None:
    """Route ``module.<name>`` through ropekit for tables carrying a RotaryCall; count ``patch`` as a user of
    the router (installed by the first user, removed after the last by ``_release_router``)."""
    current = getattr(module, name)
    users = getattr(current, "ropekit_users", None)
    if users is None:
        original = current
        try:
            params = inspect.signature(original).parameters
            default = params["unsqueeze_dim"].default == 1 if "unsqueeze_dim" in params else None
        except (TypeError, ValueError):  # pragma: no cover - a builtin
            default = None

        def routed(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                call = call_of(value)
                if call is not None:
                    return call.rotate(name, default, *args, **kwargs)
            return original(*args, **kwargs)

        routed.__name__ = getattr(original, "__name__", name)
        routed.__doc__ = getattr(original, "__doc__", None)
        routed.__wrapped__ = original  # type: ignore[attr-defined]
        users = routed.ropekit_users = weakref.WeakSet()  # type: ignore[attr-defined]
        setattr(module, name, routed)
    users.add(patch)


def _release_router(module, name: str, patch: Any) -> None:
    current = getattr(module, name)
    users = getattr(current, "ropekit_users", None)
    if users is None:
        return  # someone replaced it since: theirs stays
    users.discard(patch)
    if not users:
        setattr(module, name, current.__wrapped__)
