"""Passkey retrieval (Mohtashami & Jaggi, arXiv 2305.16300) and the machinery needle-in-a-haystack shares.

A prompt of exactly ``length`` tokens: an instruction, filler sentences, the key sentence at ``depth`` (0 = right
after the instruction, 1 = just before the question), more filler, then the question. The model answers
greedily; a trial is correct when the first number in its answer is the key (``evaluation.scoring``).
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from ropekit.config import RopeConfig
from ropekit.evaluation.data import plain_ids, special_prefix_ids
from ropekit.evaluation.scoring import first_number, is_correct  # noqa: F401 - the scorer; re-exported

INSTRUCTION = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
               "I will quiz you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_SENTENCE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
ANSWER_TOKENS = 8


@dataclass(frozen=True)
class RetrievalPrompt:
    """One retrieval trial.

    Attributes:
        input_ids: (n,) long prompt tokens, n <= the requested length.
        answer: the string the answer must contain (the key).
        depth: the requested depth in [0, 1].
        needle_start: token index where the needle (key sentence) starts.
        needle_end: token index one past its end.
        context_start, context_end: the span of filler/haystack the needle was placed in.
    """

    input_ids: torch.Tensor
    answer: str
    depth: float
    needle_start: int
    needle_end: int
    context_start: int
    context_end: int

    @property
    def actual_depth(self) -> float:
        """Where the needle sits within the filler, as a fraction of the filler's tokens."""
        span = (self.context_end - self.context_start) - (self.needle_end - self.needle_start)
        return 0.0 if span <= 0 else (self.needle_start - self.context_start) / span


def check_depth(depth: float) -> float:
    if not 0.0 <= float(depth) <= 1.0:
        raise ValueError(f"depth: must be in [0, 1] (0 = start of the context, 1 = end), got {depth}")
    return float(depth)


def passkey_prompt(tokenizer, length: int, depth: float, key: str, *, instruction: str = INSTRUCTION
                   ) -> RetrievalPrompt:
    """A passkey prompt of exactly ``length`` tokens: the instruction, whole filler sentences, the key sentence
    after ``round(depth * units)`` of them, the rest of the filler (its last sentence cut to fit), the question.
    ``instruction=""`` leaves the instruction out (a model trained on a few hundred tokens has no room for it)."""
    depth = check_depth(depth)
    head = special_prefix_ids(tokenizer) + (plain_ids(tokenizer, instruction) if instruction else [])
    unit = plain_ids(tokenizer, FILLER)
    needle = plain_ids(tokenizer, KEY_SENTENCE.format(key=key))
    question = plain_ids(tokenizer, QUESTION)
    room = length - len(head) - len(needle) - len(question)
    units, spare = divmod(room, len(unit))
    if units < 1:
        need = len(head) + len(needle) + len(question) + len(unit)
        raise ValueError(f"length: a passkey prompt needs at least {need} tokens, got {length}")
    before = round(depth * units)
    ids = head + unit * before + needle + unit * (units - before) + unit[:spare] + question
    start = len(head) + len(unit) * before
    return RetrievalPrompt(torch.tensor(ids, dtype=torch.long), key, depth, start, start + len(needle),
                           len(head), len(ids) - len(question))


def answer_ids(tokenizer, key: str) -> list[int]:
    """The tokens of the expected answer after the question (" 48213"): what a model trained on passkey
    prompts learns to write, and what a teacher-forced score checks."""
    return plain_ids(tokenizer, " " + key)


@torch.inference_mode()
def greedy_answer(model, tokenizer, input_ids: torch.Tensor, max_new_tokens: int = ANSWER_TOKENS) -> str:
    """Greedy continuation of ``input_ids`` (n,) decoded to text (KV cache on, no sampling)."""
    device = next(model.parameters()).device
    ids = input_ids[None].to(device)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                         num_beams=1, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None
                         else tokenizer.eos_token_id, temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


@dataclass
class RetrievalResult:
    """Accuracy of one method over depth x length; ``trials`` holds every prompt's answer."""

    task: str
    method: str
    factor: float | None
    lengths: list[int]
    depths: list[float]
    accuracy: list[list[float]]  # [length index][depth index]
    trials: list[dict[str, Any]] = field(default_factory=list)
    rope: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    @property
    def mean_accuracy(self) -> float:
        cells = [a for row in self.accuracy for a in row]
        return sum(cells) / len(cells)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["mean_accuracy"] = self.mean_accuracy
        return out


PromptBuilder = Callable[[int, float, random.Random], RetrievalPrompt]


def evaluate_retrieval(model, tokenizer, build: PromptBuilder, runs: Sequence, lengths: Sequence[int],
                       depths: Sequence[float], trials: int, *, seed: int = 0, task: str = "passkey",
                       numeric: bool = True, progress: bool = True) -> list[RetrievalResult]:
    """Run ``trials`` prompts per (length, depth) for each run (``perplexity.MethodRun``, rope None = as is).

    Every run sees the same prompts: they are drawn from ``random.Random(seed)`` per (length, depth, trial).
    """
    from ropekit.evaluation.perplexity import rope_context

    if trials < 1:
        raise ValueError(f"trials: must be >= 1, got {trials}")
    depths = [check_depth(d) for d in depths]
    prompts = {(n, d, t): build(n, d, random.Random(f"{seed}-{n}-{d}-{t}"))
               for n in lengths for d in depths for t in range(trials)}
    bar = tqdm(total=len(runs) * len(prompts), desc=task, unit="prompt", disable=not progress)
    results = []
    try:
        for run in runs:
            rope: RopeConfig | None = run.rope
            accuracy, records = [], []
            with rope_context(model, rope):
                for n in lengths:
                    row = []
                    for d in depths:
                        hits = 0
                        for t in range(trials):
                            bar.set_postfix_str(f"{run.label} @ {n} depth {d:.2f}")
                            prompt = prompts[(n, d, t)]
                            text = greedy_answer(model, tokenizer, prompt.input_ids)
                            ok = is_correct(text, prompt.answer, numeric=numeric)
                            hits += ok
                            records.append({"length": n, "prompt_tokens": int(prompt.input_ids.numel()),
                                            "depth": d, "actual_depth": round(prompt.actual_depth, 4),
                                            "expected": prompt.answer, "answer": text, "correct": bool(ok)})
                            bar.update(1)
                        row.append(hits / trials)
                    accuracy.append(row)
            result = RetrievalResult(task, rope.method if rope else "model", rope.factor if rope else None,
                                     list(lengths), depths, accuracy, records, rope.to_dict() if rope else {},
                                     run.label)
            if progress:
                bar.write(f"  {run.label:<14} {task} accuracy {result.mean_accuracy:.0%}")
            results.append(result)
    finally:
        bar.close()
    return results


def passkey_builder(tokenizer) -> PromptBuilder:
    """Prompt builder for ``evaluate_retrieval``: a random 5-digit key per trial."""
    def build(length: int, depth: float, rng: random.Random) -> RetrievalPrompt:
        return passkey_prompt(tokenizer, length, depth, str(rng.randint(10000, 99999)))
    return build


def evaluate_passkey(model, tokenizer, runs: Sequence, lengths: Sequence[int], depths: Sequence[float] = DEFAULT_DEPTHS,
                     trials: int = 1, *, seed: int = 0, progress: bool = True) -> list[RetrievalResult]:
    """Passkey accuracy over depth x length for each run; see ``evaluate_retrieval``."""
    return evaluate_retrieval(model, tokenizer, passkey_builder(tokenizer), runs, lengths, depths, trials,
                              seed=seed, task="passkey", numeric=True, progress=progress)
