"""The ``ropekit finetune`` job: continued training of a causal LM at a longer length with a RoPE scaling method.

``finetune`` is the whole job the ``ropekit finetune`` command runs: load, swap RoPE, pack data, train,
evaluate, export. Its parts live beside it: ``settings`` (``FinetuneSettings``), ``loop`` (``train``), ``loss``
(the chunked token loss), ``checkpoint`` (save, load, resume), ``lora``; their public names are re-exported here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from ropekit.output import MANIFEST, owned_files, place_own, record, write_own
from ropekit.training.checkpoint import (
    CHECKPOINT_DIR,
    RUN_FILE,
    STATE_FILE,
    check_resumable,
    fingerprint_differences,
    list_checkpoints,
    load_checkpoint,
    model_identity,
    run_fingerprint,
    save_checkpoint,
)
from ropekit.training.data import PackedRows, document_texts, pack_documents, tokenize_documents
from ropekit.training.distributed import DistContext, init_distributed, shutdown_distributed
from ropekit.training.lora import add_lora, merge_lora
from ropekit.training.loop import (
    TrainResult,
    batch_indices,
    row_rope_length,
    set_gradient_checkpointing,
    train,
    warmup_schedule,
    warmup_warning,
)
from ropekit.training.loss import LOSS_CHUNK, causal_lm, chunked_loss_sum, head_logits, loss_forward, token_loss_sum
from ropekit.training.pose import pose_windows
from ropekit.training.settings import DECAYS, NOT_FINGERPRINTED, FinetuneSettings

EXPORT_DIR = "model"
TRAINING_LOG = "training.json"
TRAINING_PLOT = "training_curve.png"
# What `ropekit finetune --out` writes: each must be free or ropekit's own before the run starts.
OUTPUT_NAMES = (f"{CHECKPOINT_DIR}/", f"{EXPORT_DIR}/", TRAINING_LOG, TRAINING_PLOT)

__all__ = [
    "CHECKPOINT_DIR", "DECAYS", "EXPORT_DIR", "LOSS_CHUNK", "NOT_FINGERPRINTED", "OUTPUT_NAMES", "RUN_FILE",
    "STATE_FILE", "TRAINING_LOG", "TRAINING_PLOT", "FinetuneSettings", "TrainResult", "add_lora", "batch_indices",
    "causal_lm", "check_resumable", "chunked_loss_sum", "evaluate_after_training", "finetune",
    "fingerprint_differences", "head_logits", "list_checkpoints", "load_checkpoint", "loss_forward", "merge_lora",
    "model_identity", "plot_training_curves", "prepare_rows", "row_rope_length", "run_fingerprint",
    "save_checkpoint", "set_gradient_checkpointing", "token_loss_sum", "train", "trained_length",
    "warmup_schedule", "warmup_warning",
]


# ---------------------------------------------------------------------- the whole job
def trained_length(loaded: Any) -> int:
    """The length the loaded model was trained at: ``loaded.rope.require_trained_length()``."""
    return loaded.rope.require_trained_length()


def prepare_rows(data: str | Path, tokenizer: Any, seq_len: int) -> PackedRows:
    """Read, tokenize and pack ``data`` (file or folder) at ``seq_len``."""
    docs = document_texts(data)
    tokens = tokenize_documents(docs, tokenizer)
    return pack_documents(tokens, seq_len)


def finetune(
    source: str,
    *,
    rope: Callable[[Any], Any],
    data: str | Path,
    out_dir: str | Path,
    settings: FinetuneSettings,
    resume: bool = False,
    device: str | None = None,
    evaluate: bool = True,
    eval_data: str | Path | None = None,
    eval_windows: int = 4,
    export: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """The ``ropekit finetune`` job; returns a summary dict (also written to out_dir/training.json).

    ``rope`` maps the model's trained RoPE (a RopeConfig) to the extended one to train with, e.g.
    ``lambda base: base.with_method("yarn", factor=4.0, max_position=4 * base.original_max_position)``.
    Evaluation (perplexity at the trained length and at seq_len, on ``eval_data`` or else ``data``) and
    export run on rank 0.
    """
    ctx = init_distributed(device)
    try:
        summary = _finetune_in_group(ctx, source, rope=rope, data=data, out_dir=out_dir, settings=settings,
                                     resume=resume, evaluate=evaluate, eval_data=eval_data,
                                     eval_windows=eval_windows, export=export, progress=progress)
    except BaseException:
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)
    return summary


def _finetune_in_group(ctx: DistContext, source: str, *, rope, data, out_dir, settings: FinetuneSettings,
                       resume: bool, evaluate: bool, eval_data, eval_windows: int, export: bool,
                       progress: bool) -> dict[str, Any]:
    from ropekit.hf import apply_rope, export_model, load_model

    out_dir = Path(out_dir)
    torch.manual_seed(settings.seed)
    docs = document_texts(data)  # bad data fails before the model loads
    loaded = load_model(source, device=str(ctx.device), dtype=torch.float32)
    trained = trained_length(loaded)
    if settings.seq_len < trained:
        raise ValueError(f"seq_len: {settings.seq_len} is smaller than the model's trained length {trained}; "
                         f"fine-tuning for a longer context needs --seq-len >= {trained}")
    cfg = rope(loaded.rope)
    tokens = tokenize_documents(docs, loaded.tokenizer)
    # PoSE: windows of consecutive text (their ids are drawn per step); otherwise packed rows of seq_len.
    rows = pose_windows(tokens, settings.window) if settings.pose else pack_documents(tokens, settings.seq_len)
    model = loaded.model
    patch = apply_rope(model, cfg)
    if cfg.length_dependent:
        patch.fix_length(settings.seq_len)  # one scale for every packed row: the training length's
    if settings.lora:
        model = add_lora(model, settings)
    fingerprint = run_fingerprint(settings, cfg, model_identity(loaded.model, str(source)), rows.fingerprint(),
                                  ctx.world_size)
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    ctx.barrier()
    result = train(model, rows, settings, out_dir=out_dir, fingerprint=fingerprint, resume=resume, ctx=ctx,
                   progress=progress)
    summary: dict[str, Any] = {"source": str(source), "rope": cfg.to_dict(), "settings": settings.fingerprint(),
                               "steps": settings.steps, "world_size": ctx.world_size, "rows": len(rows),
                               "rows_tokens": rows.seq_len,
                               "history": result.history, "resumed_from_step": result.start_step,
                               "warnings": result.warnings}
    model = merge_lora(model)
    patch.remove()  # evaluation applies the RoPE itself; export needs the plain model
    if ctx.is_main and export:  # before evaluation, so a failing evaluation cannot lose the trained weights
        export_dir = out_dir / EXPORT_DIR
        export_model(model, cfg, export_dir, tokenizer=loaded.tokenizer, overwrite=True)
        record(out_dir, [f"{EXPORT_DIR}/{rel}" for rel in owned_files(export_dir)] + [f"{EXPORT_DIR}/{MANIFEST}"],
               "finetune")
        summary["exported"] = str(export_dir)
    if ctx.is_main and evaluate:
        try:
            summary["evaluation"] = evaluate_after_training(model, loaded.tokenizer, cfg, eval_data or data,
                                                            [trained, settings.seq_len], eval_windows, progress)
        except ValueError as exc:  # e.g. no evaluation document long enough: say so, keep the run's outputs
            summary["evaluation_error"] = str(exc)
    if ctx.is_main:
        write_own(out_dir, TRAINING_LOG, json.dumps(summary, indent=2, default=str), "finetune")
        place_own(out_dir, TRAINING_PLOT, lambda path: plot_training_curves({f"{cfg.method}": result.history}, path),
                  "finetune")
    ctx.barrier()
    return summary


def evaluate_after_training(model, tokenizer, cfg, data, lengths: list[int], windows: int = 4,
                            progress: bool = True) -> dict[str, Any]:
    """Perplexity of the fine-tuned model under ``cfg`` at each of ``lengths`` (first ``windows`` documents long
    enough), with ``ropekit.evaluation``; returns {"lengths": {length: ppl}, "results": [...]}."""
    from ropekit.evaluation import MethodRun, evaluate_perplexity, load_documents as eval_documents, token_windows

    lengths = sorted(set(lengths))
    by_length = {n: token_windows(eval_documents(data), tokenizer, n, count=windows) for n in lengths}
    results = evaluate_perplexity(model, [MethodRun(f"{cfg.method} (fine-tuned)", cfg)], lengths, by_length,
                                  bucket_size=max(1, min(lengths) // 2), progress=progress)
    return {"lengths": {r.length: r.ppl for r in results}, "results": [r.to_dict() for r in results]}


def plot_training_curves(histories: dict[str, list[dict]], path: str | Path, title: str = "training loss") -> Path:
    """One line per run: loss against optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, history in histories.items():
        if history:
            ax.plot([h["step"] for h in history], [h["loss"] for h in history], label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
