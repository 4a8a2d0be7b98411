"""`ropekit finetune`: continue training a model at a longer length with a RoPE scaling method."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ropekit.methods import method_names


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_command)


def finetune_command(
    model: str = typer.Argument(..., help="Hub id, model folder, .gguf file, or 'demo' (SmolLM2-135M)."),
    method: str = typer.Option(..., "--method", "-m", help=f"Scaling method: {', '.join(method_names())} "
                                                           "(default = no scaling)."),
    factor: Optional[float] = typer.Option(None, "--factor", "-f", help="Scale s = target / trained length."),
    seq_len: int = typer.Option(..., "--seq-len", help="Training length in tokens (>= the trained length)."),
    data: Path = typer.Option(..., "--data", help="Text file, .jsonl ({\"text\": ...} per line) or folder."),
    steps: int = typer.Option(..., "--steps", help="Optimizer steps."),
    out: Path = typer.Option(..., "--out", help="Output folder: checkpoints/, model/, training.json."),
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
) -> None:
    """Fine-tune MODEL at --seq-len with RoPE scaling --method/--factor on packed documents from --data.

    Runs data-parallel when started by torchrun (gloo on CPU, nccl on GPU).
    """
    from ropekit.commands.common import build_rope_config, error_exit
    from ropekit.training.finetune import FinetuneSettings, finetune

    try:
        settings = FinetuneSettings(
            seq_len=seq_len, steps=steps, lr=lr, warmup=warmup, weight_decay=weight_decay, batch_size=batch_size,
            grad_accum=grad_accum, max_grad_norm=max_grad_norm or None, gradient_checkpointing=gradient_checkpointing,
            lora=lora, lora_rank=lora_rank, checkpoint_every=checkpoint_every, seed=seed, strategy=strategy,
        )
        summary = finetune(model, rope=lambda base: build_rope_config(base, method, factor), data=data,
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


# Library errors name fields; the CLI names options.
_OPTION_NAMES = {"seq_len:": "--seq-len:", "steps:": "--steps:", "lr:": "--lr:", "warmup:": "--warmup:",
                 "grad_accum:": "--grad-accum:", "batch_size:": "--batch-size:", "lora_rank:": "--lora-rank:",
                 "checkpoint_every:": "--checkpoint-every:", "strategy:": "--strategy:", "data:": "--data:",
                 "resume:": "--resume:", "out:": "--out:", "weight_decay:": "--weight-decay:", "device:": "--device:"}


def _cli_message(message: str) -> str:
    for field, option in _OPTION_NAMES.items():
        if message.startswith(field):
            return option + message[len(field):]
    return message
