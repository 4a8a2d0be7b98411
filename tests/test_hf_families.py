"""ropekit.hf.families: which models ropekit patches, and refusing (by family and transformers version) the
ones it cannot, before anything is changed."""

from __future__ import annotations

import sys

import pytest
import torch
from tiny import make_tiny_model
from hf_models import logits, one_line, token_ids

from ropekit import RopeConfig
from ropekit.hf import (
    SUPPORTED_FAMILIES,
    TransformersStructureError,
    active_patch,
    apply_rope,
)
from ropekit.hf.patch import RopekitRotaryAdapter


def test_config_geometry_must_match_the_model():
    model = make_tiny_model("gpt_neox")  # rotary_dim 8 of head_dim 16
    cfg = RopeConfig.from_hf(model.config)
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rope(model, cfg.replace(rotary_dim=16))
    with pytest.raises(ValueError, match="layout"):
        apply_rope(model, cfg.replace(layout="gptj"))
    with pytest.raises(ValueError, match="RopeConfig"):
        apply_rope(model, {"method": "yarn"})


def test_unsupported_family_is_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32))
    with pytest.raises(ValueError, match="no rotary position embeddings") as info:
        apply_rope(model, RopeConfig(head_dim=16))
    assert all(f in str(info.value) for f in SUPPORTED_FAMILIES)


class _Sinusoids(torch.nn.Module):
    """A stand-in for a rotary module under another name (as a future transformers might have)."""

    def forward(self, x, position_ids=None, **kwargs):  # pragma: no cover - never reached
        raise AssertionError


def _structure_error(model, cfg=None):
    import transformers

    with pytest.raises(TransformersStructureError) as info:
        apply_rope(model, cfg or RopeConfig.from_hf(model.config))
    message = one_line(info)
    assert f"transformers {transformers.__version__}" in message
    assert isinstance(info.value, ValueError)
    assert active_patch(model) is None
    return message


def test_gptj_without_a_known_sin_cos_structure_is_refused_naming_version_and_family():
    model = make_tiny_model("gptj")
    # Take away both places transformers has kept GPT-J's sin/cos: the GPTJRotaryEmbedding module (>= 5.24)
    # and the per-attention table ``embed_positions`` (before).
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child).__name__.endswith("RotaryEmbedding"):
                setattr(parent, name, _Sinusoids())
    for module in model.modules():
        if hasattr(module, "embed_positions"):
            delattr(module, "embed_positions")
    module = sys.modules[type(model.transformer.h[0].attn).__module__]
    original = module.apply_rotary_pos_emb
    message = _structure_error(model)
    assert message.startswith("gptj: GPT-J keeps its sin/cos in no GPTJRotaryEmbedding module")
    assert module.apply_rotary_pos_emb is original  # nothing was installed


def test_rope_family_without_its_rotary_module_is_refused():
    model = make_tiny_model("llama")
    model.model.rotary_emb = _Sinusoids()
    assert _structure_error(model).startswith("llama: found no *RotaryEmbedding module")


def test_modeling_module_without_apply_rotary_pos_emb_is_refused(monkeypatch):
    model = make_tiny_model("mistral")
    monkeypatch.delattr(sys.modules[type(model.model.rotary_emb).__module__], "apply_rotary_pos_emb")
    assert "has no apply_rotary_pos_emb" in _structure_error(model)


def test_attention_that_stops_calling_apply_rotary_pos_emb_fails_instead_of_silently_falling_back(monkeypatch):
    """A transformers whose attention rotates through its own reference (not the module's function) would leave
    the rotation to transformers: the first forward says so instead of returning transformers' numbers."""
    model = make_tiny_model("qwen2")
    attn_cls = type(model.model.layers[0].self_attn)
    module = sys.modules[attn_cls.__module__]
    original_forward, original_rotation = attn_cls.forward, module.apply_rotary_pos_emb

    def forward_with_its_own_rotation(self, *args, **kwargs):
        dispatcher = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = original_rotation
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            module.apply_rotary_pos_emb = dispatcher

    monkeypatch.setattr(attn_cls, "forward", forward_with_its_own_rotation)
    with apply_rope(model, RopeConfig.from_hf(model.config).extend("yarn", 2.0)):
        with pytest.raises(TransformersStructureError, match="did not call .*apply_rotary_pos_emb"):
            logits(model, token_ids(seq=20))


def test_gptj_uses_the_layout_transformers_has_today():
    """Whichever GPT-J structure the installed transformers has, the patch routes every layer through ropekit."""
    model = make_tiny_model("gptj")
    has_module = any(type(m).__name__ == "GPTJRotaryEmbedding" for m in model.modules())
    with apply_rope(model, RopeConfig.from_hf(model.config)) as patch:
        replaced = any(isinstance(m, RopekitRotaryAdapter) for m in model.modules())
        assert replaced == has_module and patch.adapter.gptj_order == has_module
    assert not any(isinstance(m, RopekitRotaryAdapter) for m in model.modules())


# ---------------------------------------------------------------------- any family, from its structure
def _tiny(model_type):
    from ropekit.hf.reference import _tiny_model, tiny_family_config

    return _tiny_model(tiny_family_config(model_type)[0])


def test_layout_comes_from_the_modeling_code_not_a_list():
    from ropekit.hf.config_map import hf_layout

    # rotate_half over (2i, 2i+1) in Cohere's and GLM's modeling code; halves in Llama's.
    assert hf_layout({"model_type": "cohere"}) == hf_layout({"model_type": "glm4"}) == "gptj"
    assert hf_layout({"model_type": "llama"}) == "neox"
    assert hf_layout({"model_type": "deepseek_v3", "rope_interleave": False}) == "neox"
    assert hf_layout({"model_type": "youtu", "rope_interleave": True}) == "gptj"


def test_layout_of_families_whose_text_rotation_is_not_a_module_rotate_half():
    """Issue 19: Llama 4 (and DeepSeek-V2) multiply complex (2i, 2i+1) pairs and have no rotate_half; GLM-4V,
    GLM-OCR and ERNIE 4.5 VL rotate their text with rotate_half_llm / rotate_half_text over (2i, 2i+1) beside
    the vision tower's rotate_half over halves; the privacy filter rotates x[..., ::2] against x[..., 1::2]."""
    from ropekit.hf.config_map import hf_layout

    for model_type in ("llama4", "llama4_text", "glm4v", "glm4v_text", "glm_ocr", "ernie4_5_vl_moe",
                       "openai_privacy_filter"):
        assert hf_layout({"model_type": model_type}) == "gptj", model_type
    # Families beside them that do rotate halves are still read so.
    for model_type in ("gpt_oss", "glm4v_moe", "qwen2_5_omni", "llama"):
        assert hf_layout({"model_type": model_type}) == "neox", model_type


def test_each_routed_function_is_probed_for_its_own_pairing():
    """DeepSeek-V3.2 rotates its indexer's q, k rotate-half and its attention's interleaved: each function the
    attention calls is matched against ropekit by calling it, and the patch rotates each its own way."""
    from ropekit.layered import LayeredRope
    from ropekit.hf.families import locate, probe_functions, probe_tables

    model = _tiny("deepseek_v32")
    located = locate(model, "deepseek_v32")
    rope = LayeredRope.from_hf(model.config)
    probe_tables(located, rope, torch.float32, torch.device("cpu"))
    probe_functions(located, rope, torch.device("cpu"))
    assert located.functions["apply_rotary_pos_emb"].layout == "neox"
    assert located.functions["apply_rotary_pos_emb_interleave"].layout == "gptj"
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    reference = logits(model, ids)
    with apply_rope(model, rope):
        torch.testing.assert_close(logits(model, ids), reference, atol=1e-4, rtol=0)


def test_a_model_whose_rotary_module_disagrees_with_the_config_reading_is_refused():
    """The probe calls the model's own rotary module: if ropekit's reading of the config would give other
    frequencies (here: a config edited after the model was built), nothing is patched."""
    model = make_tiny_model("llama")
    model.config.rope_parameters = {**model.config.rope_parameters, "rope_theta": 12345.0}
    with pytest.raises(TransformersStructureError, match="computes other frequencies"):
        apply_rope(model, RopeConfig.from_hf(model.config))
    assert active_patch(model) is None


def test_per_layer_type_model_needs_a_layered_rope():
    from ropekit.layered import LayeredRope

    model = _tiny("gemma3_text")
    with pytest.raises(ValueError, match="one RoPE per layer type"):
        apply_rope(model, LayeredRope.from_hf(model.config)["full_attention"])
    layered = LayeredRope.from_hf(model.config).extend("linear", 2.0)
    assert layered.changed == ("full_attention",)
    with apply_rope(model, layered) as patch:
        assert set(patch.ropes) == {"full_attention", "sliding_attention"}
        assert patch.config == layered["full_attention"]


def test_nope_layers_are_left_alone():
    """SmolLM3: the layers without RoPE do not rotate, patched or not; the others rotate through ropekit."""
    from ropekit.layered import LayeredRope

    model = _tiny("smollm3")
    layered = LayeredRope.from_hf(model.config)
    assert layered.nope_layers == (1,) and layered.rope_layers == (0,)
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    reference = logits(model, ids)
    with apply_rope(model, layered.extend("yarn", 2.0, original_max_position=16)) as patch:
        scaled = logits(model, ids)
        assert patch._forward.rotated == {0}
    with apply_rope(model, layered):
        torch.testing.assert_close(logits(model, ids), reference, atol=1e-4, rtol=0)
    assert not torch.allclose(scaled, reference, atol=1e-3)


def test_mrope_models_are_refused_with_the_reason():
    from ropekit.hf.families import rope_families

    if "qwen3_5_text" not in rope_families():
        pytest.skip("no Qwen3.5 in this transformers")
    model = _tiny("qwen3_5_text")
    with pytest.raises(ValueError, match="M-RoPE"):
        apply_rope(model, RopeConfig.from_hf(model.config))
