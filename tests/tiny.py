"""Tiny models and a byte tokenizer for tests: an ordinary module the test files import (``from tiny import ...``).

``make_tiny_model(family, rope=None, seed=0, **config)`` builds a 2-layer, hidden-64, vocab-256 causal LM with
random weights (deterministic per seed), trained length (max_position_embeddings) 64, eager attention.
``rope`` is a ``rope_parameters`` dict (e.g. ``{"rope_type": "yarn", "factor": 2.0}``), merged over the
family's default; the same seed gives the same weights whatever the RoPE, so a model built with
transformers' own scaling can be compared to the unscaled one patched by ropekit.
"""

from __future__ import annotations

import torch

TINY_VOCAB = 256
TINY_TRAINED_LENGTH = 64

# Per family: (config class name, kwargs). Partial rotary on GPT-NeoX, Phi-3 and GPT-J; GQA on Llama/Qwen.
TINY_CONFIGS: dict[str, tuple[str, dict]] = {
    "llama": ("LlamaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2)),
    "mistral": ("MistralConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, sliding_window=None)),
    "qwen2": ("Qwen2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1)),
    "qwen3": ("Qwen3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=16)),
    "phi3": ("Phi3Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, pad_token_id=0,
                                partial_rotary_factor=0.5, original_max_position_embeddings=64)),
    "gemma": ("GemmaConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=1, head_dim=16, pad_token_id=0)),
    "gemma2": ("Gemma2Config", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16, pad_token_id=0,
                                    sliding_window=4096)),
    "gpt_neox": ("GPTNeoXConfig", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, rotary_pct=0.5)),
    "gptj": ("GPTJConfig", dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_inner=128)),
}


def make_tiny_config(family: str, rope: dict | None = None, **overrides):
    """A transformers config for a tiny ``family`` model; ``rope`` updates its rope_parameters."""
    import transformers

    cls_name, kwargs = TINY_CONFIGS[family]
    kwargs = dict(kwargs, vocab_size=TINY_VOCAB, bos_token_id=1, eos_token_id=2, **overrides)
    if family == "gptj":
        kwargs.setdefault("n_positions", TINY_TRAINED_LENGTH)
        if rope:
            raise ValueError("gptj: transformers' GPT-J has no rope_parameters")
    else:
        kwargs.setdefault("max_position_embeddings", TINY_TRAINED_LENGTH)
        params = {"rope_type": "default", "rope_theta": 10000.0}
        partial = kwargs.pop("rotary_pct", None) or kwargs.pop("partial_rotary_factor", None)
        if partial is not None:
            params["partial_rotary_factor"] = partial
        params.update(rope or {})
        kwargs["rope_parameters"] = params
    config = getattr(transformers, cls_name)(**kwargs)
    config._attn_implementation = "eager"
    return config


def make_tiny_model(family: str, rope: dict | None = None, seed: int = 0, **overrides):
    """A tiny random causal LM of ``family`` in eval mode (float32, CPU)."""
    from transformers import AutoModelForCausalLM

    config = make_tiny_config(family, rope, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random init leaves some weights tiny (zeros in norms for Gemma); perturb all for a sensitive test.
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def byte_tokenizer():
    """A real transformers fast tokenizer with one token per byte (vocabulary 256: fits the tiny test models)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[2], pad_token=alphabet[0])
