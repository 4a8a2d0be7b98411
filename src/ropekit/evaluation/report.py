"""Writers for evaluation results: JSON, CSV, PNG plots, Markdown tables; folders written atomically."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Any, Sequence

from ropekit.output import write_file_atomic


# ---------------------------------------------------------------------- atomic writes
def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` via a temporary file in the same folder and a rename (ordinary permissions)."""
    return write_file_atomic(path, text)


def json_text(data: Any) -> str:
    return json.dumps(data, indent=2, allow_nan=True) + "\n"


def write_json(path: str | Path, data: Any) -> Path:
    return write_text_atomic(path, json_text(data))


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """CSV (RFC 4180: CRLF line ends, so a cell holding a bare CR or LF, e.g. a model's answer, is quoted and any
    CSV reader gets the rows back)."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\r\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in columns})
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return " ".join(str(_cell(v)) for v in value)
    return "" if value is None else value


# ---------------------------------------------------------------------- perplexity tables
def perplexity_rows(results: Sequence) -> list[dict[str, Any]]:
    """One CSV row per (method, length, bucket): label, method, factor, length, ppl, bucket, start, end, bucket_ppl."""
    rows = []
    for r in results:
        for b, p in enumerate(r.bucket_ppl):
            rows.append({"label": r.label or r.method, "method": r.method, "factor": r.factor, "length": r.length,
                         "ppl": r.ppl, "bucket": b, "bucket_start": b * r.bucket_size,
                         "bucket_end": min((b + 1) * r.bucket_size, r.length), "bucket_ppl": p})
    return rows


def perplexity_payload(model: str, results: Sequence, **extra: Any) -> dict[str, Any]:
    """``{"model": ..., "results": [{"method", "factor", "length", "ppl", "bucket_size", "bucket_ppl", ...}]}``."""
    return {"model": model, **extra, "results": [r.to_dict() for r in results]}


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def perplexity_markdown(results: Sequence) -> str:
    """A Markdown table: one row per method, one column per length."""
    lengths = sorted({r.length for r in results})
    labels = list(dict.fromkeys(r.label or r.method for r in results))
    by = {(r.label or r.method, r.length): r for r in results}
    rows = [[label] + [fmt(by[(label, n)].ppl) if (label, n) in by else "-" for n in lengths] for label in labels]
    return markdown_table(["method"] + [f"ppl @ {n}" for n in lengths], rows)


# ---------------------------------------------------------------------- plots
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_bucket_ppl(results: Sequence, path: str | Path, *, trained_length: int | None = None,
                    title: str = "Perplexity by position") -> Path:
    """Bucket perplexity vs position, one line per method (longest length per method), log y axis,
    the trained length marked with a dashed line."""
    plt = _pyplot()
    longest: dict[str, Any] = {}
    for r in results:
        key = r.label or r.method
        if key not in longest or r.length > longest[key].length:
            longest[key] = r
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, r in longest.items():
        x = [min((b + 1) * r.bucket_size, r.length) for b in range(len(r.bucket_ppl))]
        ax.plot(x, r.bucket_ppl, marker="o", markersize=3, label=label)
    if trained_length:
        ax.axvline(trained_length, color="grey", linestyle="--", linewidth=1)
        ax.text(trained_length, ax.get_ylim()[1], " trained length", color="grey", va="top", fontsize=8)
    ax.set_yscale("log")
    ax.set_xlabel("position (end of bucket, tokens)")
    ax.set_ylabel("bucket perplexity (log scale)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, path)


def plot_retrieval_heatmap(result, path: str | Path, *, title: str | None = None) -> Path:
    """Accuracy heat map, depth (x) by length (y), one retrieval result."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result.depths), 1.2 + 0.6 * len(result.lengths)))
    image = ax.imshow(result.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result.depths)), [f"{d:.0%}" for d in result.depths])
    ax.set_yticks(range(len(result.lengths)), [str(n) for n in result.lengths])
    for i, row in enumerate(result.accuracy):
        for j, acc in enumerate(row):
            ax.text(j, i, f"{acc:.0%}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("depth of the needle")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(title or f"{result.task}: {result.label or result.method}")
    fig.colorbar(image, ax=ax, label="accuracy")
    return _save(fig, plt, path)


def plot_retrieval_grid(results: Sequence, path: str | Path, *, title: str = "retrieval accuracy") -> Path:
    """Several methods' retrieval accuracy side by side: one heat map panel per method."""
    plt = _pyplot()
    n = len(results)
    first = results[0]
    panel = max(1.5, 0.8 * len(first.depths))
    fig, axes = plt.subplots(1, n, figsize=(1.5 + panel * n, 2.0 + 0.5 * len(first.lengths)),
                             squeeze=False, sharey=True)
    for ax, r in zip(axes[0], results):
        image = ax.imshow(r.accuracy, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(r.depths)), [f"{d:.0%}" for d in r.depths], fontsize=7)
        ax.set_yticks(range(len(r.lengths)), [str(x) for x in r.lengths])
        for i, row in enumerate(r.accuracy):
            for j, acc in enumerate(row):
                ax.text(j, i, f"{acc:.0%}", ha="center", va="center", fontsize=7)
        ax.set_title(r.label or r.method, fontsize=8)
        ax.set_xlabel("depth", fontsize=8)
    axes[0][0].set_ylabel("length")
    fig.suptitle(title, y=1.04)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy")
    return _save(fig, plt, path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
LINESTYLES = ("-", "--", "-.", ":")


def _style(i: int, plt) -> dict[str, Any]:
    """Colour, marker and line style of series ``i``: lines that overlap stay distinguishable."""
    colors = plt.get_cmap("tab10").colors
    return {"color": colors[i % len(colors)], "marker": MARKERS[i % len(MARKERS)],
            "linestyle": LINESTYLES[(i // len(colors)) % len(LINESTYLES)]}


def _kilo(x: float, _pos=None) -> str:
    return f"{x / 1024:g}k" if x >= 1024 else f"{x:g}"


def _token_axis(ax, end: int) -> None:
    """x axis in tokens with about eight labelled ticks at round multiples of 1024."""
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    step = max(1024, 1024 * round(end / 8 / 1024)) if end >= 8192 else max(1, end // 8)
    ax.xaxis.set_major_locator(MultipleLocator(step))
    ax.xaxis.set_major_formatter(FuncFormatter(_kilo))
    ax.set_xlim(0, end)


def _shade_past(ax, trained_length: int | None, end: int, label: bool = True, top: bool = False) -> None:
    if trained_length and trained_length < end:
        ax.axvspan(trained_length, end, color="0.92", zorder=0)
        ax.axvline(trained_length, color="0.4", linestyle="--", linewidth=1)
        if label:
            ax.text(trained_length, 0.98 if top else 0.02, f" past the trained length ({_kilo(trained_length)})",
                    transform=ax.get_xaxis_transform(), color="0.3", va="top" if top else "bottom", fontsize=8)


def plot_compare_perplexity(outcomes: Sequence, path: str | Path, *, trained_length: int, target_length: int,
                            model_name: str) -> Path:
    """Two panels over position: bucket perplexity (log), and each method's bucket perplexity relative to the
    first-ranked method on a linear scale zoomed on the methods that hold up (the ones that bundle together in the
    first panel separate there; methods more than 2x off are drawn clipped and marked "off scale")."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 1, figsize=(11, 7.8), sharex=True)
    ref = outcomes[0]
    ratios = {o.label: [a / b for a, b in zip(o.bucket_ppl, ref.bucket_ppl)] for o in outcomes}
    in_scale = [r for r in ratios.values() if max(r) <= 2.0 and min(r) >= 0.5]
    low = min(min(r) for r in in_scale) if in_scale else 0.5
    high = max(max(r) for r in in_scale) if in_scale else 2.0
    pad = max(0.01, (high - low) * 0.08)
    for i, o in enumerate(outcomes):
        style = _style(i, plt)
        axes[0].plot(o.bucket_end, o.bucket_ppl, markersize=4, linewidth=1.4,
                     label=f"{o.label} ({fmt(o.ppl_target)})", **style)
        off = not (max(ratios[o.label]) <= 2.0 and min(ratios[o.label]) >= 0.5)
        axes[1].plot(o.bucket_end, [min(max(v, low - pad), high + pad) for v in ratios[o.label]], markersize=4,
                     linewidth=1.4, alpha=0.5 if off else 1.0,
                     label=f"{o.label}" + (" (off scale, clipped)" if off else ""), **style)
    for k, ax in enumerate(axes):
        _shade_past(ax, trained_length, target_length, label=k == 0)
        ax.grid(True, which="both", alpha=0.3)
        _token_axis(ax, target_length)
    axes[0].set_yscale("log")
    size = outcomes[0].bucket_end[1] - outcomes[0].bucket_end[0] if len(outcomes[0].bucket_end) > 1 else target_length
    axes[0].set_ylabel(f"perplexity per {_kilo(size)}-token bucket")
    axes[0].set_title(f"{model_name}: perplexity by position at {target_length} tokens")
    axes[0].legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (ppl, all tokens)",
                   title_fontsize=9)
    axes[1].axhline(1.0, color="black", linewidth=0.8)
    axes[1].set_ylim(low - pad, high + pad)
    axes[1].set_ylabel(f"relative to {ref.label}\n(below 1 = better)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    axes[-1].set_xlabel("position of the predicted token (tokens)")
    fig.tight_layout()
    return _save(fig, plt, path)


def plot_retrieval_by_distance(outcomes: Sequence, path: str | Path, *, trained_length: int, target_length: int,
                               model_name: str, bins: int = 4) -> Path:
    """Retrieval accuracy against the distance from needle to question, per method, with 95% Wilson intervals
    as error bars; the bins past the trained length shaded."""
    from ropekit.evaluation.stats import wilson_interval

    plt = _pyplot()
    width = target_length / bins
    fig, ax = plt.subplots(figsize=(11, 4.6))
    methods = [o for o in outcomes if o.queries]
    dodge = width * 0.7 / max(1, len(methods))
    counts = [0] * bins
    for i, o in enumerate(methods):
        xs, ys, lows, highs = [], [], [], []
        for b in range(bins):
            cell = [q for q in o.queries if b * width <= q["distance"] < (b + 1) * width
                    or (b == bins - 1 and q["distance"] >= target_length)]
            if not cell:
                continue
            hits = sum(q["correct"] for q in cell)
            lo, hi = wilson_interval(hits, len(cell))
            p = hits / len(cell)
            xs.append(b * width + width * 0.15 + dodge * (i + 0.5))
            ys.append(p)
            lows.append(p - lo)
            highs.append(hi - p)
            counts[b] = max(counts[b], len(cell))
        style = _style(i, plt)
        ax.errorbar(xs, ys, yerr=[lows, highs], fmt=style["marker"], color=style["color"], capsize=2, markersize=5,
                    label=f"{o.label} ({o.retrieval_hits}/{o.retrieval_queries})")
    _shade_past(ax, trained_length, target_length, top=True)
    ax.set_xlim(0, target_length)
    ax.set_xticks([(b + 0.5) * width for b in range(bins)],
                  [f"{_kilo(b * width)}-{_kilo((b + 1) * width)}\nn = {counts[b]}" for b in range(bins)])
    for b in range(1, bins):
        ax.axvline(b * width, color="0.85", linewidth=0.8, zorder=0)
    ax.set_ylim(-0.05, 1.1)
    ax.set_ylabel("needles retrieved (95% Wilson interval)")
    ax.set_xlabel("distance from the needle to the question (tokens); n = queries per method")
    ax.set_title(f"{model_name}: retrieval at {target_length} tokens by distance")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="method (found / asked)",
              title_fontsize=9)
    fig.tight_layout()
    return _save(fig, plt, path)


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)
    return path
