"""The study's model: a fresh small Llama-style causal LM, each method's extended RoPE, and the LongRoPE
factor search for it."""

from __future__ import annotations

from typing import Any

import torch

from ropekit.config import RopeConfig
from ropekit.study.settings import BYTES, StudySizes


def build_model(sizes: StudySizes):
    """A fresh Llama-style causal LM (random init, seeded) whose trained length is sizes.train_len."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(sizes.seed)
    config = LlamaConfig(vocab_size=BYTES.vocab_size, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
                         num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
                         num_key_value_heads=sizes.kv_heads, max_position_embeddings=sizes.train_len,
                         rope_theta=sizes.rope_base, eos_token_id=BYTES.eos_token_id, bos_token_id=None,
                         pad_token_id=None, tie_word_embeddings=True, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def method_config(base: RopeConfig, method: str, factor: float) -> RopeConfig:
    """The pretrained RoPE extended by ``method`` to factor * L (no scaling: unchanged). LongRoPE's factors
    come from a search (``search_longrope``), not from here."""
    if method == "default":
        return base
    if method == "longrope":
        raise ValueError("method: longrope needs searched factors (search_longrope)")
    return base.extend(method, float(factor))


def search_longrope(model, base: RopeConfig, sizes: StudySizes, train_docs: list[str], progress: bool = True,
                    ) -> tuple[RopeConfig, dict[str, Any]]:
    """LongRoPE long factors for the pretrained ``model`` at factor * L, found by ``ropekit.search`` (the same
    search as ``ropekit search``: seeded with PI/NTK/YaRN, needle-driven perplexity with a short-range guard)
    on the training text, never on the held-out files. Returns (the longrope RopeConfig, the search record)."""
    from ropekit.evaluation.data import Document
    from ropekit.hf.load import LoadedModel
    from ropekit.search.run import SearchOptions, factors_config, search_factors

    loaded = LoadedModel(model=model, tokenizer=BYTES, rope=base, family=model.config.model_type, source="study")
    documents = [Document(f"study-train-{i}", text) for i, text in enumerate(train_docs)]
    # The study's model never learns retrieval (0% passkey even at 1x), so the answer NLL is mostly noise: the
    # text NLL gets the weight, and few needles keep the question/answer block at the haystack's end short, so
    # that the scored text reaches the long positions (with 8 needles, a 2048-byte haystack's text ended before
    # position ~900 and the search picked factors that were worse than YaRN's on held-out text). Every pair is a
    # gene (LongRoPE v1): the 16-pair model has only 9 from the critical dimension on. Generations are not the
    # limit: the budget is, with early stopping after 6 flat generations.
    options = SearchOptions(target_length=sizes.long_len, budget=sizes.search_budget,
                            population=sizes.search_population, generations=10 * sizes.search_budget, patience=6,
                            needles=sizes.search_needles, genes="all", text_weight=4.0, seed=sizes.seed)
    result = search_factors(loaded, options, None, documents=documents, data_name="study training text",
                            model_name="study", progress=progress)
    record = dict(result.factors["search"])
    record["long_factor"] = result.factors["long_factor"]
    record["attention_factor"] = result.factors["attention_factor"]
    return factors_config(base, result.factors), record
