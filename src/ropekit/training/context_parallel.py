"""Context parallelism: one sequence split over ranks, attention over the whole causal prefix.

Each rank holds a shard of the sequence (``ropekit.training.distributed.shard_sequence``: "contiguous" or the
load-balanced "zigzag"), with the shard's GLOBAL position ids, so q and k are rotated exactly as in the unsharded
run. Everything but attention is per token, so it runs on the shard alone. Attention is the one place that needs
the other ranks: ``context_parallel_attention`` swaps the model's attention for one that all-gathers keys and
values (``torch.distributed.nn.functional.all_gather``, whose backward sends each rank the gradient of its own
keys and values from every rank's queries), puts them back in sequence order, and masks by GLOBAL sequence index
(key j visible to query i iff j <= i and both lie in the same packed document). The loss is then the sum over
ranks of each shard's token losses, with next-token labels shifted on the full sequence before sharding
(``shard_batch``), and the gradients are summed over ranks.

The swap goes through transformers' attention registry: ``AttentionInterface.register("ropekit_cp", ...)`` and
``model.set_attn_implementation("ropekit_cp")`` (restored on exit). transformers builds no mask for an
implementation it has no mask function for, and the registered function builds its own.

Memory: every rank holds the full keys and values of one layer at a time (2 x seq x kv_heads x head_dim), and
its own queries' slice of the scores; activations, MLPs and the loss stay per shard. That is the simple "all-gather
KV" form of context parallelism (Llama 3's choice); a ring (passing K/V blocks rank to rank) would cap the keys
held at one shard but is not implemented. The same code runs with NCCL on CUDA (all_gather's backward is then a
reduce-scatter). PyTorch's own experimental context-parallel SDPA (``torch.distributed.tensor.experimental
.context_parallel``) shards buffers itself and patches SDPA globally; it is not used here.

Not supported: sliding-window attention layers, attention sinks, softcapping, dropout > 0 differs from the single
process only in its random draws.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist

from ropekit.training.data import IGNORE_INDEX, document_ids
from ropekit.training.distributed import SHARD_MODES, shard_indices, unwrap_model

Tensor = torch.Tensor

ATTENTION_NAME = "ropekit_cp"


@dataclass
class ShardLayout:
    """Where this rank's tokens sit in the full sequence.

    Attributes:
        world_size, rank, mode: the split (``shard_indices``).
        seq_len: tokens in the full sequence.
        document: (batch, seq_len) int64 document index of every token of the full sequence (packed rows), or
            None for one document per row.
        group: the process group of the context-parallel ranks (None: the default group).
    """

    world_size: int
    rank: int
    mode: str
    seq_len: int
    document: Tensor | None = None
    group: Any = None

    def local_index(self, device: torch.device | str = "cpu") -> Tensor:
        """(seq_len / world_size,) global sequence indices of this rank's tokens, in shard order."""
        return shard_indices(self.seq_len, self.world_size, self.rank, self.mode).to(device)

    def inverse_order(self, device: torch.device | str = "cpu") -> Tensor:
        """(seq_len,) index that puts the rank-by-rank concatenation of shards back in sequence order."""
        order = torch.cat([shard_indices(self.seq_len, self.world_size, r, self.mode)
                           for r in range(self.world_size)])
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(self.seq_len)
        return inverse.to(device)

    def visible(self, device: torch.device | str = "cpu") -> Tensor:
        """(batch|1, 1, local, seq_len) bool: key j (sequence order) visible to this rank's query i."""
        q = self.local_index(device)
        k = torch.arange(self.seq_len, device=device)
        allowed = (k[None, :] <= q[:, None])[None]  # (1, local, seq)
        if self.document is not None:
            doc = self.document.to(device)
            allowed = allowed & (doc[:, q][:, :, None] == doc[:, None, :])
        return allowed[:, None]


_state = threading.local()


def current_layout() -> ShardLayout | None:
    """The layout set by the innermost active ``context_parallel_attention`` of this thread, if any."""
    return getattr(_state, "layout", None)


def _gather_sequence_autograd(x: Tensor, layout: ShardLayout) -> Tensor:
    """(batch, heads, local, dim) shard -> (batch, heads, seq_len, dim) full sequence, differentiable: the
    backward returns to each rank the summed gradient of its own shard."""
    from torch.distributed.nn.functional import all_gather

    parts = all_gather(x.contiguous(), group=layout.group) if layout.world_size > 1 else (x,)
    joined = torch.cat(parts, dim=2)
    return joined.index_select(2, layout.inverse_order(x.device))


def context_parallel_sdpa(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                          attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                          **kwargs: Any) -> tuple[Tensor, None]:
    """transformers attention function (the registry's signature) for sharded sequences.

    query (batch, heads, local, head_dim), key/value (batch, kv_heads, local, head_dim), rotated at global
    positions; returns (batch, local, heads, head_dim) and no weights. ``attention_mask`` is ignored: the mask comes
    from the active ``ShardLayout`` (causal by global index, per packed document).
    """
    layout = current_layout()
    if layout is None:
        raise RuntimeError("context_parallel_sdpa: called outside ropekit.training.context_parallel_attention")
    if kwargs.get("sliding_window") is not None or getattr(module, "sliding_window", None):
        raise ValueError("context_parallel: sliding-window attention is not supported")
    if kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None:
        raise ValueError("context_parallel: attention softcapping / sinks are not supported")
    keys = _gather_sequence_autograd(key, layout)
    values = _gather_sequence_autograd(value, layout)
    groups = query.shape[1] // keys.shape[1]
    if groups > 1:  # grouped-query attention: each kv head serves `groups` query heads
        keys = keys.repeat_interleave(groups, dim=1)
        values = values.repeat_interleave(groups, dim=1)
    mask = layout.visible(query.device)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, attn_mask=mask, dropout_p=dropout if module.training else 0.0, scale=scaling)
    return out.transpose(1, 2).contiguous(), None


def register_attention() -> None:
    """Register ``context_parallel_sdpa`` as transformers attention implementation "ropekit_cp" (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, context_parallel_sdpa)


def _transformers_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a DDP and/or peft wrapper (as ``finetune.causal_lm``)."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def context_parallel_attention(model: torch.nn.Module, layout: ShardLayout) -> Iterator[ShardLayout]:
    """While active, ``model``'s attention (and its recomputation under gradient checkpointing: keep the backward
    inside the block) is ``context_parallel_sdpa`` over ``layout``. The model's own implementation is restored
    on exit."""
    if layout.mode not in SHARD_MODES:
        raise ValueError(f"mode: {layout.mode!r} not accepted; accepted: {', '.join(SHARD_MODES)}")
    register_attention()
    lm = _transformers_model(model)
    previous = lm.config._attn_implementation
    outer = current_layout()
    lm.set_attn_implementation(ATTENTION_NAME)
    _state.layout = layout
    try:
        yield layout
    finally:
        _state.layout = outer
        lm.set_attn_implementation(previous)


def shifted_targets(labels: Tensor) -> Tensor:
    """(batch, seq) labels -> (batch, seq) next-token targets: targets[:, t] = labels[:, t+1], the last -100.
    Shifted on the full sequence, so the token after a shard's last token is still its target."""
    pad = torch.full_like(labels[:, :1], IGNORE_INDEX)
    return torch.cat((labels[:, 1:], pad), dim=1)


def shard_batch(input_ids: Tensor, position_ids: Tensor, labels: Tensor, world_size: int, rank: int,
                mode: str = "zigzag", packed: bool = True, group: Any = None
                ) -> tuple[Tensor, Tensor, Tensor, ShardLayout]:
    """This rank's shard of one batch of full rows, all (batch, seq):

    returns (input_ids, global position_ids, next-token targets) of the shard, each (batch, seq / world_size),
    and the ``ShardLayout`` for ``context_parallel_attention``. ``packed``: rows hold several documents whose
    positions restart at 0 (attention stays within a document).
    """
    seq_len = input_ids.shape[1]
    index = shard_indices(seq_len, world_size, rank, mode).to(input_ids.device)
    targets = shifted_targets(labels)
    document = document_ids(position_ids) if packed else None
    if document is not None and bool((document == 0).all()):
        document = None  # one document: plain causal
    layout = ShardLayout(world_size=world_size, rank=rank, mode=mode, seq_len=seq_len, document=document,
                         group=group)
    pick = lambda t: t.index_select(1, index.to(t.device))  # noqa: E731
    return pick(input_ids), pick(position_ids), pick(targets), layout


def all_reduce_gradients(params: list[torch.nn.Parameter], group: Any = None) -> None:
    """Sum every parameter's gradient over the context-parallel ranks (each rank's loss is its shard's share)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad, group=group)
