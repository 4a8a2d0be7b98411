"""The study's sizes (``StudySizes``, the ``QUICK`` preset), its methods and their labels, and the passkey
format its rows and prompts share."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ropekit.evaluation.passkey import FILLER, KEY_SENTENCE, QUESTION
from ropekit.training.data import ByteTokenizer

STUDY_METHODS = ("default", "linear", "ntk", "dynamic", "yarn", "longrope")
METHOD_LABELS = {"default": "no scaling", "linear": "linear (PI)", "ntk": "NTK", "dynamic": "dynamic NTK",
                 "yarn": "YaRN", "longrope": "LongRoPE (searched)"}
KEY_DIGITS = 5
BYTES = ByteTokenizer()
# Passkey rows and prompts are ropekit.evaluation.passkey's prompt without its instruction (a model trained on
# 256 bytes has no room for it), followed by the answer " 12345" (1 + KEY_DIGITS bytes; all of it ASCII).
ANSWER_LEN = 1 + KEY_DIGITS
MIN_PROMPT = len(FILLER) + len(KEY_SENTENCE.format(key="0" * KEY_DIGITS)) + len(QUESTION) + ANSWER_LEN


@dataclass(frozen=True)
class StudySizes:
    """Every size of the study (the CLI exposes each as an option)."""

    hidden: int = 128
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    intermediate: int = 384
    rope_base: float = 10000.0
    train_len: int = 256
    factor: int = 8
    pretrain_steps: int = 500
    pretrain_batch: int = 16
    pretrain_lr: float = 2e-3
    finetune_steps: int = 30
    finetune_batch: int = 2
    finetune_lr: float = 3e-4
    finetune_warmup: int = 5
    passkey_share: float = 0.2
    eval_windows: int = 6
    passkey_samples: int = 16
    max_files: int = 600
    seed: int = 0
    pose_window: int = 256  # PoSE run's window in bytes (0: no PoSE run)
    search_budget: int = 256  # forwards of the LongRoPE factor search (method "longrope"); ~20 s here
    search_population: int = 32
    search_needles: int = 1

    def __post_init__(self) -> None:
        for name in ("hidden", "layers", "heads", "kv_heads", "intermediate", "train_len", "factor",
                     "pretrain_steps", "pretrain_batch", "finetune_steps", "finetune_batch", "eval_windows",
                     "passkey_samples", "max_files", "search_population", "search_needles"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("pretrain_lr", "finetune_lr"):  # checked here, not when the training of that phase starts
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if self.hidden % self.heads or (self.hidden // self.heads) % 2:
            raise ValueError(f"hidden: must split into {self.heads} heads of an even size, got {self.hidden}")
        if self.heads % self.kv_heads:
            raise ValueError(f"kv_heads: must divide heads ({self.heads}), got {self.kv_heads}")
        if isinstance(self.search_budget, bool) or not isinstance(self.search_budget, int) or self.search_budget < 2:
            raise ValueError(f"search_budget: must be an integer >= 2 (the guard's reference and one candidate), "
                             f"got {self.search_budget!r}")
        if self.factor < 2:
            raise ValueError(f"factor: must be >= 2 (the study extends the context), got {self.factor}")
        if self.train_len < MIN_PROMPT:
            raise ValueError(f"train_len: must be >= {MIN_PROMPT} bytes to hold a passkey prompt, got {self.train_len}")
        if not 0 <= self.passkey_share < 1:
            raise ValueError(f"passkey_share: must be in [0, 1), got {self.passkey_share}")
        if isinstance(self.pose_window, bool) or not isinstance(self.pose_window, int) or not (
                self.pose_window == 0 or MIN_PROMPT <= self.pose_window < self.long_len):
            raise ValueError(f"pose_window: must be 0 (no PoSE run) or in [{MIN_PROMPT}, {self.long_len}) bytes "
                             f"(a passkey prompt fits, shorter than factor x train_len), got {self.pose_window!r}")

    @property
    def long_len(self) -> int:
        return self.train_len * self.factor

    @property
    def eval_lengths(self) -> list[int]:
        """L, 2L, 4L, ... up to factor * L."""
        out, n = [], self.train_len
        while n <= self.long_len:
            out.append(n)
            n *= 2
        if out[-1] != self.long_len:
            out.append(self.long_len)
        return out


QUICK = StudySizes(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192, train_len=256, factor=4,
                   pretrain_steps=150, pretrain_batch=8, pretrain_lr=3e-3, finetune_steps=6, finetune_batch=1,
                   finetune_lr=5e-4, finetune_warmup=2, eval_windows=2, passkey_samples=6, max_files=120,
                   pose_window=256, search_budget=32, search_population=8, search_needles=1)
