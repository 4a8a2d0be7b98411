"""`ropekit finetune`: continue training a model at a longer length with a RoPE scaling method."""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Optional

import typer

from ropekit.methods import method_names


def register(app: typer.Typer) -> None:
    from ropekit.commands.common import with_method_options

    app.command("finetune")(with_method_options(finetune_command))


def finetune_command(
    model: str = typer.Argument(..., help="Hub id, model folder, .gguf file, or 'demo' (SmolLM2-135M)."),
    method: str = typer.Option(..., "--method", "-m", help=f"Scaling method: {', '.join(method_names())} "
                                                           "(default = no scaling)."),
    seq_len: int = typer.Option(..., "--seq-len", help="Training length in tokens (>= the trained length)."),
    data: Path = typer.Option(..., "--data", help="Text file, .jsonl ({\"text\": ...} per line) or folder."),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoints/, model/, training.json (new, empty, or "
                                                "this command's earlier run)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into an --out folder holding other files "
                                                              "(they are kept)."),
    lr: float = typer.Option(2e-5, "--lr", help="Peak learning rate (AdamW)."),
    warmup: int = typer.Option(20, "--warmup", help="Linear warm-up steps."),
    weight_decay: float = typer.Option(0.0, "--weight-decay"),
    grad_accum: int = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step."),
    batch_size: int = typer.Option(1, "--batch-size", help="Rows per micro-batch per process."),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="Gradient clipping (0: off)."),
    lora: bool = typer.Option(False, "--lora/--no-lora", help="Train LoRA adapters (peft) instead of all weights."),
    lora_rank: int = typer.Option(8, "--lora-rank"),
    checkpoint_every: int = typer.Option(0, "--checkpoint-every", help="Save a checkpoint every N steps (0: never)."),
    resume: bool = typer.Option(False, "--resume/--no-resume", help="Continue from the newest checkpoint in --out."),
    gradient_checkpointing: bool = typer.Option(True, "--gradient-checkpointing/--no-gradient-checkpointing"),
    strategy: str = typer.Option("ddp", "--strategy", help="Under torchrun: ddp or fsdp."),
    seed: int = typer.Option(0, "--seed"),
    device: Optional[str] = typer.Option(None, "--device", help="auto, cpu, cuda or cuda:N (default auto: cuda when available; under torchrun one GPU per local rank)."),
    evaluate: bool = typer.Option(True, "--eval/--no-eval",
                                  help="At the end: perplexity at the trained length and at --seq-len."),
    eval_data: Optional[Path] = typer.Option(None, "--eval-data", help="Held-out text for the evaluation "
                                             "(default: --data; 'stdlib' for the Python sources)."),
    eval_windows: int = typer.Option(4, "--eval-windows", help="Documents per evaluation length."),
    export: bool = typer.Option(True, "--export/--no-export", help="Write a transformers checkpoint to OUT/model."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    pose: bool = typer.Option(False, "--pose/--no-pose", help="PoSE: train --window-token windows whose position "
                                                              "ids are spread over --seq-len (cost of --window)."),
    window: Optional[int] = typer.Option(None, "--window", help="With --pose: tokens per training row "
                                                                "(2 <= W < --seq-len)."),
    pose_chunks: int = typer.Option(2, "--pose-chunks", help="With --pose: pieces per window, each shifted by its "
                                                             "own random skip (the paper: 2)."),
    mixed_windows: bool = typer.Option(False, "--mixed-windows/--no-mixed-windows",
                                       help="LongRoPE2 mixed context windows: each row rotates as at its own length "
                                            "(rows up to the trained length use longrope's short factors). "
                                            "Length-dependent methods only."),
    context_parallel: int = typer.Option(1, "--context-parallel", help="Split each sequence over N ranks "
                                         "(under torchrun --nproc_per_node N); attention sees the whole prefix."),
    cp_mode: str = typer.Option("zigzag", "--cp-mode", help="With --context-parallel: zigzag (load-balanced) or "
                                                            "contiguous shards."),
    method_options: dict = None,
) -> None:
    """Fine-tune MODEL at --seq-len with RoPE scaling --method/--factor on packed documents from --data.

    Runs data-parallel when started by torchrun (gloo on CPU, nccl on GPU); with --context-parallel N, the N
    processes share each sequence instead. With --pose, rows are --window tokens long and their position ids
    reach --seq-len.
    """
    from ropekit.commands.common import (
        check_data_or_exit,
        check_device_or_exit,
        check_out_or_exit,
        error_exit,
        extend_or_exit,
        extend_rope,
        model_rope_or_exit,
    )
    from ropekit.commands.limits import check_memory_or_exit, check_text_or_exit
    from ropekit.training.finetune import OUTPUT_NAMES, FinetuneSettings, finetune, list_checkpoints, warmup_warning

    # Every check that needs no weights, before the model loads.
    if window is not None and not pose:
        error_exit("--window: only used with --pose")
    if pose and window is None:
        error_exit("--window: PoSE needs a window length (--pose --window W, 2 <= W < --seq-len)")
    if pose and window >= seq_len:
        error_exit(f"--window: must be smaller than --seq-len {seq_len} (PoSE trains short windows for a long "
                   f"target), got {window}")
    try:
        settings = FinetuneSettings(
            seq_len=seq_len, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, batch_size=batch_size,
            grad_accum=grad_accum, max_grad_norm=max_grad_norm or None, gradient_checkpointing=gradient_checkpointing,
            lora=lora, lora_rank=lora_rank, checkpoint_every=checkpoint_every, seed=seed, strategy=strategy,
            pose=pose, window=window, pose_chunks=pose_chunks, mixed_windows=mixed_windows,
            context_parallel=context_parallel, cp_mode=cp_mode,
        )
    except ValueError as exc:
        error_exit(_cli_message(str(exc)))
    if context_parallel > 1 and _world_size() != context_parallel:
        error_exit(f"--context-parallel: {context_parallel} needs exactly {context_parallel} processes "
                   f"(torchrun --nproc_per_node {context_parallel} -m ropekit.cli finetune ...), got {_world_size()}")
    if eval_windows < 1:
        error_exit(f"--eval-windows: must be >= 1, got {eval_windows}")
    check_device_or_exit(device)
    check_data_or_exit(data, "--data")
    if eval_data is not None:
        check_data_or_exit(eval_data, "--eval-data")
    if resume and not out.is_dir():
        error_exit(f"--resume: {out} does not exist; there is no run to resume")
    check_out_or_exit(out, overwrite or resume, names=OUTPUT_NAMES, source=model)
    if resume and not list_checkpoints(out):
        error_exit(f"--resume: {out} holds no checkpoint ropekit wrote (checkpoints/step-N from an earlier "
                   f"ropekit finetune --checkpoint-every N); there is no run to resume")
    base_cfg, _ = model_rope_or_exit(model)
    extended = extend_or_exit(base_cfg, method, method_options)
    # Enough text and memory for --seq-len, from the files' sizes and the config alone (packing joins documents
    # with EOS, so no tokenizer is needed to bound the supply).
    check_text_or_exit(model, data, seq_len, joined=True, length_option="--seq-len", tokenizer=lambda: None)
    check_memory_or_exit(model, seq_len, "--seq-len", device=device, dtype=None)
    if mixed_windows and not extended.length_dependent:
        error_exit(f"--mixed-windows: needs a method whose rotation depends on the length (longrope, dynamic, "
                   f"dynamic_yarn); --method {method} rotates every row alike")
    trained = base_cfg.original_max_position
    if trained is not None and seq_len < trained:
        error_exit(f"--seq-len: {seq_len} is shorter than the model's trained length {trained}; fine-tuning for a "
                   f"longer context needs --seq-len >= {trained}")
    early_warning = warmup_warning(settings)
    if early_warning and _is_main():
        typer.echo(f"warning: {early_warning}", err=True)  # said once, before the model loads
    try:
        with warnings.catch_warnings():
            if early_warning:
                warnings.filterwarnings("ignore", message=re.escape(early_warning))
            summary = finetune(model, rope=lambda base: extend_rope(base, method, method_options), data=data,
                               out_dir=out, settings=settings, resume=resume, device=device, evaluate=evaluate,
                               eval_data=eval_data, eval_windows=eval_windows, export=export, progress=progress)
    except (ValueError, FileNotFoundError, FileExistsError) as exc:
        error_exit(_cli_message(str(exc)))
        return
    if summary.get("world_size", 1) > 1 and not _is_main():
        return
    history = summary["history"]
    if history:
        typer.echo(f"trained {len(history)} steps, loss {history[0]['loss']:.4f} -> {history[-1]['loss']:.4f}")
    evaluation = summary.get("evaluation")
    if evaluation:
        ppl = ", ".join(f"{n}: {v:.3f}" for n, v in evaluation["lengths"].items())
        typer.echo(f"perplexity after fine-tuning (length: ppl): {ppl}")
    if "evaluation_error" in summary:
        typer.echo(f"evaluation not done: {summary['evaluation_error']}", err=True)
    if "exported" in summary:
        typer.echo(f"exported: {summary['exported']}")
    typer.echo(f"log: {Path(out) / 'training.json'}")


def _is_main() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


# Library errors name fields; the CLI names options.
FIELD_FLAGS = {"data": "--data", "out": "--out", "out_dir": "--out", "resume": "--resume", "device": "--device",
               "max_grad_norm": "--max-grad-norm", "eval_data": "--eval-data"}


def _cli_message(message: str) -> str:
    from ropekit.commands.common import cli_message, flags_for

    return cli_message(message, {**flags_for("seq_len", "steps", "lr", "warmup", "grad_accum", "batch_size",
                                             "lora_rank", "checkpoint_every", "strategy", "weight_decay", "window",
                                             "pose_chunks", "mixed_windows", "context_parallel", "cp_mode"),
                                 **FIELD_FLAGS})
