"""`ropekit compare`: the main job. Every applicable extension method, measured and ranked, in one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.evaluation.haystack import MAX_NEEDLES
from ropekit.methods import get_method, method_names

from ropekit.commands.common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OverwriteOpt,
    check_data_or_exit,
    check_device_or_exit,
    check_out_or_exit,
    check_positive,
    cli_message,
    error_exit,
    load_model_or_exit,
    model_rope_or_exit,
)

DEFAULT_OUT = Path("ropekit-report")


def compare_command(
    model: ModelArg = None,
    target_length: Annotated[Optional[int], typer.Option("--target-length", "-n", help="the context length to reach, "
                                                         "tokens (default: twice the trained length)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder: new, empty, or ropekit's own earlier "
                                      "report (files are renamed into place when the run is done)")] = DEFAULT_OUT,
    overwrite: OverwriteOpt = False,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="haystack text: a file, a folder, a .jsonl "
                                                "with a 'text' field, or 'stdlib' (the default)")] = None,
    windows: Annotated[int, typer.Option("--windows", help="contexts of the target length per method (each one "
                                         "forward pass)")] = 1,
    needles: Annotated[int, typer.Option("--needles", help="labelled needles (retrieval questions) per context, "
                                         f"1-{MAX_NEEDLES}")] = 32,
    methods: Annotated[Optional[str], typer.Option("--methods", help="comma-separated subset of: "
                                                   f"{', '.join(method_names(comparable=True))}")] = None,
    original_length: Annotated[Optional[int], typer.Option("--original-length", help="treat the model as trained "
                                                           "at this length (default: its config's)")] = None,
    factors_file: Annotated[Optional[Path], typer.Option("--factors-file", help="LongRoPE factors (JSON with "
                                                         "short_factor/long_factor, e.g. from `ropekit search`) "
                                                         "for a longrope row (default: factors ropekit ships for "
                                                         "this model and length)")] = None,
    bucket_size: Annotated[int, typer.Option("--bucket-size", help="tokens per perplexity bucket (the "
                                             "bootstrap unit)")] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="random seed of the needles and the bootstrap")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Run every applicable RoPE extension method at the target length and write a ranked report: summary.md,
    results.json, CSVs and plots. Each method costs one forward pass per context: the perplexity of real text
    and many needle questions answered from the cached context, with intervals.

    With no arguments: the bundled SmolLM2-135M (trained at 8192 tokens) extended to 16384 tokens, on the
    Python standard library's own sources (bf16 where the CPU has native bf16).
    """
    import time

    from ropekit.evaluation.compare import CompareOptions, longrope_factors, plan_methods, run_compare

    # Every check that needs no weights, before the model loads.
    check_positive(windows=(windows, 1), needles=(needles, 1), bucket_size=(bucket_size, 1),
                   original_length=(original_length, 2), target_length=(target_length, 2))
    if needles > MAX_NEEDLES:
        error_exit(f"--needles: must be between 1 and {MAX_NEEDLES}, got {needles}")
    check_out_or_exit(out, overwrite)
    check_data_or_exit(data)
    check_device_or_exit(device, dtype)
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if methods is not None and not method_list:
        error_exit("--methods: give at least one method")
    demo_run = model in (None, "demo")
    base_cfg, _ = model_rope_or_exit(model)
    if original_length is not None:
        base_cfg = base_cfg.replace(original_max_position=original_length, max_position=None)
    if base_cfg.original_max_position is None:
        error_exit("--original-length: required: the model's config does not say its trained length")
    target = target_length or 2 * base_cfg.original_max_position
    try:
        found, source = longrope_factors(model, target, factors_file)
        plans = plan_methods(base_cfg, target, method_list, factors_file=found, factors_source=source)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), {"target length": "--target-length", "methods": "--methods",
                                          "factors_file": "--factors-file"}))
    check_something_to_compare(plans, method_list, base_cfg.method)

    if demo_run and dtype is None and device in ("auto", "cpu") and cpu_has_native_bf16():
        # CPUs with native bf16 matmul run the demo model 1.5x faster in bf16 (the rotation itself stays
        # float32 inside ropekit), which keeps the no-argument run within 10 minutes on 2 cores.
        dtype = "bfloat16"
    check_compare_size_or_exit(model, target, data, windows=windows, needles=needles, device=device, dtype=dtype)
    started = time.perf_counter()
    loaded = load_model_or_exit(model, device=device, dtype=dtype)
    load_s = round(time.perf_counter() - started, 1)
    if original_length is not None:
        loaded.rope = loaded.rope.replace(original_max_position=original_length, max_position=None)
    try:
        options = CompareOptions(target_length=target, data=data, windows=windows, needles=needles,
                                 bucket_size=bucket_size, seed=seed, methods=method_list, load_time_s=load_s,
                                 factors_file=factors_file)
        result = run_compare(loaded, options, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(cli_message(str(exc), {"data": "--data", "haystack": "--data", "text": "--data",
                                          "target length": "--target-length"}))
    typer.echo((out / "summary.md").read_text(encoding="utf-8"))
    typer.echo(f"report written to {out}/ in {result.wall_time_s:.0f} s")


def check_something_to_compare(plans: list, method_list: list[str] | None, own_method: str) -> None:
    """Refuse (one line naming --methods, exit 2) a comparison in which no method would run beside the baseline:
    every method asked for is skipped (longrope without factors, ...) or is the model's own RoPE."""
    if any(p.rope is not None for p in plans[1:]):
        return
    asked = method_list or []
    reasons = [f"{p.method} would be skipped: {p.skipped}" for p in plans[1:] if p.skipped]
    reasons += [f"{m} is the model's own RoPE (the baseline)" for m in asked
                if m == own_method and not get_method(m).needs_searched_factors]
    error_exit(f"--methods: nothing to compare with the model's own RoPE: {'; '.join(reasons) or 'no method runs'}; "
               f"the run would measure the baseline alone")


def check_compare_size_or_exit(model: str | None, target: int, data: str | None, *, windows: int, needles: int,
                               device: str, dtype: str | None) -> None:
    """Before the load: ``target`` leaves room for the needles after a question, the text holds ``windows``
    haystacks of that context and the machine can hold a forward of ``target`` tokens; one line naming
    --target-length or --data otherwise. The tokenizer loads only where the sizes do not settle it."""
    from ropekit.commands.limits import check_memory_or_exit, check_text_or_exit, lazy_tokenizer, qa_tokens_bound
    from ropekit.evaluation.haystack import qa_tokens

    tokenizer = lazy_tokenizer(model)
    room = qa_tokens_bound(1)
    if target - room < 4 * needles and tokenizer() is not None:
        context = target - qa_tokens(tokenizer(), 1)
        if context < 4 * needles:
            error_exit(f"--target-length: {target} tokens is too short for {needles} needles (a context of "
                       f"{context} tokens after the question; 4 per needle needed)")
    check_text_or_exit(model, data, windows * max(target - room, 4 * needles), joined=True, tokenizer=tokenizer,
                       length_option="--target-length",
                       exact_length=lambda tok: windows * (target - qa_tokens(tok, 1)))
    check_memory_or_exit(model, target, "--target-length", device=device, dtype=dtype)


def cpu_has_native_bf16() -> bool:
    """True where no GPU is present and the CPU multiplies bf16 natively (oneDNN AVX512-BF16 / AMX)."""
    import torch

    if torch.cuda.is_available():
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def register(app: typer.Typer) -> None:
    app.command("compare")(compare_command)
