"""Continued training of a causal LM at a longer length with a RoPE scaling method.

``train`` is the loop (AdamW, linear warm-up then constant learning rate, gradient accumulation, gradient
checkpointing, bf16 autocast on CUDA only, DDP/FSDP under torchrun, periodic checkpoints and exact resume).
Three ways to train long for less (``FinetuneSettings``): ``pose`` (short windows whose position ids reach seq_len,
``ropekit.training.pose``), ``mixed_windows`` (each row rotated as at its own length: longrope's short factors for
rows within the trained length) and ``context_parallel`` (one row split over ranks, attention across them,
``ropekit.training.context_parallel``).
``finetune`` is the whole job the ``ropekit finetune`` command runs: load, swap RoPE, pack data, train,
evaluate, export.

Loss normalisation: every micro-batch's summed token loss is divided by the number of predicted tokens in
the whole global batch (all micro-batches of all ranks), so gradient accumulation and data parallelism give
the gradient of one big batch — the same numbers as a single process, up to summation order.

Memory: the loss never holds full-vocabulary logits. The model body gives the final hidden states
(batch, seq, hidden); the output head and the cross-entropy then run ``LOSS_CHUNK`` positions at a time, each
chunk inside ``torch.utils.checkpoint`` so its logits are recomputed in backward instead of kept (8192
positions x 49k vocabulary in float32 would be 1.6 GB, and its gradient as much again). With gradient
checkpointing on, what stays alive for backward is each decoder layer's input (layers x seq x hidden).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ropekit.output import (
    MANIFEST,
    STAGING_PREFIX,
    make_dirs,
    owned_files,
    place_own,
    record,
    remove_own,
    write_own,
)
from ropekit.training.data import (
    IGNORE_INDEX,
    PackedRows,
    document_texts,
    pack_documents,
    packed_forward_kwargs,
    tokenize_documents,
)
from ropekit.training.context_parallel import all_reduce_gradients, context_parallel_attention, shard_batch
from ropekit.training.pose import PoseSpec, pose_forward_kwargs, pose_windows, step_position_ids
from ropekit.training.distributed import (
    SHARD_MODES,
    STRATEGIES,
    DistContext,
    all_reduce_sum,
    context_from_group,
    init_distributed,
    shutdown_distributed,
    unwrap_model,
    wrap_model,
)

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
EXPORT_DIR = "model"
TRAINING_LOG = "training.json"
TRAINING_PLOT = "training_curve.png"
# What `ropekit finetune --out` writes: each must be free or ropekit's own before the run starts.
OUTPUT_NAMES = (f"{CHECKPOINT_DIR}/", f"{EXPORT_DIR}/", TRAINING_LOG, TRAINING_PLOT)
STATE_FILE = "state.pt"
# Settings that do not change the numbers a run produces, so a resumed run may change them.
# Learning rate after warm-up: constant (the papers' fine-tuning) or cosine down to 10% (pretraining).
DECAYS = ("constant", "cosine")
NOT_FINGERPRINTED = ("steps", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")
# Positions per chunk of the training loss: (batch, LOSS_CHUNK, vocab) float32 logits exist at a time
# (200 MB for a 49k vocabulary), plus their softmax and gradient in backward.
LOSS_CHUNK = 1024


@dataclass(frozen=True)
class FinetuneSettings:
    """Hyper-parameters of a fine-tuning run (defaults follow PI / YaRN: lr 2e-5, 20 warm-up steps, no decay).

    ``batch_size`` is rows per micro-batch per process; one optimizer step sees
    batch_size * grad_accum * world_size rows.
    """

    seq_len: int
    steps: int
    lr: float = 2e-5
    warmup: int = 20
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    batch_size: int = 1
    grad_accum: int = 1
    max_grad_norm: float | None = 1.0
    gradient_checkpointing: bool = True
    lora: bool = False
    lora_rank: int = 8
    lora_alpha: float | None = None
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    seed: int = 0
    strategy: str = "ddp"
    decay: str = "constant"
    # PoSE (``ropekit.training.pose``): train windows of ``window`` tokens with position ids spread over seq_len.
    pose: bool = False
    window: int | None = None
    pose_chunks: int = 2
    # Mixed context windows (LongRoPE2): each row's rotation is resolved at the row's own length (max position + 1),
    # so rows no longer than the trained length rotate as short contexts do at inference (longrope: short factors).
    mixed_windows: bool = False
    # Context parallelism (``ropekit.training.context_parallel``): one sequence split over this many ranks.
    context_parallel: int = 1
    cp_mode: str = "zigzag"

    def __post_init__(self) -> None:
        for name, minimum in (("seq_len", 2), ("steps", 1), ("batch_size", 1), ("grad_accum", 1),
                              ("lora_rank", 1), ("warmup", 0), ("checkpoint_every", 0), ("keep_checkpoints", 1),
                              ("pose_chunks", 1), ("context_parallel", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
        if self.pose:
            if self.window is None:
                raise ValueError("window: PoSE needs a window length (tokens per training row)")
            from ropekit.training.pose import check_pose

            check_pose(self.seq_len, self.window, self.pose_chunks)
        elif self.window is not None:
            raise ValueError("window: only used with pose")
        if self.cp_mode not in SHARD_MODES:
            raise ValueError(f"cp_mode: {self.cp_mode!r} not accepted; accepted: {', '.join(SHARD_MODES)}")
        if self.context_parallel > 1:
            if self.pose or self.mixed_windows:
                raise ValueError("context_parallel: splits one long row over ranks; it is not combined with pose "
                                 "or mixed_windows (PoSE rows are short, so they need no splitting)")
            if self.batch_size != 1:
                raise ValueError(f"context_parallel: trains one sequence at a time; needs batch_size 1, got "
                                 f"{self.batch_size}")
            chunks = self.context_parallel * (2 if self.cp_mode == "zigzag" else 1)
            if self.seq_len % chunks:
                raise ValueError(f"seq_len: {self.seq_len} must be divisible by {chunks} for context_parallel "
                                 f"{self.context_parallel} with cp_mode {self.cp_mode!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr: must be a finite number > 0, got {self.lr!r}")
        if not (isinstance(self.weight_decay, (int, float)) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay: must be >= 0, got {self.weight_decay!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"max_grad_norm: must be > 0 or None, got {self.max_grad_norm!r}")
        if self.decay not in DECAYS:
            raise ValueError(f"decay: {self.decay!r} not accepted; accepted: {', '.join(DECAYS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: {self.strategy!r} not accepted; accepted: {', '.join(STRATEGIES)}")

    @property
    def resolved_lora_alpha(self) -> float:
        return float(self.lora_alpha) if self.lora_alpha is not None else 2.0 * self.lora_rank

    @property
    def row_len(self) -> int:
        """Tokens per training row: the PoSE window, or seq_len."""
        return self.window if self.pose else self.seq_len

    def fingerprint(self) -> dict[str, Any]:
        """The settings that decide the numbers (everything but NOT_FINGERPRINTED; the PoSE, mixed-window and
        context-parallel fields only when used, so runs without them keep their earlier fingerprints)."""
        out = {k: v for k, v in dataclasses.asdict(self).items() if k not in NOT_FINGERPRINTED}
        if not self.pose:
            for key in ("pose", "window", "pose_chunks"):
                out.pop(key)
        if not self.mixed_windows:
            out.pop("mixed_windows")
        if self.context_parallel == 1:
            out.pop("context_parallel")
            out.pop("cp_mode")
        out["betas"] = list(self.betas)
        if self.decay != "constant":
            out["steps"] = self.steps  # the schedule depends on the run length
        if not self.lora:
            out.pop("lora_rank")
            out.pop("lora_alpha")
        return out


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


# ---------------------------------------------------------------------- fingerprints
def run_fingerprint(settings: FinetuneSettings, rope: Any, model_id: str, data_id: str,
                    world_size: int) -> dict[str, Any]:
    """Everything a checkpoint must agree on to be resumed: settings, RoPE config, model, data, world size."""
    rope_dict = rope.to_dict() if hasattr(rope, "to_dict") else rope
    return {"settings": settings.fingerprint(), "rope": rope_dict, "model": model_id, "data": data_id,
            "world_size": world_size}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'key: checkpoint X, now Y' lines for every field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return out


def model_identity(model: torch.nn.Module, source: str | None = None) -> str:
    """A short id of the starting model: its source and a hash of its config."""
    import hashlib

    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(model)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{source or type(model).__name__}#{digest}"


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


# ---------------------------------------------------------------------- checkpoints
def _rng_state() -> dict[str, Any]:
    # Plain types only, so a checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints under ``out_dir``/checkpoints, oldest first: only those whose files ropekit wrote
    and recorded (``ropekit.output``), so a folder someone planted there is never read or removed."""
    owned = owned_files(out_dir, CHECKPOINT_DIR)
    steps = {rel.split("/")[1] for rel in owned if rel.count("/") == 2 and rel.split("/")[1].startswith("step-")}
    return sorted(Path(out_dir) / CHECKPOINT_DIR / name for name in steps
                  if {f"{CHECKPOINT_DIR}/{name}/{STATE_FILE}", f"{CHECKPOINT_DIR}/{name}/{RUN_FILE}"} <= set(owned))


def _checkpoint_files(out_dir: str | Path, checkpoint: Path) -> list[str]:
    return owned_files(out_dir, f"{CHECKPOINT_DIR}/{checkpoint.name}")


def _model_state(model: torch.nn.Module, strategy_sharded: bool, trainable_only: bool) -> dict[str, torch.Tensor]:
    if strategy_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=trainable_only))
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if names is None or k in names}


def _optimizer_state(model, optimizer, strategy_sharded: bool) -> dict[str, Any]:
    if strategy_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    return optimizer.state_dict()


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, fingerprint: dict,
                    history: list, ctx: DistContext, settings: FinetuneSettings) -> Path:
    """Write ``out_dir/checkpoints/step-NNNNNN`` atomically (temp folder + rename); keep the newest few.

    Holds model (trainable parameters only under LoRA), optimizer, scheduler, step, loss history, the run
    fingerprint, and every rank's RNG state. Collective: every rank must call it.
    """
    sharded = ctx.distributed and settings.strategy == "fsdp"
    model_sd = _model_state(model, sharded, settings.lora)
    optim_sd = _optimizer_state(model, optimizer, sharded)
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step-{step:06d}"
    # Written in a staging folder of this process's own (skipped by the output checks, never another run's),
    # renamed into place when complete, then recorded file by file.
    names = [None]
    if ctx.is_main:
        make_dirs(root)
        names[0] = tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{os.getpid()}-step-{step:06d}-")
    if ctx.distributed:
        torch.distributed.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    ctx.barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                    "history": history}, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    ctx.barrier()
    if ctx.is_main:
        try:
            if os.path.lexists(final):
                remove_own(out_dir, _checkpoint_files(out_dir, final))
                if os.path.lexists(final):
                    raise ValueError(f"out: {final} holds files ropekit did not write; it is kept, and this "
                                     f"checkpoint was not saved")
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # this process's own staging folder, if the rename did not happen
        record(out_dir, [f"{CHECKPOINT_DIR}/{final.name}/{f.name}" for f in sorted(final.iterdir())], "finetune")
        for old in list_checkpoints(out_dir)[:-settings.keep_checkpoints]:
            remove_own(out_dir, _checkpoint_files(out_dir, old))
    ctx.barrier()
    return final


def check_resumable(out_dir: str | Path, fingerprint: dict[str, Any]) -> Path:
    """The newest checkpoint in ``out_dir`` if its run fingerprint equals ``fingerprint``; ValueError otherwise."""
    found = list_checkpoints(out_dir)
    if not found:
        raise ValueError(f"resume: no checkpoint under {Path(out_dir) / CHECKPOINT_DIR}")
    latest = found[-1]
    try:
        saved = json.loads((latest / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"resume: {latest / RUN_FILE} cannot be read ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {latest / RUN_FILE} is damaged (not a JSON object)")
    diffs = fingerprint_differences(saved, json.loads(json.dumps(fingerprint)))
    if diffs:
        raise ValueError(f"resume: {latest} was made by a different run configuration: " + "; ".join(diffs))
    return latest


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, ctx: DistContext,
                    settings: FinetuneSettings) -> tuple[int, list]:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns (step, history)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    sharded = ctx.distributed and settings.strategy == "fsdp"
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=not settings.lora))
    else:
        missing, unexpected = model.load_state_dict(state["model"], strict=not settings.lora)
        if unexpected:
            raise ValueError(f"resume: checkpoint has parameters this model lacks: {unexpected[:5]}")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{ctx.rank}.pt"
    _set_rng_state(torch.load(rng, weights_only=True))
    return int(state["step"]), list(state["history"])


# ---------------------------------------------------------------------- the loop
def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits (batch, seq, vocab) at t predict labels (batch, seq) at t+1;
    labels -100 are skipped. Half-precision logits are upcast to float32; float64 stays float64."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a DDP and/or peft wrapper (FSDP2 keeps the model itself)."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states as the causal LM's forward makes them (the evaluation's
    ``output_logits``: the same head transforms, half precision upcast, float64 kept)."""
    from ropekit.evaluation.perplexity import output_logits

    return output_logits(model, hidden)


def _chunk_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head_logits(model, hidden)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                     chunk_size: int = LOSS_CHUNK, shifted: bool = False) -> torch.Tensor:
    """``token_loss_sum`` of the causal LM ``model``'s logits, computed from its final hidden states
    (batch, seq, hidden) ``chunk_size`` positions at a time. With ``shifted``, ``labels`` are already the
    next-token targets of each position (a context-parallel shard: the shift was done on the full sequence).

    Each chunk's head and cross-entropy run inside ``torch.utils.checkpoint`` (non-reentrant): only the chunk's
    hidden states are kept for backward, and its logits are recomputed there. So at most one chunk of
    (batch, chunk_size, vocab) logits exists at a time, in forward and in backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    from torch.utils.checkpoint import checkpoint

    if shifted:
        target = labels.to(hidden.device)
    else:
        hidden = hidden[:, :-1]
        target = labels[:, 1:].to(hidden.device)
    total = None
    for start in range(0, hidden.shape[1], chunk_size):
        piece = (hidden[:, start:start + chunk_size], target[:, start:start + chunk_size])
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss_sum, model, *piece, use_reentrant=False)
        else:
            part = _chunk_loss_sum(model, *piece)
        total = part if total is None else total + part
    return total


@contextlib.contextmanager
def loss_forward(model: torch.nn.Module, chunk_size: int = LOSS_CHUNK):
    """While active, calling ``model`` (or its DDP / FSDP / peft wrapper) with ``input_ids``, ``labels`` and the
    body's keyword arguments returns the summed token loss (``chunked_loss_sum``) instead of logits.

    The causal LM's forward is replaced for the duration (an instance attribute, removed on exit) so that the
    call still goes through the wrappers' forward: DDP's gradient-sync bookkeeping and FSDP's unsharding of the
    root's parameters (embeddings, final norm, head) happen as for an ordinary forward.
    """
    from ropekit.evaluation.perplexity import model_body

    lm = causal_lm(model)
    body = model_body(lm)
    had_own = "forward" in lm.__dict__
    own = lm.__dict__.get("forward")

    def forward(input_ids=None, labels=None, targets=None, **kwargs):
        if labels is None and targets is None:
            raise ValueError("labels: the training loss needs labels")
        # peft passes its optional arguments explicitly (attention_mask=None, return_dict=None...).
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "labels")}
        hidden = body(input_ids=input_ids, **kwargs).last_hidden_state
        if targets is not None:  # next-token targets already aligned with the positions (context parallel)
            return chunked_loss_sum(lm, hidden, targets, chunk_size, shifted=True)
        return chunked_loss_sum(lm, hidden, labels, chunk_size)

    lm.forward = forward
    try:
        yield model
    finally:
        if had_own:
            lm.forward = own
        else:
            del lm.forward


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


# ---------------------------------------------------------------------- LoRA
def add_lora(model: torch.nn.Module, settings: FinetuneSettings) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the attention and MLP projections (base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora: needs the peft package (pip install 'ropekit[lora]')") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    if not targets:
        raise ValueError(f"lora: no q_proj/k_proj/v_proj/o_proj linear layers in this model (found {sorted(names)})")
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.resolved_lora_alpha, lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    _skip_incompatible_torchao()
    return get_peft_model(model, config)


def _skip_incompatible_torchao() -> None:
    """peft >= 0.18 raises ImportError while wrapping *any* Linear when an older torchao (< 0.16, e.g. pulled in
    by torchtune) is installed. Its torchao dispatcher only serves torchao-quantized weights, which ropekit never
    loads, so tell that dispatcher torchao is absent instead of failing."""
    try:
        from peft.import_utils import is_torchao_available
        from peft.tuners.lora import torchao as peft_torchao
    except ImportError:
        return
    try:
        is_torchao_available()
    except ImportError:
        peft_torchao.is_torchao_available = lambda: False


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain model (identity without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


# ---------------------------------------------------------------------- the whole job
def trained_length(loaded: Any) -> int:
    """The length the loaded model was trained at: ``loaded.rope.require_trained_length()``."""
    return loaded.rope.require_trained_length()


def prepare_rows(data: str | Path, tokenizer: Any, seq_len: int) -> PackedRows:
    """Read, tokenize and pack ``data`` (file or folder) at ``seq_len``."""
    docs = document_texts(data)
    tokens = tokenize_documents(docs, tokenizer)
    return pack_documents(tokens, seq_len)


def finetune(
    source: str,
    *,
    rope: Callable[[Any], Any],
    data: str | Path,
    out_dir: str | Path,
    settings: FinetuneSettings,
    resume: bool = False,
    device: str | None = None,
    evaluate: bool = True,
    eval_data: str | Path | None = None,
    eval_windows: int = 4,
    export: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``ropekit finetune`` job; returns a summary dict (also written to out_dir/training.json).

    ``rope`` maps the model's trained RoPE (a RopeConfig) to the extended one to train with, e.g.
    ``lambda base: base.with_method("yarn", factor=4.0, max_position=4 * base.original_max_position)``.
    Evaluation (perplexity at the trained length and at seq_len, on ``eval_data`` or else ``data``) and
    export run on rank 0.
    """
    ctx = init_distributed(device)
    try:
        summary = _finetune_in_group(ctx, source, rope=rope, data=data, out_dir=out_dir, settings=settings,
                                     resume=resume, evaluate=evaluate, eval_data=eval_data,
                                     eval_windows=eval_windows, export=export, progress=progress)
    except BaseException:
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)
    return summary


def _finetune_in_group(ctx: DistContext, source: str, *, rope, data, out_dir, settings: FinetuneSettings,
                       resume: bool, evaluate: bool, eval_data, eval_windows: int, export: bool,
                       progress: bool) -> dict[str, Any]:
    from ropekit.hf import apply_rope, export_model, load_model

    out_dir = Path(out_dir)
    torch.manual_seed(settings.seed)
    docs = document_texts(data)  # bad data fails before the model loads
    loaded = load_model(source, device=str(ctx.device), dtype=torch.float32)
    trained = trained_length(loaded)
    if settings.seq_len < trained:
        raise ValueError(f"seq_len: {settings.seq_len} is smaller than the model's trained length {trained}; "
                         f"fine-tuning for a longer context needs --seq-len >= {trained}")
    cfg = rope(loaded.rope)
    tokens = tokenize_documents(docs, loaded.tokenizer)
    # PoSE: windows of consecutive text (their ids are drawn per step); otherwise packed rows of seq_len.
    rows = pose_windows(tokens, settings.window) if settings.pose else pack_documents(tokens, settings.seq_len)
    model = loaded.model
    patch = apply_rope(model, cfg)
    if cfg.length_dependent:
        patch.fix_length(settings.seq_len)  # one scale for every packed row: the training length's
    if settings.lora:
        model = add_lora(model, settings)
    fingerprint = run_fingerprint(settings, cfg, model_identity(loaded.model, str(source)), rows.fingerprint(),
                                  ctx.world_size)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    result = train(model, rows, settings, out_dir=out_dir, fingerprint=fingerprint, resume=resume, ctx=ctx,
                   progress=progress)
    summary: dict[str, Any] = {"source": str(source), "rope": cfg.to_dict(), "settings": settings.fingerprint(),
                               "steps": settings.steps, "world_size": ctx.world_size, "rows": len(rows),
                               "rows_tokens": rows.seq_len,
                               "history": result.history, "resumed_from_step": result.start_step,
                               "warnings": result.warnings}
    model = merge_lora(model)
    patch.remove()  # evaluation applies the RoPE itself; export needs the plain model
    if ctx.is_main and export:  # before evaluation, so a failing evaluation cannot lose the trained weights
        export_dir = out_dir / EXPORT_DIR
        export_model(model, cfg, export_dir, tokenizer=loaded.tokenizer, overwrite=True)
        record(out_dir, [f"{EXPORT_DIR}/{rel}" for rel in owned_files(export_dir)] + [f"{EXPORT_DIR}/{MANIFEST}"],
               "finetune")
        summary["exported"] = str(export_dir)
    if ctx.is_main and evaluate:
        try:
            summary["evaluation"] = evaluate_after_training(model, loaded.tokenizer, cfg, eval_data or data,
                                                            [trained, settings.seq_len], eval_windows, progress)
        except ValueError as exc:  # e.g. no evaluation document long enough: say so, keep the run's outputs
            summary["evaluation_error"] = str(exc)
    if ctx.is_main:
        write_own(out_dir, TRAINING_LOG, json.dumps(summary, indent=2, default=str), "finetune")
        place_own(out_dir, TRAINING_PLOT, lambda path: plot_training_curves({f"{cfg.method}": result.history}, path),
                  "finetune")
    ctx.barrier()
    return summary


def evaluate_after_training(model, tokenizer, cfg, data, lengths: list[int], windows: int = 4,
                            progress: bool = True) -> dict[str, Any]:
    """Perplexity of the fine-tuned model under ``cfg`` at each of ``lengths`` (first ``windows`` documents long
    enough), with ``ropekit.evaluation``; returns {"lengths": {length: ppl}, "results": [...]}."""
    from ropekit.evaluation import MethodRun, evaluate_perplexity, load_documents as eval_documents, token_windows

    lengths = sorted(set(lengths))
    by_length = {n: token_windows(eval_documents(data), tokenizer, n, count=windows) for n in lengths}
    results = evaluate_perplexity(model, [MethodRun(f"{cfg.method} (fine-tuned)", cfg)], lengths, by_length,
                                  bucket_size=max(1, min(lengths) // 2), progress=progress)
    return {"lengths": {r.length: r.ppl for r in results}, "results": [r.to_dict() for r in results]}


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "training loss") -> Path:
    """One line per run: loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        if history:
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
