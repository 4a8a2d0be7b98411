"""`ropekit eval ppl | passkey | needle | ruler`: measure a model with one or more RoPE extension methods."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OverwriteOpt,
    check_data_or_exit,
    check_device_or_exit,
    check_file_or_exit,
    check_options_used,
    check_out_or_exit,
    check_positive,
    cli_message,
    error_exit,
    extend_rope,
    fail_on,
    load_model_or_exit,
    model_rope_or_exit,
    options_for,
    typed_path,
    with_method_options,
)
from ropekit.methods import baseline_label, canonical_name, get_method, run_label

eval_app = typer.Typer(help="Evaluate a model with RoPE extension methods: perplexity, passkey, needle, RULER.",
                       no_args_is_help=True)

MethodsOpt = Annotated[str, typer.Option("--method", "-m", help="scaling method(s), comma-separated, e.g. yarn,dynamic")]
LengthsOpt = Annotated[Optional[str], typer.Option("--lengths", "-l", help="comma-separated context lengths in "
                                                   "tokens (default: the trained length and twice it)")]
NoBaselineOpt = Annotated[bool, typer.Option("--no-baseline", help="skip the unscaled model (included by default)")]
JsonOpt = Annotated[Optional[Path], typer.Option("--json", parser=typed_path, help="write the results as JSON to this file")]
OutOpt = Annotated[Optional[Path], typer.Option("--out", "-o", help="write JSON, CSV, Markdown and PNG files to this folder")]
DataOpt = Annotated[Optional[str], typer.Option("--data", "-d", help="a text file, a folder of text files, a .jsonl file "
                                                "with a 'text' field, or 'stdlib' (the Python standard library's "
                                                "sources, the default)")]
DepthsOpt = Annotated[str, typer.Option("--depths", help="comma-separated depths of the key in [0, 1]")]
TrialsOpt = Annotated[int, typer.Option("--trials", help="prompts per (length, depth), each with a new random key")]
SeedOpt = Annotated[int, typer.Option("--seed", help="random seed of the keys")]


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


def parse_depths(text: str, name: str = "--depths") -> list[float]:
    """Comma-separated depths, each in [0, 1]."""
    values = parse_floats(text, name)
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"{name}: each depth must be in [0, 1] (0 = the start of the context, 1 = just before "
                         f"the question), got {text!r}")
    return values


def method_runs(base_cfg, methods: str, method_options: dict[str, Any], *, baseline: bool) -> list:
    """``MethodRun``s for the comma-separated ``methods``, each given the method options it reads, the model's own
    RoPE first unless ``baseline`` is False. An option no chosen method reads is an error. Raises ValueError
    naming the CLI option at fault."""
    from ropekit.evaluation.perplexity import MethodRun

    names = [canonical_name(m.strip()) for m in methods.split(",") if m.strip()]
    if not names:
        raise ValueError("--method: give at least one method")
    for name in names:
        try:
            get_method(name)
        except ValueError as exc:
            raise ValueError(f"--method:{str(exc).partition(':')[2]}") from None
    check_options_used(names, method_options)
    runs = [MethodRun(baseline_label(base_cfg), base_cfg)] if baseline else []
    for name in names:
        cfg = extend_rope(base_cfg, name, options_for(name, method_options))
        if not any(r.rope == cfg for r in runs):
            runs.append(MethodRun(run_label(cfg), cfg))
    return runs


def runs_and_lengths(base_cfg, methods: str, method_options: dict[str, Any], lengths: str | None, *,
                     baseline: bool) -> tuple[list, list[int]]:
    """``method_runs`` and the ``--lengths`` to measure (default: the trained length and twice it)."""
    runs = method_runs(base_cfg, methods, method_options, baseline=baseline)
    trained = base_cfg.trained_length
    # An empty --lengths ("") is an error, not the default.
    return runs, (parse_ints(lengths, "--lengths") if lengths is not None else
                  [n for n in (trained, 2 * trained) if n])


def preflight(model: str | None, method: str, method_options: dict[str, Any], lengths: str | None, *,
              baseline: bool, out: Path | None, json_path: Path | None, overwrite: bool, device: str,
              dtype: str | None, data: str | None = None, data_option: str = "--data", text: str | None = None,
              windows: int = 1, probe: Callable[[Any, list[int]], None] | None = None) -> list[int]:
    """Every check an ``eval`` command can make before loading weights: outputs, data, device, the model's
    files and config, the methods and their options, the lengths, that the text has tokens enough for the
    longest length (``text``: "windows", ``windows`` documents that long; "joined", the documents joined into
    one haystack; None: the command reads no text), that the prompts of the lengths below ``PROBE_BELOW`` can be
    built (``probe(tokenizer, lengths)`` builds them, with the tokenizer alone) and that the machine can hold the
    longest. Exits with one line on the first problem; returns the lengths."""
    from ropekit.commands.limits import check_memory_or_exit, check_text_or_exit, load_tokenizer

    check_out_or_exit(out, overwrite, source=model)
    check_file_or_exit(json_path, overwrite, out=out, source=model)
    check_data_or_exit(data, data_option)
    check_device_or_exit(device, dtype)
    base_cfg, _ = model_rope_or_exit(model)
    try:
        _, length_list = runs_and_lengths(base_cfg, method, method_options, lengths, baseline=baseline)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(str(exc))
    if not length_list:
        error_exit("--lengths: required (the model's config does not say its trained length)")
    if text is not None:
        check_text_or_exit(model, data, max(length_list), length_option="--lengths", data_option=data_option,
                           count=max(windows, 1), joined=text == "joined")
    short = [n for n in length_list if n < PROBE_BELOW]
    if probe is not None and short:
        tokenizer = load_tokenizer(model)
        if tokenizer is not None:
            try:
                probe(tokenizer, short)
            except (ValueError, FileNotFoundError) as exc:
                error_exit(cli_message(str(exc), renames(data_option)))
    check_memory_or_exit(model, max(length_list), "--lengths", device=device, dtype=dtype)
    return length_list


# A prompt's fixed parts (instruction, needle, question) take a few hundred tokens at most: lengths below this are
# tried with the tokenizer before the model loads (a length too short for a prompt is refused then).
PROBE_BELOW = 1024


def renames(data_option: str = "--data") -> dict[str, str]:
    """The eval commands' library fields -> their options (``length: ...`` -> ``--lengths: ...``)."""
    return {"length": "--lengths", "lengths": "--lengths", "depth": "--depths", "depths": "--depths",
            "trials": "--trials", "samples": "--samples", "tasks": "--tasks", "data": data_option,
            "haystack": data_option, "text": data_option}


def _load(model: str | None, device: str, dtype: str | None):
    return load_model_or_exit(model, device=device, dtype=dtype)


def _write_outputs(out: Path | None, json_path: Path | None, payload: dict, files: dict, *, command: str,
                   overwrite: bool) -> None:
    from ropekit.evaluation import report
    from ropekit.output import OutputDir, write_file_atomic

    if json_path is not None:
        write_file_atomic(json_path, report.json_text(payload))
    if out is not None:
        with OutputDir(out, command=command, overwrite=overwrite) as folder:
            folder.write_text(next(n for n in files if n.endswith(".json")), report.json_text(payload))
            for name, writer in files.items():
                if not name.endswith(".json"):
                    writer(folder.path(name))


# ---------------------------------------------------------------------- ppl
@eval_app.command("ppl")
@with_method_options
def ppl_command(
    model: ModelArg = None,
    method: MethodsOpt = "yarn",
    lengths: LengthsOpt = None,
    data: DataOpt = None,
    bucket_size: Annotated[int, typer.Option("--bucket-size", help="tokens per position bucket")] = 1024,
    windows: Annotated[int, typer.Option("--windows", help="documents per length (the first ones with enough "
                                                           "tokens; 0 = every one)")] = 1,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="positions per loss chunk (memory bound)")] = 1024,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    no_baseline: NoBaselineOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    method_options: dict = None,
) -> None:
    """Perplexity of the first N tokens of each document, per length and per position bucket."""
    from ropekit.evaluation import report
    from ropekit.evaluation.data import load_documents, prefix_windows, token_windows
    from ropekit.evaluation.perplexity import evaluate_perplexity

    check_positive(bucket_size=(bucket_size, 1), chunk_size=(chunk_size, 1), windows=(windows, 0))
    preflight(model, method, method_options, lengths, baseline=not no_baseline, out=out, json_path=json_path,
              overwrite=overwrite, device=device, dtype=dtype, data=data, text="windows", windows=windows)
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, method_options, lengths,
                                             baseline=not no_baseline)
        if not length_list:
            raise ValueError("--lengths: required (the model's trained length is unknown)")
        longest = max(length_list)
        docs = token_windows(load_documents(data), loaded.tokenizer, longest, windows or None)
        by_length = prefix_windows(docs, length_list)
        results = evaluate_perplexity(loaded.model, runs, length_list, by_length, bucket_size=bucket_size,
                                      chunk_size=chunk_size)
    except (ValueError, FileNotFoundError) as exc:
        fail_on("--data", str(exc))
    typer.echo(report.perplexity_markdown(results))
    payload = report.perplexity_payload(loaded.source, results, trained_length=loaded.rope.original_max_position)
    _write_outputs(out, json_path, payload, {
        "ppl.json": None,
        "ppl.csv": lambda p: report.write_text_atomic(p, report.csv_text(report.perplexity_rows(results))),
        "ppl.md": lambda p: report.write_text_atomic(p, report.perplexity_markdown(results)),
        "ppl.png": lambda p: report.plot_bucket_ppl(results, p, trained_length=loaded.rope.original_max_position,
                                                    title=f"{Path(loaded.source).name}: perplexity by position"),
    }, command="eval ppl", overwrite=overwrite)


# ---------------------------------------------------------------------- passkey and needle
def _retrieval_outputs(out, json_path, loaded, results, task: str, overwrite: bool) -> None:
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
    }, command=f"eval {task}", overwrite=overwrite)


@eval_app.command("passkey")
@with_method_options
def passkey_command(
    model: ModelArg = None,
    method: MethodsOpt = "yarn",
    lengths: LengthsOpt = None,
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: TrialsOpt = 1,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    no_baseline: NoBaselineOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    method_options: dict = None,
) -> None:
    """Passkey retrieval (a 5-digit key in filler text, greedy answer): accuracy over depth x length."""
    from ropekit.evaluation.passkey import evaluate_passkey

    from ropekit.evaluation.passkey import passkey_builder

    depth_list = _depths_or_exit(depths, trials)

    def probe(tokenizer, short: list[int]) -> None:  # the prompts evaluate_retrieval builds first
        build = passkey_builder(tokenizer)
        for n, d, t in ((n, d, t) for n in short for d in depth_list for t in range(trials)):
            build(n, d, random.Random(f"{seed}-{n}-{d}-{t}"))

    preflight(model, method, method_options, lengths, baseline=not no_baseline, out=out, json_path=json_path,
              overwrite=overwrite, device=device, dtype=dtype, probe=probe)
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, method_options, lengths,
                                             baseline=not no_baseline)
        results = evaluate_passkey(loaded.model, loaded.tokenizer, runs, length_list, depth_list, trials, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), renames()))
    _retrieval_outputs(out, json_path, loaded, results, "passkey", overwrite)


@eval_app.command("needle")
@with_method_options
def needle_command(
    model: ModelArg = None,
    haystack: Annotated[Optional[str], typer.Option("--haystack", help="real text for the haystack (file, folder, "
                                                    ".jsonl, or 'stdlib', the default)")] = None,
    method: MethodsOpt = "yarn",
    lengths: LengthsOpt = None,
    depths: DepthsOpt = "0,0.25,0.5,0.75,1",
    trials: TrialsOpt = 1,
    seed: SeedOpt = 0,
    needle: Annotated[Optional[str], typer.Option("--needle", help="a custom needle sentence (with --question, --answer)")] = None,
    question: Annotated[Optional[str], typer.Option("--question", help="the question the needle answers")] = None,
    answer: Annotated[Optional[str], typer.Option("--answer", help="the key fact a correct answer contains")] = None,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    no_baseline: NoBaselineOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    method_options: dict = None,
) -> None:
    """Needle in a haystack: a sentence hidden in real text at each depth x length; accuracy heat map."""
    from ropekit.evaluation.data import load_documents
    from ropekit.evaluation.needle import evaluate_needle

    depth_list = _depths_or_exit(depths, trials)
    custom = {"--needle": needle, "--question": question, "--answer": answer}
    if any(v is not None for v in custom.values()) and not all(v for v in custom.values()):
        missing = ", ".join(k for k, v in custom.items() if not v)
        error_exit(f"{missing}: a custom needle needs --needle, --question and --answer together")
    def probe(tokenizer, short: list[int]) -> None:  # the prompts evaluate_retrieval builds first
        from ropekit.evaluation.needle import needle_builder

        build = needle_builder(tokenizer, load_documents(haystack), max(short), needle=needle, question=question,
                               answer=answer)
        for n, d, t in ((n, d, t) for n in short for d in depth_list for t in range(trials)):
            build(n, d, random.Random(f"{seed}-{n}-{d}-{t}"))

    preflight(model, method, method_options, lengths, baseline=not no_baseline, out=out, json_path=json_path,
              overwrite=overwrite, device=device, dtype=dtype, data=haystack,
              data_option="--haystack", text="joined", probe=probe)
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, method_options, lengths,
                                             baseline=not no_baseline)
        results = evaluate_needle(loaded.model, loaded.tokenizer, load_documents(haystack), runs, length_list,
                                  depth_list, trials, seed=seed, needle=needle, question=question, answer=answer)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), renames("--haystack")))
    _retrieval_outputs(out, json_path, loaded, results, "needle", overwrite)


# ---------------------------------------------------------------------- RULER
@eval_app.command("ruler")
@with_method_options
def ruler_command(
    model: ModelArg = None,
    method: MethodsOpt = "yarn",
    lengths: LengthsOpt = None,
    tasks: Annotated[str, typer.Option("--tasks", help="comma-separated tasks, or 'all': niah_single, niah_multikey, "
                                       "niah_multivalue, variable_tracking, common_words, frequent_words")] = "all",
    samples: Annotated[int, typer.Option("--samples", help="contexts per (task, length); each is one prefill, "
                                         "all its questions answered from the cache")] = 2,
    data: DataOpt = None,
    seed: SeedOpt = 0,
    json_path: JsonOpt = None,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    no_baseline: NoBaselineOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
    method_options: dict = None,
) -> None:
    """RULER-style tasks (needles with distractors, multi-value, variable tracking, common and frequent words),
    synthesised locally and seeded, scored by string match, per length with 95% intervals."""
    from ropekit.evaluation.ruler import TASKS, evaluate_ruler, plot_ruler, ruler_markdown

    check_positive(samples=(samples, 1))
    task_list = list(TASKS) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    unknown = [t for t in task_list if t not in TASKS]
    if unknown or not task_list:
        error_exit(f"--tasks: {', '.join(unknown) or 'none given'} not accepted; accepted: all, {', '.join(TASKS)}")
    from ropekit.evaluation.data import concatenated_tokens, load_documents
    from ropekit.evaluation.ruler import build_sample, word_vocabulary

    def vocabulary() -> list[str]:  # the word tasks' words, from the text alone
        return word_vocabulary(load_documents(data)) if "common_words" in task_list else []

    def probe(tokenizer, short: list[int]) -> None:  # the samples evaluate_ruler builds first
        text_ids = concatenated_tokens(load_documents(data), tokenizer, max(short))
        words = vocabulary()
        for t, n, i in ((t, n, i) for t in task_list for n in short for i in range(samples)):
            build_sample(t, tokenizer, n, random.Random(f"{seed}-{t}-{n}-{i}"), text_ids, words)

    preflight(model, method, method_options, lengths, baseline=not no_baseline, out=out, json_path=json_path,
              overwrite=overwrite, device=device, dtype=dtype, data=data, text="joined", probe=probe)
    try:
        vocabulary()
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), renames()))
    loaded = _load(model, device, dtype)
    try:
        runs, length_list = runs_and_lengths(loaded.rope, method, method_options, lengths,
                                             baseline=not no_baseline)
        results = evaluate_ruler(loaded.model, loaded.tokenizer, runs, length_list, task_list, samples,
                                 data=data, seed=seed)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), renames()))
    from ropekit.evaluation import report

    table = ruler_markdown(results)
    typer.echo(table)
    payload = {"model": loaded.source, "task": "ruler", "trained_length": loaded.rope.original_max_position,
               "results": [r.to_dict() for r in results]}
    name = Path(loaded.source).name or loaded.source
    _write_outputs(out, json_path, payload, {
        "ruler.json": None,
        "ruler.md": lambda p: report.write_text_atomic(p, f"# RULER-style tasks: {name}\n\n{table}"),
        "ruler.csv": lambda p: report.write_text_atomic(p, report.csv_text(
            [dict(a, method=r.label) for r in results for a in r.answers])),
        "ruler.png": lambda p: plot_ruler(results, p, model_name=name,
                                          trained_length=loaded.rope.original_max_position),
    }, command="eval ruler", overwrite=overwrite)


def _depths_or_exit(depths: str, trials: int) -> list[float]:
    check_positive(trials=(trials, 1))
    try:
        return parse_depths(depths)
    except ValueError as exc:
        error_exit(str(exc))


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
