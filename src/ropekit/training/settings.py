"""``FinetuneSettings``: the hyper-parameters of a fine-tuning run, checked, and the part of them a checkpoint
fingerprints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from ropekit.training.distributed import SHARD_MODES, STRATEGIES

# Settings that do not change the numbers a run produces, so a resumed run may change them.
# Learning rate after warm-up: constant (the papers' fine-tuning) or cosine down to 10% (pretraining).
DECAYS = ("constant", "cosine")
NOT_FINGERPRINTED = ("steps", "checkpoint_every", "keep_checkpoints", "gradient_checkpointing")


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
