"""The fitness of a candidate: one forward pass at the target length over a haystack with answers.

The context is real text of about N tokens with ``needles`` labelled needles at spread depths, followed by every
question with its answer (``evaluation.haystack.with_answers``); one teacher-forced forward under the
candidate's long factors gives

* ``answer_nll``: mean NLL of the answer tokens (LongRoPE2's "needle-driven perplexity": retrieval at every
  distance up to N, which the easy local tokens of plain perplexity hide);
* ``text_nll``: mean NLL of the real-text tokens of the context (plain perplexity at N, LongRoPE v1's fitness);
* ``early_nll``: the same over the positions below the trained length L.

score = answer_nll + text_weight * text_nll + guard penalty; lower is better.

The guard. A HF-style LongRoPE model switches on the sequence length: sequences of at most L tokens use the
short factors (here all 1: the original rotation), longer ones the long factors at every position, the first L
included. A plain L-token window therefore never sees the long factors, and what the candidate can break is the
model's short-range quality inside a long sequence. The guard measures exactly that, for free, in the same
forward: the text perplexity of the positions below L under the candidate against the unscaled model's on the
same tokens (one forward of the first L tokens, done once). A regression beyond ``tolerance`` (a ratio of
perplexities) adds ``guard_weight`` x the excess log-ratio to the score. (The attention factor, fixed for the
whole search, is the one thing that also reaches sequences of at most L tokens; the search reports it.)
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Sequence

import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.data import Document, load_documents, tokenize
from ropekit.evaluation.haystack import build_haystack, line_start_mask, qa_tokens, with_answers
from ropekit.evaluation.perplexity import DEFAULT_CHUNK_SIZE, rope_context, token_nll


# The needles the shipped search was run with (colour + object labels); kept so that its score reproduces.
SEARCH_STYLE = "objects"


@dataclass
class Fitness:
    """One candidate's measurement (NLL in nats per token)."""

    score: float
    answer_nll: float
    text_nll: float
    early_nll: float | None  # None: no text below the trained length (the guard is off)
    guard_ratio: float | None
    penalty: float
    seconds: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def search_text(tokenizer, length: int, documents: Iterable[Document] | None = None, separator: str = "\n\n",
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """(ids, line_starts, names): ``length`` tokens of the documents joined by ``separator``, the line-start
    mask, and the names of the documents used (so an evaluation can leave them out)."""
    docs = load_documents(None) if documents is None else documents
    pieces: list[str] = []
    names: list[str] = []
    chars = 0
    ids = torch.empty(0, dtype=torch.long)
    for doc in docs:
        pieces.append(doc.text)
        names.append(doc.name)
        chars += len(doc.text)
        if chars >= length:  # a token is at least one character: tokenize only once there may be enough
            ids = tokenize(tokenizer, separator.join(pieces))
            if ids.numel() >= length:
                break
    if ids.numel() < length:
        ids = tokenize(tokenizer, separator.join(pieces)) if pieces else ids
    if ids.numel() < length:
        raise ValueError(f"data: the text is too short: {length} tokens needed, it has {ids.numel()}")
    ids = ids[:length].clone()
    return ids, line_start_mask(tokenizer, ids), names


def longrope_config(base_cfg: RopeConfig, target_length: int, long_factor: Sequence[float],
                    attention_factor: float) -> RopeConfig:
    """``base_cfg`` extended with LongRoPE: ``long_factor`` beyond the trained length, the original rotation
    (short factors all 1) up to it."""
    pairs = base_cfg.rotary_dim // 2
    return base_cfg.extend("longrope", target_length=target_length, long_factor=tuple(float(x) for x in long_factor),
                           short_factor=(1.0,) * pairs, attention_factor=float(attention_factor))


class NeedleFitness:
    """Scores LongRoPE long factors on one answered haystack of about ``target_length`` tokens.

    Args:
        model, tokenizer: a transformers causal LM ropekit can patch, and its tokenizer.
        base_cfg: the model's RoPE (``LoadedModel.rope``); its trained length L is where the factors switch.
        target_length: N (> L). The haystack is sized so that context + questions + answers <= N.
        documents: the real text (default: the standard library's sources, largest first).
        needles, seed: how many needles, and the seed of their labels, values and question order.
        tolerance, guard_weight, text_weight: see the module docstring.
    """

    def __init__(self, model, tokenizer, base_cfg: RopeConfig, target_length: int, *,
                 documents: Iterable[Document] | None = None, needles: int = 32, seed: int = 0,
                 tolerance: float = 0.05, guard_weight: float = 10.0, text_weight: float = 1.0,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False) -> None:
        self.model = model
        self.base_cfg = base_cfg
        self.trained = base_cfg.require_trained_length()
        self.target_length = int(target_length)
        if self.target_length <= self.trained:
            raise ValueError(f"target_length: must be > the trained length {self.trained}, got {target_length}")
        if tolerance < 0:
            raise ValueError(f"tolerance: must be >= 0, got {tolerance}")
        self.tolerance = float(tolerance)
        self.guard_weight = float(guard_weight)
        self.text_weight = float(text_weight)
        self.chunk_size = int(chunk_size)
        self.progress = progress
        context = self.target_length - qa_tokens(tokenizer, needles, SEARCH_STYLE)
        if context <= self.trained:
            raise ValueError(f"target_length: {target_length} leaves {context} tokens of context after "
                             f"{needles} questions, not more than the trained length {self.trained}; use fewer "
                             f"needles or a longer target")
        text, starts, self.documents = search_text(tokenizer, context, documents)
        haystack = build_haystack(tokenizer, text, context, needles, seed=seed, line_starts=starts, style=SEARCH_STYLE)
        answered = with_answers(tokenizer, haystack, seed=seed)
        self.input_ids = answered.input_ids  # (n,) with n <= N
        n = self.input_ids.numel()
        self.answer_mask = answered.nll_mask()  # (n - 1,)
        scored = torch.zeros(n, dtype=torch.bool)
        scored[:context] = haystack.scored
        self.text_mask = scored[1:]
        self.early_mask = self.text_mask.clone()
        self.early_mask[self.trained - 1:] = False  # entries predicting tokens at positions < L
        # A haystack whose first L tokens hold no scored text (a tiny model's L) cannot be guarded.
        self.guarded = bool(self.early_mask.any())
        self.needle_records = [{"label": nd.label, "value": nd.value, "depth": nd.depth,
                                "distance": nd.distance(context)} for nd in haystack.needles]
        self.reference_nll: float | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def describe(self) -> dict[str, Any]:
        return {"length": self.length, "trained_length": self.trained, "needles": len(self.needle_records),
                "answer_tokens": int(self.answer_mask.sum()), "text_tokens": int(self.text_mask.sum()),
                "documents": self.documents, "tolerance": self.tolerance, "guard_weight": self.guard_weight,
                "text_weight": self.text_weight, "guarded": self.guarded,
                "reference_early_nll": self.reference_nll if self.guarded else None}

    def measure_reference(self) -> float:
        """The unscaled model's mean text NLL over the positions below L (one forward of L tokens)."""
        nll = token_nll(self.model, self.input_ids[None, : self.trained], chunk_size=self.chunk_size,
                        progress="reference" if self.progress else None)[0]
        mask = self.early_mask[: self.trained - 1]
        self.reference_nll = float(nll[mask].double().mean()) if self.guarded else 0.0
        return self.reference_nll

    def evaluate(self, long_factor: Sequence[float], attention_factor: float) -> Fitness:
        """Score ``long_factor`` (rotary_dim/2 factors) with ``attention_factor``: one forward of the haystack."""
        if self.reference_nll is None:
            self.measure_reference()
        cfg = longrope_config(self.base_cfg, self.target_length, long_factor, attention_factor)
        started = time.perf_counter()
        with rope_context(self.model, cfg):
            nll = token_nll(self.model, self.input_ids[None], chunk_size=self.chunk_size,
                            progress="candidate" if self.progress else None)[0].double()
        return self.score(nll, time.perf_counter() - started)

    def score(self, nll: torch.Tensor, seconds: float = 0.0) -> Fitness:
        """The ``Fitness`` of per-token NLL (n - 1,) of the haystack."""
        answer = float(nll[self.answer_mask].mean())
        text = float(nll[self.text_mask].mean())
        if not self.guarded:
            return Fitness(score=answer + self.text_weight * text, answer_nll=answer, text_nll=text, early_nll=None,
                           guard_ratio=None, penalty=0.0, seconds=seconds)
        early = float(nll[self.early_mask].mean())
        excess = (early - float(self.reference_nll)) - math.log1p(self.tolerance)
        penalty = self.guard_weight * max(0.0, excess)
        return Fitness(score=answer + self.text_weight * text + penalty, answer_nll=answer, text_nll=text,
                       early_nll=early, guard_ratio=math.exp(early - float(self.reference_nll)), penalty=penalty,
                       seconds=seconds)
