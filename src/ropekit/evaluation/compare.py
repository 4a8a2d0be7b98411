"""``ropekit compare``: every applicable extension method on one model, measured, ranked, explained.

For a target length N and the model's trained length L (factor s = N / L), each method is applied with
``ropekit.hf.apply_rope`` and measured on the same real-text windows of N tokens (per-bucket perplexity)
and the same passkey prompts. Work is shared where the maths makes it exact:

* the perplexity of the first L tokens (the short-context check) is read off the N-token window for
  methods whose rotation does not depend on the length (causal attention: a prefix's tokens see only the
  prefix); length-dependent methods get a separate L-token window unless their rotation at L is the
  baseline's (dynamic NTK and dynamic YaRN are plain RoPE up to L);
* two methods whose frequencies and attention scale are identical at N tokens (dynamic YaRN at exactly
  N tokens *is* YaRN at factor s) are measured once; the report says so.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ropekit.config import RopeConfig
from ropekit.evaluation import report
from ropekit.evaluation.data import load_documents, token_windows
from ropekit.evaluation.passkey import RetrievalResult, evaluate_passkey
from ropekit.evaluation.perplexity import (
    DEFAULT_BUCKET_SIZE,
    DEFAULT_CHUNK_SIZE,
    MethodRun,
    PerplexityResult,
    summarize_nll,
    window_nll,
)
from ropekit.methods import frequencies, method_names
from ropekit.methods.base_change import suggested_base

HEALTHY_RATIO = 1.3  # late buckets within this factor of the trained-length perplexity = "does not break"
SHORT_REGRESSION = 0.05
TIE = 0.01  # perplexities within 1% are not told apart by one or two windows  # > 5% worse than the baseline at the trained length = "hurts short context"


@dataclass
class CompareOptions:
    """Settings of one comparison (defaults fit the demo model on a 2-core CPU in under 10 minutes).

    Attributes:
        target_length: N, tokens; default twice the trained length.
        data: evaluation text (file, folder, JSON lines) or None for the standard library's sources.
        windows: real-text windows of N tokens per method.
        bucket_size: tokens per perplexity bucket.
        passkey_length: passkey prompt length; default N.
        passkey_depths: depths of the key in [0, 1].
        passkey_trials: prompts per depth (each a different random key).
        methods: restrict to these method names (default: every comparable method of the registry,
            ``ropekit.method_names(comparable=True)``).
        seed: passkey keys are drawn from it.
    """

    target_length: int | None = None
    data: str | Path | None = None
    windows: int = 1
    bucket_size: int = DEFAULT_BUCKET_SIZE
    passkey_length: int | None = None
    passkey_depths: tuple[float, ...] = (0.1,)
    passkey_trials: int = 1
    methods: Sequence[str] | None = None
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress: bool = True


@dataclass
class MethodPlan:
    """One row of the comparison: ``rope`` to apply, or ``skipped`` with the reason."""

    label: str
    method: str
    rope: RopeConfig | None
    skipped: str | None = None


@dataclass
class MethodOutcome:
    """What was measured for one method (perplexities exp(mean NLL) over the named spans)."""

    label: str
    method: str
    factor: float | None
    rope: dict[str, Any]
    ppl_trained: float
    ppl_target: float
    ppl_late: float
    passkey_accuracy: float | None
    rank: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def late_ratio(self) -> float:
        """Late-bucket perplexity over the same method's trained-length perplexity."""
        return self.ppl_late / self.ppl_trained

    def to_dict(self) -> dict[str, Any]:
        return {"label": self.label, "method": self.method, "factor": self.factor, "rank": self.rank,
                "ppl_trained": self.ppl_trained, "ppl_target": self.ppl_target, "ppl_late": self.ppl_late,
                "late_ratio": self.late_ratio, "passkey_accuracy": self.passkey_accuracy, "notes": self.notes,
                "rope": self.rope}


@dataclass
class CompareReport:
    model: str
    trained_length: int
    target_length: int
    factor: float
    outcomes: list[MethodOutcome]
    skipped: list[MethodPlan]
    perplexity: list[PerplexityResult]
    passkey: list[RetrievalResult]
    recommendation: str
    settings: dict[str, Any]
    wall_time_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "trained_length": self.trained_length, "target_length": self.target_length,
                "factor": self.factor, "settings": self.settings, "wall_time_s": self.wall_time_s,
                "ranking": [o.to_dict() for o in self.outcomes],
                "skipped": [{"method": p.method, "reason": p.skipped} for p in self.skipped],
                "recommendation": self.recommendation,
                "results": [r.to_dict() for r in self.perplexity],
                "passkey": [r.to_dict() for r in self.passkey]}


# ---------------------------------------------------------------------- planning
def plan_methods(base: RopeConfig, target_length: int, methods: Sequence[str] | None = None) -> list[MethodPlan]:
    """The comparison's rows for a model whose RoPE is ``base``, extended to ``target_length`` tokens.

    The baseline is the model's own RoPE ("default" for an unscaled model). Every other method runs at
    factor N / L; ``base`` uses ``suggested_base(N)``; ``longrope`` needs per-pair factors, so it runs only
    when the model's config has them. Unknown names in ``methods`` raise ValueError.
    """
    trained = base.require_trained_length()
    if target_length <= trained:
        raise ValueError(f"target length: must be longer than the trained length {trained}, got {target_length}")
    comparable = method_names(comparable=True)
    names = list(comparable if methods is None else methods)
    unknown = [m for m in names if m not in comparable]
    if unknown:
        raise ValueError(f"methods: unknown {', '.join(unknown)}; accepted: {', '.join(comparable)}")
    factor = target_length / trained
    plans: list[MethodPlan] = []
    baseline_label = "default" if base.method == "default" else f"{base.method} (model's own)"
    plans.append(MethodPlan(baseline_label, base.method, base))
    for name in names:
        if name == base.method and name != "longrope":
            continue  # the baseline already is this method
        if name == "default":
            plans.append(MethodPlan("default", "default", base.with_method("default")))
        elif name == "longrope":
            if base.short_factor is None or base.long_factor is None:
                plans.append(MethodPlan("longrope", "longrope", None,
                                        skipped="needs per-pair factors (short_factor/long_factor) that this "
                                                "model's config does not have; search them or pass them to "
                                                "`ropekit eval ppl --method longrope --factors-file`"))
            elif base.method == "longrope":
                continue  # the model's own LongRoPE is the baseline
        elif name == "base":
            new_base = suggested_base(target_length)
            if new_base <= base.base:
                plans.append(MethodPlan("base", "base", None,
                                        skipped=f"the suggested base for {target_length} tokens ({new_base:.3g}, "
                                                f"arXiv 2405.14591) is not above the model's ({base.base:.3g})"))
            else:
                plans.append(MethodPlan(f"base {new_base:.3g}", "base",
                                        base.extend("base", new_base=round(new_base))))
        else:
            plans.append(MethodPlan(name, name, base.extend(name, factor)))
    return plans


def rotation_key(rope: RopeConfig, seq_len: int) -> tuple:
    """What the model computes with ``rope`` for a sequence of ``seq_len`` tokens (equal keys = same numbers)."""
    f = frequencies(rope, seq_len)
    original = None if f.original_inv_freq64 is None else tuple(f.original_inv_freq64.tolist())
    return (tuple(f.inv_freq64.tolist()), f.attention_scale, f.unscaled_until, original, f.layout, f.rotary_dim)


# ---------------------------------------------------------------------- the run
def run_compare(loaded, options: CompareOptions | None = None, out_dir: str | Path | None = None, *,
                overwrite: bool = False) -> CompareReport:
    """Measure every applicable method on ``loaded`` (a ``ropekit.hf.LoadedModel``); write the report
    folder to ``out_dir`` when given (see ``write_compare_report``; checked before any work). Returns the
    ``CompareReport``."""
    from ropekit.output import check_output_dir

    options = options or CompareOptions()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite)
    start = time.perf_counter()
    base = loaded.rope
    trained = base.require_trained_length()
    target = options.target_length or 2 * trained
    plans = plan_methods(base, target, options.methods)
    runnable = [p for p in plans if p.rope is not None]
    skipped = [p for p in plans if p.rope is None]
    model, tokenizer = loaded.model, loaded.tokenizer
    say = tqdm.write if options.progress else (lambda *_: None)
    say(f"compare: {loaded.source} trained at {trained} tokens -> target {target} (factor {target / trained:g}); "
        f"{len(runnable)} methods, {options.windows} window(s) of {target} tokens, "
        f"{len(options.passkey_depths) * options.passkey_trials} passkey prompt(s) each")
    for p in skipped:
        say(f"  skipping {p.method}: {p.skipped}")

    windows = token_windows(load_documents(options.data), tokenizer, target, options.windows)
    if len(windows) < options.windows:
        say(f"  note: only {len(windows)} document(s) have {target} tokens; using them")

    # --- perplexity at the target length (shared when two methods compute the same rotation)
    measured: dict[tuple, tuple[str, torch.Tensor]] = {}
    nll_by_label: dict[str, torch.Tensor] = {}
    notes: dict[str, list[str]] = {p.label: [] for p in runnable}
    bar = tqdm(total=len(runnable), desc="perplexity", unit="method", disable=not options.progress)
    for plan in runnable:
        bar.set_postfix_str(plan.label)
        key = rotation_key(plan.rope, target)
        if key in measured:
            twin, nll = measured[key]
            notes[plan.label].append(f"same rotation as {twin} at {target} tokens: measured once")
        else:
            nll = window_nll(model, windows, plan.rope, chunk_size=options.chunk_size,
                             desc=f"{plan.label} @ {target}" if options.progress else None)
            measured[key] = (plan.label, nll)
        nll_by_label[plan.label] = nll
        bar.update(1)
        say(f"  {plan.label:<16} ppl @ {target}: {math.exp(float(nll.double().mean())):.3f}")
    bar.close()

    # --- perplexity at the trained length
    baseline = runnable[0]
    base_key_at_trained = rotation_key(baseline.rope, trained)
    ppl_trained: dict[str, float] = {}
    short_windows = None
    for plan in runnable:
        if not plan.rope.length_dependent:
            nll = nll_by_label[plan.label][:, : trained - 1]
        elif rotation_key(plan.rope, trained) == base_key_at_trained and not baseline.rope.length_dependent:
            nll = nll_by_label[baseline.label][:, : trained - 1]
            notes[plan.label].append(f"same rotation as {baseline.label} up to {trained} tokens")
        else:
            if short_windows is None:
                short_windows = [type(w)(w.name, w.input_ids[:trained].clone()) for w in windows]
            nll = window_nll(model, short_windows, plan.rope, chunk_size=options.chunk_size,
                             desc=f"{plan.label} @ {trained}" if options.progress else None)
            notes[plan.label].append(f"trained-length perplexity from a separate {trained}-token window")
        ppl_trained[plan.label] = math.exp(float(nll.double().mean()))

    # --- passkey (prompts are exactly passkey_length tokens: methods with the same rotation there share a run)
    passkey_length = options.passkey_length or target
    passkey: list[RetrievalResult] = []
    if options.passkey_trials > 0 and options.passkey_depths:
        unique: dict[tuple, MethodPlan] = {}
        twin_of: dict[str, str] = {}
        for plan in runnable:
            key = rotation_key(plan.rope, passkey_length)
            if key in unique:
                twin_of[plan.label] = unique[key].label
                notes[plan.label].append(f"same rotation as {unique[key].label} for the {passkey_length}-token "
                                         f"passkey prompts: passkey measured once")
            else:
                unique[key] = plan
        measured_pk = {r.label: r for r in evaluate_passkey(
            model, tokenizer, [MethodRun(p.label, p.rope) for p in unique.values()], [passkey_length],
            options.passkey_depths, options.passkey_trials, seed=options.seed, progress=options.progress)}
        for plan in runnable:
            if plan.label in measured_pk:
                passkey.append(measured_pk[plan.label])
            else:
                twin = measured_pk[twin_of[plan.label]]
                passkey.append(dataclasses.replace(twin, method=plan.method, factor=plan.rope.factor,
                                                   rope=plan.rope.to_dict(), label=plan.label))
    passkey_by_label = {r.label: r for r in passkey}

    # --- summaries and ranking
    perplexity: list[PerplexityResult] = []
    outcomes: list[MethodOutcome] = []
    for plan in runnable:
        nll = nll_by_label[plan.label]
        ppl, bucket_ppl, counts = summarize_nll(nll, options.bucket_size)
        perplexity.append(PerplexityResult(
            method=plan.method, factor=plan.rope.factor, length=target, ppl=ppl, bucket_size=options.bucket_size,
            bucket_ppl=bucket_ppl, bucket_tokens=counts, windows=[w.name for w in windows],
            rope=plan.rope.to_dict(), label=plan.label))
        late = math.exp(float(nll[:, trained - 1:].double().mean()))
        pk = passkey_by_label.get(plan.label)
        outcomes.append(MethodOutcome(plan.label, plan.method, plan.rope.factor, plan.rope.to_dict(),
                                      ppl_trained[plan.label], ppl, late, pk.mean_accuracy if pk else None,
                                      notes=notes[plan.label]))
    rank_outcomes(outcomes)
    settings = {"windows": [w.name for w in windows], "window_count": len(windows), "bucket_size": options.bucket_size,
                "passkey_length": passkey_length, "passkey_depths": list(options.passkey_depths),
                "passkey_trials": options.passkey_trials, "seed": options.seed,
                "data": str(options.data) if options.data else "stdlib",
                "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    result = CompareReport(model=loaded.source, trained_length=trained, target_length=target, factor=target / trained,
                           outcomes=outcomes, skipped=skipped, perplexity=perplexity, passkey=passkey,
                           recommendation=recommend(outcomes, trained, target, baseline.label), settings=settings)
    result.wall_time_s = round(time.perf_counter() - start, 1)
    if out_dir is not None:
        write_compare_report(result, out_dir, overwrite=overwrite)
    return result


def rank_outcomes(outcomes: list[MethodOutcome]) -> None:
    """Rank in place: methods within ``TIE`` (1%) of the lowest perplexity at the target length first, ordered
    among themselves by passkey accuracy, then perplexity; the rest by perplexity. Sorts ``outcomes``."""
    lowest = min(o.ppl_target for o in outcomes)
    order = sorted(outcomes, key=lambda o: (o.ppl_target > lowest * (1 + TIE), -(o.passkey_accuracy or 0.0),
                                            round(o.ppl_target, 6), o.ppl_trained))
    for i, o in enumerate(order, start=1):
        o.rank = i
    outcomes.sort(key=lambda o: o.rank)


def _pct(a: float, b: float) -> str:
    change = a / b - 1
    return f"{change:+.1%}"


def recommend(outcomes: Sequence[MethodOutcome], trained: int, target: int, baseline_label: str) -> str:
    """The "which method and why" paragraph, built from the measured numbers."""
    by = {o.label: o for o in outcomes}
    base = by[baseline_label]
    best = outcomes[0]
    sentences: list[str] = []
    base_healthy = base.late_ratio <= HEALTHY_RATIO
    if best.label == baseline_label:
        sentences.append(
            f"Keep the model's own RoPE ({baseline_label}): it has the lowest perplexity at {target} tokens "
            f"({report.fmt(base.ppl_target)}), and no extension method beat it on this text.")
        if base_healthy:
            sentences.append(f"Its late buckets (past {trained}) stay at {report.fmt(base.ppl_late)}, "
                             f"{base.late_ratio:.2f}x its {trained}-token perplexity.")
        return " ".join(sentences)

    healthy = best.late_ratio <= HEALTHY_RATIO
    better_passkey = (best.passkey_accuracy or 0.0) > (base.passkey_accuracy or 0.0)
    if best.ppl_target > base.ppl_target * (1 - TIE) and better_passkey:
        sentences.append(
            f"Use {best.label} (factor {best.factor:g}) at {target} tokens: its perplexity ties with the unscaled "
            f"model's (within {TIE:.0%}: {report.fmt(best.ppl_target)} vs {report.fmt(base.ppl_target)}), but it "
            f"retrieved the passkey {best.passkey_accuracy:.0%} of the time against {base.passkey_accuracy:.0%} "
            f"without scaling.")
        short_change = best.ppl_trained / base.ppl_trained - 1
        sentences.append(f"Short contexts: {_pct(best.ppl_trained, base.ppl_trained)} perplexity on the first "
                         f"{trained} tokens.")
        tied = [o.label for o in outcomes[1:] if o.label != baseline_label and o.passkey_accuracy ==
                best.passkey_accuracy and o.ppl_target <= best.ppl_target * (1 + TIE)]
        if tied:
            sentences.append(f"Equally good on these measurements: {', '.join(tied)}.")
        if short_change > SHORT_REGRESSION:
            sentences.append("It costs short-context quality; consider fine-tuning.")
        return " ".join(sentences)
    if best.ppl_target > base.ppl_target * (1 - TIE):
        sentences.append(
            f"No method clearly beats the unscaled model at {target} tokens: the best, {best.label}, is within "
            f"{TIE:.0%} of it ({report.fmt(best.ppl_target)} vs {report.fmt(base.ppl_target)}); this text does not "
            f"separate them, so keep the model's own RoPE or measure on longer or more windows.")
        return " ".join(sentences)
    sentences.append(
        f"Use {best.label} (factor {best.factor:g}) to run this model at {target} tokens: it has the lowest "
        f"perplexity at that length, {report.fmt(best.ppl_target)} against {report.fmt(base.ppl_target)} "
        f"without scaling ({_pct(best.ppl_target, base.ppl_target)}).")
    if healthy:
        sentences.append(
            f"Past the trained length ({trained} tokens) its buckets stay at {report.fmt(best.ppl_late)}, "
            f"{best.late_ratio:.2f}x its own {trained}-token perplexity ({report.fmt(best.ppl_trained)}), so it "
            f"does not break down there.")
    else:
        sentences.append(
            f"It still degrades past the trained length: its late buckets reach {report.fmt(best.ppl_late)}, "
            f"{best.late_ratio:.2f}x its {trained}-token perplexity; expect to fine-tune at {target} tokens.")
    if base.late_ratio > HEALTHY_RATIO:
        sentences.append(
            f"Without scaling the late buckets blow up to {report.fmt(base.ppl_late)} "
            f"({base.late_ratio:.1f}x the {trained}-token perplexity of {report.fmt(base.ppl_trained)}).")
    short_change = best.ppl_trained / base.ppl_trained - 1
    if short_change > SHORT_REGRESSION:
        sentences.append(f"It costs short-context quality: {_pct(best.ppl_trained, base.ppl_trained)} perplexity "
                         f"on the first {trained} tokens.")
    else:
        sentences.append(f"Short contexts are unharmed ({_pct(best.ppl_trained, base.ppl_trained)} on the first "
                         f"{trained} tokens).")
    if best.passkey_accuracy is not None and base.passkey_accuracy is not None:
        sentences.append(f"Passkey retrieval at {target} tokens: {best.passkey_accuracy:.0%} "
                         f"(unscaled: {base.passkey_accuracy:.0%}).")
    others = [o for o in outcomes[1:] if o.label != baseline_label]
    if others:
        second = others[0]
        tie = " - a tie on this text" if second.ppl_target < best.ppl_target * (1 + TIE) else ""
        sentences.append(f"Runner-up: {second.label} at {report.fmt(second.ppl_target)} "
                         f"({_pct(second.ppl_target, best.ppl_target)} vs {best.label}{tie}).")
    hurt = [o for o in outcomes if o.label not in (baseline_label, best.label)
            and o.ppl_trained / base.ppl_trained - 1 > SHORT_REGRESSION]
    if hurt:
        listed = ", ".join(f"{o.label} ({_pct(o.ppl_trained, base.ppl_trained)})" for o in hurt)
        sentences.append(f"Without fine-tuning, these hurt the first {trained} tokens: {listed}.")
    if best.method in ("dynamic", "dynamic_yarn", "longrope"):
        sentences.append("Its rotation depends on the sequence length; ropekit fixes the scale once per sequence "
                         "so that cached keys stay valid while generating.")
    return " ".join(sentences)


# ---------------------------------------------------------------------- the report folder
def summary_markdown(rep: CompareReport) -> str:
    """summary.md: settings, the ranked table, the recommendation, skipped methods, notes, plots."""
    t, n = rep.trained_length, rep.target_length
    rows = []
    for o in rep.outcomes:
        pk = "-" if o.passkey_accuracy is None else f"{o.passkey_accuracy:.0%}"
        rows.append([o.rank, o.label, "-" if o.factor is None else f"{o.factor:g}", report.fmt(o.ppl_trained),
                     report.fmt(o.ppl_target), report.fmt(o.ppl_late), f"{o.late_ratio:.2f}", pk])
    table = report.markdown_table(
        ["rank", "method", "factor", f"ppl @ {t}", f"ppl @ {n}", f"ppl of tokens {t}-{n}", "late / short", "passkey"],
        rows)
    s = rep.settings
    lines = [
        f"# ropekit compare: {rep.model}",
        "",
        f"Trained length {t} tokens, target {n} tokens (factor {rep.factor:g}). Perplexity on "
        f"{s['window_count']} real-text window(s) of {n} tokens ({', '.join(s['windows'])}); passkey: "
        f"{s['passkey_trials']} prompt(s) of {s['passkey_length']} tokens per depth {s['passkey_depths']}. "
        f"Wall time {rep.wall_time_s:.0f} s (model loading not included) on {s['device']} ({s['dtype']}, "
        f"{s['torch_threads']} threads).",
        "",
        "## Ranking",
        "",
        table,
        f"*ppl @ {t}*: the first {t} tokens (short-context check); *ppl of tokens {t}-{n}*: the late buckets "
        f"past the trained length; *late / short*: their ratio (<= {HEALTHY_RATIO} = the method holds up). "
        f"Ranked by ppl at the target length; methods within {TIE:.0%} of the lowest are ordered by passkey accuracy.",
        "",
        "## Which method to use and why",
        "",
        rep.recommendation,
        "",
    ]
    if rep.skipped:
        lines += ["## Skipped", ""] + [f"- {p.method}: {p.skipped}" for p in rep.skipped] + [""]
    noted = [o for o in rep.outcomes if o.notes]
    if noted:
        lines += ["## Notes", ""] + [f"- {o.label}: {'; '.join(o.notes)}" for o in noted] + [""]
    lines += ["## Plots", "", "![perplexity by position](perplexity.png)", ""]
    if rep.passkey:
        lines += ["![passkey accuracy](passkey.png)", ""]
    lines += ["Data: `results.json` (everything), `perplexity.csv` (per bucket), `passkey.csv` (per prompt).", ""]
    return "\n".join(lines)


def write_compare_report(rep: CompareReport, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write summary.md, results.json, perplexity.csv, perplexity.png, passkey.csv, passkey.png to ``out_dir``.

    Through ``ropekit.output.OutputDir``: a folder holding files ropekit did not write is refused unless
    ``overwrite`` (and even then those files are kept); the files reach the folder only once all are written.
    """
    from ropekit.output import OutputDir

    with OutputDir(out_dir, command="compare", overwrite=overwrite) as out:
        out.write_text("summary.md", summary_markdown(rep))
        out.write_text("results.json", report.json_text(rep.to_dict()))
        out.write_text("perplexity.csv", report.csv_text(report.perplexity_rows(rep.perplexity)))
        report.plot_bucket_ppl(rep.perplexity, out.path("perplexity.png"), trained_length=rep.trained_length,
                               title=f"{Path(rep.model).name}: perplexity by position at {rep.target_length} tokens")
        if rep.passkey:
            rows = [dict(t, label=r.label, method=r.method) for r in rep.passkey for t in r.trials]
            out.write_text("passkey.csv", report.csv_text(rows))
            report.plot_retrieval_grid(rep.passkey, out.path("passkey.png"), title="passkey accuracy")
    return Path(out_dir)
