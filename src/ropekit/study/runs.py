"""``run_study``: the whole study (pretrain, search, evaluate, fine-tune each method, the PoSE run), and the
activation-memory measurement the PoSE comparison reports."""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch

from ropekit.config import RopeConfig
from ropekit.study.data import held_out_windows, mixed_rows, pose_mixture, stdlib_files
from ropekit.study.evaluate import evaluate_methods
from ropekit.study.model import build_model, method_config, search_longrope
from ropekit.study.report import plot_curves, plot_position, summary_markdown
from ropekit.study.settings import METHOD_LABELS, STUDY_METHODS, StudySizes
from ropekit.training.data import PackedRows
from ropekit.training.loop import train
from ropekit.training.settings import FinetuneSettings


def activation_bytes(model, rows: PackedRows, forward_kwargs: dict) -> int:
    """Bytes of the tensors one training forward of ``rows`` keeps for backward (activations; parameters and
    the optimizer state, the same for every run, are not counted). Storages are counted once."""
    from ropekit.training.loss import loss_forward

    storages: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), loss_forward(model):
        model(input_ids=rows.input_ids, labels=rows.labels, **forward_kwargs)
    return sum(storages.values())



# ---------------------------------------------------------------------- the study
def run_study(out_dir: str | Path, sizes: StudySizes = StudySizes(), methods: tuple[str, ...] = STUDY_METHODS,
              progress: bool = True, log=print, *, overwrite: bool = False) -> dict[str, Any]:
    """Run the whole study and write the report folder; returns the results dict (also results.json).

    The folder is checked before any work and written through ``ropekit.output.OutputDir`` (files ropekit did
    not write are refused unless ``overwrite``, and kept either way)."""
    from ropekit.hf import apply_rope
    from ropekit.output import OutputDir, check_output_dir

    for m in methods:
        if m not in STUDY_METHODS:
            raise ValueError(f"methods: {m!r} not accepted; accepted: {', '.join(STUDY_METHODS)}")
    check_output_dir(out_dir, overwrite=overwrite)
    out = Path(out_dir)
    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    train_docs, held_out = stdlib_files(sizes.max_files)
    windows = {n: held_out_windows(held_out, n, sizes.eval_windows) for n in sizes.eval_lengths}

    # 1. pretrain at L
    log(f"[study] pretraining a {sizes.layers}-layer, hidden-{sizes.hidden} model at {sizes.train_len} tokens "
        f"for {sizes.pretrain_steps} steps")
    t0 = time.perf_counter()
    model = build_model(sizes)
    n_params = sum(p.numel() for p in model.parameters())
    pre_rows = mixed_rows(train_docs, sizes.train_len, sizes.passkey_share, sizes.seed)
    pre_settings = FinetuneSettings(seq_len=sizes.train_len, steps=sizes.pretrain_steps, lr=sizes.pretrain_lr,
                                    warmup=max(1, sizes.pretrain_steps // 20), weight_decay=0.1,
                                    batch_size=sizes.pretrain_batch, gradient_checkpointing=False,
                                    decay="cosine", seed=sizes.seed)
    base_cfg = RopeConfig.from_hf(model.config)
    with apply_rope(model, base_cfg):
        pretrain = train(model, pre_rows, pre_settings, progress=progress, desc="pretrain")
    timings["pretrain_s"] = time.perf_counter() - t0
    model.eval()

    search = None
    if "longrope" in methods:
        log(f"[study] searching LongRoPE factors for {sizes.long_len} bytes ({sizes.search_budget} forwards)")
        t0 = time.perf_counter()
        searched, search = search_longrope(model, base_cfg, sizes, train_docs, progress)
        timings["search_s"] = time.perf_counter() - t0
    configs = {m: searched if m == "longrope" else method_config(base_cfg, m, sizes.factor) for m in methods}
    t0 = time.perf_counter()
    before = evaluate_methods(model, configs, sizes, windows, "no fine-tuning", progress)
    timings["evaluate_before_s"] = time.perf_counter() - t0

    # 2. fine-tune each method at factor * L
    long_rows = mixed_rows(train_docs, sizes.long_len, sizes.passkey_share, sizes.seed + 1)
    ft_settings = FinetuneSettings(seq_len=sizes.long_len, steps=sizes.finetune_steps, lr=sizes.finetune_lr,
                                   warmup=sizes.finetune_warmup, batch_size=sizes.finetune_batch,
                                   gradient_checkpointing=False, seed=sizes.seed)
    after: dict[str, Any] = {}
    curves: dict[str, list] = {}
    t0 = time.perf_counter()
    for method, cfg in configs.items():
        tuned = copy.deepcopy(model)
        patch = apply_rope(tuned, cfg)
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        result = train(tuned, long_rows, ft_settings, progress=progress, desc=f"fine-tune {METHOD_LABELS[method]}")
        patch.remove()
        curves[method] = result.history
        after.update(evaluate_methods(tuned, {method: cfg}, sizes, windows, "fine-tuned", progress))
        del tuned
    timings["finetune_and_evaluate_s"] = time.perf_counter() - t0

    pose = None
    if sizes.pose_window:
        t0 = time.perf_counter()
        pose = pose_comparison(model, configs, sizes, train_docs, long_rows, ft_settings, curves, after, windows,
                               progress, log)
        timings["pose_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start

    results = {"sizes": dataclasses.asdict(sizes), "parameters": n_params, "methods": list(methods),
               "eval_lengths": sizes.eval_lengths, "pretrain_rows": len(pre_rows), "finetune_rows": len(long_rows),
               "before": before, "after": after, "pretrain_history": pretrain.history, "finetune_history": curves,
               "timings": timings, "torch_threads": torch.get_num_threads()}
    if pose is not None:
        results["pose"] = pose
    if search is not None:
        results["search"] = search
    with OutputDir(out, command="study", overwrite=overwrite) as folder:
        folder.write_text("results.json", json.dumps(results, indent=2))
        plot_position(results, folder.path("ppl_vs_position.png"))
        plot_curves(results, folder.path("training_curves.png"))
        folder.write_text("summary.md", summary_markdown(results))
    log(f"[study] wrote {out / 'summary.md'} in {timings['total_s'] / 60:.1f} min")
    return results


def pose_comparison(model, configs: dict[str, RopeConfig], sizes: StudySizes, train_docs: list[str],
                    long_rows: PackedRows, ft_settings: FinetuneSettings, curves: dict, after: dict, windows: dict,
                    progress: bool, log) -> dict[str, Any]:
    """Fine-tune the PoSE run (YaRN, or the last method) for ft_settings.steps on ``sizes.pose_window``-byte
    windows and return it beside the full-length run of the same method: train time, activation bytes, evaluation."""
    from ropekit.hf import apply_rope
    from ropekit.training.data import packed_forward_kwargs
    from ropekit.training.pose import PoseSpec, pose_forward_kwargs, step_position_ids

    method = "yarn" if "yarn" in configs else list(configs)[-1]
    cfg = configs[method]
    window = sizes.pose_window
    log(f"[study] PoSE: fine-tuning {METHOD_LABELS[method]} on {window}-byte windows with ids up to {sizes.long_len}")
    rows = pose_mixture(train_docs, window, sizes.passkey_share, sizes.seed + 2)
    settings = dataclasses.replace(ft_settings, pose=True, window=window)
    measure = copy.deepcopy(model)
    with apply_rope(measure, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        measure.train()
        full_batch = long_rows.rows(list(range(ft_settings.batch_size)))
        full_bytes = activation_bytes(measure, full_batch, packed_forward_kwargs(full_batch.position_ids))
        pose_batch = rows.rows(list(range(ft_settings.batch_size)))
        ids = step_position_ids(PoseSpec(sizes.long_len, window, settings.pose_chunks), settings.seed, 0,
                                ft_settings.batch_size)
        pose_bytes = activation_bytes(measure, pose_batch, pose_forward_kwargs(ids))
    del measure
    tuned = copy.deepcopy(model)
    with apply_rope(tuned, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(sizes.long_len)
        result = train(tuned, rows, settings, progress=progress, desc=f"PoSE {METHOD_LABELS[method]}")
    evaluation = evaluate_methods(tuned, {method: cfg}, sizes, windows, "PoSE fine-tuned", progress)[method]
    del tuned
    full_history = curves[method]
    return {"method": method, "window": window, "rows": len(rows),
            "full": {"train_s": sum(h["seconds"] for h in full_history), "activation_bytes": full_bytes,
                     "row_bytes": sizes.long_len, "ppl": after[method]["ppl"], "passkey": after[method]["passkey"]},
            "pose": {"train_s": sum(h["seconds"] for h in result.history), "activation_bytes": pose_bytes,
                     "row_bytes": window, "ppl": evaluation["ppl"], "passkey": evaluation["passkey"],
                     "bucket_ppl": evaluation["bucket_ppl"], "bucket_size": evaluation["bucket_size"],
                     "history": result.history}}
