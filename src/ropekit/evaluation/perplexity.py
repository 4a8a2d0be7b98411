"""Perplexity over long windows, per position bucket, with the loss computed in chunks.

The model body runs once over the window to give hidden states (batch, seq, hidden); the output head and
the cross-entropy then run ``chunk_size`` positions at a time, so full-vocabulary logits are never held
for the whole window (16k positions x 49k vocabulary in float32 would be 3.2 GB).

Buckets are by the position of the predicted token: bucket b holds tokens b*size .. (b+1)*size - 1 of the
window (token 0 has no prediction). ``ppl`` = exp(mean NLL over all predicted tokens of all windows);
``bucket_ppl[b]`` = exp(mean NLL of bucket b), so log(ppl) is the token-weighted mean of log(bucket_ppl).
"""

from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ropekit.config import RopeConfig

DEFAULT_BUCKET_SIZE = 1024
DEFAULT_CHUNK_SIZE = 1024


# ---------------------------------------------------------------------- model pieces
def model_body(model) -> torch.nn.Module:
    """The transformer body of a causal LM (``model.model`` for Llama, ``.gpt_neox``, ``.transformer``...)."""
    body = getattr(model, getattr(model, "base_model_prefix", ""), None)
    if body is None or body is model:
        raise ValueError(f"model: cannot find the body of {type(model).__name__} (base_model_prefix)")
    return body


def output_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Logits (..., vocab) from final hidden states, with the head's final transforms as transformers applies
    them: Cohere's ``logit_scale``, Granite's ``logits_scaling``, Gemma's ``final_logit_softcapping``. Half
    precision is upcast to float32 (the loss is taken in float32 or better); float64 stays float64."""
    logits = model.get_output_embeddings()(hidden)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    cfg = model.config
    if getattr(cfg, "logit_scale", None) is not None:
        logits = logits * cfg.logit_scale
    if getattr(cfg, "logits_scaling", None) not in (None, 1, 1.0):
        logits = logits / cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


@contextmanager
def layer_progress(model, desc: str, enabled: bool = True):
    """A tqdm bar ticking once per decoder layer during a forward pass (a 16k window takes a minute on CPU)."""
    body = model_body(model)
    layers = next((getattr(body, name) for name in ("layers", "h", "layer", "blocks")
                   if isinstance(getattr(body, name, None), torch.nn.ModuleList)), None)
    if not enabled or layers is None:
        yield
        return
    bar = tqdm(total=len(layers), desc=desc, unit="layer", leave=False)

    def tick(*_):  # a forward hook's non-None return would replace the layer's output
        bar.update(1)

    handles = [layer.register_forward_hook(tick) for layer in layers]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        bar.close()


@torch.inference_mode()
def token_nll(model, input_ids: torch.Tensor, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
              progress: str | None = None) -> torch.Tensor:
    """Per-token negative log-likelihood of ``input_ids`` (batch, seq) -> (batch, seq - 1) float32.

    Entry j is -log p(token j+1 | tokens 0..j). Only (batch, chunk_size, vocab) logits exist at a time.
    ``progress``: a description for a per-layer progress bar, or None.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.shape[-1] < 2:
        raise ValueError(f"input_ids: need at least 2 tokens, got {input_ids.shape[-1]}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size: must be >= 1, got {chunk_size}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    with layer_progress(model, progress or "", enabled=progress is not None):
        hidden = model_body(model)(input_ids=input_ids, use_cache=False).last_hidden_state
    labels = input_ids[:, 1:]
    out = torch.empty(labels.shape, dtype=torch.float32, device=device)
    for start in range(0, labels.shape[1], chunk_size):
        end = min(start + chunk_size, labels.shape[1])
        logits = output_logits(model, hidden[:, start:end])
        out[:, start:end] = F.cross_entropy(logits.flatten(0, 1), labels[:, start:end].flatten(),
                                            reduction="none").view(labels.shape[0], end - start)
    return out.cpu()


# ---------------------------------------------------------------------- buckets
def bucket_index(length: int, bucket_size: int) -> torch.Tensor:
    """(length - 1,) bucket of each NLL entry: entry j predicts token j+1, in bucket (j+1) // bucket_size."""
    if bucket_size < 1:
        raise ValueError(f"bucket_size: must be >= 1, got {bucket_size}")
    return torch.div(torch.arange(1, length), bucket_size, rounding_mode="floor")


def summarize_nll(nll: torch.Tensor, bucket_size: int) -> tuple[float, list[float], list[int]]:
    """(windows, length - 1) NLL -> (ppl, bucket_ppl, tokens per bucket); means in float64."""
    nll = nll.to(torch.float64)
    if nll.dim() == 1:
        nll = nll[None]
    index = bucket_index(nll.shape[1] + 1, bucket_size)
    buckets = int(index.max()) + 1
    sums = torch.zeros(buckets, dtype=torch.float64).index_add_(0, index, nll.sum(0))
    counts = torch.bincount(index, minlength=buckets) * nll.shape[0]
    bucket_ppl = [math.exp(s / c) for s, c in zip(sums.tolist(), counts.tolist())]
    return math.exp(float(nll.mean())), bucket_ppl, counts.tolist()


# ---------------------------------------------------------------------- results
@dataclass
class PerplexityResult:
    """One (method, length) measurement; ``to_dict`` gives the JSON record."""

    method: str
    factor: float | None
    length: int
    ppl: float
    bucket_size: int
    bucket_ppl: list[float]
    bucket_tokens: list[int] = field(default_factory=list)
    windows: list[str] = field(default_factory=list)
    rope: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def late_ppl(self, start: int) -> float:
        """Perplexity of the buckets from position ``start`` on (token-weighted), e.g. past the trained length."""
        first = start // self.bucket_size
        logs = [(math.log(p), n) for p, n in zip(self.bucket_ppl[first:], self.bucket_tokens[first:])]
        if not logs:
            raise ValueError(f"start: {start} is past the window length {self.length}")
        return math.exp(sum(l * n for l, n in logs) / sum(n for _, n in logs))


@dataclass(frozen=True)
class MethodRun:
    """A labelled RoPE configuration to evaluate (``label`` is the name shown in reports)."""

    label: str
    rope: RopeConfig


def rope_context(model, rope: RopeConfig | None):
    """``apply_rope(model, rope)`` as a context manager; ``rope=None``: the model as it is."""
    if rope is None:
        return nullcontext()
    from ropekit.hf import apply_rope

    return apply_rope(model, rope)


def window_nll(model, windows: Sequence, rope: RopeConfig | None, *, chunk_size: int = DEFAULT_CHUNK_SIZE,
               desc: str | None = None) -> torch.Tensor:
    """(len(windows), length - 1) NLL of each token window under ``rope`` (None: the model as it is)."""
    rows = []
    with rope_context(model, rope):
        for w in windows:
            ids = w.input_ids if hasattr(w, "input_ids") else w
            rows.append(token_nll(model, ids[None], chunk_size=chunk_size, progress=desc)[0])
    return torch.stack(rows)


def _is_prefix(short: Sequence, long: Sequence) -> bool:
    """Each short window is the start of the long window of the same document."""
    return len(short) == len(long) and all(
        a.name == b.name and torch.equal(a.input_ids, b.input_ids[: a.input_ids.numel()]) for a, b in zip(short, long))


def evaluate_perplexity(model, runs: Iterable[MethodRun], lengths: Sequence[int], windows_by_length: dict,
                        *, bucket_size: int = DEFAULT_BUCKET_SIZE, chunk_size: int = DEFAULT_CHUNK_SIZE,
                        progress: bool = True) -> list[PerplexityResult]:
    """Perplexity of every run at every length.

    Args:
        model: a transformers causal LM.
        runs: ``MethodRun``s; each is applied with ``ropekit.hf.apply_rope`` for its windows.
        lengths: window lengths in tokens.
        windows_by_length: ``{length: [TokenWindow, ...]}`` (see ``data.token_windows``).
    Returns:
        One ``PerplexityResult`` per (run, length), runs outer, lengths inner (ascending).

    For runs whose rotation does not depend on the sequence length, the shorter windows are read off the
    longest one when they are its prefixes (identical by causality, up to float rounding): one forward pass
    per document instead of one per length.
    """
    runs = list(runs)
    lengths = sorted(lengths)
    longest = lengths[-1]
    total = sum(len(windows_by_length[n]) for n in lengths) * len(runs)
    bar = tqdm(total=total, desc="perplexity", unit="window", disable=not progress)
    results = []
    try:
        for run in runs:
            # A rotation that does not depend on the length gives the first n tokens of a long window exactly
            # what an n-token window gives (causal attention): measure the longest window only and slice it.
            shared = not run.rope.length_dependent and all(_is_prefix(windows_by_length[n], windows_by_length[longest])
                                                             for n in lengths)
            nll_by_length: dict[int, torch.Tensor] = {}
            with rope_context(model, run.rope):
                for length in (lengths[::-1] if shared else lengths):
                    windows = windows_by_length[length]
                    bar.set_postfix_str(f"{run.label} @ {length}")
                    if shared and length != longest:
                        nll_by_length[length] = nll_by_length[longest][:, : length - 1]
                        bar.update(len(windows))
                        continue
                    rows = []
                    for w in windows:
                        rows.append(token_nll(model, w.input_ids[None], chunk_size=chunk_size,
                                              progress=f"{run.label} @ {length}" if progress else None)[0])
                        bar.update(1)
                    nll_by_length[length] = torch.stack(rows)
            for length in lengths:
                windows = windows_by_length[length]
                ppl, bucket_ppl, counts = summarize_nll(nll_by_length[length], bucket_size)
                results.append(PerplexityResult(
                    method=run.rope.method, factor=run.rope.factor, length=length, ppl=ppl, bucket_size=bucket_size,
                    bucket_ppl=bucket_ppl, bucket_tokens=counts, windows=[w.name for w in windows],
                    rope=run.rope.to_dict(), label=run.label))
                if progress:
                    bar.write(f"  {run.label:<14} length {length:>6}: ppl {ppl:.3f}")
    finally:
        bar.close()
    return results
