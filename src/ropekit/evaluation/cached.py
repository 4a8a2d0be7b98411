"""Prefill a long context once, then answer many questions from its KV cache.

``prefill`` runs the model body over the context with a cache and, from the same hidden states, the per-token
NLL (chunked head: the full (length, vocabulary) logits never exist). ``answer`` appends a question to the cached
context, decodes greedily, and crops the cache back to the context, so the next question sees exactly the
same prefix. The answer equals what greedy decoding of the full prompt (context + question) gives, because a
causal model's keys and values for the context do not depend on what follows; tests check it for every method,
length-dependent ones included (their scale is frozen for the sequence: ``RopePatch.fix_length``). Decoding
stops early by the retrieval scorer's rule (``evaluation.scoring``), so an early stop never changes a verdict.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ropekit.evaluation.perplexity import DEFAULT_CHUNK_SIZE, layer_progress, model_body, output_logits
from ropekit.evaluation.scoring import answer_state

ANSWER_TOKENS = 8


@dataclass
class Prefill:
    """A context in a model's KV cache.

    Attributes:
        cache: the transformers cache holding the context's keys and values.
        length: tokens of the context.
        nll: (length - 1,) float32 per-token NLL of the context (entry j predicts token j + 1), or None.
    """

    cache: Any
    length: int
    nll: torch.Tensor | None


def cache_keyword(module) -> str:
    """The name ``module.forward`` takes the KV cache by: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def crop_cache(cache, length: int) -> None:
    """Drop the cache's entries past ``length`` tokens (a negative ``crop`` means the same in every release)."""
    extra = int(cache.get_seq_length()) - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, *, nll: bool = True, chunk_size: int = DEFAULT_CHUNK_SIZE,
            progress: str | None = None) -> Prefill:
    """Run ``input_ids`` (length,) through ``model`` once, keeping the KV cache (and the NLL if ``nll``)."""
    from transformers import DynamicCache

    if input_ids.dim() != 1 or input_ids.numel() < 2:
        raise ValueError(f"input_ids: need a 1-D context of at least 2 tokens, got shape {tuple(input_ids.shape)}")
    device = next(model.parameters()).device
    ids = input_ids[None].to(device)
    cache = DynamicCache(config=model.config)
    body = model_body(model)
    with layer_progress(model, progress or "", enabled=progress is not None):
        out = body(input_ids=ids, use_cache=True, **{cache_keyword(body): cache})
    losses = None
    if nll:
        hidden, labels = out.last_hidden_state[0], ids[0, 1:]
        losses = torch.empty(labels.shape, dtype=torch.float32, device=device)
        for start in range(0, labels.numel(), chunk_size):
            end = min(start + chunk_size, labels.numel())
            losses[start:end] = F.cross_entropy(output_logits(model, hidden[start:end]), labels[start:end],
                                                reduction="none")
        losses = losses.cpu()
    return Prefill(cache, ids.shape[1], losses)


@torch.inference_mode()
def answer(model, tokenizer, context: Prefill, question_ids: Sequence[int], *, max_new_tokens: int = ANSWER_TOKENS,
           stop_after_number: bool = True) -> str:
    """Greedy answer to ``question_ids`` asked right after the cached context; the cache is cropped back after.

    ``stop_after_number``: stop once the first number of the answer is complete (the scored part).
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    ids = torch.tensor([list(question_ids)], dtype=torch.long, device=device)
    generated: list[int] = []
    cache_kw = {cache_keyword(model): context.cache}
    try:
        for _ in range(max_new_tokens):
            logits = model(input_ids=ids, use_cache=True, logits_to_keep=1, **cache_kw).logits[0, -1]
            token = int(logits.argmax())
            if token == eos:
                break
            generated.append(token)
            if stop_after_number and answer_state(tokenizer.decode(generated, skip_special_tokens=True),
                                                   None) == "done":
                break
            ids = torch.tensor([[token]], dtype=torch.long, device=device)
    finally:
        crop_cache(context.cache, context.length)
    return tokenizer.decode(generated, skip_special_tokens=True)


@torch.inference_mode()
def answer_all(model, tokenizer, context: Prefill, questions: Sequence[Sequence[int]], *,
               max_new_tokens: int = ANSWER_TOKENS, expected: Sequence[str] | None = None,
               stop_after_number: bool = True) -> list[str]:
    """Greedy answers to all ``questions``, each asked right after the cached context, decoded together.

    The questions are packed into one sequence after the context, each at the positions it would have alone
    (context length, +1, ...) and seeing only the context and its own tokens (a 4-D attention mask); each decoding
    step adds one token per unfinished question the same way. So every answer is the one ``answer`` gives for that
    question alone, for ``1 + max_new_tokens`` forward passes in all instead of that many per question. The cache is
    cropped back to the context afterwards.

    ``expected``: the answers the scorer compares first numbers with; a question stops as soon as its first number
    is complete or can no longer equal its expected answer (``stop_after_number``).
    """
    if not questions:
        return []
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    body = model_body(model)
    cache_kw = {cache_keyword(body): context.cache}
    eos = tokenizer.eos_token_id
    n = context.length
    count = len(questions)
    owner: list[int] = []  # for each cached token past the context: the question it belongs to
    next_pos = [n] * count
    generated: list[list[int]] = [[] for _ in range(count)]
    active = list(range(count))
    tokens = [[int(t) for t in q] for q in questions]
    try:
        for step in range(max_new_tokens):
            if not active:
                break
            ids, pos, rows = [], [], []
            for i in active:
                new = tokens[i] if step == 0 else [generated[i][-1]]
                for t in new:
                    ids.append(t)
                    pos.append(next_pos[i])
                    rows.append(i)
                    next_pos[i] += 1
            past = len(owner)
            owner_all = torch.tensor(owner + rows, dtype=torch.long, device=device)
            row_of = torch.tensor(rows, dtype=torch.long, device=device)
            q_len = len(rows)
            # (q, past + q): own earlier tokens (and itself), never another question's; all of the context
            own = owner_all[None, :] == row_of[:, None]
            columns = torch.arange(past + q_len, device=device)
            causal = columns[None, :] <= (past + torch.arange(q_len, device=device))[:, None]
            allowed = torch.cat([torch.ones(q_len, n, dtype=torch.bool, device=device), own & causal], dim=1)
            # additive float mask: every attention implementation reads it the same way (eager adds it)
            mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, torch.finfo(dtype).min)
            out = body(input_ids=torch.tensor([ids], device=device), position_ids=torch.tensor([pos], device=device),
                       attention_mask=mask[None, None], use_cache=True, **cache_kw)
            owner += rows
            last = {}
            for j, i in enumerate(rows):
                last[i] = j  # the last packed token of question i predicts its next token
            picks = torch.tensor([last[i] for i in active], device=device)
            logits = output_logits(model, out.last_hidden_state[0, picks])
            chosen = logits.argmax(-1).tolist()
            still = []
            for i, token in zip(active, chosen):
                if token == eos:
                    continue
                generated[i].append(int(token))
                if stop_after_number:
                    text = tokenizer.decode(generated[i], skip_special_tokens=True)
                    if answer_state(text, None if expected is None else expected[i]) == "done":
                        continue
                still.append(i)
            active = still
    finally:
        crop_cache(context.cache, n)
    return [tokenizer.decode(g, skip_special_tokens=True) for g in generated]
