"""`ropekit eval ppl | passkey | needle`: measure a model with one or more RoPE extension methods."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    OPTION_FIELDS,
    AttentionFactorOpt,
    BetaFastOpt,
    BetaSlowOpt,
    DeviceOpt,
    DtypeOpt,
    FactorOpt,
    FactorsFileOpt,
    HighFreqOpt,
    LowFreqOpt,
    ModelArg,
    MscaleAllDimOpt,
    MscaleOpt,
    NewBaseOpt,
    OriginalLengthOpt,
    build_rope_config,
    error_exit,
    load_model_or_exit,
)
from ropekit.methods import get_method, method_names

eval_app = typer.Typer(help="Evaluate a model with RoPE extension methods: perplexity, passkey, needle.",
                       no_args_is_help=True)

MethodsOpt = Annotated[str, typer.Option("--method", "-m", help="scaling method(s), comma-separated, e.g. yarn,dynamic")]
LengthsOpt = Annotated[Optional[str], typer.Option("--lengths", "-l", help="comma-separated context lengths in "
                                                   "tokens (default: the trained length and twice it)")]
NoBaselineOpt = Annotated[bool, typer.Option("--no-baseline", help="skip the unscaled model (included by default)")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", help="write the results as JSON to this file")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="write JSON, CSV, Markdown and PNG files to this folder")]
DataOpt = Annotated[Optional[str], typer.Option("--data", "-d", help="a text file, a folder of text files, a .jsonl file "
                                                "with a 'text' field, or 'stdlib' (the Python standard library's "
                                                "sources, the default)")]
DepthsOpt = Annotated[str, typer.Option("--depths", help="comma-separated depths of the key in [0, 1]")]
TrialsOpt = Annotated[int, typer.Option("--trials", help="prompts per (length, depth), each with a new random key")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed of the keys")]
TruncateOpt = Annotated[Optional[bool], typer.Option("--truncate/--no-truncate", help="yarn: floor/ceil the ramp bounds (default on)")]


def parse_ints(text: str, name: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v < 2 for v in values):
        raise ValueError(f"{name}: expected comma-separated integers >= 2, got {text!r}")
    return sorted(set(values))


def parse_floats(text: str, name: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise ValueError(f"{name}: expected comma-separated numbers, got {text!r}")
    return values


def method_runs(base_cfg, methods: str, factor: float | None, *, baseline: bool, factors_file=None,
                **options: Any) -> list:
    """``MethodRun``s for the comma-separated ``methods`` (each given the options it reads), the model's own
    RoPE first unless ``baseline`` is False. Raises ValueError naming the CLI option at fault."""
    from ropekit.config import METHOD_ALIASES
    from ropekit.evaluation.perplexity import MethodRun

    names = [METHOD_ALIASES.get(m.strip(), m.strip()) for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError("--method: give at least one method")
    given = {k: v for k, v in options.items() if v is not None}
    known = set(method_names())
    reads = {n: set(get_method(n).required) | set(get_method(n).accepted) | {"original_max_position",
                                                                              "max_position"}
             for n in names if n in known}
    for opt in given:  # an option no chosen method reads is a mistake: let build_rope_config name it
        if not any(OPTION_FIELDS[opt] in r for r in reads.values()):
            build_rope_config(base_cfg, names[0], factor, **{opt: given[opt]})
    label = "default" if base_cfg.method == "default" else f"{base_cfg.method} (model's own)"
    runs = [MethodRun(label, base_cfg)] if baseline else []
    for name in names:
        mine = {k: v for k, v in given.items() if name not in reads or OPTION_FIELDS[k] in reads[name]}
        # the shared --factor goes to every method that takes one (base takes --new-base, default nothing)
        cfg = build_rope_config(base_cfg, name, factor if len(names) == 1 or name not in ("default", "base")
                                else None, factors_file=factors_file if name == "longrope" else None, **mine)
        label = f"base {cfg.new_base:g}" if name == "base" else (
            name if cfg.factor is None else f"{name} x{cfg.factor:g}")
        if not any(r.rope == cfg for r in runs):
            runs.append(MethodRun(label, cfg))
    return runs


def runs_and_lengths(base_cfg, methods: str, factor: float | None, lengths: str | None, *, baseline: bool,
                     factors_file=None, **options: Any) -> tuple[list, list[int]]:
    """``method_runs`` and the ``--lengths`` to measure (default: the trained length and twice it)."""
    runs = method_runs(base_cfg, methods, factor, baseline=baseline, factors_file=factors_file, **options)
    trained = base_cfg.original_max_position
    return runs, (parse_ints(lengths, "--lengths") if lengths else [n for n in (trained, 2 * trained) if n])


def _load(model: str | None, device: str, dtype: str | None):
    return load_model_or_exit(model, device=device, dtype=dtype)


def _write_outputs(out: Path | None, json_path: Path | None, payload: dict, files: dict) -> None:
    from ropekit.evaluation import report

    if json_path is not None:
        report.write_json(json_path, payload)
    if out is not None:
        with report.atomic_dir(out) as tmp:
            report.write_json(tmp / next(n for n in files if n.endswith(".json")), payload)
            for name, writer in files.items():
                if not name.endswith(".json"):
                    writer(tmp / name)


# ---------------------------------------------------------------------- ppl
@eval_app.command("ppl")
def ppl_command(
    model: ModelArg = None,
    method: MethodsOpt = "yarn",
    factor: FactorOpt = None,
    lengths: LengthsOpt = None,
    data: DataOpt = None,
    bucket_size: Annotated[int, typer.Option("--bucket-size", help="tokens per position bucket")] = 1024,
    windows: Annotated[int, typer.Option("--windows", help="documents per length (the first ones with enough "
                                                           "tokens; 0 = every one)")] = 1,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="positions per loss chunk (memory bound)")] = 1024,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    no_baseline: NoBaselineOpt = False,
    beta_fast: BetaFastOpt = None,
    beta_slow: BetaSlowOpt = None,
    attention_factor: AttentionFactorOpt = None,
    mscale: MscaleOpt = None,
    mscale_all_dim: MscaleAllDimOpt = None,
    truncate: TruncateOpt = None,
    original_length: OriginalLengthOpt = None,
    low_freq_factor: LowFreqOpt = None,
    high_freq_factor: HighFreqOpt = None,
    new_base: NewBaseOpt = None,
    factors_file: FactorsFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Perplexity of the first N tokens of each document, per length and per position bucket."""
    from ropekit.evaluation import report
    from ropekit.evaluation.data import load_documents, prefix_windows, token_windows
    from ropekit.evaluation.perplexity import evaluate_perplexity

    options = dict(beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor, mscale=mscale,
                   mscale_all_dim=mscale_all_dim, truncate=truncate, original_length=original_length,
                   low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, new_base=new_base)
    if bucket_size < 1 or chunk_size < 1 or windows < 0:
        error_exit("--bucket-size and --chunk-size must be >= 1, --windows >= 0")
    if data is not None and data != "stdlib" and not Path(data).exists():
        error_exit(f"--data: no such file or folder: {data}")
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, factor, lengths, baseline=not no_baseline,
                                             factors_file=factors_file, **options)
        if not length_list:
            raise ValueError("--lengths: required (the model's trained length is unknown)")
        longest = max(length_list)
        docs = token_windows(load_documents(data), loaded.tokenizer, longest, windows or None)
        by_length = prefix_windows(docs, length_list)
        results = evaluate_perplexity(loaded.model, runs, length_list, by_length, bucket_size=bucket_size,
                                      chunk_size=chunk_size)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(str(exc))
    typer.echo(report.perplexity_markdown(results))
    payload = report.perplexity_payload(loaded.source, results, trained_length=loaded.rope.original_max_position)
    _write_outputs(out, json_path, payload, {
        "ppl.json": None,
        "ppl.csv": lambda p: report.write_text_atomic(p, report.csv_text(report.perplexity_rows(results))),
        "ppl.md": lambda p: report.write_text_atomic(p, report.perplexity_markdown(results)),
        "ppl.png": lambda p: report.plot_bucket_ppl(results, p, trained_length=loaded.rope.original_max_position,
                                                    title=f"{Path(loaded.source).name}: perplexity by position"),
    })


# ---------------------------------------------------------------------- passkey and needle
def _retrieval_outputs(out, json_path, loaded, results, task: str) -> None:
    from ropekit.evaluation import report

    for r in results:
        row = "  ".join(f"{n}: " + " ".join(f"{a:.0%}" for a in accs) for n, accs in zip(r.lengths, r.accuracy))
        typer.echo(f"{r.label:<16} {task} mean {r.mean_accuracy:.0%}  ({row})")
    payload = {"model": loaded.source, "task": task, "results": [r.to_dict() for r in results]}
    rows = [dict(t, label=r.label, method=r.method) for r in results for t in r.trials]
    _write_outputs(out, json_path, payload, {
        f"{task}.json": None,
        f"{task}.csv": lambda p: report.write_text_atomic(p, report.csv_text(rows)),
        f"{task}.png": lambda p: report.plot_retrieval_grid(results, p, title=f"{task} accuracy"),
    })


@eval_app.command("passkey")
def passkey_command(
    model: ModelArg = None,
    method: MethodsOpt = "yarn",
    factor: FactorOpt = None,
    lengths: LengthsOpt = None,
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: TrialsOpt = 1,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    no_baseline: NoBaselineOpt = False,
    beta_fast: BetaFastOpt = None,
    beta_slow: BetaSlowOpt = None,
    attention_factor: AttentionFactorOpt = None,
    mscale: MscaleOpt = None,
    mscale_all_dim: MscaleAllDimOpt = None,
    truncate: TruncateOpt = None,
    original_length: OriginalLengthOpt = None,
    low_freq_factor: LowFreqOpt = None,
    high_freq_factor: HighFreqOpt = None,
    new_base: NewBaseOpt = None,
    factors_file: FactorsFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Passkey retrieval (a 5-digit key in filler text, greedy answer): accuracy over depth x length."""
    from ropekit.evaluation.passkey import evaluate_passkey

    options = dict(beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor, mscale=mscale,
                   mscale_all_dim=mscale_all_dim, truncate=truncate, original_length=original_length,
                   low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, new_base=new_base)
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, factor, lengths, baseline=not no_baseline,
                                             factors_file=factors_file, **options)
        results = evaluate_passkey(loaded.model, loaded.tokenizer, runs, length_list,
                                   parse_floats(depths, "--depths"), trials, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(str(exc))
    _retrieval_outputs(out, json_path, loaded, results, "passkey")


@eval_app.command("needle")
def needle_command(
    model: ModelArg = None,
    haystack: Annotated[Optional[str], typer.Option("--haystack", help="real text for the haystack (file, folder, "
                                                    ".jsonl, or 'stdlib', the default)")] = None,
    method: MethodsOpt = "yarn",
    factor: FactorOpt = None,
    lengths: LengthsOpt = None,
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: TrialsOpt = 1,
    seed: SeedOpt = 0,
    needle: Annotated[Optional[str], typer.Option("--needle", help="a custom needle sentence (with --question, --answer)")] = None,
    question: Annotated[Optional[str], typer.Option("--question", help="the question the needle answers")] = None,
    answer: Annotated[Optional[str], typer.Option("--answer", help="the key fact a correct answer contains")] = None,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    no_baseline: NoBaselineOpt = False,
    beta_fast: BetaFastOpt = None,
    beta_slow: BetaSlowOpt = None,
    attention_factor: AttentionFactorOpt = None,
    mscale: MscaleOpt = None,
    mscale_all_dim: MscaleAllDimOpt = None,
    truncate: TruncateOpt = None,
    original_length: OriginalLengthOpt = None,
    low_freq_factor: LowFreqOpt = None,
    high_freq_factor: HighFreqOpt = None,
    new_base: NewBaseOpt = None,
    factors_file: FactorsFileOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Needle in a haystack: a sentence hidden in real text at each depth x length; accuracy heat map."""
    from ropekit.evaluation.data import load_documents
    from ropekit.evaluation.needle import evaluate_needle

    options = dict(beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor, mscale=mscale,
                   mscale_all_dim=mscale_all_dim, truncate=truncate, original_length=original_length,
                   low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, new_base=new_base)
    if haystack is not None and haystack != "stdlib" and not Path(haystack).exists():
        error_exit(f"--haystack: no such file or folder: {haystack}")
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, factor, lengths, baseline=not no_baseline,
                                             factors_file=factors_file, **options)
        results = evaluate_needle(loaded.model, loaded.tokenizer, load_documents(haystack), runs, length_list,
                                  parse_floats(depths, "--depths"), trials, seed=seed, needle=needle,
                                  question=question, answer=answer)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(str(exc))
    _retrieval_outputs(out, json_path, loaded, results, "needle")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
