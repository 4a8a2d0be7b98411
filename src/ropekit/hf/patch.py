"""``apply_rope(model, cfg)``: a transformers model whose q and k ropekit rotates, code and weights untouched.

How the patch reaches the rotation (families: ``ropekit.hf.families``; the adapter, the call and the
router below: ``ropekit.hf.routing``):

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

The patch owns the cpu backend's cos/sin tables for its model (``table_cache``, a thread-safe
``ropekit.kernels.cpu.TableCache``): every layer's rotation in a forward reads the same table.
"""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import ropekit
from ropekit.config import RopeConfig
from ropekit.hf.config_map import hf_mrope_section
from ropekit.layered import LayeredRope
from ropekit.hf.families import (
    Located,
    check_family,
    check_rope_matches,
    locate,
    model_layered_rope,
    probe_functions,
    probe_tables,
    structure_error,
)
from ropekit.hf.load import DropRecords
from ropekit.hf.routing import (  # noqa: F401  (RotaryCall, call_of: re-exported, ropekit.hf.patch's names)
    RopekitRotaryAdapter,
    RotaryCall,
    _install_router,
    _release_router,
    call_of,
)
from ropekit.kernels.cpu import TableCache

BACKENDS = ("auto", "reference", "cpu", "triton")
DYNAMIC_POLICIES = ("freeze", "recompute")
CACHE_ARGUMENTS = ("cache", "past_key_values")  # transformers >= 5.24 / before

# generate()'s reminder past config.max_position_embeddings: a patched model runs there on purpose. Each live
# patch attaches its own filter (so patches come and go independently).
LENGTH_LOGGERS = ("transformers.generation.stopping_criteria",)
LENGTH_PHRASES = ("exceeded the model's predefined maximum length",)


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
        config: the ``RopeConfig`` in use (the main one: the single RoPE, else that of the full-attention layers).
        layered: every layer's RoPE (``LayeredRope``); layers without RoPE are left alone.
        ropes: {layer type: ``ropekit.RotaryEmbedding``} holding each RoPE's frequencies and frozen length.
        rope: the main one of ``ropes``.
        backend: the rotation backend ("auto", "reference", "cpu", "triton").
        family: the model's ``model_type``.
    """

    def __init__(self, model: nn.Module, layered: LayeredRope, ropes: dict[str, ropekit.RotaryEmbedding],
                 located: Located, backend: str) -> None:
        self.model = model
        self.layered = layered
        self.ropes = ropes
        self.main_key = _main_key(layered)
        self.config = layered[self.main_key]
        self.rope = ropes[self.main_key]
        self.backend = backend
        self.family = located.family.model_type
        self._located = located
        self.adapters: list[RopekitRotaryAdapter] = [
            RopekitRotaryAdapter(self, located.tables[id(child)], located.rotary_keys.get(id(child)), child)
            for _, _, child in located.rotary]
        self.adapter = self.adapters[0]
        self._fixed_length: int | None = None
        self._next_sequence: tuple[int | None] | None = None  # set by begin_sequence: (length,)
        self._forward = threading.local()  # .call, .layer, .rotated: this thread's current forward
        self.table_cache = TableCache()  # the cpu backend's cos/sin tables for this model's rotations
        self._handles: list = []
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._length_filter: DropRecords | None = None
        self._routed: list[str] = []
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
        for rope in self.ropes.values():
            rope.begin_sequence(self._fixed_length)

    def remove(self) -> None:
        """Restore the model's own rotary modules and transformers' functions."""
        if not (self._active or self._replaced or self._handles or self._routed):
            return
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        self._replaced.clear()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for name in self._routed:
            _release_router(self._located.module, name, self)
        self._routed.clear()
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
        dependent = [r for r in self.ropes.values() if r.length_dependent and r.dynamic_policy == "freeze"]
        if not dependent:
            return  # nothing to decide: no cache inspection, no device read
        if self._next_sequence is not None:
            (length,), self._next_sequence = self._next_sequence, None
            for rope in dependent:
                rope.begin_sequence(length if length is not None else self._fixed_length)
            return
        present = [name for name in CACHE_ARGUMENTS if name in kwargs]
        if present:
            cache = kwargs[present[0]]
        else:
            index = next((i for name, i in cache_index.items() if i < len(args)), None)
            cache = None if index is None else args[index]
        if _cached_tokens(cache) == 0:
            for rope in dependent:
                rope.begin_sequence(self._fixed_length)  # a prefill: the length comes with it (or is fixed)

    def _call_for(self, position_ids: torch.Tensor) -> RotaryCall:
        """This forward's RotaryCall (one per forward, shared by every rotary module and layer type)."""
        positions = position_ids if position_ids.dim() == 2 else position_ids.reshape(1, -1)
        call = getattr(self._forward, "call", None)
        if call is not None and (call.positions is positions or call.positions is position_ids):
            return call
        call = RotaryCall(self, positions, self.backend)
        self._forward.call = call
        return call

    def _frequencies(self, key: str, positions: torch.Tensor):
        rope = self.ropes[key]
        seq_len = None
        if rope.length_dependent:
            fixed = self._fixed_length if rope.dynamic_policy == "recompute" else None
            seq_len = rope.resolve_seq_len(positions, fixed)  # "freeze": read once per sequence, if not given
        return rope.frequencies(seq_len, positions.device)

    def _current_layer(self) -> int | None:
        return getattr(self._forward, "layer", None)

    def _key_for_layer(self, layer: int | None) -> str:
        layers = self.layered.layers
        if layer is None or not layers:
            if len(self.ropes) == 1:
                return self.main_key
            raise structure_error(self.family, "q and k were rotated outside an attention module, so ropekit "
                                               "cannot tell which layer type's RoPE applies")
        if layer >= len(layers):
            raise structure_error(self.family, f"layer {layer} is past the config's {len(layers)} layers")
        key = layers[layer]
        if key is None:
            raise structure_error(self.family, f"layer {layer} rotates q and k, but ropekit reads it from the config "
                                               f"as a layer without RoPE")
        return key

    def _note_rotation(self, layer: int | None) -> None:
        rotated = getattr(self._forward, "rotated", None)
        if rotated is not None and layer is not None:
            rotated.add(layer)

    def _expected_layers(self) -> set[int]:
        located = self._located
        present = set(located.layer_of.values())
        if self.layered.layers:
            return {i for i in self.layered.rope_layers if i in present}
        return present

    def _check_rotated(self) -> None:
        call = getattr(self._forward, "call", None)
        rotated = getattr(self._forward, "rotated", set())
        missing = sorted(self._expected_layers() - rotated)
        if call is None or missing:
            attn = type(self._located.attentions[0]).__name__
            where = f" (layers {', '.join(map(str, missing[:8]))})" if missing and call is not None else ""
            raise structure_error(self.family, f"{attn}.forward did not call {self._located.module.__name__}"
                                               f".apply_rotary_pos_emb{where}, so ropekit could not rotate q and k")

    # ------------------------------------------------------------------ installation
    def _install(self) -> None:
        located = self._located
        try:
            for name in located.routed:
                _install_router(located.module, name, self)
                self._routed.append(name)
            owners: list[nn.Module] = []
            for (parent, name, child), adapter in zip(located.rotary, self.adapters):
                setattr(parent, name, adapter)
                self._replaced.append((parent, name, child))
                if all(parent is not o for o in owners):
                    owners.append(parent)
            for owner in owners:
                index = _cache_index(owner.forward)
                self._handles.append(owner.register_forward_pre_hook(
                    lambda module, args, kwargs, index=index: self._before_forward(module, args, kwargs, index),
                    with_kwargs=True))
                self._handles.append(owner.register_forward_hook(lambda module, args, output: self._check_rotated()))
            for attention in located.attentions:
                layer = located.layer_of.get(id(attention))
                self._handles.append(attention.register_forward_pre_hook(
                    lambda module, args, layer=layer: setattr(self._forward, "layer", layer)))
                self._handles.append(attention.register_forward_hook(
                    lambda module, args, output: setattr(self._forward, "layer", None)))
            self._length_filter = DropRecords(LENGTH_PHRASES)
            for name in LENGTH_LOGGERS:
                logging.getLogger(name).addFilter(self._length_filter)
        except Exception:
            self.remove()
            raise
        self._active = True

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict, cache_index: dict) -> None:
        self._forward.call = None
        self._forward.layer = None
        self._forward.rotated = set()
        self._start_sequence_if_due(module, args, kwargs, cache_index)


def _main_key(layered: LayeredRope) -> str:
    """The RoPE a patch reports as its ``config``: the single one, else the first full-attention type's."""
    full = layered.default_extend_types()
    return full[0] if full else layered.types[0]


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


def apply_rope(model: nn.Module, cfg: RopeConfig | LayeredRope, *, backend: str = "auto",
               dynamic_policy: str = "freeze") -> RopePatch:
    """Make ``model`` rotate q and k with ropekit and ``cfg`` (the model's code and weights are untouched).

    Args:
        model: a transformers causal LM (or its base model) with RoPE: any family whose decoder has a
            ``*RotaryEmbedding`` module whose tables ropekit reads the same from the config (``ropekit.hf.families``).
        cfg: the RoPE to use: a ``RopeConfig`` for a model with one RoPE (its NoPE layers stay without), or a
            ``LayeredRope`` (one RoPE per layer type, Gemma 3/4); its head_dim, rotary_dim and layout must match
            the model's (start from ``LoadedModel.rope``, ``RopeConfig.from_hf(model.config)`` or
            ``LayeredRope.from_hf(model.config)``).
        backend: "auto" (the fused CPU pass for large CPU inputs, Triton on CUDA, else the reference),
            "reference", "cpu" or "triton" (``ropekit.apply_rotary``); one that cannot run on the model's
            device and dtype is a ValueError here.
        dynamic_policy: "freeze" (default) or "recompute" for length-dependent methods (module docstring).
    Returns:
        A ``RopePatch`` (also a context manager). The model's config is not changed (see ``export_model``).
    Raises:
        ValueError: a model without RoPE, a cfg of another geometry, or (``TransformersStructureError``) a model
            whose rotary module or attention ropekit cannot follow, with the reason.
    """
    if not isinstance(cfg, (RopeConfig, LayeredRope)):
        raise ValueError(f"cfg: expected a RopeConfig or LayeredRope, got {type(cfg).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: expected a transformers model (with a .config)")
    family = check_family(getattr(config, "model_type", None))
    if active_patch(model) is not None:
        raise ValueError("model: already patched by ropekit; call .remove() on the existing RopePatch first")
    check_rope_matches(model, cfg)
    if dynamic_policy not in DYNAMIC_POLICIES:
        raise ValueError(f"dynamic_policy: {dynamic_policy!r} not accepted; accepted: {', '.join(DYNAMIC_POLICIES)}")
    model_rope = model_layered_rope(model)
    _check_attention_temperature(config, cfg)
    sections = hf_mrope_section(config) or next(
        (m.mrope_section for m in model.modules()
         if type(m).__name__.endswith("RotaryEmbedding") and getattr(m, "mrope_section", None) is not None), None)
    if sections is not None:
        raise ValueError(f"{family}: its attention rotates by 3-D (t, h, w) position ids (M-RoPE, mrope_section "
                         f"{list(sections)}); ropekit's patch of transformers models rotates 1-D positions only")
    if isinstance(cfg, RopeConfig):
        layered = LayeredRope(tuple((key, cfg) for key in model_rope.types), model_rope.layers, model_rope.per_type)
    else:
        layered = cfg
    ropes = {key: ropekit.RotaryEmbedding(c, heads_first=True, dynamic_policy=dynamic_policy)
             for key, c in layered.ropes}
    for rope in ropes.values():
        _check_backend(backend, rope.cfg, model, rope)
    located = locate(model, family)
    weight = next(model.parameters(), None)
    device = weight.device if weight is not None else torch.device("cpu")
    probe_tables(located, model_rope, torch.float32, device)
    probe_functions(located, model_rope, device)
    patch = RopePatch(model, layered, ropes, located, backend)
    patch._install()
    return patch


def _check_attention_temperature(config, cfg: RopeConfig | LayeredRope) -> None:
    """Ministral 3 / Mistral-Large-3 scale queries by position with ``llama_4_scaling_beta`` over the config's
    ``original_max_position_embeddings``, in the attention, outside the rotation: ropekit cannot change that
    length, so a cfg with another trained length would be only half applied."""
    params = getattr(config, "rope_parameters", None) or {}
    if not isinstance(params, dict) or params.get("llama_4_scaling_beta") is None:
        return
    length = params.get("original_max_position_embeddings")
    ropes = [c for _, c in cfg.ropes] if isinstance(cfg, LayeredRope) else [cfg]
    for c in ropes:
        if length is not None and c.original_max_position not in (None, length):
            raise ValueError(f"cfg.original_max_position: {getattr(config, 'model_type', 'this model')} scales its "
                             f"queries by position over original_max_position_embeddings={length} "
                             f"(llama_4_scaling_beta) outside the rotation, which ropekit does not change; keep "
                             f"original_max_position={length} (extend(..., original_max_position={length}))")


def active_patch(model: nn.Module) -> RopePatch | None:
    """The live ``RopePatch`` of ``model`` (found from its modules: a ropekit adapter in place), if any."""
    for module in model.modules():
        if isinstance(module, RopekitRotaryAdapter) and module.patch.active:
            return module.patch
    return None
