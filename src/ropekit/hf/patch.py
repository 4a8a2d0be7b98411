"""``apply_rope(model, cfg)``: a transformers model whose q and k ropekit rotates, code and weights untouched.

How the patch reaches the rotation (families: ``ropekit.hf.families``):

* **The rotary module** (``model.model.rotary_emb``, transformers' own extension point for RoPE) is replaced by
  a ``RopekitRotaryAdapter``. Per forward it picks the frequencies (the patch's sequence state, below), and
  returns the tables the family's attention expects, in float32. The tables carry, as the attribute
  ``ropekit_call`` of the tensors, a ``RotaryCall``: this forward's frequencies, positions and backend.
* **The rotation.** Each attention hands those tables to its modeling module's ``apply_rotary_pos_emb``
  between projecting q, k and writing k into the KV cache; transformers has no public hook there, so that
  function is wrapped by a router. The router keeps no state: tables that carry a ``RotaryCall`` are rotated
  with ``ropekit.apply_rotary(q, k, call.freqs, call.positions, backend=...)`` (the dispatcher: the fused CPU
  pass for large CPU inputs, the Triton kernel on CUDA); any other tables (an unpatched model of the same
  family) go to transformers' function. Routing follows each call's own tables, so two models patched with
  different RoPEs, a patched and an unpatched one, or threads cannot see each other's rotation. The router is
  installed while a live patch of that family uses it, and transformers' function is put back after the last.
* **A forward hook** on the module that owns the rotary module (the decoder stack) starts sequences and, after
  the forward, checks that every attention rotated through ropekit: an attention that no longer calls
  ``apply_rotary_pos_emb`` raises ``TransformersStructureError`` instead of leaving the rotation to transformers.

Length-dependent methods (dynamic, dynamic_yarn, longrope) under the default policy "freeze": the scale is
chosen once per sequence and kept while the KV cache grows, so cached keys stay valid. A sequence starts

* when the caller says so: ``patch.begin_sequence(total_len)`` (the next forward starts one, its scale taken at
  ``total_len``; None: at that forward's length), or
* when the forward's KV cache is empty (``cache`` / ``past_key_values`` None or of length 0): a prefill.

The length of a sequence started without one is the prefill's max position + 1, read once from the device at
that prefill; decoding steps read nothing. ``fix_length(n)`` takes every sequence's scale at ``n`` (no read)
until ``fix_length(None)``. ``dynamic_policy="recompute"`` (transformers' behaviour) takes every forward's own
length instead. Methods that do not depend on the length never inspect the cache or read the device.
"""

from __future__ import annotations

import inspect
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ropekit
from ropekit.config import RopeConfig
from ropekit.hf.families import (
    Located,
    check_family,
    check_rope_matches,
    locate,
    structure_error,
)
from ropekit.hf.load import DropRecords

BACKENDS = ("auto", "reference", "cpu", "triton")
DYNAMIC_POLICIES = ("freeze", "recompute")
CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 / before

# generate()'s reminder past config.max_position_embeddings: a patched model runs there on purpose. Each live
# patch attaches its own filter (so patches come and go independently).
LENGTH_LOGGERS = ("transformers.generation.stopping_criteria",)
LENGTH_PHRASES = ("exceeded the model's predefined maximum length",)


class RotaryCall:
    """One forward's rotation, carried by the tables the adapter returned to the router.

    Attributes: ``freqs`` (``ropekit.Frequencies``), ``positions`` ((batch|1, seq) int64), ``backend``,
    ``rotations`` (how many times the router rotated with it: the patch checks every attention did).
    """

    __slots__ = ("backend", "freqs", "positions", "rotations")

    def __init__(self, freqs, positions: torch.Tensor, backend: str) -> None:
        self.freqs = freqs
        self.positions = positions
        self.backend = backend
        self.rotations = 0

    def rotate_qk(self, q, k, cos=None, sin=None, *rest, unsqueeze_dim=1, **kwargs):
        """Rotate-half families: ``apply_rotary_pos_emb(q, k, cos, sin[, position_ids], unsqueeze_dim=1)``."""
        # Older releases put an unused position_ids before unsqueeze_dim: the int among the rest is the axis.
        unsqueeze_dim = next((r for r in rest if isinstance(r, int)), unsqueeze_dim)
        if unsqueeze_dim not in (1, 2):
            raise ValueError(f"unsqueeze_dim: {unsqueeze_dim!r} is neither 1 (heads first) nor 2 (heads last)")
        self.rotations += 1
        return ropekit.apply_rotary(q, k, self.freqs, self.positions, heads_first=unsqueeze_dim == 1,
                                    backend=self.backend)

    def rotate_one(self, tensor, sin=None, cos=None, *args, **kwargs):
        """GPT-J: ``apply_rotary_pos_emb(x, sin, cos)`` on (batch, seq, heads, rotary_dim)."""
        self.rotations += 1
        return ropekit.apply_rotary(tensor, None, self.freqs, self.positions, heads_first=False,
                                    backend=self.backend)[0]


def call_of(tables: Any) -> RotaryCall | None:
    """The ``RotaryCall`` a tensor made by a ``RopekitRotaryAdapter`` carries (None for any other value)."""
    return getattr(tables, "ropekit_call", None) if isinstance(tables, torch.Tensor) else None


class RopekitRotaryAdapter(nn.Module):
    """Stands in for a model's ``*RotaryEmbedding`` module; holds no parameters or buffers.

    ``forward(x, position_ids)`` returns, for rotate-half families, full-size float32 ``(cos, sin)``
    (batch, seq, rotary_dim) as ``cat(c, c)``; for GPT-J its ``(sin, cos)``, each (batch, seq, rotary_dim/2).
    The values are ropekit's (float64 angles rounded once), so code reading them sees the right tables; the
    router rotates from the ``RotaryCall`` they carry.
    """

    def __init__(self, patch: RopePatch, gptj_order: bool) -> None:
        super().__init__()
        self.patch = patch
        self.gptj_order = gptj_order

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, layer_type: str | None = None):
        if position_ids is None:
            raise ValueError("position_ids: required by the ropekit rotary adapter")
        call = self.patch._call_for(position_ids)
        cos, sin = ropekit.cos_sin(call.freqs, call.positions, dtype=torch.float32)
        tables = (sin, cos) if self.gptj_order else (torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1))
        for t in tables:
            t.ropekit_call = call
        return tables

    def extra_repr(self) -> str:
        return f"ropekit {self.patch.rope.extra_repr()}, backend={self.patch.backend}"


def _install_router(module, rotate: Callable[..., Any], patch: RopePatch) -> None:
    """Route ``module.apply_rotary_pos_emb`` through ropekit for tables carrying a RotaryCall; count ``patch``
    as a user of the router (installed by the first user, removed after the last by ``_release_router``)."""
    current = module.apply_rotary_pos_emb
    users = getattr(current, "ropekit_users", None)
    if users is None:
        original = current

        def apply_rotary_pos_emb(*args, **kwargs):
            for value in (*args, *kwargs.values()):
                call = call_of(value)
                if call is not None:
                    return rotate(call, *args, **kwargs)
            return original(*args, **kwargs)

        apply_rotary_pos_emb.__name__ = getattr(original, "__name__", "apply_rotary_pos_emb")
        apply_rotary_pos_emb.__doc__ = getattr(original, "__doc__", None)
        apply_rotary_pos_emb.__wrapped__ = original  # type: ignore[attr-defined]
        users = apply_rotary_pos_emb.ropekit_users = weakref.WeakSet()  # type: ignore[attr-defined]
        module.apply_rotary_pos_emb = apply_rotary_pos_emb
    users.add(patch)


def _release_router(module, patch: RopePatch) -> None:
    current = module.apply_rotary_pos_emb
    users = getattr(current, "ropekit_users", None)
    if users is None:
        return  # someone replaced it since: theirs stays
    users.discard(patch)
    if not users:
        module.apply_rotary_pos_emb = current.__wrapped__


def _cache_index(forward: Callable) -> dict[str, int]:
    """Positions of the cache arguments in ``forward``'s signature (for a cache passed positionally)."""
    try:
        params = list(inspect.signature(forward).parameters)
    except (TypeError, ValueError):  # pragma: no cover - a builtin forward
        return {}
    return {name: params.index(name) for name in CACHE_ARGUMENTS if name in params}


def _cached_tokens(cache: Any) -> int | None:
    """Tokens already in a KV cache (0 for None); None for a cache of a kind ropekit cannot read."""
    if cache is None:
        return 0
    length = getattr(cache, "get_seq_length", None)
    if callable(length):
        return int(length())  # DynamicCache: from tensor shapes, no device read
    if isinstance(cache, (tuple, list)):  # the legacy tuple format
        return 0 if not cache or not cache[0] else int(cache[0][0].shape[-2])
    return None


class RopePatch:
    """A model whose RoPE ropekit computes. ``remove()`` (or leaving the ``with`` block) restores it.

    Attributes:
        model: the patched model.
        config: the ``RopeConfig`` in use.
        rope: the ``ropekit.RotaryEmbedding`` holding the frequencies and the frozen length.
        backend: the rotation backend ("auto", "reference", "cpu", "triton").
        family: the model's ``model_type``.
    """

    def __init__(self, model: nn.Module, cfg: RopeConfig, rope: ropekit.RotaryEmbedding, located: Located,
                 backend: str) -> None:
        self.model = model
        self.config = cfg
        self.rope = rope
        self.backend = backend
        self.family = located.family.model_type
        self._located = located
        self.adapter = RopekitRotaryAdapter(self, gptj_order=located.family.tables == "gptj")
        self._fixed_length: int | None = None
        self._next_sequence: tuple[int | None] | None = None  # set by begin_sequence: (length,)
        self._forward = threading.local()  # .call: this thread's current forward, for the check after it
        self._handles: list = []
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._length_filter: DropRecords | None = None
        self._routed = False
        self._active = False

    # ------------------------------------------------------------------ public
    @property
    def active(self) -> bool:
        return self._active

    def begin_sequence(self, total_len: int | None = None) -> None:
        """The next forward starts a new sequence, its scale taken at ``total_len`` (None: that forward's own
        length). For a prefill that will be followed by decoding up to ``total_len`` tokens."""
        self._next_sequence = (_check_length("total_len", total_len),)

    def fix_length(self, seq_len: int | None) -> None:
        """Take length-dependent scales at ``seq_len`` for every sequence (None: each prefill's own length)."""
        self._fixed_length = _check_length("seq_len", seq_len)
        self._next_sequence = None
        self.rope.begin_sequence(self._fixed_length)

    def remove(self) -> None:
        """Restore the model's own rotary modules and transformers' ``apply_rotary_pos_emb``."""
        if not (self._active or self._replaced or self._handles or self._routed):
            return
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._replaced.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._routed:
            _release_router(self._located.module, self)
            self._routed = False
        if self._length_filter is not None:
            for name in LENGTH_LOGGERS:
                logging.getLogger(name).removeFilter(self._length_filter)
            self._length_filter = None
        self._active = False

    def __enter__(self) -> RopePatch:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return (f"RopePatch({self.family}, {self.config.method}, factor={self.config.factor}, "
                f"backend={self.backend}, {state})")

    # ------------------------------------------------------------------ per forward
    def _start_sequence_if_due(self, module: nn.Module, args: tuple, kwargs: dict, cache_index: dict) -> None:
        rope = self.rope
        if not rope.length_dependent or rope.dynamic_policy != "freeze":
            return  # nothing to decide: no cache inspection, no device read
        if self._next_sequence is not None:
            (length,), self._next_sequence = self._next_sequence, None
            rope.begin_sequence(length if length is not None else self._fixed_length)
            return
        present = [name for name in CACHE_ARGUMENTS if name in kwargs]
        if present:
            cache = kwargs[present[0]]
        else:
            index = next((i for name, i in cache_index.items() if i < len(args)), None)
            cache = None if index is None else args[index]
        if _cached_tokens(cache) == 0:
            rope.begin_sequence(self._fixed_length)  # a prefill: the length comes with it (or is fixed)

    def _call_for(self, position_ids: torch.Tensor) -> RotaryCall:
        """This forward's RotaryCall: positions (batch|1, seq) and the frequencies the sequence state picks."""
        positions = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
        rope = self.rope
        seq_len = None
        if rope.length_dependent:
            fixed = self._fixed_length if rope.dynamic_policy == "recompute" else None
            seq_len = rope.resolve_seq_len(positions, fixed)  # "freeze": read once per sequence, if not given
        call = RotaryCall(rope.frequencies(seq_len, positions.device), positions, self.backend)
        self._forward.call = call
        return call

    def _check_rotated(self) -> None:
        call, attentions = getattr(self._forward, "call", None), self._located.attentions
        if call is None or call.rotations < len(attentions):
            attn = type(attentions[0]).__name__
            raise structure_error(self.family, f"{attn}.forward did not call {self._located.module.__name__}"
                                               f".apply_rotary_pos_emb, so ropekit could not rotate q and k")

    # ------------------------------------------------------------------ installation
    def _install(self) -> None:
        located = self._located
        rotate = RotaryCall.rotate_one if located.family.tables == "gptj" else RotaryCall.rotate_qk
        try:
            _install_router(located.module, rotate, self)
            self._routed = True
            owners: list[nn.Module] = []
            for parent, name, child in located.rotary:
                setattr(parent, name, self.adapter)
                self._replaced.append((parent, name, child))
                if all(parent is not o for o in owners):
                    owners.append(parent)
            for owner in owners:
                index = _cache_index(owner.forward)
                self._handles.append(owner.register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: self._before_forward(module, args, kwargs, index),
                    with_kwargs=True))
                self._handles.append(owner.register_forward_hook(lambda module, args, output: self._check_rotated()))
            self._length_filter = DropRecords(LENGTH_PHRASES)
            for name in LENGTH_LOGGERS:
                logging.getLogger(name).addFilter(self._length_filter)
        except Exception:
            self.remove()
            raise
        self._active = True

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict, cache_index: dict) -> None:
        self._forward.call = None
        self._start_sequence_if_due(module, args, kwargs, cache_index)


def _check_length(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name}: must be a positive integer or None, got {value!r}")
    return value


def _check_backend(backend: str, cfg: RopeConfig, model: nn.Module, rope: ropekit.RotaryEmbedding) -> None:
    """A named backend must be able to rotate this model's q and k (device, dtype), or it is an error now."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} not accepted; accepted: {', '.join(BACKENDS)}")
    if backend in ("auto", "reference"):
        return
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    dtype = weight.dtype if weight is not None else torch.float32
    probe = torch.zeros(1, 1, 1, cfg.head_dim, device=device, dtype=dtype)
    try:
        ropekit.apply_rotary(probe, None, rope.frequencies(1, device), 0, backend=backend)
    except ValueError as exc:
        raise ValueError(f"backend: {backend!r} cannot rotate this model's q and k ({device}, {dtype}): {exc}") from None


def apply_rope(model: nn.Module, cfg: RopeConfig, *, backend: str = "auto",
               dynamic_policy: str = "freeze") -> RopePatch:
    """Make ``model`` rotate q and k with ropekit and ``cfg`` (the model's code and weights are untouched).

    Args:
        model: a transformers causal LM (or its base model) of a family in ``SUPPORTED_FAMILIES``.
        cfg: the RoPE to use; its head_dim, rotary_dim and layout must match the model's (start from
            ``LoadedModel.rope`` or ``RopeConfig.from_hf(model.config)``).
        backend: "auto" (the fused CPU pass for large CPU inputs, Triton on CUDA, else the reference),
            "reference", "cpu" or "triton" (``ropekit.apply_rotary``); one that cannot run on the model's
            device and dtype is a ValueError here.
        dynamic_policy: "freeze" (default) or "recompute" for length-dependent methods (module docstring).
    Returns:
        A ``RopePatch`` (also a context manager). The model's config is not changed (see ``export_model``).
    """
    if not isinstance(cfg, RopeConfig):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: expected a transformers model (with a .config)")
    family = check_family(getattr(config, "model_type", None))
    if active_patch(model) is not None:
        raise ValueError("model: already patched by ropekit; call .remove() on the existing RopePatch first")
    check_rope_matches(model, cfg)
    if dynamic_policy not in DYNAMIC_POLICIES:
        raise ValueError(f"dynamic_policy: {dynamic_policy!r} not accepted; accepted: {', '.join(DYNAMIC_POLICIES)}")
    rope = ropekit.RotaryEmbedding(cfg, heads_first=True, dynamic_policy=dynamic_policy)
    _check_backend(backend, cfg, model, rope)
    located = locate(model, family)
    patch = RopePatch(model, cfg, rope, located, backend)
    patch._install()
    return patch


def active_patch(model: nn.Module) -> RopePatch | None:
    """The live ``RopePatch`` of ``model`` (found from its modules: a ropekit adapter in place), if any."""
    for module in model.modules():
        if isinstance(module, RopekitRotaryAdapter) and module.patch.active:
            return module.patch
    return None
