"""The training loss: summed next-token cross-entropy, computed from final hidden states in chunks.

Loss normalisation: every micro-batch's summed token loss is divided by the number of predicted tokens in
the whole global batch (all micro-batches of all ranks), so gradient accumulation and data parallelism give
the gradient of one big batch — the same numbers as a single process, up to summation order.

Memory: the loss never holds full-vocabulary logits. The model body gives the final hidden states
(batch, seq, hidden); the output head and the cross-entropy then run ``LOSS_CHUNK`` positions at a time, each
chunk inside ``torch.utils.checkpoint`` so its logits are recomputed in backward instead of kept (8192
positions x 49k vocabulary in float32 would be 1.6 GB, and its gradient as much again). With gradient
checkpointing on, what stays alive for backward is each decoder layer's input (layers x seq x hidden).
"""

from __future__ import annotations

import contextlib

import torch

from ropekit.training.data import IGNORE_INDEX
from ropekit.training.distributed import unwrap_model

# Positions per chunk of the training loss: (batch, LOSS_CHUNK, vocab) float32 logits exist at a time
# (200 MB for a 49k vocabulary), plus their softmax and gradient in backward.
LOSS_CHUNK = 1024


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy: logits (batch, seq, vocab) at t predict labels (batch, seq) at t+1;
    labels -100 are skipped. Half-precision logits are upcast to float32; float64 stays float64."""
    logits = logits[:, :-1]
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    target = labels[:, 1:].to(logits.device)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers causal LM inside a DDP and/or peft wrapper (FSDP2 keeps the model itself)."""
    model = unwrap_model(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_logits(model: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """Logits from final hidden states as the causal LM's forward makes them (the evaluation's
    ``output_logits``: the same head transforms, half precision upcast, float64 kept)."""
    from ropekit.evaluation.perplexity import output_logits

    return output_logits(model, hidden)


def _chunk_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    logits = head_logits(model, hidden)
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_loss_sum(model: torch.nn.Module, hidden: torch.Tensor, labels: torch.Tensor,
                     chunk_size: int = LOSS_CHUNK, shifted: bool = False) -> torch.Tensor:
    """``token_loss_sum`` of the causal LM ``model``'s logits, computed from its final hidden states
    (batch, seq, hidden) ``chunk_size`` positions at a time. With ``shifted``, ``labels`` are already the
    next-token targets of each position (a context-parallel shard: the shift was done on the full sequence).

    Each chunk's head and cross-entropy run inside ``torch.utils.checkpoint`` (non-reentrant): only the chunk's
    hidden states are kept for backward, and its logits are recomputed there. So at most one chunk of
    (batch, chunk_size, vocab) logits exists at a time, in forward and in backward.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    from torch.utils.checkpoint import checkpoint

    if shifted:
        target = labels.to(hidden.device)
    else:
        hidden = hidden[:, :-1]
        target = labels[:, 1:].to(hidden.device)
    total = None
    for start in range(0, hidden.shape[1], chunk_size):
        piece = (hidden[:, start:start + chunk_size], target[:, start:start + chunk_size])
        if torch.is_grad_enabled():
            part = checkpoint(_chunk_loss_sum, model, *piece, use_reentrant=False)
        else:
            part = _chunk_loss_sum(model, *piece)
        total = part if total is None else total + part
    return total


@contextlib.contextmanager
def loss_forward(model: torch.nn.Module, chunk_size: int = LOSS_CHUNK):
    """While active, calling ``model`` (or its DDP / FSDP / peft wrapper) with ``input_ids``, ``labels`` and the
    body's keyword arguments returns the summed token loss (``chunked_loss_sum``) instead of logits.

    The causal LM's forward is replaced for the duration (an instance attribute, removed on exit) so that the
    call still goes through the wrappers' forward: DDP's gradient-sync bookkeeping and FSDP's unsharding of the
    root's parameters (embeddings, final norm, head) happen as for an ordinary forward.
    """
    from ropekit.evaluation.perplexity import model_body

    lm = causal_lm(model)
    body = model_body(lm)
    had_own = "forward" in lm.__dict__
    own = lm.__dict__.get("forward")

    def forward(input_ids=None, labels=None, targets=None, **kwargs):
        if labels is None and targets is None:
            raise ValueError("labels: the training loss needs labels")
        # peft passes its optional arguments explicitly (attention_mask=None, return_dict=None...).
        kwargs = {k: v for k, v in kwargs.items() if v is not None and k not in ("return_dict", "labels")}
        hidden = body(input_ids=input_ids, **kwargs).last_hidden_state
        if targets is not None:  # next-token targets already aligned with the positions (context parallel)
            return chunked_loss_sum(lm, hidden, targets, chunk_size, shifted=True)
        return chunked_loss_sum(lm, hidden, labels, chunk_size)

    lm.forward = forward
    try:
        yield model
    finally:
        if had_own:
            lm.forward = own
        else:
            del lm.forward
