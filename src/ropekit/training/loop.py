"""``train``: the fine-tuning loop.

AdamW, linear warm-up then constant (or cosine) learning rate, gradient accumulation, gradient checkpointing,
bf16 autocast on CUDA only, DDP/FSDP under torchrun, periodic checkpoints and exact resume.
Three ways to train long for less (``FinetuneSettings``): ``pose`` (short windows whose position ids reach seq_len,
``ropekit.training.pose``), ``mixed_windows`` (each row rotated as at its own length: longrope's short factors for
rows within the trained length) and ``context_parallel`` (one row split over ranks, attention across them,
``ropekit.training.context_parallel``). The loss is ``ropekit.training.loss``'s.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ropekit.training.checkpoint import check_resumable, list_checkpoints, load_checkpoint, save_checkpoint
from ropekit.training.context_parallel import all_reduce_gradients, context_parallel_attention, shard_batch
from ropekit.training.data import PackedRows, packed_forward_kwargs
from ropekit.training.distributed import DistContext, all_reduce_sum, context_from_group, wrap_model
from ropekit.training.loss import LOSS_CHUNK, causal_lm, loss_forward
from ropekit.training.pose import PoseSpec, pose_forward_kwargs, step_position_ids
from ropekit.training.settings import FinetuneSettings


@dataclass
class TrainResult:
    """What ``train`` did: per-step history ({"step", "loss", "lr", "tokens", "seconds"}), where it started,
    and the warnings it gave (e.g. the run ends inside the warm-up)."""

    history: list[dict[str, float]] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    start_step: int = 0
    final_step: int = 0
    checkpoints: list[str] = field(default_factory=list)

    @property
    def losses(self) -> list[float]:
        return [h["loss"] for h in self.history]


# ---------------------------------------------------------------------- data order
def batch_indices(step: int, n_rows: int, global_batch: int, seed: int) -> torch.Tensor:
    """(global_batch,) row indices for optimizer step ``step``: epochs of seeded permutations laid end to end.

    Depends only on (step, n_rows, global_batch, seed), so a resumed run sees the same rows.
    """
    start = step * global_batch
    out = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n_rows)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(n_rows, generator=gen)
        out.extend(perm[offset:offset + global_batch - len(out)].tolist())
    return torch.tensor(out, dtype=torch.long)



# ---------------------------------------------------------------------- the loop
def set_gradient_checkpointing(model: torch.nn.Module, enable: bool) -> None:
    """Turn transformers' activation checkpointing on (non-reentrant) or off; ValueError if the model lacks it."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft
    if enable:
        if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5
            base.activation_checkpointing_enable({"use_reentrant": False})
        elif hasattr(base, "gradient_checkpointing_enable"):
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            raise ValueError("gradient-checkpointing: this model does not support it; pass --no-gradient-checkpointing")
    elif hasattr(base, "activation_checkpointing_disable"):
        base.activation_checkpointing_disable()
    elif hasattr(base, "gradient_checkpointing_disable"):
        base.gradient_checkpointing_disable()


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int, decay: str = "constant",
                    steps: int | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over ``warmup`` steps (step 1 already gets lr/warmup, never 0), then constant, or a cosine
    from the peak down to 10% of it at ``steps``."""
    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        if decay == "constant":
            return 1.0
        progress = min(1.0, (s - warmup) / max(1, (steps or 1) - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_warning(settings: FinetuneSettings) -> str | None:
    """The warning for a run that ends inside its warm-up (the learning rate never reaches ``lr``), else None.

    Step s (from 0) runs at lr * (s + 1) / warmup during the warm-up, so the last step reaches lr only when
    steps >= warmup.
    """
    if settings.steps >= settings.warmup:
        return None
    peak = settings.lr * settings.steps / settings.warmup
    return (f"--steps {settings.steps} ends inside the {settings.warmup}-step warm-up (--warmup): the learning "
            f"rate peaks at {peak:.3g} and never reaches --lr {settings.lr:g}; train for at least "
            f"{settings.warmup} steps or shorten the warm-up")


def train(
    model: torch.nn.Module,
    rows: PackedRows,
    settings: FinetuneSettings,
    *,
    out_dir: str | Path | None = None,
    fingerprint: dict[str, Any] | None = None,
    resume: bool = False,
    ctx: DistContext | None = None,
    progress: bool = True,
    desc: str = "fine-tune",
    after_backward: Callable[[int, torch.nn.Module], None] | None = None,
    loss_chunk: int = LOSS_CHUNK,
) -> TrainResult:
    """Train ``model`` (already on its device, RoPE already swapped, LoRA already applied) on packed ``rows``.

    Args:
        rows: PackedRows of settings.seq_len tokens.
        out_dir: where checkpoints go (``out_dir/checkpoints/step-N``); None: no checkpoints.
        fingerprint: the run fingerprint stored in checkpoints and checked on resume.
        resume: continue from the newest checkpoint in out_dir (its fingerprint must equal ``fingerprint``).
        ctx: the process group (default: the initialised one, or a single process).
        after_backward: called as f(step, model) once the step's gradients are complete (before clipping).
        loss_chunk: positions per chunk of the loss (``chunked_loss_sum``); changes only the summation order.

    Warns (and lists in ``TrainResult.warnings``) when the run ends inside the warm-up.
    """
    from tqdm.auto import tqdm

    ctx = ctx or context_from_group()
    if rows.seq_len != settings.row_len:
        what = f"settings.window is {settings.window}" if settings.pose else f"settings.seq_len is {settings.seq_len}"
        raise ValueError(f"rows: packed at {rows.seq_len} tokens, {what}")
    cp = settings.context_parallel
    if cp > 1 and ctx.world_size != cp:
        raise ValueError(f"context_parallel: {cp} ranks per sequence needs exactly {cp} processes (torchrun "
                         f"--nproc_per_node {cp}), got {ctx.world_size}")
    if cp > 1 and ctx.distributed and settings.strategy != "ddp":
        raise ValueError("strategy: context_parallel sums gradients itself; use ddp (fsdp is not supported with it)")
    per_rank = settings.batch_size * settings.grad_accum
    # Data-parallel ranks take different rows; context-parallel ranks share every row (each holds a shard).
    data_ranks = 1 if cp > 1 else ctx.world_size
    data_rank = 0 if cp > 1 else ctx.rank
    global_batch = per_rank * data_ranks
    if len(rows) < global_batch:
        raise ValueError(f"data: {len(rows)} rows of {settings.seq_len} tokens, fewer than one global batch "
                         f"({settings.batch_size} x {settings.grad_accum} accumulation x {ctx.world_size} processes)")
    if (resume or settings.checkpoint_every) and out_dir is None:
        raise ValueError("out_dir: needed for checkpoints and resume")
    fingerprint = fingerprint or {}
    if out_dir is not None and not resume and list_checkpoints(out_dir):
        raise ValueError(f"out: {out_dir} already holds checkpoints; pass --resume to continue that run "
                         f"or choose another --out")
    latest = check_resumable(out_dir, fingerprint) if resume else None

    result = TrainResult()
    message = warmup_warning(settings)
    if message is not None:
        result.warnings.append(message)
        if ctx.is_main:
            warnings.warn(message, UserWarning, stacklevel=2)

    torch.manual_seed(settings.seed)
    if settings.gradient_checkpointing:
        set_gradient_checkpointing(model, True)
    config = getattr(model, "config", None)
    use_cache = getattr(config, "use_cache", None)
    if config is not None:
        config.use_cache = False  # a KV cache is useless in training and hides packed rows from transformers
    model.train()
    # Context parallel: no DDP wrapper (its gradient averaging would run beside the attention's collectives);
    # the shard gradients are summed explicitly after backward.
    wrapped = model if cp > 1 else wrap_model(model, ctx, settings.strategy)
    params = [p for p in wrapped.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model: no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, betas=settings.betas)
    scheduler = warmup_schedule(optimizer, settings.warmup, settings.decay, settings.steps)

    step = 0
    if latest is not None:
        step, result.history = load_checkpoint(latest, wrapped, optimizer, scheduler, ctx, settings)
    result.start_step = step
    if step >= settings.steps:
        result.final_step = step
        return result

    device = ctx.device
    dtype = next(model.parameters()).dtype
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
                else contextlib.nullcontext())
    is_ddp = isinstance(wrapped, torch.nn.parallel.DistributedDataParallel)
    is_fsdp = ctx.distributed and settings.strategy == "fsdp" and cp == 1
    pose = PoseSpec(settings.seq_len, settings.window, settings.pose_chunks) if settings.pose else None
    patch = _rope_patch(model) if settings.mixed_windows else None
    if settings.mixed_windows and (patch is None or not patch.rope.length_dependent):
        raise ValueError("mixed_windows: needs a model patched with a length-dependent RoPE method "
                         "(longrope, dynamic, dynamic_yarn); the rotation of other methods does not depend on "
                         "the row's length")
    fixed_length = patch._fixed_length if patch is not None else None  # put back after each step
    cp_patch = _rope_patch(model) if cp > 1 else None
    if cp_patch is not None and cp_patch.rope.length_dependent and cp_patch._fixed_length is None:
        # A shard's largest position is not the sequence's: take the scale at the full length on every rank.
        cp_patch.fix_length(settings.seq_len)
    else:
        cp_patch = None  # nothing to put back
    bar = tqdm(total=settings.steps, initial=step, desc=desc, disable=not (progress and ctx.is_main),
               dynamic_ncols=True)
    try:
        while step < settings.steps:
            t0 = time.perf_counter()
            index = batch_indices(step, len(rows), global_batch, settings.seed)
            n_tokens = rows.rows(index).predicted_tokens()
            if n_tokens == 0:
                raise ValueError(f"data: step {step + 1}'s batch has no token to predict")
            mine = slice(data_rank * per_rank, (data_rank + 1) * per_rank)
            step_rows = rows.rows(index[mine])
            if pose is not None:  # this step's skipped ids for every slot of the global batch; keep this rank's
                step_rows.position_ids = step_position_ids(pose, settings.seed, step, global_batch)[mine]
            lr_now = scheduler.get_last_lr()[0]
            local_loss = torch.zeros((), dtype=torch.float64)
            for micro in range(settings.grad_accum):
                batch = step_rows.rows(list(range(micro * settings.batch_size, (micro + 1) * settings.batch_size)))
                # Mixed windows: one row per forward, its rotation resolved at its own length.
                pieces = [batch.rows([r]) for r in range(len(batch))] if patch is not None else [batch]
                for i, piece in enumerate(pieces):
                    # Gradients are synchronised over data-parallel ranks after the step's last backward only.
                    last = micro == settings.grad_accum - 1 and i == len(pieces) - 1
                    sync = contextlib.nullcontext() if (last or not is_ddp) else wrapped.no_sync()
                    if is_fsdp:
                        wrapped.set_requires_gradient_sync(last)
                    if patch is not None:
                        patch.fix_length(row_rope_length(piece.position_ids))
                    with sync:
                        with contextlib.ExitStack() as stack:
                            if cp > 1:
                                ids, pos, targets, layout = shard_batch(
                                    piece.input_ids, piece.position_ids, piece.labels, cp, ctx.rank,
                                    settings.cp_mode)
                                stack.enter_context(context_parallel_attention(model, layout))
                                inputs = {"input_ids": ids.to(device), "targets": targets.to(device),
                                          "position_ids": pos.to(device), "use_cache": False}
                            elif pose is not None:
                                inputs = {"input_ids": piece.input_ids.to(device), "labels": piece.labels.to(device),
                                          **pose_forward_kwargs(piece.position_ids.to(device))}
                            else:
                                inputs = {"input_ids": piece.input_ids.to(device), "labels": piece.labels.to(device),
                                          **packed_forward_kwargs(piece.position_ids.to(device), dtype)}
                            with autocast, loss_forward(wrapped, loss_chunk):  # the summed token loss, not logits
                                loss = wrapped(**inputs) / n_tokens
                            # DDP / FSDP average gradients over ranks; the loss is already a share of the global
                            # mean. Context parallel: each rank's loss is its shard's share, summed below.
                            (loss * (1 if cp > 1 else ctx.world_size)).backward()
                    local_loss += loss.detach().to("cpu", torch.float64)
            if patch is not None:
                patch.fix_length(fixed_length)
            if cp > 1:
                all_reduce_gradients(params)
            if after_backward is not None:
                after_backward(step, model)
            if settings.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = all_reduce_sum(local_loss, ctx)  # context parallel: the shards' shares add up to the row's loss
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}; lower --lr")
            result.history.append({"step": step, "loss": loss, "lr": lr_now, "tokens": n_tokens,
                                   "seconds": time.perf_counter() - t0})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_now:.2e}")
            if out_dir is not None and ((settings.checkpoint_every and step % settings.checkpoint_every == 0)
                                        or (settings.checkpoint_every and step == settings.steps)):
                result.checkpoints.append(str(save_checkpoint(Path(out_dir), step, wrapped, optimizer, scheduler,
                                                              fingerprint, result.history, ctx, settings)))
    finally:
        bar.close()
        if patch is not None:
            patch.fix_length(fixed_length)
        if cp_patch is not None:
            cp_patch.fix_length(None)
    if settings.gradient_checkpointing:
        set_gradient_checkpointing(model, False)
    if config is not None and use_cache is not None:
        config.use_cache = use_cache  # exported configs keep generation's default
    model.eval()
    result.final_step = step
    return result


def row_rope_length(position_ids: torch.Tensor) -> int:
    """The length a row's rotation is resolved at under mixed windows: its largest position + 1 (a packed row of
    short documents is a short context; a PoSE row reaches as far as its last skipped id)."""
    return int(position_ids.max()) + 1


def _rope_patch(model: torch.nn.Module):
    from ropekit.hf.patch import active_patch

    return active_patch(causal_lm(model))
