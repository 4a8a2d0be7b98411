"""Published ``config.json`` RoPE fields of current models (tests/data/published_configs/, provenance in each
file) read by ropekit exactly as transformers reads them: per layer type, the inverse frequencies and attention
scale of the model's own rotary module, the channel layout its modeling code rotates with, which layers have
RoPE at all. A reading that silently differs from transformers' (Gemma 3's per-type RoPE, Command-R's
interleaved pairs) fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ropekit.config import RopeConfig
from ropekit.layered import LayeredRope
from ropekit.hf.reference import hf_config
from ropekit.methods import frequencies

DATA = Path(__file__).parent / "data" / "published_configs"
FILES = sorted(DATA.glob("*.json"))

# The channel pairing each model's attention rotates with in transformers (read off its modeling code:
# rotate_half over halves, or over (2i, 2i+1) pairs: Cohere, GLM, DeepSeek's rope_interleave; Llama 4 multiplies
# complex (2i, 2i+1) pairs by freqs_cis).
INTERLEAVED = {"command-r-v01", "command-r7b", "glm-4-9b-0414", "glm-4-9b-chat-hf", "deepseek-v3",
               "llama-4-scout-17b-16e"}


def load(path: Path) -> dict:
    return json.loads(path.read_text())["config"]


def text_config(hf_cfg):
    return hf_cfg.get_text_config() if hasattr(hf_cfg, "get_text_config") else hf_cfg


def transformers_rope(text_cfg, layer_type: str | None, seq_len: int | None = None):
    """(inv_freq, attention_scaling) of transformers' own RoPE code for this config (and layer type)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = text_cfg.rope_parameters if layer_type is None else text_cfg.rope_parameters[layer_type]
    rope_type = params.get("rope_type", "default")
    kwargs = {"layer_type": layer_type} if layer_type is not None else {}
    if rope_type == "default":
        from ropekit.hf.reference import hf_rotary_module

        rot = hf_rotary_module(text_cfg)
        prefix = f"{layer_type}_" if layer_type is not None else ""
        inv = getattr(rot, f"{prefix}inv_freq")
        scale = getattr(rot, f"{prefix}attention_scaling", getattr(rot, "attention_scaling", 1.0))
        if isinstance(scale, dict):
            scale = scale[layer_type]
        return inv.double(), float(scale)
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](text_cfg, "cpu", seq_len=seq_len, **kwargs)
    return inv.double(), float(scale)


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_published_config_reads_as_transformers_does(path):
    config = load(path)
    layered = LayeredRope.from_hf(config)
    text = text_config(hf_config(config))
    layer_types = getattr(text, "layer_types", None)
    per_type = isinstance(text.rope_parameters, dict) and any(
        isinstance(v, dict) for v in text.rope_parameters.values())
    keys = list(layered.types)
    for key in keys:
        cfg = layered[key]
        layer_type = key if per_type else None
        ours = frequencies(cfg, cfg.original_max_position if cfg.length_dependent else None)
        inv, scale = transformers_rope(text, layer_type)
        assert ours.inv_freq64.shape == inv.shape, key
        torch.testing.assert_close(ours.inv_freq64, inv, rtol=2e-6, atol=0)  # transformers computes in float32
        assert ours.attention_scale == pytest.approx(scale, rel=1e-6), key
        if cfg.method == "longrope":  # past the trained length: the long factors
            long = frequencies(cfg, cfg.original_max_position + 1)
            inv, scale = transformers_rope(text, layer_type, seq_len=cfg.original_max_position + 1)
            torch.testing.assert_close(long.inv_freq64, inv, rtol=2e-6, atol=0)
            assert long.attention_scale == pytest.approx(scale, rel=1e-6)
        assert cfg.layout == ("gptj" if path.stem in INTERLEAVED else "neox"), key
    # Which layers have which RoPE, and which none.
    n_layers = text.num_hidden_layers
    assert len(layered.layers) == n_layers
    no_rope = getattr(text, "no_rope_layers", None)
    for i, key in enumerate(layered.layers):
        if no_rope is not None and not no_rope[i]:
            assert key is None, i
        elif per_type:
            assert key == layer_types[i], i
        else:
            assert key is not None or (layer_types and "full" in layer_types[i]), i


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_single_rope_reader_refuses_per_type_configs_instead_of_picking_one(path):
    config = load(path)
    layered = LayeredRope.from_hf(config)
    if layered.single is not None:
        assert RopeConfig.from_hf(config) == layered.single
    else:
        with pytest.raises(ValueError, match="one RoPE per layer type"):
            RopeConfig.from_hf(config)
        for key in layered.types:
            assert RopeConfig.from_hf(config, layer_type=key) == layered[key]


def test_the_silently_wrong_cases_of_issue_13_read_right():
    by_name = {p.stem: LayeredRope.from_hf(load(p)) for p in FILES}
    assert by_name["command-r-v01"].single.layout == "gptj"
    assert by_name["glm-4-9b-0414"].single.layout == "gptj"
    assert by_name["glm-4-9b-0414"].single.rotary_dim == 64  # partial rotary over interleaved pairs
    gemma = by_name["gemma-3-27b-it"]
    assert gemma["sliding_attention"].base == 10000.0 and gemma["sliding_attention"].method == "default"
    assert gemma["full_attention"].base == 1e6 and gemma["full_attention"].method == "linear"
    assert gemma["full_attention"].factor == 8.0
    assert len(gemma.layers_of("full_attention")) == 62 // 6
    scout = by_name["llama-4-scout-17b-16e"].single
    assert (scout.method, scout.low_freq_factor, scout.high_freq_factor, scout.factor) == ("llama3", 1.0, 1.0, 16.0)
    assert by_name["smollm3-3b"].nope_layers == tuple(range(3, 36, 4))
    g4 = by_name["gemma-4-style"]
    assert g4["full_attention"].method == "proportional" and g4["full_attention"].head_dim == 512
    assert g4["sliding_attention"].head_dim == 256


def test_llama4_scout_rotates_as_transformers_complex_pairs_do():
    """Issue 19: Llama 4's config says nothing of its pairing, and its modeling code has no rotate_half: it
    multiplies complex (2i, 2i+1) pairs by freqs_cis. ropekit's reading must rotate q and k as that code does,
    so that q.k agree (a rotate-half reading gives other scores)."""
    from ropekit.hf.reference import hf_rotary_module
    from ropekit.rotation import apply_rotary_reference
    from transformers.models.llama4 import modeling_llama4

    config = load(DATA / "llama-4-scout-17b-16e.json")
    cfg = RopeConfig.from_hf(config)
    assert cfg.layout == "gptj"
    text = text_config(hf_config(config))
    torch.manual_seed(0)
    seq, heads = 24, 2
    q = torch.randn(1, seq, heads, cfg.head_dim, dtype=torch.float64)
    k = torch.randn(1, seq, heads, cfg.head_dim, dtype=torch.float64)
    positions = (torch.arange(seq) * 997).unsqueeze(0)  # far apart: every frequency band turns
    freqs_cis = hf_rotary_module(text)(q.float(), positions)
    hq, hk = modeling_llama4.apply_rotary_emb(q.float(), k.float(), freqs_cis)
    oq, ok = apply_rotary_reference(q.float(), k.float(), cfg, positions, heads_first=False)
    theirs = torch.einsum("bqhd,bkhd->bhqk", hq.double(), hk.double())
    ours = torch.einsum("bqhd,bkhd->bhqk", oq.double(), ok.double())
    torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-2)  # transformers turns float32 angles
