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
perplexities) adds ``guard_weight`` x the excess log-ratio to the score.

The short-context guard. The attention factor (the cos/sin scale) is the one thing that also reaches sequences
of at most L tokens: transformers' longrope applies it at every length. ``short_nll(attention)`` measures the
text NLL of the same positions below L in a forward of only the first L tokens under the candidate's config (short
factors all 1, so it depends on the attention alone): one L-token forward per distinct attention value, cached;
1.0 on a plain-RoPE model is the reference itself. With ``short_guard`` (``--search-attention``) a ratio
exp(short_nll - reference) beyond ``short_tolerance`` adds ``guard_weight`` x the excess log-ratio to the score;
without it the score is unchanged and the search reports the fixed attention's ratio once.
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
    """One candidate's measurement (NLL in nats per token). ``penalty`` is the whole guard penalty (the
    in-sequence guard plus ``short_penalty``): score = answer_nll + text_weight * text_nll + penalty."""

    score: float
    answer_nll: float
    text_nll: float
    early_nll: float | None  # None: no text below the trained length (the guard is off)
    guard_ratio: float | None
    penalty: float
    seconds: float
    short_nll: float | None = None  # text NLL below L in an L-token forward (None: not measured)
    short_ratio: float | None = None  # exp(short_nll - reference)
    short_penalty: float = 0.0  # the short-context guard's part of ``penalty``

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
        short_guard: score the short-context ratio of each candidate's attention factor (``--search-attention``);
            needs scored text below L (``guarded``).
        short_tolerance: the short-context perplexity ratio allowed before the short guard penalises.
    """

    def __init__(self, model, tokenizer, base_cfg: RopeConfig, target_length: int, *,
                 documents: Iterable[Document] | None = None, needles: int = 32, seed: int = 0,
                 tolerance: float = 0.05, guard_weight: float = 10.0, text_weight: float = 1.0,
                 short_guard: bool = False, short_tolerance: float = 0.01,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, progress: bool = False) -> None:
        self.model = model
        self.base_cfg = base_cfg
        self.trained = base_cfg.require_trained_length()
        self.target_length = int(target_length)
        if self.target_length <= self.trained:
            raise ValueError(f"target_length: must be > the trained length {self.trained}, got {target_length}")
        # NaN would switch a guard off (every comparison with it is false) and be saved in the search state.
        for name, value in (("tolerance", tolerance), ("short_tolerance", short_tolerance),
                            ("text_weight", text_weight), ("guard_weight", guard_weight)):
            if not 0 <= value < math.inf:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value}")
        self.tolerance = float(tolerance)
        self.short_guard = bool(short_guard)
        self.short_tolerance = float(short_tolerance)
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
        if self.short_guard and not self.guarded:
            raise ValueError(f"search_attention: the haystack has no scored text in its first {self.trained} tokens "
                             f"(the trained length), so the short-context guard cannot be measured; use fewer "
                             f"needles, or keep the attention factor fixed")
        self.needle_records = [{"label": nd.label, "value": nd.value, "depth": nd.depth,
                                "distance": nd.distance(context)} for nd in haystack.needles]
        self.reference_nll: float | None = None
        # attention_key(attention) -> short-context NLL; run.py refills it from a resumed search's cache.
        self.short_cache: dict[str, float] = {}

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def describe(self) -> dict[str, Any]:
        return {"length": self.length, "trained_length": self.trained, "needles": len(self.needle_records),
                "answer_tokens": int(self.answer_mask.sum()), "text_tokens": int(self.text_mask.sum()),
                "documents": self.documents, "tolerance": self.tolerance, "guard_weight": self.guard_weight,
                "text_weight": self.text_weight, "guarded": self.guarded,
                "reference_early_nll": self.reference_nll if self.guarded else None,
                "short_guard": self.short_guard, "short_tolerance": self.short_tolerance if self.short_guard else None,
                "short_forwards": self.short_forwards}

    @property
    def reference_is_attention_one(self) -> bool:
        """The reference (the model as it is) is the longrope short rotation at attention 1.0: the model uses
        plain RoPE (tests/test_search.py checks the numbers agree)."""
        return not self.base_cfg.is_scaled

    @property
    def short_forwards(self) -> int:
        """L-token forwards the short-context NLLs measured so far took (over the whole search: the values
        refilled from a resumed search's cache count too; 1.0 on a plain model took none)."""
        free = attention_key(1.0) if self.reference_is_attention_one else None
        return sum(1 for key in self.short_cache if key != free)

    def measure_reference(self) -> float:
        """The unscaled model's mean text NLL over the positions below L (one forward of L tokens)."""
        nll = token_nll(self.model, self.input_ids[None, : self.trained], chunk_size=self.chunk_size,
                        progress="reference" if self.progress else None)[0]
        mask = self.early_mask[: self.trained - 1]
        self.reference_nll = float(nll[mask].double().mean()) if self.guarded else 0.0
        return self.reference_nll

    def measure_short(self, attention_factor: float, long_factor: Sequence[float] | None = None) -> float:
        """Mean text NLL of the positions below L (``measure_reference``'s tokens) in a forward of the first L
        tokens under the longrope config with ``attention_factor``: always one L-token forward, no cache.
        ``long_factor`` (default all 1) only completes the config: L tokens use the short factors."""
        if not self.guarded:
            raise ValueError("short-context NLL: the haystack has no scored text below the trained length")
        pairs = self.base_cfg.rotary_dim // 2
        cfg = longrope_config(self.base_cfg, self.target_length, (1.0,) * pairs if long_factor is None
                              else long_factor, attention_factor)
        with rope_context(self.model, cfg):
            nll = token_nll(self.model, self.input_ids[None, : self.trained], chunk_size=self.chunk_size,
                            progress="short context" if self.progress else None)[0]
        return float(nll[self.early_mask[: self.trained - 1]].double().mean())

    def short_nll(self, attention_factor: float, long_factor: Sequence[float] | None = None) -> float | None:
        """``measure_short``, once per attention value (None when there is no text below L to measure)."""
        if not self.guarded:
            return None
        if self.reference_nll is None:
            self.measure_reference()
        key = attention_key(attention_factor)
        if key not in self.short_cache:
            if key == attention_key(1.0) and self.reference_is_attention_one:
                self.short_cache[key] = float(self.reference_nll)
            else:
                self.short_cache[key] = self.measure_short(attention_factor, long_factor)
        return self.short_cache[key]

    def evaluate(self, long_factor: Sequence[float], attention_factor: float) -> Fitness:
        """Score ``long_factor`` (rotary_dim/2 factors) with ``attention_factor``: one forward of the haystack
        (with ``short_guard``, plus one L-token forward the first time this attention value is seen)."""
        if self.reference_nll is None:
            self.measure_reference()
        cfg = longrope_config(self.base_cfg, self.target_length, long_factor, attention_factor)
        started = time.perf_counter()
        with rope_context(self.model, cfg):
            nll = token_nll(self.model, self.input_ids[None], chunk_size=self.chunk_size,
                            progress="candidate" if self.progress else None)[0].double()
        seconds = time.perf_counter() - started
        short = self.short_nll(attention_factor, long_factor) if self.short_guard else None
        return self.score(nll, seconds, short_nll=short)

    def score(self, nll: torch.Tensor, seconds: float = 0.0, *, short_nll: float | None = None) -> Fitness:
        """The ``Fitness`` of per-token NLL (n - 1,) of the haystack and, optionally, the short-context NLL of
        the candidate's attention (``short_nll``; penalised only with ``short_guard``)."""
        answer = float(nll[self.answer_mask].mean())
        text = float(nll[self.text_mask].mean())
        if not self.guarded:
            return Fitness(score=answer + self.text_weight * text, answer_nll=answer, text_nll=text, early_nll=None,
                           guard_ratio=None, penalty=0.0, seconds=seconds)
        reference = float(self.reference_nll)
        early = float(nll[self.early_mask].mean())
        excess = (early - reference) - math.log1p(self.tolerance)
        penalty = self.guard_weight * max(0.0, excess)
        short_ratio, short_penalty = None, 0.0
        if short_nll is not None:
            short_ratio = math.exp(short_nll - reference)
            if self.short_guard:
                short_excess = (short_nll - reference) - math.log1p(self.short_tolerance)
                short_penalty = self.guard_weight * max(0.0, short_excess)
        # penalty + 0.0 is penalty exactly: without the short guard the score is bit for bit the old one.
        penalty = penalty + short_penalty
        return Fitness(score=answer + self.text_weight * text + penalty, answer_nll=answer, text_nll=text,
                       early_nll=early, guard_ratio=math.exp(early - reference), penalty=penalty,
                       seconds=seconds, short_nll=short_nll, short_ratio=short_ratio, short_penalty=short_penalty)


def attention_key(attention_factor: float) -> str:
    """The short-context cache key of an attention value: the search cache's rounding (``factors_key``), so a
    value read back from a resumed search's cache key finds its entry."""
    return f"{float(attention_factor):.9g}"
