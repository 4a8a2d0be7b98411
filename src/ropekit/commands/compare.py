"""`ropekit compare`: the main job. Every applicable extension method, measured and ranked, in one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.methods import method_names

from ropekit.commands.common import (
    DeviceOpt,
    DtypeOpt,
    ModelArg,
    OverwriteOpt,
    check_data_or_exit,
    check_device_or_exit,
    check_out_or_exit,
    check_positive,
    error_exit,
    fail_on,
    load_model_or_exit,
    model_rope_or_exit,
)

DEFAULT_OUT = Path("ropekit-report")
# The no-argument run (demo model, trained at 8192) must finish in 10 minutes on 2 CPU cores: one
# forward pass of ~10k tokens per method for perplexity and one for passkey fits; 2x (16384) does not.
DEMO_TARGET_LENGTH = 9728


def compare_command(
    model: ModelArg = None,
    target_length: Annotated[Optional[int], typer.Option("--target-length", "-n", help="the context length to reach, "
                                                         "tokens (default: twice the trained length; 9728 for "
                                                         "the demo model)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder: new, empty, or ropekit's own earlier "
                                      "report (files are renamed into place when the run is done)")] = DEFAULT_OUT,
    overwrite: OverwriteOpt = False,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="evaluation text: a file, a folder, a .jsonl "
                                                "with a 'text' field, or 'stdlib' (the default)")] = None,
    windows: Annotated[int, typer.Option("--windows", help="real-text windows of the target length per method")] = 1,
    passkey_trials: Annotated[int, typer.Option("--passkey-trials", help="passkey prompts per depth (0 = skip "
                                                                          "passkey)")] = 1,
    passkey_depths: Annotated[str, typer.Option("--passkey-depths", help="comma-separated depths in [0, 1] (0.1: "
                                                "the key is 90% of the prompt away from the question)")] = "0.1",
    passkey_length: Annotated[Optional[int], typer.Option("--passkey-length", help="passkey prompt length "
                                                          "(default: the target length)")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="comma-separated subset of: "
                                                   f"{', '.join(method_names(comparable=True))}")] = None,
    original_length: Annotated[Optional[int], typer.Option("--original-length", help="treat the model as trained "
                                                           "at this length (default: its config's)")] = None,
    bucket_size: Annotated[int, typer.Option("--bucket-size", help="tokens per perplexity bucket")] = 1024,
    seed: Annotated[int, typer.Option("--seed", help="random seed of the passkeys")] = 0,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = None,
) -> None:
    """Run every applicable RoPE extension method at the target length (perplexity per position bucket and
    passkey retrieval) and write a ranked report: summary.md, results.json, CSVs and plots.

    With no arguments: the bundled SmolLM2-135M (trained at 8192 tokens) extended to 9728 tokens, on the
    Python standard library's own sources (under 10 minutes on 2 CPU cores; bf16 where the CPU has native bf16).
    """
    from ropekit.commands.evaluate import parse_depths
    from ropekit.evaluation.compare import CompareOptions, plan_methods, run_compare

    # Every check that needs no weights, before the model loads.
    check_positive(windows=(windows, 1), passkey_trials=(passkey_trials, 0), bucket_size=(bucket_size, 1),
                   passkey_length=(passkey_length, 2), original_length=(original_length, 2),
                   target_length=(target_length, 2))
    check_out_or_exit(out, overwrite)
    check_data_or_exit(data)
    check_device_or_exit(device, dtype)
    try:
        depths = tuple(parse_depths(passkey_depths, "--passkey-depths"))
    except ValueError as exc:
        error_exit(str(exc))
    method_list = [m.strip() for m in methods.split(",") if m.strip()] if methods else None
    if methods is not None and not method_list:
        error_exit("--methods: give at least one method")
    demo_run = target_length is None and model in (None, "demo") and original_length is None
    base_cfg, _ = model_rope_or_exit(model)
    if original_length is not None:
        base_cfg = base_cfg.replace(original_max_position=original_length, max_position=None)
    if base_cfg.original_max_position is None:
        error_exit("--original-length: required: the model's config does not say its trained length")
    target = DEMO_TARGET_LENGTH if demo_run else (target_length or 2 * base_cfg.original_max_position)
    try:
        plan_methods(base_cfg, target, method_list)
    except ValueError as exc:
        message = str(exc)
        for field, option in (("target length:", "--target-length:"), ("methods:", "--methods:")):
            if message.startswith(field):
                message = option + message[len(field):]
        error_exit(message)

    if demo_run and dtype is None and device in ("auto", "cpu") and cpu_has_native_bf16():
        # CPUs with native bf16 matmul run the demo model 1.5x faster in bf16 (the rotation itself stays
        # float32 inside ropekit), which keeps the no-argument run within 10 minutes on 2 cores.
        dtype = "bfloat16"
    loaded = load_model_or_exit(model, device=device, dtype=dtype)
    if original_length is not None:
        loaded.rope = loaded.rope.replace(original_max_position=original_length, max_position=None)
    try:
        options = CompareOptions(
            target_length=target, data=data, windows=windows, bucket_size=bucket_size,
            passkey_length=passkey_length, passkey_depths=depths, passkey_trials=passkey_trials, seed=seed,
            methods=method_list)
        result = run_compare(loaded, options, out, overwrite=overwrite)
    except (ValueError, FileNotFoundError) as exc:
        message = str(exc)
        if message.startswith("length:") and "passkey" in message:
            message = "--passkey-length:" + message[len("length:"):]
        fail_on("--data", message)
    typer.echo((out / "summary.md").read_text(encoding="utf-8"))
    typer.echo(f"report written to {out}/ in {result.wall_time_s:.0f} s")


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
