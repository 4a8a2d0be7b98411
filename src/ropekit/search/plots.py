"""The search's two figures: best score per generation against the seeds, and the factors found against them."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


SEED_NAMES = {"yarn": "YaRN", "ntk": "NTK", "pi": "PI", "own": "own"}


def plot_progress(history: Sequence[dict], seed_scores: dict[str, float], path: str | Path, title: str = "",
                  seed_labels: dict[str, str] | None = None) -> Path:
    """Best score so far after each generation (line) and each generation's own best (dots); seeds as
    horizontal lines (YaRN's is the one to beat). Lower is better. ``seed_labels``: a seed's legend name when
    it is not the method itself (e.g. YaRN's factors under another attention factor)."""
    seed_labels = seed_labels or {}
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    gens = [h["generation"] for h in history]
    ax.plot(gens, [h["best_score"] for h in history], "o-", color="C3", label="search: best so far", zorder=3)
    ax.plot(gens, [h["generation_best"] for h in history], "x", color="C3", alpha=0.5,
            label="best of the generation")
    styles = {"yarn": ("C0", "--"), "ntk": ("C2", ":"), "pi": ("C1", "-."), "own": ("C4", "--")}
    finite = [h["best_score"] for h in history] + list(seed_scores.values())
    low, high = min(finite), max(finite)
    if seed_scores.get("yarn") is not None:
        # Keep the interesting range readable when a seed (PI) is far worse than the rest.
        high = min(high, seed_scores["yarn"] + 3 * max(seed_scores["yarn"] - low, 0.05))
    for name, score in seed_scores.items():
        color, style = styles.get(name, ("grey", ":"))
        shown = seed_labels.get(name, SEED_NAMES.get(name, name))
        ax.axhline(score, color=color, linestyle=style, label=f"{shown} (seed) {score:.3f}"
                   + (" (off the scale)" if score > high else ""))
    ax.set_ylim(low - 0.1 * (high - low + 1e-3), high + 0.15 * (high - low + 1e-3))
    ax.set_xlabel("generation")
    ax.set_ylabel("score (answer NLL + text NLL + guard), lower is better")
    ax.set_xticks(gens)
    ax.set_title(title or "LongRoPE factor search")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def plot_factors(found: Sequence[float], seeds: dict[str, Sequence[float]], path: str | Path, *,
                 first_gene: int | None = None, title: str = "", label: str = "searched (long_factor)") -> Path:
    """Per-pair rescale factors (log scale) of the search's result and of the seed methods; the searched pairs
    (from ``first_gene``, the critical dimension) shaded."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    pairs = list(range(len(found)))
    styles = {"yarn": ("C0", "--"), "ntk": ("C2", ":"), "pi": ("C1", "-."), "own": ("C4", "--")}
    for name, factors in seeds.items():
        color, style = styles.get(name, ("grey", ":"))
        ax.plot(pairs, list(factors), style, color=color,
                label=SEED_NAMES.get(name, name) if name != "own" else "own factors")
    ax.plot(pairs, list(found), "o-", color="C3", markersize=3.5, label=label, zorder=3, alpha=0.85)
    if first_gene:
        ax.axvspan(first_gene - 0.5, len(found) - 0.5, color="C3", alpha=0.07,
                   label=f"searched pairs (>= critical dim {first_gene})")
    ax.set_yscale("log")
    from matplotlib.ticker import FormatStrFormatter, LogLocator

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter(""))
    ax.set_xlabel("rotary pair i (low i: fast, high i: slow)")
    ax.set_ylabel("rescale factor lambda_i (inv_freq_i / lambda_i)")
    ax.set_title(title or "LongRoPE factors")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
