"""``run_compare``: the whole comparison on a loaded model, from the plan to the report folder."""

from __future__ import annotations

import math
import platform
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ropekit.evaluation.compare.measure import (
    MethodOutcome,
    _bucket_ppl,
    _masked_ppl,
    _Measured,
    build_haystacks,
    measure_method,
)
from ropekit.evaluation.compare.plan import CompareOptions, longrope_factors, plan_methods, rotation_key
from ropekit.evaluation.compare.rank import rank_outcomes, recommend
from ropekit.evaluation.compare.report import CompareReport, model_display_name, write_compare_report
from ropekit.evaluation.haystack import describe as describe_haystack
from ropekit.evaluation.perplexity import rope_context, token_nll
from ropekit.evaluation.stats import perplexity_interval
from ropekit.methods import get_method


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
