"""``ropekit compare``: every applicable extension method on one model, measured, ranked, explained.

For a target length N and the model's trained length L (factor s = N / L), each method is applied with
``ropekit.hf.apply_rope`` and measured in **one forward pass per context**: a haystack of real text with many
labelled needles at spread depths (``evaluation.haystack``) is prefilled once; the same pass gives the
perplexity of the real text (needle tokens left out), and every needle's question is then answered greedily from
the cached context (``evaluation.cached``). Work is shared where the maths makes it exact:

* the perplexity of the first L tokens (the short-context check) is read off the same pass for methods whose
  rotation does not depend on the length (causal attention: a prefix's tokens see only the prefix);
  length-dependent methods get a separate L-token pass unless their rotation at L is the baseline's;
* two methods whose frequencies and attention scale are identical at N tokens (dynamic YaRN at exactly
  N tokens *is* YaRN at factor s) are measured once; the report says so.

Length-dependent methods are measured with their scale fixed at N for the whole sequence (``fix_length``), as
they run when a prompt of N tokens is generated from.

Statistics (``evaluation.stats``): perplexity with a bucket-bootstrap interval; accuracy with a Wilson interval
and its n; two methods are told apart only where a paired bootstrap (perplexity) or non-overlapping Wilson
intervals (retrieval) separate them; otherwise the report says they are tied at this sample size and about how
much more data would separate them.
"""

from __future__ import annotations

import math
import platform
import shlex
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from ropekit.config import RopeConfig
from ropekit.evaluation import report
from ropekit.evaluation.cached import answer_all, prefill
from ropekit.evaluation.data import concatenated_tokens, load_documents
from ropekit.evaluation.haystack import Haystack, build_haystack, line_start_mask, qa_tokens, question_ids
from ropekit.evaluation.haystack import describe as describe_haystack
from ropekit.evaluation.passkey import first_number
from ropekit.evaluation.perplexity import DEFAULT_BUCKET_SIZE, DEFAULT_CHUNK_SIZE, rope_context, token_nll
from ropekit.evaluation.stats import (
    PairedDifference,
    intervals_overlap,
    paired_log_ratio,
    perplexity_interval,
    queries_to_separate,
    wilson_interval,
)
from ropekit.methods import frequencies, get_method, method_names
from ropekit.methods.base_change import suggested_base

HEALTHY_RATIO = 1.3  # late buckets within this factor of the trained-length perplexity = "does not break"
SHORT_REGRESSION = 0.05  # > 5% worse than the baseline at the trained length = "hurts short context"
DEFAULT_NEEDLES = 32


@dataclass
class CompareOptions:
    """Settings of one comparison (defaults: the demo model at 2x on a 2-core CPU in about 10 minutes).

    Attributes:
        target_length: N, tokens; default twice the trained length.
        data: haystack text (file, folder, JSON lines) or None for the standard library's sources.
        windows: contexts of N tokens per method (each a different stretch of text with its own needles).
        needles: labelled needles (= retrieval queries) per context.
        bucket_size: tokens per perplexity bucket (also the bootstrap unit).
        methods: restrict to these method names (default: every comparable method of the registry,
            ``ropekit.method_names(comparable=True)``).
        seed: needle labels and values, and the bootstrap, are drawn from it.
        load_time_s: seconds the caller spent loading the model (reported in the time breakdown).
        factors_file: LongRoPE factors for a ``longrope`` row (default: the ones ``ropekit.search`` ships for
            this model and target length, if any).
    """

    target_length: int | None = None
    data: str | Path | None = None
    windows: int = 1
    needles: int = DEFAULT_NEEDLES
    bucket_size: int = DEFAULT_BUCKET_SIZE
    methods: Sequence[str] | None = None
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress: bool = True
    load_time_s: float | None = None
    factors_file: str | Path | None = None


@dataclass
class MethodPlan:
    """One row of the comparison: ``rope`` to apply, or ``skipped`` with the reason."""

    label: str
    method: str
    rope: RopeConfig | None
    skipped: str | None = None


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


@dataclass
class CompareReport:
    model: str
    trained_length: int
    target_length: int
    factor: float
    outcomes: list[MethodOutcome]
    skipped: list[MethodPlan]
    recommendation: Recommendation
    settings: dict[str, Any]
    haystacks: list[dict[str, Any]] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    wall_time_s: float = 0.0
    baseline: str = ""  # label of the model's own RoPE, the reference of the relative plot

    name: str = ""  # the model's own name (GGUF general.name, config _name_or_path), for titles

    @property
    def model_name(self) -> str:
        return self.name or Path(self.model).name or self.model

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "model_name": self.model_name, "trained_length": self.trained_length, "target_length": self.target_length,
                "factor": self.factor, "baseline": self.baseline, "wall_time_s": self.wall_time_s,
                "timing_s": self.timing,
                "settings": self.settings, "recommendation": self.recommendation.to_dict(),
                "ranking": [o.to_dict() for o in self.outcomes],
                "skipped": [{"method": p.method, "reason": p.skipped} for p in self.skipped],
                "haystacks": self.haystacks}


# ---------------------------------------------------------------------- planning
def plan_methods(base: RopeConfig, target_length: int, methods: Sequence[str] | None = None, *,
                 factors_file: str | Path | None = None, factors_source: str = "factors file") -> list[MethodPlan]:
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
            if factors_file is not None:
                plans.append(MethodPlan(f"longrope ({factors_source})", "longrope",
                                        base.extend("longrope", factor, factors_file=factors_file)))
            elif base.short_factor is None or base.long_factor is None:
                plans.append(MethodPlan("longrope", "longrope", None,
                                        skipped="needs per-pair factors (short_factor/long_factor) that this "
                                                "model's config does not have: search them (`ropekit search`) "
                                                "and pass them with --factors-file"))
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


def model_display_name(loaded) -> str:
    """A name for titles: the demo's and GGUF files' ``general.name``, a folder's ``_name_or_path``, else the source."""
    source = str(loaded.source)
    try:
        from ropekit.config import read_gguf_metadata
        from ropekit.hf.load import demo_model_path

        path = demo_model_path() if source in ("demo", "None") else Path(source)
        if path.suffix == ".gguf" and path.is_file():
            name = read_gguf_metadata(path).get("general.name")
            if name:
                return f"{name} (demo)" if source in ("demo", "None") else str(name)
    except (OSError, ValueError, FileNotFoundError):
        pass
    config = getattr(getattr(loaded, "model", None), "config", None)
    name = getattr(config, "_name_or_path", "") or ""
    return Path(name).name if name and not Path(name).is_dir() else (Path(source).name or source)


def longrope_factors(model_source: str | None, target_length: int, factors_file: str | Path | None = None
                     ) -> tuple[Path | None, str]:
    """(factors file, how it was found) for compare's longrope row: ``factors_file`` when given, else a search
    ropekit ships for this model at this target length (``ropekit.search.shipped_factors``), else (None, "")."""
    if factors_file is not None:
        return Path(factors_file), "factors file"
    from ropekit.search.run import shipped_factors

    shipped = shipped_factors(model_source, target_length)
    return (shipped, f"searched, {shipped.name}") if shipped is not None else (None, "")


def rotation_key(rope: RopeConfig, seq_len: int) -> tuple:
    """What the model computes with ``rope`` for a sequence of ``seq_len`` tokens (equal keys = same numbers)."""
    f = frequencies(rope, seq_len)
    original = None if f.original_inv_freq64 is None else tuple(f.original_inv_freq64.tolist())
    return (tuple(f.inv_freq64.tolist()), f.attention_scale, f.unscaled_until, original, f.layout, f.rotary_dim)


# ---------------------------------------------------------------------- the run
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
                                "correct": first_number(text) == needle.value, "depth": needle.depth,
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


def run_compare(loaded, options: CompareOptions | None = None, out_dir: str | Path | None = None, *,
                overwrite: bool = False) -> CompareReport:
    """Measure every applicable method on ``loaded`` (a ``ropekit.hf.LoadedModel``); write the report
    folder to ``out_dir`` when given (see ``write_compare_report``; checked before any work). Returns the
    ``CompareReport``."""
    from ropekit.output import check_output_dir

    options = options or CompareOptions()
    if out_dir is not None:
        check_output_dir(out_dir, overwrite=overwrite)
    if options.windows < 1 or options.needles < 1:
        raise ValueError(f"windows, needles: must be >= 1, got {options.windows}, {options.needles}")
    start = time.perf_counter()
    base = loaded.rope
    trained = base.require_trained_length()
    target = options.target_length or 2 * trained
    factors_file, source = longrope_factors(loaded.source, target, options.factors_file)
    plans = plan_methods(base, target, options.methods, factors_file=factors_file, factors_source=source)
    runnable = [p for p in plans if p.rope is not None]
    skipped = [p for p in plans if p.rope is None]
    model, tokenizer = loaded.model, loaded.tokenizer
    say = tqdm.write if options.progress else (lambda *_: None)
    say(f"compare: {loaded.source} trained at {trained} tokens -> target {target} (factor {target / trained:g}); "
        f"{len(runnable)} methods; {options.windows} context(s) of {target} tokens with {options.needles} "
        f"needles each")
    for p in skipped:
        say(f"  skipping {p.method}: {p.skipped}")

    t0 = time.perf_counter()
    haystacks = build_haystacks(tokenizer, target, options)
    haystack_s = time.perf_counter() - t0
    mask = torch.stack([h.nll_mask() for h in haystacks])  # (windows, context - 1): real-text predictions
    position = torch.arange(1, mask.shape[1] + 1)[None]  # position of the predicted token
    trained_mask, late_mask = mask & (position < trained), mask & (position >= trained)

    measured: dict[tuple, tuple[str, _Measured]] = {}
    raw: dict[str, _Measured] = {}
    notes: dict[str, list[str]] = {p.label: [] for p in runnable}
    bar = tqdm(total=len(runnable), desc="methods", unit="method", disable=not options.progress)
    for plan in runnable:
        bar.set_postfix_str(plan.label)
        key = rotation_key(plan.rope, target)
        if key in measured:
            twin, m = measured[key]
            notes[plan.label].append(f"same rotation as {twin} at {target} tokens: measured once")
            m = _Measured(m.nll, m.queries, {"shared_with": twin})
        else:
            m = measure_method(model, tokenizer, plan.rope, haystacks, target, chunk_size=options.chunk_size,
                               label=plan.label, progress=options.progress)
            measured[key] = (plan.label, m)
        raw[plan.label] = m
        bar.update(1)
        hits = sum(q["correct"] for q in m.queries)
        cost = (f"measured with {m.timing['shared_with']}" if "shared_with" in m.timing else
                f"{m.timing['forward']:.0f} s forward, {m.timing['queries']:.0f} s questions")
        say(f"  {plan.label:<16} ppl @ {target}: {_masked_ppl(m.nll, mask):.3f}   retrieval {hits}/{len(m.queries)}"
            f"   ({cost})")
    bar.close()

    # --- perplexity at the trained length: the same pass where exact, else a separate L-token pass
    baseline = runnable[0]
    base_key_at_trained = rotation_key(baseline.rope, trained)
    ppl_trained: dict[str, float] = {}
    for plan in runnable:
        nll = raw[plan.label].nll
        if not plan.rope.length_dependent:
            ppl_trained[plan.label] = _masked_ppl(nll, trained_mask)
        elif rotation_key(plan.rope, trained) == base_key_at_trained and not baseline.rope.length_dependent:
            ppl_trained[plan.label] = _masked_ppl(raw[baseline.label].nll, trained_mask)
            notes[plan.label].append(f"same rotation as {baseline.label} up to {trained} tokens")
        else:
            t1 = time.perf_counter()
            with rope_context(model, plan.rope):
                short = torch.stack([token_nll(model, h.input_ids[None, :trained], chunk_size=options.chunk_size,
                                               progress=f"{plan.label} @ {trained}" if options.progress else None)[0]
                                     for h in haystacks])
            ppl_trained[plan.label] = _masked_ppl(short, mask[:, : trained - 1])
            raw[plan.label].timing["trained_length_pass"] = round(time.perf_counter() - t1, 1)  # a twin's own dict
            notes[plan.label].append(f"trained-length perplexity from a separate {trained}-token pass")

    outcomes: list[MethodOutcome] = []
    for plan in runnable:
        m = raw[plan.label]
        ppl, lo, hi = perplexity_interval(m.nll, mask, bucket_size=options.bucket_size, seed=options.seed)
        buckets, ends = _bucket_ppl(m.nll, mask, options.bucket_size)
        outcomes.append(MethodOutcome(
            plan.label, plan.method, plan.rope.factor, plan.rope.to_dict(), get_method(plan.method).exportable,
            ppl_trained[plan.label], ppl, (lo, hi), _masked_ppl(m.nll, late_mask), buckets, ends,
            [dict(q) for q in m.queries], trained, notes=notes[plan.label], timing=dict(m.timing),
            config=plan.rope))
    nll_of = {o.label: raw[o.label].nll for o in outcomes}
    pairs = rank_outcomes(outcomes, nll_of, mask, bucket_size=options.bucket_size, seed=options.seed)
    twins = {label: [label] + [p.label for p in runnable if raw[p.label].timing.get("shared_with") == label]
             for label, _ in measured.values()}
    recommendation = recommend(outcomes, trained, target, baseline.label, model_source=loaded.source,
                               twins=twins, windows=options.windows, pairs=pairs,
                               buckets_per_window=math.ceil(mask.shape[1] / options.bucket_size),
                               factors_file=factors_file)
    settings = {"windows": options.windows, "needles_per_window": options.needles,
                "context_tokens": haystacks[0].length, "bucket_size": options.bucket_size, "seed": options.seed,
                "data": str(options.data) if options.data else "stdlib",
                "device": str(loaded.device), "dtype": str(loaded.dtype).replace("torch.", ""),
                "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                "torch": torch.__version__}
    run_s = time.perf_counter() - start
    timing = {"load": options.load_time_s, "haystack": round(haystack_s, 1),
              "methods": {o.label: o.timing for o in outcomes}, "compare": round(run_s, 1)}
    result = CompareReport(model=loaded.source, trained_length=trained, target_length=target, factor=target / trained,
                           outcomes=outcomes, skipped=skipped, recommendation=recommendation, settings=settings,
                           haystacks=[describe_haystack(h) for h in haystacks],
                           timing=timing, baseline=baseline.label, name=model_display_name(loaded))
    result.wall_time_s = round(run_s + (options.load_time_s or 0.0), 1)
    if out_dir is not None:
        t2 = time.perf_counter()
        write_compare_report(result, out_dir, overwrite=overwrite)
        timing["report"] = round(time.perf_counter() - t2, 1)
    return result


# ---------------------------------------------------------------------- ranking and ties
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


def export_command(model_source: str, rope: RopeConfig, target_length: int,
                   factors_file: str | Path | None = None) -> str:
    """The ``ropekit export`` command line that writes a checkpoint with ``rope`` (flags from the registry).
    Per-pair factors (longrope) have no flag of their own: they travel as ``--factors-file``, the file they were
    read from (absolute, so the line runs from any folder)."""
    spec = get_method(rope.method)
    parts = ["ropekit", "export", model_source or "demo", "--method", spec.name]
    if factors_file is not None and any(p.type == "float_list" and getattr(rope, p.field, None) is not None
                                        for p in spec.params):
        parts += ["--factors-file", str(Path(factors_file).resolve())]
    for p in spec.params:
        value = getattr(rope, p.field, None)
        if value is None or p.field == "original_max_position" or p.type == "float_list":
            continue
        parts += [p.flag, f"{value:g}" if isinstance(value, float) else str(value)]
    name = (Path(model_source).stem if model_source else "demo") or "model"
    parts += ["--out", f"{name}-{spec.name}-{target_length}"]
    return " ".join(shlex.quote(x) for x in parts)


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
                              factors_file=factors_file if pick.method == "longrope" else None)
               if pick.exportable and pick.config is not None and pick.label != baseline_label else None)
    if command:
        sentences.append(f"Export: `{command}`.")
    if pick.method in ("dynamic", "dynamic_yarn", "longrope"):
        sentences.append("Its rotation depends on the sequence length; ropekit fixes the scale once per sequence "
                         "so that cached keys stay valid while generating.")
    return Recommendation(" ".join(sentences), pick.label, pick.method, pick.factor, command)


# ---------------------------------------------------------------------- the report folder
def summary_markdown(rep: CompareReport) -> str:
    """summary.md: settings, the ranked table with intervals, the recommendation, skipped methods, notes, time."""
    t, n = rep.trained_length, rep.target_length
    rows = []
    for o in rep.outcomes:
        lo, hi = o.ppl_target_ci
        far_hits, far_n = o.far()
        rows.append([
            f"{o.rank}" + ("=" if o.tied_with else ""), o.label, "-" if o.factor is None else f"{o.factor:g}",
            report.fmt(o.ppl_trained), f"{report.fmt(o.ppl_target)} [{report.fmt(lo)}, {report.fmt(hi)}]",
            report.fmt(o.ppl_late), f"{o.late_ratio:.2f}",
            "-" if not o.queries else _acc(o), f"{far_hits}/{far_n}" if far_n else "-",
            "yes" if o.exportable else "no"])
    table = report.markdown_table(
        ["rank", "method", "factor", f"ppl @ {t}", f"ppl @ {n} [95% CI]", f"ppl past {t}", "late / short",
         "retrieval [95% CI]", f"found > {t} away", "exportable"], rows)
    s = rep.settings
    tm = rep.timing
    lines = [
        f"# ropekit compare: {rep.model_name}",
        "",
        f"Trained length {t} tokens, target {n} tokens (factor {rep.factor:g}). Each method: {s['windows']} "
        f"context(s) of {s['context_tokens']} tokens of real text ({s['data']}) with {s['needles_per_window']} "
        f"labelled needles each, prefilled once; perplexity of the text (needles left out) from that pass, and "
        f"every needle's question answered greedily from the cached context. Wall time {rep.wall_time_s:.0f} s "
        f"on {s['device']} ({s['dtype']}, {s['torch_threads']} threads).",
        "",
        "## Ranking",
        "",
        table,
        f"*ppl @ {t}*: the first {t} tokens (short-context check); *ppl past {t}*: the tokens past the trained "
        f"length; *late / short*: their ratio (<= {HEALTHY_RATIO} = the method holds up); *retrieval*: needles "
        f"found / asked, Wilson interval; *found > {t} away*: needles farther than the trained length from their "
        f"question. Ranked by perplexity at {n} where the paired bootstrap separates methods; methods it does not "
        f"separate from the lowest are ordered by retrieval. `=`: tied with another method on both measures at "
        f"this sample size.",
        "",
        "## Which method to use and why",
        "",
        rep.recommendation.text,
        "",
    ]
    if rep.skipped:
        lines += ["## Skipped", ""] + [f"- {p.method}: {p.skipped}" for p in rep.skipped] + [""]
    noted = [o for o in rep.outcomes if o.notes or o.tied_with]
    if noted:
        lines += ["## Notes", ""]
        for o in noted:
            parts = list(o.notes) + ([f"tied with {', '.join(o.tied_with)}"] if o.tied_with else [])
            lines.append(f"- {o.label}: {'; '.join(parts)}")
        lines.append("")
    per = "; ".join((f"{label} (measured with {v['shared_with']})" if "shared_with" in v else
                     f"{label} {v.get('forward', 0):.0f} + {v.get('queries', 0):.0f} s")
                    + (f" + {v['trained_length_pass']:.0f} s at {t}" if "trained_length_pass" in v else "")
                    for label, v in tm.get("methods", {}).items())
    load = f"model load {tm['load']:.0f} s, " if tm.get("load") is not None else ""
    lines += ["## Where the time went", "",
              f"{load}haystacks {tm.get('haystack', 0):.0f} s; per method (forward + questions): {per}.", ""]
    lines += ["## Plots", "", "![perplexity by position](perplexity.png)", "",
              "![retrieval by distance](retrieval.png)", "",
              "Data: `results.json` (everything), `perplexity.csv` (per bucket), `retrieval.csv` (per question).", ""]
    return "\n".join(lines)


def write_compare_report(rep: CompareReport, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Write summary.md, results.json, perplexity.csv, perplexity.png, retrieval.csv, retrieval.png to ``out_dir``.

    Through ``ropekit.output.OutputDir``: a folder holding files ropekit did not write is refused unless
    ``overwrite`` (and even then those files are kept); the files reach the folder only once all are written.
    """
    from ropekit.output import OutputDir

    with OutputDir(out_dir, command="compare", overwrite=overwrite) as out:
        out.write_text("summary.md", summary_markdown(rep))
        out.write_text("results.json", report.json_text(rep.to_dict()))
        rows = [{"label": o.label, "method": o.method, "bucket_end": end, "ppl": ppl}
                for o in rep.outcomes for end, ppl in zip(o.bucket_end, o.bucket_ppl)]
        out.write_text("perplexity.csv", report.csv_text(rows))
        out.write_text("retrieval.csv", report.csv_text(
            [dict(q, method=o.label) for o in rep.outcomes for q in o.queries]))
        report.plot_compare_perplexity(rep.outcomes, out.path("perplexity.png"), trained_length=rep.trained_length,
                                       target_length=rep.target_length, model_name=rep.model_name)
        report.plot_retrieval_by_distance(rep.outcomes, out.path("retrieval.png"), trained_length=rep.trained_length,
                                          target_length=rep.target_length, model_name=rep.model_name)
    return Path(out_dir)
