"""Tiny-model helpers shared by the ropekit.hf tests (tests/test_hf_*.py)."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch
from tiny import TINY_TRAINED_LENGTH, make_tiny_model

from ropekit import RopeConfig

ATOL = 2e-5
LONG = 150  # > 2x the tiny models' trained length (64)


def token_ids(batch=2, seq=LONG, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def hf_rope(method: str, rotary_dim: int) -> dict:
    """transformers rope_parameters for ``method`` on a tiny model (trained length 64)."""
    half = rotary_dim // 2
    L = TINY_TRAINED_LENGTH
    return {
        "linear": {"rope_type": "linear", "factor": 2.0},
        "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": L},
        "llama3": {"rope_type": "llama3", "factor": 4.0, "original_max_position_embeddings": L,
                   "low_freq_factor": 1.0, "high_freq_factor": 4.0},
        "dynamic": {"rope_type": "dynamic", "factor": 2.0},
        "longrope": {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": L,
                     "short_factor": [1.0 + 0.05 * i for i in range(half)],
                     "long_factor": [1.0 + 0.6 * i for i in range(half)]},
    }[method]


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def scaled_pair(family: str, method: str):
    """(tiny model without scaling, the same weights with transformers' own ``method``)."""
    base = make_tiny_model(family)
    rd = RopeConfig.from_hf(base.config).rotary_dim
    # yarn/llama3/longrope read the target length from max_position_embeddings: make it factor * L.
    extra = {"max_position_embeddings": 4 * TINY_TRAINED_LENGTH} if method in ("yarn", "llama3", "longrope") else {}
    reference = make_tiny_model(family, rope=hf_rope(method, rd), **extra)
    reference.load_state_dict(base.state_dict())
    return base, reference


def cache_of(out):
    """The KV cache of a forward's output: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def decode_logits(model, ids, prompt_len):
    """Logits of each token after the prompt, fed one at a time through the KV cache: (batch, n, vocab)."""
    # transformers 5.24 renamed the argument (``past_key_values`` is deprecated there, removed in 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True)
        past, steps = cache_of(out), [out.logits[:, -1]]
        for t in range(prompt_len, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **{name: past})
            past = cache_of(out)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


def save_tiny(tmp_path, family="llama"):
    """A tiny model saved as a folder with a word-level tokenizer: (model, folder)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_model(family)
    folder = tmp_path / family
    model.save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", eos_token="w2").save_pretrained(folder)
    return model, folder


def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


@pytest.fixture
def transformers_log():
    """Every record the "transformers" loggers let through (they do not propagate to the root logger)."""
    handler = _Records()
    logger = logging.getLogger("transformers")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler.messages
    logger.removeHandler(handler)
    logger.setLevel(old_level)
