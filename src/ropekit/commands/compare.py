"""`ropekit compare`: the main job. Every applicable extension method, measured and ranked, in one report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import DeviceOpt, DtypeOpt, ModelArg, error_exit, load_model_or_exit

DEFAULT_OUT = Path("ropekit-report")
# The no-argument run (demo model, trained at 8192) must finish in 10 minutes on 2 CPU cores: one
# forward pass of ~10k tokens per method for perplexity and one for passkey fits; 2x (16384) does not.
DEMO_TARGET_LENGTH = 9728


def compare_command(
    model: ModelArg = None,
    target_length: Annotated[Optional[int], typer.Option("--target-length", "-n", help="the context length to reach, "
                                                         "tokens (default: twice the trained length; 9728 for "
                                                         "the demo model)")] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="report folder (replaced atomically)")] = DEFAULT_OUT,
    data: Annotated[Optional[str], typer.Option("--data", "-d", help="evaluation text: a file, a folder, a .jsonl "
                                                "with a 'text' field, or 'stdlib' (the default)")] = None,
    windows: Annotated[int, typer.Option("--windows", help="real-text windows of the target length per method")] = 1,
    passkey_trials: Annotated[int, typer.Option("--passkey-trials", help="passkey prompts per depth (0 = skip "
                                                                          "passkey)")] = 1,
    passkey_depths: Annotated[str, typer.Option("--passkey-depths", help="comma-separated depths in [0, 1] (0.1: "
                                                "the key is 90% of the prompt away from the question)")] = "0.1",
    passkey_length: Annotated[Optional[int], typer.Option("--passkey-length", help="passkey prompt length "
                                                          "(default: the target length)")] = None,
    methods: Annotated[Optional[str], typer.Option("--methods", help="comma-separated subset of: default, linear, "
                                                   "ntk, dynamic, yarn, dynamic_yarn, llama3, longrope, base")] = None,
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
    from ropekit.commands.evaluate import parse_floats
    from ropekit.evaluation.compare import CompareOptions, run_compare

    if data is not None and data != "stdlib" and not Path(data).exists():
        error_exit(f"--data: no such file or folder: {data}")
    for name, value, minimum in (("--windows", windows, 1), ("--passkey-trials", passkey_trials, 0),
                                 ("--bucket-size", bucket_size, 1)):
        if value < minimum:
            error_exit(f"{name}: must be >= {minimum}, got {value}")
    demo_run = target_length is None and model in (None, "demo") and original_length is None
    if demo_run and dtype is None and device in ("auto", "cpu") and cpu_has_native_bf16():
        # CPUs with native bf16 matmul run the demo model 1.5x faster in bf16 (the rotation itself stays
        # float32 inside ropekit), which keeps the no-argument run within 10 minutes on 2 cores.
        dtype = "bfloat16"
    loaded = load_model_or_exit(model, device=device, dtype=dtype)
    if demo_run:
        target_length = DEMO_TARGET_LENGTH
    try:
        if original_length is not None:
            if original_length < 2:
                raise ValueError(f"--original-length: must be >= 2, got {original_length}")
            loaded.rope = loaded.rope.replace(original_max_position=original_length, max_position=None)
        options = CompareOptions(
            target_length=target_length, data=data, windows=windows, bucket_size=bucket_size,
            passkey_length=passkey_length, passkey_depths=tuple(parse_floats(passkey_depths, "--passkey-depths")),
            passkey_trials=passkey_trials, seed=seed,
            methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None)
        result = run_compare(loaded, options, out)
    except (ValueError, FileNotFoundError) as exc:
        error_exit(str(exc))
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
