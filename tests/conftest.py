"""Shared fixtures: tiny transformers models of every supported family, and the real SmolLM2 (session-scoped).

``tiny_model(family, rope=None, seed=0, **config)`` builds a 2-layer, hidden-64, vocab-256 causal LM with
random weights (deterministic per seed), trained length (max_position_embeddings) 64, eager attention.
``rope`` is a ``rope_parameters`` dict (e.g. ``{"rope_type": "yarn", "factor": 2.0}``), merged over the
family's default; the same seed gives the same weights whatever the RoPE, so a model built with
transformers' own scaling can be compared to the unscaled one patched by ropekit.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
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


@pytest.fixture
def tiny_model():
    """Factory fixture: ``tiny_model(family, rope=None, seed=0, **config)`` -> model."""
    return make_tiny_model


@pytest.fixture(scope="session")
def smollm2():
    """The real SmolLM2-135M-Instruct (GGUF, float32, CPU) as a ``ropekit.models.LoadedModel``.

    Loaded once per test session (~25 s). Tests must leave it unpatched (use ``with apply_rope(...)``).
    """
    from ropekit.models import demo_model_path, load_model

    try:
        demo_model_path()
    except FileNotFoundError as exc:  # pragma: no cover - CI installs it
        pytest.fail(str(exc))
    return load_model("demo", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def stdlib_text() -> str:
    """Real text available on every machine: Python standard-library sources, concatenated (~2 MB)."""
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    names = ["argparse.py", "typing.py", "inspect.py", "dataclasses.py", "subprocess.py", "pathlib.py",
             "tarfile.py", "zipfile.py", "logging/__init__.py", "collections/__init__.py"]
    parts = [(root / n).read_text(encoding="utf-8") for n in names if (root / n).is_file()]
    return "\n\n".join(parts)


def pytest_report_header(config):
    return f"python {sys.version.split()[0]}, torch {torch.__version__}"
