"""Compare's measurements: one method's forward pass per haystack (perplexity and every needle's answer).

``MethodOutcome`` holds what was measured for one method; ``measure_method`` prefills each haystack once and
answers every question from the cached context, judged by the retrieval scorer (``evaluation.scoring``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.cached import answer_all, prefill
from ropekit.evaluation.compare.plan import CompareOptions
from ropekit.evaluation.data import concatenated_tokens, load_documents
from ropekit.evaluation.haystack import Haystack, build_haystack, line_start_mask, qa_tokens, question_ids
from ropekit.evaluation.perplexity import DEFAULT_CHUNK_SIZE, rope_context
from ropekit.evaluation.scoring import is_correct
from ropekit.evaluation.stats import wilson_interval


@dataclass
class MethodOutcome:
    """What was measured for one method.

    Perplexities are exp(mean NLL) of the haystack's real-text tokens: ``ppl_target`` over all N positions (with
    ``ppl_target_ci``, a 95% bucket-bootstrap interval), ``ppl_trained`` over the first L, ``ppl_late`` past L.
    ``queries``: one record per needle question (window, label, expected, answer, correct, distance in tokens
    from the needle to the question).
    """

    label: str
    method: str
    factor: float | None
    rope: dict[str, Any]
    exportable: bool
    ppl_trained: float
    ppl_target: float
    ppl_target_ci: tuple[float, float]
    ppl_late: float
    bucket_ppl: list[float]
    bucket_end: list[int]
    queries: list[dict[str, Any]]
    trained_length: int
    rank: int = 0
    tied_with: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)
    config: RopeConfig | None = None  # the configuration measured (for the export command line)

    @property
    def late_ratio(self) -> float:
        """Late-bucket perplexity over the same method's trained-length perplexity."""
        return self.ppl_late / self.ppl_trained

    @property
    def retrieval_queries(self) -> int:
        return len(self.queries)

    @property
    def retrieval_hits(self) -> int:
        return sum(q["correct"] for q in self.queries)

    @property
    def retrieval_accuracy(self) -> float | None:
        return self.retrieval_hits / self.retrieval_queries if self.queries else None

    @property
    def retrieval_ci(self) -> tuple[float, float]:
        return wilson_interval(self.retrieval_hits, self.retrieval_queries)

    def far(self) -> tuple[int, int]:
        """(hits, queries) of the needles farther than the trained length from their question."""
        far = [q for q in self.queries if q["distance"] >= self.trained_length]
        return sum(q["correct"] for q in far), len(far)

    def to_dict(self) -> dict[str, Any]:
        far_hits, far_n = self.far()
        return {"rank": self.rank, "label": self.label, "method": self.method, "factor": self.factor,
                "exportable": self.exportable, "ppl_trained": self.ppl_trained, "ppl_target": self.ppl_target,
                "ppl_target_ci": list(self.ppl_target_ci), "ppl_late": self.ppl_late, "late_ratio": self.late_ratio,
                "retrieval_accuracy": self.retrieval_accuracy, "retrieval_queries": self.retrieval_queries,
                "retrieval_hits": self.retrieval_hits, "retrieval_ci": list(self.retrieval_ci),
                "retrieval_far_hits": far_hits, "retrieval_far_queries": far_n,
                "retrieval_far_ci": list(wilson_interval(far_hits, far_n)),
                "tied_with": self.tied_with, "notes": self.notes, "timing_s": self.timing,
                "bucket_ppl": self.bucket_ppl, "bucket_end": self.bucket_end, "rope": self.rope,
                "queries": self.queries}



def build_haystacks(tokenizer, target_length: int, options: CompareOptions) -> list[Haystack]:
    """``options.windows`` haystacks, each from its own stretch of the text, sized so that a question and its
    answer still end within ``target_length`` positions."""
    context = target_length - qa_tokens(tokenizer, 1)
    if context < 4 * options.needles:
        raise ValueError(f"target length: {target_length} tokens is too short for {options.needles} needles")
    documents = load_documents(options.data)
    text = concatenated_tokens(documents, tokenizer, context * options.windows)
    out = []
    for w in range(options.windows):
        piece = text[w * context:(w + 1) * context]
        out.append(build_haystack(tokenizer, piece, context, options.needles, seed=options.seed + w,
                                  line_starts=line_start_mask(tokenizer, piece)))
    return out



@dataclass
class _Measured:
    """One method's raw measurements: (windows, context - 1) NLL and the answered queries."""

    nll: torch.Tensor
    queries: list[dict[str, Any]]
    timing: dict[str, float]



def measure_method(model, tokenizer, rope: RopeConfig, haystacks: Sequence[Haystack], target_length: int, *,
                   chunk_size: int = DEFAULT_CHUNK_SIZE, label: str = "", progress: bool = True) -> _Measured:
    """Prefill each haystack once under ``rope`` (its scale fixed at ``target_length`` when it depends on the
    length), keep the per-token NLL, and answer every needle's question from the cached context (all questions
    decoded together: ``cached.answer_all``)."""
    rows, queries = [], []
    forward_s = queries_s = 0.0
    with rope_context(model, rope) as patch:
        if rope.length_dependent:
            patch.fix_length(target_length)
        for w, hay in enumerate(haystacks):
            t0 = time.perf_counter()
            context = prefill(model, hay.input_ids, chunk_size=chunk_size,
                              progress=f"{label} @ {target_length}" if progress else None)
            t1 = time.perf_counter()
            rows.append(context.nll)
            answers = answer_all(model, tokenizer, context, [question_ids(tokenizer, n) for n in hay.needles],
                                 expected=[n.value for n in hay.needles])
            for needle, text in zip(hay.needles, answers):
                queries.append({"window": w, "label": needle.label, "expected": needle.value, "answer": text,
                                "correct": is_correct(text, needle.value), "depth": needle.depth,
                                "distance": needle.distance(hay.length)})
            forward_s += t1 - t0
            queries_s += time.perf_counter() - t1
            del context
    return _Measured(torch.stack(rows), queries, {"forward": round(forward_s, 1), "queries": round(queries_s, 1)})



def _masked_ppl(nll: torch.Tensor, mask: torch.Tensor) -> float:
    return math.exp(float(nll.double()[mask].mean()))


def _bucket_ppl(nll: torch.Tensor, mask: torch.Tensor, bucket_size: int) -> tuple[list[float], list[int]]:
    index = torch.div(torch.arange(1, nll.shape[1] + 1), bucket_size, rounding_mode="floor")
    out, ends = [], []
    for b in range(int(index.max()) + 1):
        cell = mask & (index == b)[None]
        if cell.any():
            out.append(_masked_ppl(nll, cell))
            ends.append(min((b + 1) * bucket_size, nll.shape[1] + 1))
    return out, ends
