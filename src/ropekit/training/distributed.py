"""Scaling out: data parallelism under ``torchrun`` (DDP or FSDP) and the context-parallel sequence split.

Data parallel: ``torchrun --nproc_per_node N -m ropekit.cli finetune ...`` (or the ``ropekit`` script)
sets RANK / WORLD_SIZE / LOCAL_RANK; ``init_distributed`` joins the group (nccl on CUDA, gloo on CPU)
and ``wrap_model`` wraps the model in DDP or FSDP (``torch.distributed.fsdp.fully_shard``).

Context parallel: a sequence too long for one device is split over ranks along its length.
``shard_sequence`` gives each rank its shard and the shard's GLOBAL positions; rotate q/k with those
positions (``ropekit.apply_rotary(q, k, cfg, positions, seq_len=total_length)`` — length-dependent
methods must be resolved at the full length, not the shard's) and the rotation equals the matching slice
of the unsharded rotation. ``gather_sequence`` is the inverse. Modes:

* ``"contiguous"``: rank r holds chunk r of W equal chunks.
* ``"zigzag"`` (load-balanced for causal attention): the sequence is cut in 2W chunks and rank r holds
  chunks r and 2W-1-r, so every rank has the same amount of causal-attention work.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

Tensor = torch.Tensor

SHARD_MODES = ("contiguous", "zigzag")
STRATEGIES = ("ddp", "fsdp")


# ---------------------------------------------------------------------- process group
@dataclass(frozen=True)
class DistContext:
    """Where this process sits: rank, world size, and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    owns_group: bool = False  # init_distributed created the process group, so shutdown_distributed ends it

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def launched_by_torchrun() -> bool:
    """True when WORLD_SIZE > 1 is set in the environment (torchrun, torch.distributed.launch)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str | None = None) -> DistContext:
    """Join the process group torchrun describes (no-op for a single process).

    ``device``: "cpu", "cuda", "cuda:N", or None / "auto" (cuda if available). CUDA uses nccl and one GPU per local rank,
    CPU uses gloo.
    """
    if device == "auto":
        device = None
    if device is not None and device != "cpu" and not str(device).startswith("cuda"):
        raise ValueError(f"device: {device!r} not accepted; accepted: auto, cpu, cuda, cuda:N")
    want_cuda = torch.cuda.is_available() if device is None else str(device).startswith("cuda")
    if want_cuda and not torch.cuda.is_available():
        raise ValueError("device: cuda requested but no CUDA device is available")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        explicit = torch.device(device).index if device else None
        dev = torch.device("cuda", local if world > 1 else (explicit or 0))
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    owns = world > 1 and not dist.is_initialized()
    if owns:
        dist.init_process_group(backend="nccl" if want_cuda else "gloo")
    return DistContext(rank=rank, world_size=world, local_rank=local, device=dev, owns_group=owns)


def shutdown_distributed(ctx: DistContext | None = None, *, failed: bool = False) -> None:
    """End the default process group: a barrier first, then ``destroy_process_group``.

    The barrier matters: a rank that tears gloo down while its peer still has work in flight can abort the peer
    (``terminate called without an active exception``). With ``failed=True`` (this rank is leaving on an error and
    its peers may never reach a barrier) the group is destroyed without waiting. With a ``ctx`` that did not create
    the group (``owns_group`` False), nothing happens: whoever created it ends it.
    """
    if not dist.is_initialized() or (ctx is not None and not ctx.owns_group):
        return
    if not failed:
        dist.barrier()
    dist.destroy_process_group()


def context_from_group() -> DistContext:
    """The DistContext of an already initialised default group (tests spawn their own processes)."""
    if not dist.is_initialized():
        return DistContext()
    return DistContext(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=dist.get_rank())


def wrap_model(model: torch.nn.Module, ctx: DistContext, strategy: str = "ddp") -> torch.nn.Module:
    """Wrap ``model`` for data-parallel training: DDP (a full copy per rank) or FSDP (parameters sharded)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: {strategy!r} not accepted; accepted: {', '.join(STRATEGIES)}")
    if not ctx.distributed:
        return model
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)
    from torch.distributed.fsdp import fully_shard

    # Shard each decoder layer, then the rest (embeddings, head).
    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    for module in model.modules():
        layers = getattr(module, "layers", None)
        if isinstance(layers, torch.nn.ModuleList):
            return list(layers)
    return []


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DDP wrapper (FSDP2 keeps the model itself)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def all_reduce_sum(value: float | Tensor, ctx: DistContext) -> float:
    """Sum a scalar over ranks (returns a Python float)."""
    t = torch.as_tensor(value, dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
    if ctx.distributed:
        t = t.clone()
        dist.all_reduce(t)
    return float(t)


# ---------------------------------------------------------------------- context parallelism
def shard_indices(seq_len: int, world_size: int, rank: int, mode: str = "contiguous") -> Tensor:
    """(seq_len / world_size,) int64 global indices of the tokens rank ``rank`` holds, in shard order."""
    if mode not in SHARD_MODES:
        raise ValueError(f"mode: {mode!r} not accepted; accepted: {', '.join(SHARD_MODES)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size: must be an integer >= 1, got {world_size!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank: must be an integer in [0, {world_size}), got {rank!r}")
    chunks = world_size if mode == "contiguous" else 2 * world_size
    if seq_len % chunks:
        raise ValueError(f"seq_len: {seq_len} must be divisible by {chunks} for mode {mode!r} "
                         f"with world_size {world_size}")
    size = seq_len // chunks
    if mode == "contiguous":
        return torch.arange(rank * size, (rank + 1) * size)
    first, second = rank, 2 * world_size - 1 - rank
    return torch.cat((torch.arange(first * size, (first + 1) * size), torch.arange(second * size, (second + 1) * size)))


def shard_sequence(
    x: Tensor,
    positions: Tensor | None,
    world_size: int,
    rank: int,
    mode: str = "contiguous",
    dim: int = 1,
) -> tuple[Tensor, Tensor]:
    """This rank's shard of ``x`` along ``dim`` and the shard's global positions.

    Args:
        x: any tensor with the sequence on axis ``dim`` (e.g. (batch, seq, ...) input ids, dim=1, or
            (batch, heads, seq, head_dim) q/k, dim=2).
        positions: None (0..seq-1), (seq,) or (batch, seq) integer positions of the full sequence
            (packed documents included).
        world_size, rank: the context-parallel group.
        mode: "contiguous" or "zigzag".
    Returns:
        (x_shard, positions_shard): x_shard has seq/world_size tokens on ``dim``; positions_shard is
        (shard,) or (batch, shard) with the tokens' positions in the full sequence.
    """
    seq_len = x.shape[dim]
    index = shard_indices(seq_len, world_size, rank, mode).to(x.device)
    if positions is None:
        positions = torch.arange(seq_len, device=x.device)
    if positions.is_floating_point():
        raise ValueError(f"positions: must be an integer tensor, got dtype {positions.dtype}")
    if positions.shape[-1] != seq_len:
        raise ValueError(f"positions: last axis must be the sequence length {seq_len}, got {tuple(positions.shape)}")
    return x.index_select(dim, index), positions.index_select(-1, index.to(positions.device))


def unshard_sequence(shards: Sequence[Tensor], mode: str = "contiguous", dim: int = 1) -> Tensor:
    """Inverse of ``shard_sequence`` over all ranks: shards[r] is rank r's shard; returns the full sequence."""
    world_size = len(shards)
    if world_size == 0:
        raise ValueError("shards: need one shard per rank, got none")
    joined = torch.cat(list(shards), dim=dim)
    seq_len = joined.shape[dim]
    order = torch.cat([shard_indices(seq_len, world_size, r, mode) for r in range(world_size)])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(seq_len)
    return joined.index_select(dim, inverse.to(joined.device))


def gather_sequence(shard: Tensor, ctx: DistContext, mode: str = "contiguous", dim: int = 1) -> Tensor:
    """All-gather every rank's shard and reassemble the full sequence (same result on every rank)."""
    if not ctx.distributed:
        return shard
    shard = shard.contiguous()
    parts = [torch.empty_like(shard) for _ in range(ctx.world_size)]
    dist.all_gather(parts, shard)
    return unshard_sequence(parts, mode, dim)
