"""`ropekit study`: pretrain a small model short, extend it with each method, fine-tune long, report."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import typer

from ropekit.study import QUICK, STUDY_METHODS, StudySizes


def _defaults(field: str) -> str:
    """"(default X; quick Y)" read from the sizes themselves, so the help cannot drift from them."""
    default, quick = getattr(StudySizes(), field), getattr(QUICK, field)
    return f"(default {default:g})" if default == quick else f"(default {default:g}; quick {quick:g})"


def register(app: typer.Typer) -> None:
    app.command("study")(study_command)


def study_command(
    out: Path = typer.Option(Path("ropekit-report-study"), "--out", help="Report folder (new, empty, or an earlier "
                                                                        "study's)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a folder holding other files (they are "
                                                              "kept)."),
    quick: bool = typer.Option(False, "--quick", help="Tiny sizes: a couple of minutes, for a smoke test."),
    methods: str = typer.Option(",".join(STUDY_METHODS), "--methods",
                                help="Comma-separated: default (no scaling), linear, ntk, dynamic, yarn, longrope "
                                     "(factors searched on the pretrained model)."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help=f"Model width {_defaults('hidden')}."),
    layers: Optional[int] = typer.Option(None, "--layers", help=f"Decoder layers {_defaults('layers')}."),
    heads: Optional[int] = typer.Option(None, "--heads", help=f"Attention heads {_defaults('heads')}."),
    kv_heads: Optional[int] = typer.Option(None, "--kv-heads", help=f"Key/value heads {_defaults('kv_heads')}."),
    train_len: Optional[int] = typer.Option(None, "--train-len", help=f"Pretraining length in bytes "
                                               f"{_defaults('train_len')}."),
    factor: Optional[int] = typer.Option(None, "--factor", help="Extension factor; fine-tuning length = factor x "
                                                                f"train-len {_defaults('factor')}."),
    pretrain_steps: Optional[int] = typer.Option(None, "--pretrain-steps", help=f"Steps {_defaults('pretrain_steps')}."),
    pretrain_batch: Optional[int] = typer.Option(None, "--pretrain-batch", help="Rows per pretraining step."),
    pretrain_lr: Optional[float] = typer.Option(None, "--pretrain-lr"),
    finetune_steps: Optional[int] = typer.Option(None, "--finetune-steps", help=f"Per method {_defaults('finetune_steps')}."),
    finetune_batch: Optional[int] = typer.Option(None, "--finetune-batch", help="Long rows per fine-tuning step."),
    finetune_lr: Optional[float] = typer.Option(None, "--finetune-lr"),
    eval_windows: Optional[int] = typer.Option(None, "--eval-windows", help="Held-out files per length."),
    passkey_samples: Optional[int] = typer.Option(None, "--passkey-samples", help="Passkey prompts per length."),
    seed: Optional[int] = typer.Option(None, "--seed"),
    pose_window: Optional[int] = typer.Option(None, "--pose-window", help="Also fine-tune YaRN with PoSE on windows "
                                              "of this many bytes, same steps, and compare "
                                              f"{_defaults('pose_window')}; 0: skip."),
    search_budget: Optional[int] = typer.Option(None, "--search-budget", help="Forwards of the LongRoPE factor "
                                                f"search {_defaults('search_budget')}."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Pretrain a small Llama-style model at a short length on the Python standard library, search LongRoPE
    factors for it, evaluate it at 2x/4x/8x with no scaling, linear, NTK, dynamic NTK, YaRN and the searched
    LongRoPE, fine-tune each at the long length (and YaRN again with PoSE on short windows), evaluate again, and
    write OUT/summary.md with tables and plots. The default run takes 3-4 minutes on 2 CPU cores.
    """
    from ropekit.commands.common import check_out_or_exit, cli_message, error_exit, flags_for
    from ropekit.study import run_study

    check_out_or_exit(out, overwrite)

    chosen = {k: v for k, v in dict(hidden=hidden, layers=layers, heads=heads, kv_heads=kv_heads, train_len=train_len,
                                     factor=factor, pretrain_steps=pretrain_steps, pretrain_batch=pretrain_batch,
                                     pretrain_lr=pretrain_lr, finetune_steps=finetune_steps,
                                     finetune_batch=finetune_batch, finetune_lr=finetune_lr,
                                     eval_windows=eval_windows, passkey_samples=passkey_samples,
                                     seed=seed, pose_window=pose_window, search_budget=search_budget).items()
              if v is not None}
    try:
        sizes = dataclasses.replace(QUICK if quick else StudySizes(), **chosen)
        names = tuple(m.strip() for m in methods.split(",") if m.strip())
        if not names:
            raise ValueError("methods: give at least one method")
        unknown = [m for m in names if m not in STUDY_METHODS]
        if unknown:
            raise ValueError(f"methods: {', '.join(map(repr, unknown))} not accepted; accepted: "
                             f"{', '.join(STUDY_METHODS)}")
        results = run_study(out, sizes, names, progress=progress, log=typer.echo, overwrite=overwrite)
    except ValueError as exc:
        error_exit(cli_message(str(exc), flags_for(*(f.name for f in dataclasses.fields(StudySizes)), "methods")))
    typer.echo((out / "summary.md").read_text())
    typer.echo(f"report: {out} (summary.md, results.json, ppl_vs_position.png, training_curves.png); "
               f"{results['timings']['total_s'] / 60:.1f} min")
