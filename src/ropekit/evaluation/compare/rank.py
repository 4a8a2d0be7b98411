"""Compare's ranking and recommendation: ties from paired intervals, and "which method and why" from the numbers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ropekit.evaluation import report
from ropekit.evaluation.compare.command_line import export_command
from ropekit.evaluation.compare.measure import MethodOutcome
from ropekit.evaluation.perplexity import DEFAULT_BUCKET_SIZE
from ropekit.evaluation.stats import PairedDifference, intervals_overlap, paired_log_ratio, queries_to_separate
from ropekit.methods import get_method

HEALTHY_RATIO = 1.3  # late buckets within this factor of the trained-length perplexity = "does not break"
SHORT_REGRESSION = 0.05  # > 5% worse than the baseline at the trained length = "hurts short context"



@dataclass
class Recommendation:
    """The recommended exportable configuration and why."""

    text: str
    label: str
    method: str
    factor: float | None
    export_command: str | None

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "label": self.label, "method": self.method, "factor": self.factor,
                "export_command": self.export_command}



def _retrieval_tied(a: MethodOutcome, b: MethodOutcome) -> bool:
    if not a.queries or not b.queries:
        return True
    return intervals_overlap(a.retrieval_ci, b.retrieval_ci)



def rank_outcomes(outcomes: list[MethodOutcome], nll_of: dict[str, torch.Tensor], mask: torch.Tensor, *,
                  bucket_size: int = DEFAULT_BUCKET_SIZE, seed: int = 0) -> dict[tuple[str, str], PairedDifference]:
    """Rank in place and fill ``tied_with``; returns the paired perplexity differences by (label, label).

    The methods whose perplexity at the target is not separated from the lowest one (paired bucket bootstrap)
    come first, ordered by retrieval accuracy, then perplexity; the rest follow by perplexity. Two methods are
    *tied* when neither their perplexity (paired interval includes 0) nor their retrieval (Wilson intervals
    overlap) tells them apart.
    """
    pairs: dict[tuple[str, str], PairedDifference] = {}
    for a in outcomes:
        for b in outcomes:
            if a.label != b.label:
                pairs[(a.label, b.label)] = paired_log_ratio(nll_of[a.label], nll_of[b.label], mask,
                                                             bucket_size=bucket_size, seed=seed)
    best = min(outcomes, key=lambda o: o.ppl_target)
    top = {o.label for o in outcomes if o is best or not pairs[(o.label, best.label)].separated}
    order = sorted(outcomes, key=lambda o: (o.label not in top, -(o.retrieval_accuracy or 0.0)
                                            if o.label in top else 0.0, round(o.ppl_target, 6), o.ppl_trained))
    for i, o in enumerate(order, start=1):
        o.rank = i
        o.tied_with = [b.label for b in order if b is not o and not pairs[(o.label, b.label)].separated
                       and _retrieval_tied(o, b)]
    outcomes.sort(key=lambda o: o.rank)
    return pairs



def _pct(a: float, b: float) -> str:
    return f"{a / b - 1:+.1%}"


def _acc(o: MethodOutcome) -> str:
    lo, hi = o.retrieval_ci
    return f"{o.retrieval_hits}/{o.retrieval_queries} = {o.retrieval_accuracy:.0%} [{lo:.0%}, {hi:.0%}]"


def _ppl(o: MethodOutcome) -> str:
    lo, hi = o.ppl_target_ci
    return f"{report.fmt(o.ppl_target)} [{report.fmt(lo)}, {report.fmt(hi)}]"



def recommend(outcomes: Sequence[MethodOutcome], trained: int, target: int, baseline_label: str, *,
              model_source: str = "demo", twins: dict[str, list[str]] | None = None, windows: int = 1,
              pairs: dict[tuple[str, str], PairedDifference] | None = None,
              buckets_per_window: int = 1, factors_file: str | Path | None = None) -> Recommendation:
    """The recommended exportable configuration and the "which method and why" paragraph, from the numbers.

    ``outcomes`` ranked (``rank_outcomes``); ``twins``: groups of labels measured once (same rotation at the
    target); ``pairs``: the paired perplexity differences, for "how much more data would separate a tie".
    """
    by = {o.label: o for o in outcomes}
    base = by[baseline_label]
    best = outcomes[0]
    twins = twins or {}
    pairs = pairs or {}
    sentences: list[str] = []

    def twin_labels(o: MethodOutcome) -> list[str]:
        return next((group for group in twins.values() if o.label in group), [o.label])

    if best.label == baseline_label or baseline_label in best.tied_with:
        pick = base
        if best.label == baseline_label:
            sentences.append(
                f"Keep the model's own RoPE ({baseline_label}) at {target} tokens: it ranks first (perplexity "
                f"{_ppl(base)}, retrieval {_acc(base)}); no extension method beat it on this text.")
        else:
            sentences.append(
                f"No method is told apart from the model's own RoPE ({baseline_label}) at {target} tokens at this "
                f"sample size: the first-ranked, {best.label}, has perplexity {_ppl(best)} against {_ppl(base)} and "
                f"retrieval {_acc(best)} against {_acc(base)}. Keep the model's own RoPE, or measure more (below).")
    else:
        pick = best
        if not best.exportable:
            exportable_twin = next((by[l] for l in twin_labels(best) if by[l].exportable), None)
            if exportable_twin is not None:
                pick = exportable_twin
                sentences.append(
                    f"{best.label} ranks first, and at exactly {target} tokens it computes the same rotation as "
                    f"{pick.label} (factor {pick.factor:g}), which transformers can load: use {pick.label}.")
            else:
                pick = next((o for o in outcomes if o.exportable and o.label != baseline_label), best)
                sentences.append(
                    f"{best.label} ranks first but cannot be exported for plain transformers; the best exportable "
                    f"method is {pick.label} (rank {pick.rank}).")
        sentences.append(
            f"Use {pick.label}" + (f" (factor {pick.factor:g})" if pick.factor else "") +
            f" to run this model at {target} tokens: perplexity {_ppl(pick)} against {_ppl(base)} without scaling "
            f"({_pct(pick.ppl_target, base.ppl_target)}); retrieval {_acc(pick)} against {_acc(base)} unscaled.")
        far_hits, far_n = pick.far()
        if far_n:
            bh, bn = base.far()
            sentences.append(f"Needles more than {trained} tokens before the question: {far_hits}/{far_n} found "
                             f"(unscaled: {bh}/{bn}).")
        if pick.late_ratio <= HEALTHY_RATIO:
            sentences.append(f"Past the trained length its perplexity stays at {report.fmt(pick.ppl_late)}, "
                             f"{pick.late_ratio:.2f}x its first-{trained}-token perplexity.")
        else:
            sentences.append(f"It still degrades past the trained length ({report.fmt(pick.ppl_late)}, "
                             f"{pick.late_ratio:.2f}x its first-{trained}-token perplexity): expect to fine-tune "
                             f"at {target} tokens.")
        if base.late_ratio > HEALTHY_RATIO:
            sentences.append(f"Without scaling, the tokens past {trained} reach perplexity "
                             f"{report.fmt(base.ppl_late)} ({base.late_ratio:.1f}x).")
        change = pick.ppl_trained / base.ppl_trained - 1
        sentences.append(("It costs short-context quality: " if change > SHORT_REGRESSION else
                          "Short contexts: ") + f"{_pct(pick.ppl_trained, base.ppl_trained)} perplexity on the "
                         f"first {trained} tokens.")
    tied = [by[l] for l in pick.tied_with if l not in twin_labels(pick)]
    if tied:
        details = []
        for o in tied:
            more = []
            diff = pairs.get((o.label, pick.label))
            if diff is not None and diff.buckets_needed:
                contexts = math.ceil(diff.buckets_needed / buckets_per_window)
                more.append(f"~{contexts} contexts the perplexity" if contexts <= 100 else
                            "over 100 contexts the perplexity (a negligible difference)")
            need_q = queries_to_separate(pick.retrieval_accuracy or 0.0, o.retrieval_accuracy or 0.0)
            if need_q is not None:
                more.append(f"~{need_q} queries per method the retrieval")
            details.append(f"{o.label} (perplexity {_pct(o.ppl_target, pick.ppl_target)}, retrieval {_acc(o)}"
                           + (f"; {' and '.join(more)} would separate" if more else "") + ")")
        sentences.append(f"Tied with it at this sample size ({windows} context(s), {pick.retrieval_queries} "
                         f"queries): " + "; ".join(details) + ".")
    command = (export_command(model_source, pick.config, target,
                              factors_file=factors_file if get_method(pick.method).needs_searched_factors else None)
               if pick.exportable and pick.config is not None and pick.label != baseline_label else None)
    if command:
        sentences.append(f"Export: `{command}`.")
    if get_method(pick.method).length_dependent:
        sentences.append("Its rotation depends on the sequence length; ropekit fixes the scale once per sequence "
                         "so that cached keys stay valid while generating.")
    return Recommendation(" ".join(sentences), pick.label, pick.method, pick.factor, command)
