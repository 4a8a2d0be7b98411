"""Checkpoints of a fine-tuning run: run fingerprints, list / save / load / check_resumable, RNG state.

Checkpoints are written through ``ropekit.output`` (a staging folder of this process's own, renamed into place,
then recorded file by file), so only folders ropekit wrote and recorded are ever read or removed.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropekit.output import STAGING_PREFIX, make_dirs, owned_files, record, remove_own
from ropekit.training.distributed import DistContext
from ropekit.training.settings import FinetuneSettings

CHECKPOINT_DIR = "checkpoints"
RUN_FILE = "run.json"
STATE_FILE = "state.pt"


def run_fingerprint(settings: FinetuneSettings, rope: Any, model_id: str, data_id: str,
                    world_size: int) -> dict[str, Any]:
    """Everything a checkpoint must agree on to be resumed: settings, RoPE config, model, data, world size."""
    rope_dict = rope.to_dict() if hasattr(rope, "to_dict") else rope
    return {"settings": settings.fingerprint(), "rope": rope_dict, "model": model_id, "data": data_id,
            "world_size": world_size}


def fingerprint_differences(saved: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """Human-readable 'key: checkpoint X, now Y' lines for every field that differs."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out.extend(fingerprint_differences(a, b, name + "."))
        elif a != b:
            out.append(f"{name}: checkpoint {a!r}, now {b!r}")
    return out


def model_identity(model: torch.nn.Module, source: str | None = None) -> str:
    """A short id of the starting model: its source and a hash of its config."""
    import hashlib

    config = getattr(model, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else repr(model)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    return f"{source or type(model).__name__}#{digest}"



def _rng_state() -> dict[str, Any]:
    # Plain types only, so a checkpoint loads with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Finished checkpoints under ``out_dir``/checkpoints, oldest first: only those whose files ropekit wrote
    and recorded (``ropekit.output``), so a folder someone planted there is never read or removed."""
    owned = owned_files(out_dir, CHECKPOINT_DIR)
    steps = {rel.split("/")[1] for rel in owned if rel.count("/") == 2 and rel.split("/")[1].startswith("step-")}
    return sorted(Path(out_dir) / CHECKPOINT_DIR / name for name in steps
                  if {f"{CHECKPOINT_DIR}/{name}/{STATE_FILE}", f"{CHECKPOINT_DIR}/{name}/{RUN_FILE}"} <= set(owned))


def _checkpoint_files(out_dir: str | Path, checkpoint: Path) -> list[str]:
    return owned_files(out_dir, f"{CHECKPOINT_DIR}/{checkpoint.name}")


def _model_state(model: torch.nn.Module, strategy_sharded: bool, trainable_only: bool) -> dict[str, torch.Tensor]:
    if strategy_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                     ignore_frozen_params=trainable_only))
    names = {n for n, p in model.named_parameters() if p.requires_grad} if trainable_only else None
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if names is None or k in names}


def _optimizer_state(model, optimizer, strategy_sharded: bool) -> dict[str, Any]:
    if strategy_sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))
    return optimizer.state_dict()


def save_checkpoint(out_dir: Path, step: int, model: torch.nn.Module, optimizer, scheduler, fingerprint: dict,
                    history: list, ctx: DistContext, settings: FinetuneSettings) -> Path:
    """Write ``out_dir/checkpoints/step-NNNNNN`` atomically (temp folder + rename); keep the newest few.

    Holds model (trainable parameters only under LoRA), optimizer, scheduler, step, loss history, the run
    fingerprint, and every rank's RNG state. Collective: every rank must call it.
    """
    sharded = ctx.distributed and settings.strategy == "fsdp"
    model_sd = _model_state(model, sharded, settings.lora)
    optim_sd = _optimizer_state(model, optimizer, sharded)
    root = Path(out_dir) / CHECKPOINT_DIR
    final = root / f"step-{step:06d}"
    # Written in a staging folder of this process's own (skipped by the output checks, never another run's),
    # renamed into place when complete, then recorded file by file.
    names = [None]
    if ctx.is_main:
        make_dirs(root)
        names[0] = tempfile.mkdtemp(dir=root, prefix=f"{STAGING_PREFIX}{os.getpid()}-step-{step:06d}-")
    if ctx.distributed:
        torch.distributed.broadcast_object_list(names, src=0)
    tmp = Path(names[0])
    ctx.barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{ctx.rank}.pt")
    if ctx.is_main:
        torch.save({"model": model_sd, "optimizer": optim_sd, "scheduler": scheduler.state_dict(), "step": step,
                    "history": history}, tmp / STATE_FILE)
        (tmp / RUN_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True))
    ctx.barrier()
    if ctx.is_main:
        try:
            if os.path.lexists(final):
                remove_own(out_dir, _checkpoint_files(out_dir, final))
                if os.path.lexists(final):
                    raise ValueError(f"out: {final} holds files ropekit did not write; it is kept, and this "
                                     f"checkpoint was not saved")
            tmp.rename(final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # this process's own staging folder, if the rename did not happen
        record(out_dir, [f"{CHECKPOINT_DIR}/{final.name}/{f.name}" for f in sorted(final.iterdir())], "finetune")
        for old in list_checkpoints(out_dir)[:-settings.keep_checkpoints]:
            remove_own(out_dir, _checkpoint_files(out_dir, old))
    ctx.barrier()
    return final


def check_resumable(out_dir: str | Path, fingerprint: dict[str, Any]) -> Path:
    """The newest checkpoint in ``out_dir`` if its run fingerprint equals ``fingerprint``; ValueError otherwise."""
    found = list_checkpoints(out_dir)
    if not found:
        raise ValueError(f"resume: no checkpoint under {Path(out_dir) / CHECKPOINT_DIR}")
    latest = found[-1]
    try:
        saved = json.loads((latest / RUN_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"resume: {latest / RUN_FILE} cannot be read ({exc})") from None
    if not isinstance(saved, dict):
        raise ValueError(f"resume: {latest / RUN_FILE} is damaged (not a JSON object)")
    diffs = fingerprint_differences(saved, json.loads(json.dumps(fingerprint)))
    if diffs:
        raise ValueError(f"resume: {latest} was made by a different run configuration: " + "; ".join(diffs))
    return latest


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, ctx: DistContext,
                    settings: FinetuneSettings) -> tuple[int, list]:
    """Restore model, optimizer, scheduler and this rank's RNG from ``path``; returns (step, history)."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    sharded = ctx.distributed and settings.strategy == "fsdp"
    if sharded:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                       options=StateDictOptions(full_state_dict=True, strict=not settings.lora))
    else:
        missing, unexpected = model.load_state_dict(state["model"], strict=not settings.lora)
        if unexpected:
            raise ValueError(f"resume: checkpoint has parameters this model lacks: {unexpected[:5]}")
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = path / f"rng-rank{ctx.rank}.pt"
    _set_rng_state(torch.load(rng, weights_only=True))
    return int(state["step"]), list(state["history"])
