"""The study's report: results.json read back, summary.md (tables, the search and PoSE sections, what the run
shows), and the two plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ropekit.study.settings import METHOD_LABELS


def load_results(path: str | Path) -> dict[str, Any]:
    """results.json back into the in-memory form (JSON turned the length keys into strings)."""
    results = json.loads(Path(path).read_text())
    entries = [e for stage in ("before", "after") for e in results[stage].values()]
    if "pose" in results:
        entries += [results["pose"]["full"], results["pose"]["pose"]]
    for entry in entries:
        for key in ("ppl", "passkey"):
            entry[key] = {int(n): v for n, v in entry[key].items()}
    return results


def search_section(results: dict[str, Any]) -> list[str]:
    """What the LongRoPE search did and found (empty without one)."""
    search = results.get("search")
    if not search:
        return []
    best, yarn = search["best"], search["seeds"].get("yarn", {})
    from ropekit.search.plots import SEED_NAMES

    found = (f"the {SEED_NAMES.get(best['origin'].split(':', 1)[1], 'own')} seed (no candidate beat it)"
             if best["origin"].startswith("seed:") else f"a {best['origin']} of generation {best['generation']}")
    factors = ", ".join(f"{x:.2f}" for x in search["long_factor"])
    lines = [f"## LongRoPE factor search ({search['target_length']} bytes, before fine-tuning)", "",
             f"`ropekit.search` on the pretrained model, haystacks of training text (never the held-out files): "
             f"{search['forwards']} forwards in {search['wall_seconds_this_run']:.0f} s (stopped: {search['stopped']}); "
             f"{search['space']['gene_count']} genes from pair {search['space']['first_gene']} on. Best: {found}, "
             f"score {best['score']:.4f}"
             + (f" vs the YaRN seed's {yarn['score']:.4f} (needle NLL + text NLL + guard; lower is better)."
                if yarn else "."),
             f"long_factor: [{factors}]; attention factor {search['attention_factor']:.4f}.", ""]
    return lines


def pose_section(results: dict[str, Any]) -> list[str]:
    """The PoSE vs full-length table and what it shows (empty without a PoSE run)."""
    pose = results.get("pose")
    if not pose:
        return []
    s = results["sizes"]
    lengths = results["eval_lengths"]
    short, longest = lengths[0], lengths[-1]
    label = METHOD_LABELS[pose["method"]]
    lines = [f"## PoSE vs full-length fine-tuning ({label}, {s['finetune_steps']} steps each, same lr and batch)",
             "",
             f"| run | training row | train time | activations kept for backward | ppl at {short} | "
             f"ppl at {longest} | passkey at {longest} |",
             "|---|---|---|---|---|---|---|"]
    for name, entry in (("full length", pose["full"]), (f"PoSE, window {pose['window']}", pose["pose"])):
        lines.append(f"| {name} | {entry['row_bytes']} bytes | {entry['train_s']:.1f} s | "
                     f"{entry['activation_bytes'] / 2**20:.1f} MiB | {_ppl(entry['ppl'][short])} | "
                     f"{_ppl(entry['ppl'][longest])} | {entry['passkey'][longest]:.0%} |")
    full, cheap = pose["full"], pose["pose"]
    before = results["before"][pose["method"]]["ppl"][longest]
    gained_full, gained_pose = before - full["ppl"][longest], before - cheap["ppl"][longest]
    share = gained_pose / gained_full if gained_full > 0 else float("nan")
    verdict = ("NOT seen: full-length fine-tuning did not improve on no fine-tuning here" if gained_full <= 0 else
               "seen" if share >= 0.9 else f"partly seen: {share:.0%} of the full-length gain" if share > 0 else
               "NOT seen")
    lines += ["",
              f"- PoSE at {longest // short}x: ppl {_ppl(before)} before fine-tuning -> {_ppl(cheap['ppl'][longest])} "
              f"(full length: {_ppl(full['ppl'][longest])}) for {cheap['train_s'] / max(full['train_s'], 1e-9):.0%} "
              f"of the full-length training time and {cheap['activation_bytes'] / max(full['activation_bytes'], 1):.0%} "
              f"of its activation memory (paper claim: PoSE reaches the full-length result at a fraction of the "
              f"cost; {verdict})."]
    return lines


def plot_position(results: dict[str, Any], path: Path) -> None:
    """Perplexity per position bucket in the longest window, per method, before (solid) and after (dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = results["sizes"]
    fig, ax = plt.subplots(figsize=(11, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, method in enumerate(results["methods"]):
        for stage, style in (("before", "-"), ("after", "--")):
            entry = results[stage][method]
            size = entry["bucket_size"]
            xs = [(b + 0.5) * size for b in range(len(entry["bucket_ppl"]))]
            label = f"{METHOD_LABELS[method]} ({'fine-tuned' if stage == 'after' else 'no fine-tuning'})"
            ax.plot(xs, entry["bucket_ppl"], style, color=colors[i % len(colors)], label=label)
    ax.axvline(sizes["train_len"], color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel(f"position (bytes); grey line: trained length {sizes['train_len']}")
    ax.set_ylabel("perplexity per byte (bucket)")
    ax.set_title(f"perplexity vs position, {sizes['train_len'] * sizes['factor']}-byte windows")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: no line hidden
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(results: dict[str, Any], path: Path) -> None:
    """Pretraining loss, and fine-tuning loss per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4))
    pre = results["pretrain_history"]
    ax1.plot([h["step"] for h in pre], [h["loss"] for h in pre])
    ax1.set_title(f"pretraining at {results['sizes']['train_len']} bytes")
    ax1.set_xlabel("step")
    ax1.set_ylabel("loss (nats/byte)")
    for method, history in results["finetune_history"].items():
        ax2.plot([h["step"] for h in history], [h["loss"] for h in history], label=METHOD_LABELS[method])
    pose = results.get("pose")
    if pose:  # its loss is on short windows, so it is not comparable point for point with the long rows'
        history = pose["pose"]["history"]
        ax2.plot([h["step"] for h in history], [h["loss"] for h in history], ":",
                 label=f"{METHOD_LABELS[pose['method']]} PoSE ({pose['window']}-byte windows)")
    ax2.set_title(f"fine-tuning at {results['sizes']['train_len'] * results['sizes']['factor']} bytes")
    ax2.set_xlabel("step")
    ax2.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(results: dict[str, Any], stage: str, key: str, fmt) -> list[str]:
    lengths = results["eval_lengths"]
    train_len = results["sizes"]["train_len"]
    head = "| method | " + " | ".join(f"{n} ({n // train_len}x)" for n in lengths) + " |"
    lines = [head, "|---" * (len(lengths) + 1) + "|"]
    for method in results["methods"]:
        values = results[stage][method][key]
        cells = [fmt(values.get(n, values.get(str(n)))) for n in lengths]
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(cells) + " |")
    return lines


def _ppl(value: float) -> str:
    return f"{value:.3f}" if value < 1000 else f"{value:.3g}"


def summary_markdown(results: dict[str, Any]) -> str:
    """The report text: sizes, tables before/after, passkey, fine-tuning speed, wall time."""
    s = results["sizes"]
    t = results["timings"]
    long_len = s["train_len"] * s["factor"]
    lines = [
        "# ropekit study: train short, extend, fine-tune long",
        "",
        f"Model: Llama-style, {s['layers']} layers, hidden {s['hidden']}, {s['heads']} heads "
        f"({s['kv_heads']} KV), {results['parameters'] / 1e6:.2f} M parameters, byte tokens (vocab 257), "
        f"RoPE base {s['rope_base']:g}.",
        f"Pretrained from scratch for {s['pretrain_steps']} steps x {s['pretrain_batch']} rows of "
        f"{s['train_len']} bytes (Python standard library sources, {s['passkey_share']:.0%} synthetic passkey "
        f"rows). Every method extends by factor {s['factor']} to {long_len} bytes; each is then fine-tuned "
        f"{s['finetune_steps']} steps x {s['finetune_batch']} rows of {long_len} bytes (lr {s['finetune_lr']:g}, "
        f"{s['finetune_warmup']} warm-up steps).",
        f"Perplexity: per byte, first N bytes of {s['eval_windows']} held-out files per length. Passkey: "
        f"{s['passkey_samples']} prompts per length, depths 5%..95%, exact match of the 5 key digits "
        "(teacher-forced argmax = greedy decoding).",
        "",
        "## Perplexity before fine-tuning",
        *_table(results, "before", "ppl", _ppl),
        "",
        "## Perplexity after fine-tuning",
        *_table(results, "after", "ppl", _ppl),
        "",
        "## Passkey accuracy before fine-tuning",
        *_table(results, "before", "passkey", lambda v: f"{v:.0%}"),
        "",
        "## Passkey accuracy after fine-tuning",
        *_table(results, "after", "passkey", lambda v: f"{v:.0%}"),
        "",
        f"## Fine-tuning loss at {long_len} bytes (training rows, nats/byte)",
    ]
    spans = loss_spans(s["finetune_steps"])
    lines.append("(mean over the steps of each span; every method sees the same rows at each step)")
    lines.append("")
    lines.append("| method | " + " | ".join(f"steps {a}-{b}" if a != b else f"step {a}" for a, b in spans) + " |")
    lines.append("|---" * (len(spans) + 1) + "|")
    for method, history in results["finetune_history"].items():
        means = span_means(history, spans)
        lines.append(f"| {METHOD_LABELS[method]} | " + " | ".join(f"{v:.3f}" for v in means) + " |")
    lines += [
        "",
        f"Wall time: {t['total_s'] / 60:.1f} min (pretraining {t['pretrain_s'] / 60:.1f}, evaluation before "
        f"fine-tuning {t['evaluate_before_s'] / 60:.1f}, fine-tuning + evaluation "
        f"{t['finetune_and_evaluate_s'] / 60:.1f}"
        + (f", LongRoPE search {t['search_s'] / 60:.1f}" if "search_s" in t else "")
        + (f", PoSE run {t['pose_s'] / 60:.1f}" if "pose_s" in t else "")
        + f") with {results['torch_threads']} torch threads.",
        "",
        "Plots: ppl_vs_position.png (per-position perplexity in the longest window), training_curves.png.",
        "",
        *search_section(results),
        *pose_section(results),
        *([""] if results.get("pose") else []),
        "## What this run shows",
        *observations(results),
        "",
    ]
    return "\n".join(lines)


def loss_spans(steps: int, parts: int = 4) -> list[tuple[int, int]]:
    """Up to ``parts`` consecutive (first, last) step ranges covering 1..steps."""
    size = max(1, math.ceil(steps / parts))
    return [(a, min(a + size - 1, steps)) for a in range(1, steps + 1, size)]


def span_means(history: list[dict], spans: list[tuple[int, int]]) -> list[float]:
    """Mean training loss over each span of steps."""
    by_step = {h["step"]: h["loss"] for h in history}
    return [sum(by_step[i] for i in range(a, b + 1)) / (b - a + 1) for a, b in spans]


def observations(results: dict[str, Any]) -> list[str]:
    """Plain statements computed from the numbers, next to the papers' claims (no claim is assumed true)."""
    before, after = results["before"], results["after"]
    lengths = results["eval_lengths"]
    short, longest = lengths[0], lengths[-1]
    get = lambda table, m, n: table[m]["ppl"][n]  # noqa: E731
    out = []
    if "default" in before:
        b = before["default"]["ppl"]
        out.append(f"- No scaling, no fine-tuning: ppl {_ppl(b[short])} at the trained length, {_ppl(b[longest])} at "
                   f"{longest // short}x (paper claim: explodes past the trained length; "
                   f"{'seen here' if b[longest] > 2 * b[short] else 'NOT seen here'}).")
    if "default" in before and "linear" in before:
        d, l0 = get(before, "default", short), get(before, "linear", short)
        out.append(f"- PI without fine-tuning at the trained length: {_ppl(l0)} vs {_ppl(d)} unscaled "
                   f"(claim: short contexts degrade; {'seen' if l0 > d * 1.05 else 'NOT seen'}).")
        if "linear" in after:
            l1 = get(after, "linear", short)
            ll0, ll1 = get(before, "linear", longest), get(after, "linear", longest)
            closed = (l0 - l1) / (l0 - d) if l0 > d else float("nan")
            verdict = ("NOT seen" if not (l1 < l0 and ll1 < ll0) else
                       f"partly seen: {closed:.0%} of the short-context gap to the unscaled model closed"
                       if l1 > d * 1.05 else "seen")
            out.append(f"- PI after {results['sizes']['finetune_steps']} fine-tuning steps: {_ppl(l1)} at the "
                       f"trained length, {_ppl(ll0)} -> {_ppl(ll1)} at {longest // short}x (claim: recovers "
                       f"after a few hundred steps; {verdict}).")
    if "linear" in after and "yarn" in after:
        hist = results["finetune_history"]
        spans = loss_spans(results["sizes"]["finetune_steps"])
        means = {m: span_means(hist[m], spans) for m in ("linear", "yarn")}
        first = {m: means[m][0] for m in means}
        last = {m: means[m][-1] for m in means}
        y, p = get(after, "yarn", longest), get(after, "linear", longest)
        out.append(f"- YaRN vs PI at {longest // short}x: before fine-tuning {_ppl(get(before, 'yarn', longest))} vs "
                   f"{_ppl(get(before, 'linear', longest))}; after {_ppl(y)} vs {_ppl(p)}; fine-tuning loss "
                   f"{first['yarn']:.3f}->{last['yarn']:.3f} vs {first['linear']:.3f}->{last['linear']:.3f} (first -> last span) "
                   f"(claim: YaRN needs fewer steps for the same result; "
                   f"{'consistent' if y <= p and first['yarn'] <= first['linear'] else 'NOT seen'} here).")
    if "longrope" in before and "yarn" in before:
        lb, yb = get(before, "longrope", longest), get(before, "yarn", longest)
        line = (f"- Searched LongRoPE vs YaRN at {longest // short}x, no fine-tuning: ppl {_ppl(lb)} vs {_ppl(yb)} on "
                f"held-out files")
        if "longrope" in after and "yarn" in after:
            line += f"; after fine-tuning {_ppl(get(after, 'longrope', longest))} vs {_ppl(get(after, 'yarn', longest))}"
        line += (f"; at the trained length {_ppl(get(before, 'longrope', short))} vs {_ppl(get(before, 'yarn', short))} "
                 f"(claim: searched factors beat YaRN without fine-tuning; "
                 f"{'seen' if lb < yb * 0.99 else 'a tie within 1%' if lb < yb * 1.01 else 'NOT seen'} here).")
        out.append(line)
    passkey = [f"{METHOD_LABELS[m]} {before[m]['passkey'][longest]:.0%} -> {after[m]['passkey'][longest]:.0%}"
               for m in results["methods"] if m in after]
    best_short = max(before[m]["passkey"][short] for m in results["methods"])
    out.append(f"- Passkey at {longest // short}x before -> after fine-tuning: {'; '.join(passkey)}. At the trained "
               f"length the best method retrieves {best_short:.0%}"
               + (" — the model never learned the task in pretraining, so the retrieval columns say nothing about "
                  "the methods." if best_short == 0 else "."))
    out.append("- A model this small, trained for minutes, is a toy: treat differences of a few percent as noise "
               "(one seed, a handful of held-out files).")
    return out
