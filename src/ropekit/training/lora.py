"""LoRA for fine-tuning: peft adapters on the attention and MLP projections, merged back before export."""

from __future__ import annotations

import torch

from ropekit.training.settings import FinetuneSettings


def add_lora(model: torch.nn.Module, settings: FinetuneSettings) -> torch.nn.Module:
    """Wrap ``model`` with peft LoRA adapters on the attention and MLP projections (base weights frozen)."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ValueError("lora: needs the peft package (pip install 'ropekit[lora]')") from None
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = sorted(names & {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    if not targets:
        raise ValueError(f"lora: no q_proj/k_proj/v_proj/o_proj linear layers in this model (found {sorted(names)})")
    config = LoraConfig(r=settings.lora_rank, lora_alpha=settings.resolved_lora_alpha, lora_dropout=0.0,
                        target_modules=targets, task_type="CAUSAL_LM")
    _skip_incompatible_torchao()
    return get_peft_model(model, config)


def _skip_incompatible_torchao() -> None:
    """peft >= 0.18 raises ImportError while wrapping *any* Linear when an older torchao (< 0.16, e.g. pulled in
    by torchtune) is installed. Its torchao dispatcher only serves torchao-quantized weights, which ropekit never
    loads, so tell that dispatcher torchao is absent instead of failing."""
    try:
        from peft.import_utils import is_torchao_available
        from peft.tuners.lora import torchao as peft_torchao
    except ImportError:
        return
    try:
        is_torchao_available()
    except ImportError:
        peft_torchao.is_torchao_available = lambda: False


def merge_lora(model: torch.nn.Module) -> torch.nn.Module:
    """Fold LoRA adapters into the base weights and return the plain model (identity without LoRA)."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model
