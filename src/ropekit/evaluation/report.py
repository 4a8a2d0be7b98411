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
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
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
