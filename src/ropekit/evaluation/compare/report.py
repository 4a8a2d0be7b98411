"""Compare's report: the ``CompareReport`` and its folder (summary.md, results.json, CSVs, plots)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropekit.evaluation import report
from ropekit.evaluation.compare.measure import MethodOutcome
from ropekit.evaluation.compare.plan import MethodPlan
from ropekit.evaluation.compare.rank import HEALTHY_RATIO, Recommendation, _acc


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
