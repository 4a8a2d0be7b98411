"""The study's evaluation: perplexity per length and per position bucket, and passkey accuracy, per method."""

from __future__ import annotations

import random
from typing import Any

import torch

from ropekit.config import RopeConfig
from ropekit.study.data import passkey_ids
from ropekit.study.report import _ppl
from ropekit.study.settings import ANSWER_LEN, KEY_DIGITS, METHOD_LABELS, StudySizes


@torch.inference_mode()
def passkey_accuracy(model, cfg: RopeConfig, length: int, samples: int, seed: int) -> float:
    """Share of prompts whose KEY_DIGITS answer bytes are all the model's argmax given the prompt before each
    (teacher forcing: equal to greedy decoding of the key). Depths spread evenly over 0.05..0.95."""
    from ropekit.hf import apply_rope

    rng = random.Random(seed * 7919 + length)
    prompts = []
    for i in range(samples):
        depth = 0.05 + 0.9 * i / max(1, samples - 1)
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        prompts.append(passkey_ids(length, depth, key))
    ids = torch.tensor(prompts, dtype=torch.long)
    correct = 0
    with apply_rope(model, cfg):
        for start in range(0, samples, 4):
            batch = ids[start:start + 4]
            logits = model(input_ids=batch, use_cache=False).logits
            correct += int(keys_correct(logits, batch).sum())
    return correct / samples


def keys_correct(logits: torch.Tensor, input_ids: torch.Tensor, answer_len: int = ANSWER_LEN) -> torch.Tensor:
    """(batch,) bool: the argmax at each of the ``answer_len`` positions before the last ones equals the next
    byte, i.e. the model writes the whole answer " KEY" (logits (batch, seq, vocab), input_ids (batch, seq))."""
    guess = logits[:, -answer_len - 1:-1].argmax(-1)
    return (guess == input_ids[:, -answer_len:]).all(-1)


def evaluate_methods(model, configs: dict[str, RopeConfig], sizes: StudySizes, windows: dict[int, list],
                     stage: str, progress: bool = True) -> dict[str, dict[str, Any]]:
    """Perplexity per length (and per bucket at the longest) plus passkey accuracy per length, per method."""
    from tqdm.auto import tqdm

    from ropekit.evaluation import MethodRun, evaluate_perplexity

    lengths = sizes.eval_lengths
    bucket = max(1, sizes.train_len // 4)
    out: dict[str, dict[str, Any]] = {}
    bar = tqdm(total=len(configs) * len(lengths), desc=f"evaluate ({stage})", disable=not progress,
               dynamic_ncols=True)
    for method, cfg in configs.items():
        # One bar for the whole evaluation (ticks per method and length) instead of one per window.
        results = evaluate_perplexity(model, [MethodRun(f"{METHOD_LABELS[method]} ({stage})", cfg)], lengths,
                                      windows, bucket_size=bucket, progress=False)
        passkey = {}
        for n in lengths:
            passkey[n] = passkey_accuracy(model, cfg, n, sizes.passkey_samples, sizes.seed)
            bar.update(1)
        longest = results[-1]
        out[method] = {"ppl": {r.length: r.ppl for r in results}, "passkey": passkey,
                       "bucket_size": bucket, "bucket_ppl": longest.bucket_ppl, "rope": cfg.to_dict()}
        bar.write(f"  {METHOD_LABELS[method]:<12} {stage:<15} ppl " +
                  " ".join(f"{n}:{_ppl(r.ppl)}" for n, r in zip(lengths, results)) +
                  "  passkey " + " ".join(f"{n}:{v:.0%}" for n, v in passkey.items()))
    bar.close()
    return out
