"""RopeConfig: reading every config form, validation errors that name the field, warnings, GGUF metadata."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import ropekit
from ropekit import RopeConfig

LLAMA = {"model_type": "llama", "hidden_size": 4096, "num_attention_heads": 32, "max_position_embeddings": 8192}


def hf(**rope):
    return {**LLAMA, **rope}


# ---------------------------------------------------------------------- forms
def test_old_and_new_forms_and_type_keys_agree():
    params = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    forms = [
        hf(rope_theta=5e5, rope_scaling={**params, "rope_type": "llama3"}),
        hf(rope_theta=5e5, rope_scaling={**params, "type": "llama3"}),
        hf(rope_parameters={**params, "rope_type": "llama3", "rope_theta": 5e5}),
        hf(rope_theta=5e5, rope_parameters={**params, "rope_type": "llama3"}),
        hf(rope_parameters={**params, "type": "llama3", "rope_type": "llama3", "rope_theta": 5e5}),
    ]
    cfgs = [RopeConfig.from_hf(f) for f in forms]
    assert all(c == cfgs[0] for c in cfgs)
    assert (cfgs[0].method, cfgs[0].base, cfgs[0].factor, cfgs[0].original_max_position) == ("llama3", 5e5, 8.0, 8192)


def test_transformers_config_object_reads_like_its_dict():
    from transformers import LlamaConfig

    d = hf(rope_theta=1e6, rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048})
    obj = LlamaConfig(**{k: v for k, v in d.items() if k != "model_type"})
    assert RopeConfig.from_hf(obj) == RopeConfig.from_hf(d)


def test_head_dim_wins_and_partial_rotary_keys():
    assert RopeConfig.from_hf(hf(head_dim=128, hidden_size=5120)).head_dim == 128
    assert RopeConfig.from_hf(hf()).head_dim == 128
    assert RopeConfig.from_hf(hf(partial_rotary_factor=0.5)).rotary_dim == 64
    assert RopeConfig.from_hf(hf(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.25})).rotary_dim == 32
    assert RopeConfig.from_hf(hf(rotary_pct=0.25, rotary_emb_base=20000)).rotary_dim == 32
    assert RopeConfig.from_hf(hf(rotary_pct=0.25, rotary_emb_base=20000)).base == 20000.0
    assert RopeConfig.from_hf({"n_embd": 4096, "n_head": 16, "rotary_dim": 64}).rotary_dim == 64
    assert RopeConfig.from_hf({"d_model": 512, "num_heads": 8}).head_dim == 64


def test_default_rope_type_dict_is_not_scaling():
    cfg = RopeConfig.from_hf(hf(rope_parameters={"rope_type": "default", "rope_theta": 1e5}))
    assert cfg.method == "default" and not cfg.is_scaled and cfg.factor is None
    assert RopeConfig.from_hf(hf(rope_scaling={"type": "default"})).is_scaled is False
    assert RopeConfig.from_hf(hf(rope_scaling=None)).is_scaled is False


def test_aliases_of_other_tools():
    su = RopeConfig.from_hf(hf(rope_scaling={"type": "su", "short_factor": [1.0] * 64, "long_factor": [2.0] * 64,
                                             "original_max_position_embeddings": 4096}))
    assert su.method == "longrope" and su.factor == 2.0  # factor from max_position_embeddings / original
    assert RopeConfig(head_dim=8, method="pi", factor=2.0).method == "linear"


def test_trained_and_target_lengths_are_separate():
    qwen = RopeConfig.from_hf(hf(max_position_embeddings=32768, rope_scaling={
        "type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}))
    assert (qwen.original_max_position, qwen.target_length) == (32768, 131072)
    l32 = RopeConfig.from_hf(hf(max_position_embeddings=131072, rope_scaling={
        "rope_type": "llama3", "factor": 32.0, "original_max_position_embeddings": 8192}))
    assert (l32.original_max_position, l32.target_length, l32.factor) == (8192, 131072, 32.0)
    dyn = RopeConfig.from_hf(hf(max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2.0}))
    assert (dyn.original_max_position, dyn.target_length) == (4096, 8192)
    assert RopeConfig(head_dim=8, method="linear", factor=2.0, original_max_position=100).target_length == 200


def test_per_layer_rope_needs_layer_type():
    gemma3 = {"head_dim": 256, "layer_types": ["sliding_attention", "full_attention"], "max_position_embeddings": 131072,
              "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}
    with pytest.raises(ValueError, match="layer_type: this config has one RoPE per layer type; pass one of: "
                                         "full_attention, sliding_attention"):
        RopeConfig.from_hf(gemma3)
    full = RopeConfig.from_hf(gemma3, layer_type="full_attention")
    local = RopeConfig.from_hf(gemma3, layer_type="sliding_attention")
    assert (full.method, full.factor, full.base) == ("linear", 8.0, 1e6)
    assert (local.method, local.base) == ("default", 1e4)
    with pytest.raises(ValueError, match="layer_type: 'chunked' not in this config; accepted: full_attention"):
        RopeConfig.from_hf(gemma3, layer_type="chunked")
    with pytest.raises(ValueError, match="layer_type: 'full_attention' given but the config has one RoPE"):
        RopeConfig.from_hf(hf(), layer_type="full_attention")


def test_nested_rope_parameters_alike_for_every_type_accept_an_explicit_layer_type():
    """Issue 19: transformers v5's nested rope_parameters (one entry per layer type) with the same RoPE for every
    type read as that RoPE with or without layer_type; an unknown type or one without RoPE is still refused."""
    same = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6, "original_max_position_embeddings": 4096}
    nested = hf(max_position_embeddings=4096, layer_types=["sliding_attention", "full_attention"],
                rope_parameters={"full_attention": dict(same), "sliding_attention": dict(same)})
    plain = RopeConfig.from_hf(nested)
    assert (plain.method, plain.factor, plain.base) == ("yarn", 4.0, 1e6)
    assert RopeConfig.from_hf(nested, layer_type="full_attention") == plain
    assert RopeConfig.from_hf(nested, layer_type="sliding_attention") == plain
    with pytest.raises(ValueError, match="layer_type: 'chunked_attention' not in this config; accepted: "
                                         "full_attention, sliding_attention"):
        RopeConfig.from_hf(nested, layer_type="chunked_attention")
    no_rope = hf(layer_types=["sliding_attention", "full_attention"],
                 rope_parameters={"full_attention": None, "sliding_attention": {"rope_type": "default"}})
    with pytest.raises(ValueError, match="layer_type: the 'full_attention' layers have no RoPE"):
        RopeConfig.from_hf(no_rope, layer_type="full_attention")
    assert RopeConfig.from_hf(no_rope, layer_type="sliding_attention") == RopeConfig.from_hf(no_rope)


def test_unknown_keys_warn_once():
    d = hf(rope_parameters={"rope_type": "default", "zz_unknown_once": 1})
    with pytest.warns(UserWarning, match="rope_parameters: unknown key 'zz_unknown_once' ignored"):
        RopeConfig.from_hf(d)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second read of the same key stays quiet
        RopeConfig.from_hf(d)


def test_keys_the_method_does_not_read_warn():
    with pytest.warns(UserWarning, match="key 'beta_fast' is not used by rope_type 'linear'"):
        RopeConfig.from_hf(hf(rope_scaling={"type": "linear", "factor": 2.0, "beta_fast": 32}))


def test_yarn_factor_that_disagrees_with_the_lengths_warns_once_as_transformers_does():
    """Issue 19: transformers warns when a YaRN factor is not max_position_embeddings /
    original_max_position_embeddings (and that ratio is not 1); ropekit warns the same, once, and keeps the
    explicit factor."""
    odd = hf(max_position_embeddings=32768 + 17,
             rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096})
    with pytest.warns(UserWarning, match=r"YaRN factor 4.0 does not match .* 32785 / 4096 = 8.004"):
        cfg = RopeConfig.from_hf(odd)
    assert cfg.factor == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RopeConfig.from_hf(odd)  # once per process
        # Quiet where transformers is: the ratio matches, or it is 1 (Qwen2.5's max_position_embeddings kept at
        # the trained length), or the factor comes from the lengths.
        RopeConfig.from_hf(hf(max_position_embeddings=16384, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}))
        RopeConfig.from_hf(hf(max_position_embeddings=4096, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096}))
        RopeConfig.from_hf(hf(max_position_embeddings=8192, rope_scaling={
            "rope_type": "yarn", "original_max_position_embeddings": 4096}))


def test_overrides_and_replace_and_with_method():
    cfg = RopeConfig.from_hf(hf(), layout="gptj")
    assert cfg.layout == "gptj"
    yarn = cfg.with_method("yarn", factor=4.0)
    assert (yarn.method, yarn.factor, yarn.original_max_position) == ("yarn", 4.0, 8192)
    back = yarn.with_method("ntk", factor=2.0)
    assert back.method == "ntk" and back.factor == 2.0
    assert yarn.to_dict()["factor"] == 4.0 and "beta_fast" not in yarn.to_dict()


def test_length_dependent_flags():
    base = RopeConfig(head_dim=8, original_max_position=16)
    assert base.with_method("dynamic", factor=2.0).length_dependent
    assert base.with_method("dynamic_yarn").length_dependent
    assert not base.with_method("yarn", factor=2.0).length_dependent
    assert not base.length_dependent


# ---------------------------------------------------------------------- errors naming the field
@pytest.mark.parametrize("kwargs, match", [
    (dict(head_dim=64, rotary_dim=33), r"rotary_dim: must be even"),
    (dict(head_dim=2, method="ntk", factor=2.0), r"rotary_dim: method 'ntk' needs rotary_dim >= 4"),
    (dict(head_dim=63), r"head_dim: 63 is odd"),
    (dict(head_dim=64, rotary_dim=128), r"rotary_dim: must be <= head_dim \(64\), got 128"),
    (dict(head_dim=0), r"head_dim: must be >= 2"),
    (dict(head_dim=64.5), r"head_dim: must be an integer"),
    (dict(head_dim=64, base=1.0), r"base: must be > 1"),
    (dict(head_dim=64, method="linear", factor=0.5), r"factor: must be >= 1"),
    (dict(head_dim=64, method="linear", factor="2"), r"factor: must be a finite number"),
    (dict(head_dim=64, method="linear", factor=float("nan")), r"factor: must be a finite number"),
    (dict(head_dim=64, method="linear"), r"factor: required by method 'linear'"),
    (dict(head_dim=64, method="yarn", factor=2.0), r"original_max_position: required by method 'yarn'"),
    (dict(head_dim=64, method="llama3", factor=8.0), r"original_max_position: required by method 'llama3'"),
    (dict(head_dim=64, method="dynamic", factor=2.0), r"original_max_position: required by method 'dynamic'"),
    (dict(head_dim=64, method="base"), r"new_base: required by method 'base'"),
    (dict(head_dim=64, method="magic"), r"method: unknown scaling method 'magic'; accepted: default, linear, ntk, "
                                        r"dynamic, yarn, dynamic_yarn, llama3, longrope, base"),
    (dict(head_dim=64, method=["yarn"]), r"method: must be a method name .*accepted: default, linear"),
    (dict(head_dim=64, layout="rotate_half"), r"layout: unknown channel layout 'rotate_half'; accepted: neox, gptj"),
    (dict(head_dim=64, factor=2.0), r"factor: not used by method 'default'; it is a parameter of: linear"),
    (dict(head_dim=64, method="yarn", factor=2.0, original_max_position=64, beta_fast=1, beta_slow=32),
     r"beta_fast: must be > beta_slow"),
    (dict(head_dim=64, method="llama3", factor=8.0, original_max_position=64, low_freq_factor=4.0,
          high_freq_factor=1.0), r"high_freq_factor: must be >= low_freq_factor"),
    (dict(head_dim=64, method="linear", factor=2.0, original_max_position=100, max_position=50),
     r"max_position: the target length \(50\) must be >= original_max_position \(100\)"),
    (dict(head_dim=64, method="longrope", original_max_position=64, short_factor=[1.0] * 31, long_factor=[1.0] * 32),
     r"short_factor: needs rotary_dim/2 = 32 entries \(one per pair\), got 31"),
    (dict(head_dim=64, method="longrope", original_max_position=64, short_factor=[1.0] * 32, long_factor=[1.0] * 48),
     r"long_factor: needs rotary_dim/2 = 32 entries \(one per pair\), got 48"),
    (dict(head_dim=64, method="longrope", original_max_position=64, short_factor=[1.0] * 32,
          long_factor=[0.0] * 32), r"long_factor: every entry must be a finite number > 0"),
    (dict(head_dim=64, method="longrope", original_max_position=64, short_factor="1,2", long_factor=[1.0] * 32),
     r"short_factor: must be a list of 32 numbers"),
    (dict(head_dim=64, method="longrope", original_max_position=64, long_factor=[1.0] * 32),
     r"short_factor: required by method 'longrope'"),
    (dict(head_dim=64, method="yarn", factor=2.0, original_max_position=64, truncate="yes"),
     r"truncate: must be true or false"),
    (dict(head_dim=64, method="longrope", original_max_position=64, short_factor=[1.0] * 32,
          long_factor=[1.0] * 32, n_hat=-1), r"n_hat: must be >= 0"),
])
def test_bad_config_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig(**kwargs)


@pytest.mark.parametrize("config, match", [
    ({**LLAMA, "rope_theta": 1e4, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}},
     r"rope_theta: 10000.0 at the top level contradicts 500000.0 in rope_parameters"),
    (hf(rope_parameters={"rope_type": "yarn", "type": "linear", "factor": 2.0}),
     r"rope_type: 'yarn' contradicts type: 'linear'"),
    (hf(rope_parameters={"rope_type": "yarn", "factor": 2.0}, rope_scaling={"type": "linear", "factor": 2.0}),
     r"rope_parameters: rope_type 'yarn' contradicts rope_scaling's 'linear'"),
    (hf(rope_parameters={"rope_type": "magic"}), r"rope_type: 'magic' is not supported; accepted: default, linear"),
    (hf(rope_parameters={"rope_type": ["yarn"]}), r"rope_type: must be a string"),
    (hf(rope_parameters={"rope_type": "linear"}), r"factor: required by rope_type 'linear'"),
    ({"head_dim": 64, "rope_scaling": {"type": "yarn", "factor": 4.0}},
     r"max_position_embeddings: needed to know the trained length for rope_type 'yarn'"),
    ({"head_dim": 10, "partial_rotary_factor": 0.5}, r"rotary_dim: must be even"),
    (hf(partial_rotary_factor=1.5), r"partial_rotary_factor: must be in \(0, 1\]"),
    ({"hidden_size": 100, "num_attention_heads": 3}, r"head_dim: hidden_size 100 is not divisible"),
    ({"num_attention_heads": 3}, r"head_dim: not given"),
    (hf(rope_scaling={"type": "linear", "factor": 0.5}), r"factor: must be >= 1"),
    (hf(rope_theta="1e4"), r"rope_theta: must be a finite number"),
])
def test_bad_hf_config_errors_name_the_field(config, match):
    with pytest.raises(ValueError, match=match):
        RopeConfig.from_hf(config)


def test_from_hf_rejects_non_configs():
    with pytest.raises(TypeError, match="config: expected a config.json dict or a transformers config"):
        RopeConfig.from_hf(42)


# ---------------------------------------------------------------------- GGUF metadata
def test_from_gguf_metadata_dicts():
    meta = {"general.architecture": "llama", "llama.context_length": 131072, "llama.embedding_length": 4096,
            "llama.attention.head_count": 32, "llama.rope.freq_base": 500000.0, "llama.rope.dimension_count": 128,
            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0,
            "llama.rope.scaling.original_context_length": 8192}
    cfg = RopeConfig.from_gguf(meta)
    assert (cfg.method, cfg.factor, cfg.original_max_position, cfg.base, cfg.head_dim) == (
        "linear", 4.0, 8192, 5e5, 128)
    assert cfg.target_length == 131072 and cfg.layout == "neox"
    assert RopeConfig.from_gguf(meta, layout="file").layout == "gptj"
    qwen = dict(meta, **{"general.architecture": "qwen2"})
    qwen = {k.replace("llama.", "qwen2."): v for k, v in qwen.items()}
    assert RopeConfig.from_gguf(qwen, layout="file").layout == "neox"
    with pytest.raises(ValueError, match=r"llama.rope.scaling.type: 'magic' is not supported"):
        RopeConfig.from_gguf(dict(meta, **{"llama.rope.scaling.type": "magic"}))
    with pytest.raises(ValueError, match="general.architecture: missing"):
        RopeConfig.from_gguf({"llama.context_length": 4})
    with pytest.raises(ValueError, match=r"llama.rope.scaling.factor: required"):
        RopeConfig.from_gguf({k: v for k, v in meta.items() if k != "llama.rope.scaling.factor"})
    with pytest.raises(ValueError, match="layout: 'weird' not accepted for GGUF"):
        RopeConfig.from_gguf(meta, layout="weird")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        RopeConfig.from_gguf("/nonexistent/model.gguf")
    with pytest.warns(UserWarning, match="gguf: unknown key 'llama.rope.zz_mystery' ignored"):
        RopeConfig.from_gguf(dict(meta, **{"llama.rope.zz_mystery": 1}))


def test_to_hf_content():
    cfg = RopeConfig(head_dim=96, rotary_dim=24, base=1e4, method="yarn", factor=4.0, original_max_position=2048)
    out = cfg.to_hf()
    # Older transformers read partial_rotary_factor only at the top level: it stays out of rope_scaling.
    assert out["rope_scaling"] == {k: v for k, v in out["rope_parameters"].items() if k != "partial_rotary_factor"}
    assert out["rope_parameters"]["rope_type"] == "yarn" and out["partial_rotary_factor"] == 0.25
    assert out["max_position_embeddings"] == 8192 and out["head_dim"] == 96
    dyn = RopeConfig(head_dim=64, method="dynamic", factor=2.0, original_max_position=4096).to_hf()
    assert dyn["max_position_embeddings"] == 4096 and "original_max_position_embeddings" not in dyn["rope_parameters"]
    with pytest.warns(UserWarning, match="layout: transformers takes the channel layout from the model type"):
        RopeConfig(head_dim=64, layout="gptj").to_hf()
    assert torch.equal(ropekit.frequencies(RopeConfig.from_hf(out)).inv_freq64, ropekit.frequencies(cfg).inv_freq64)


def test_with_method_derives_the_new_target_length():
    trained = RopeConfig(head_dim=64, base=1e5, original_max_position=8192, max_position=8192)
    yarn = trained.with_method("yarn", factor=2.0)
    assert yarn.target_length == 16384
    assert yarn.to_hf()["max_position_embeddings"] == 16384
    assert yarn.with_method("default").target_length == 8192
    assert trained.with_method("yarn", factor=2.0, max_position=20000).target_length == 20000
    only_max = RopeConfig(head_dim=64, max_position=4096)
    assert only_max.with_method("linear", factor=4.0).target_length == 16384


# ---------------------------------------------------------------------- trained length and extend
SMOL = RopeConfig(head_dim=64, base=1e5, original_max_position=8192, max_position=8192)


def test_trained_length_has_one_definition():
    assert SMOL.trained_length == 8192
    assert RopeConfig(head_dim=64, max_position=4096).trained_length == 4096  # unscaled: max_position is L
    # Scaled, max_position is the target, not the trained length: unknown without original_max_position.
    assert RopeConfig(head_dim=64, method="linear", factor=2.0, max_position=8192).trained_length is None
    assert RopeConfig(head_dim=64, method="linear", factor=2.0, original_max_position=100).trained_length == 100
    assert RopeConfig(head_dim=64).trained_length is None


def test_extend_sets_factor_target_and_trained_length():
    yarn = SMOL.extend("yarn", 2.0)
    assert (yarn.method, yarn.factor, yarn.trained_length, yarn.target_length) == ("yarn", 2.0, 8192, 16384)
    by_target = SMOL.extend("yarn", target_length=12288)
    assert (by_target.factor, by_target.target_length) == (1.5, 12288)
    assert SMOL.extend("yarn", 1.5, target_length=12288) == by_target
    assert SMOL.extend("pi", 4.0).method == "linear"  # aliases of other tools
    # From an unscaled config that only states max_position, that length is the trained one.
    assert RopeConfig(head_dim=64, max_position=4096).extend("linear", 4.0).target_length == 16384
    # Re-extending a scaled config starts again from the trained length, and another method clears the old
    # method's parameters; the same method keeps them.
    tuned = yarn.extend("yarn", 4.0, beta_fast=16.0)
    assert (tuned.factor, tuned.target_length, tuned.beta_fast) == (4.0, 32768, 16.0)
    assert tuned.extend("yarn", 2.0).beta_fast == 16.0
    assert tuned.extend("dynamic", 2.0).beta_fast is None
    plain = tuned.extend("default")
    assert (plain.method, plain.factor, plain.trained_length, plain.target_length) == ("default", None, 8192, 8192)
    assert SMOL.extend("default", 1.0) == SMOL.extend("default")
    assert SMOL.extend("base", new_base=5e5).new_base == 5e5
    assert SMOL.extend("yarn", 2.0, original_max_position=4096).target_length == 8192  # trained length override
    assert SMOL.extend("dynamic_yarn", 2.0).length_dependent


@pytest.mark.parametrize("call, match", [
    (lambda: SMOL.extend("default", 2.0), r"^factor: method 'default' \(plain RoPE, no scaling\) takes no factor"),
    (lambda: SMOL.extend("base", 2.0, new_base=5e5), r"^factor: method 'base' takes new_base, not a factor"),
    (lambda: SMOL.extend("base"), r"^new_base: required by method 'base' \(the new rope_theta"),
    (lambda: SMOL.extend("yarn"), r"^factor: required by method 'yarn' \(the target length over the trained "
                                  r"length 8192; or give target_length\)"),
    (lambda: SMOL.extend("linear", 2.0, beta_fast=16.0), r"^beta_fast: not used by method 'linear'; it is a "
                                                         r"parameter of: yarn, dynamic_yarn"),
    (lambda: SMOL.extend("yarn", 2.0, new_base=5e5), r"^new_base: not used by method 'yarn'; it is a parameter of: base"),
    (lambda: SMOL.extend("yarn", 2.0, max_position=5), r"^max_position: pass target_length"),
    (lambda: SMOL.extend("yarn", 2.0, colour=3), r"^colour: not a parameter of any method"),
    (lambda: SMOL.extend("magic", 2.0), r"^method: unknown scaling method 'magic'; accepted: default"),
    (lambda: SMOL.extend("yarn", float("inf")), r"^factor: must be a finite number, got inf"),
    (lambda: SMOL.extend("yarn", float("nan")), r"^factor: must be a finite number, got nan"),
    (lambda: SMOL.extend("yarn", 2.0, beta_fast=float("nan")), r"^beta_fast: must be a finite number"),
    (lambda: SMOL.extend("yarn", 0.5), r"^factor: must be >= 1"),
    (lambda: SMOL.extend("yarn", 2.0, target_length=20000), r"^target_length: 20000 disagrees with factor 2 x "
                                                            r"trained length 8192 = 16384"),
    (lambda: SMOL.extend("yarn", target_length=4096), r"^target_length: must be >= the trained length 8192"),
    (lambda: SMOL.extend("yarn", 2.0, beta_fast=1.0, beta_slow=2.0), r"^beta_fast: must be > beta_slow"),
    (lambda: SMOL.extend("longrope", 2.0), r"^short_factor: required by method 'longrope' \(.*rotary_dim/2 = 32 "
                                           r"numbers\)"),
    (lambda: SMOL.extend("longrope", 2.0, short_factor=[1.0] * 31, long_factor=[1.0] * 32),
     r"^short_factor: needs rotary_dim/2 = 32 entries"),
    (lambda: SMOL.extend("yarn", 2.0, factors_file="x.json"), r"^factors_file: only used by method longrope, not yarn"),
    (lambda: RopeConfig(head_dim=64).extend("yarn", 2.0), r"^original_max_position: required by method 'yarn'; "
                                                         r"the config does not say its trained length"),
    (lambda: RopeConfig(head_dim=64).extend("linear", target_length=100), r"^target_length: the trained length is "
                                                                          r"unknown"),
])
def test_extend_errors_start_with_the_field(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_extend_reads_a_longrope_factors_file(tmp_path):
    path = tmp_path / "factors.json"
    path.write_text('{"rope_scaling": {"short_factor": %s, "long_factor": %s, "n_hat": 3}}'
                    % ([1.0] * 32, [2.0] * 32))
    cfg = SMOL.extend("longrope", 4.0, factors_file=path)
    assert cfg.long_factor == (2.0,) * 32 and cfg.n_hat == 3 and cfg.target_length == 32768
    assert SMOL.extend("longrope", 4.0, factors_file=path, n_hat=0).n_hat == 0  # given values win over the file's
    from ropekit.methods import read_factors_file

    assert read_factors_file(path)["n_hat"] == 3
    with pytest.raises(FileNotFoundError, match="^factors_file: .* not found"):
        SMOL.extend("longrope", 4.0, factors_file=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ValueError, match="^factors_file: .* is not valid JSON"):
        read_factors_file(tmp_path / "bad.json")
    (tmp_path / "empty.json").write_text("{}")
    with pytest.raises(ValueError, match="^factors_file: .* must hold a JSON object with 'short_factor'"):
        read_factors_file(tmp_path / "empty.json")


def test_extend_agrees_with_with_method_where_both_apply():
    for name, params in [("linear", {}), ("yarn", {"beta_fast": 16.0}), ("llama3", {"low_freq_factor": 2.0}),
                         ("dynamic", {})]:
        extended, old = SMOL.extend(name, 2.0, **params), SMOL.with_method(name, factor=2.0, **params)
        # with_method leaves the target to be derived; extend states it: the same length either way.
        assert extended.max_position == extended.target_length == old.target_length == 16384
        assert extended.replace(max_position=None) == old


def test_layered_rope_reads_gemma3s_older_config_per_layer_type():
    from ropekit.layered import LayeredRope

    g3 = {"model_type": "gemma3_text", "head_dim": 128, "hidden_size": 5376, "num_attention_heads": 32,
          "num_hidden_layers": 12, "max_position_embeddings": 131072, "rope_local_base_freq": 10000.0,
          "rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "rope_theta": 1000000.0, "sliding_window_pattern": 6}
    with pytest.raises(ValueError, match="one RoPE per layer type"):
        RopeConfig.from_hf(g3)  # never one RoPE for a config with two
    layered = LayeredRope.from_hf(g3)
    assert layered.layers_of("full_attention") == (5, 11)
    assert (layered["full_attention"].method, layered["full_attention"].base) == ("linear", 1e6)
    assert (layered["sliding_attention"].method, layered["sliding_attention"].base) == ("default", 1e4)
    assert layered.single is None and layered.per_type
    extended = layered.extend("linear", 16.0, original_max_position=16384)
    assert extended.changed == ("full_attention",) and extended.changed_layers == (5, 11)
    assert extended["sliding_attention"] == layered["sliding_attention"]
    both = layered.extend("linear", 2.0, layer_types=("full_attention", "sliding_attention"),
                          original_max_position=16384)
    assert both.changed_layers == tuple(range(12))
    with pytest.raises(ValueError, match="layer_types: 'global' is not a layer type"):
        layered.extend("linear", 2.0, layer_types="global")
    hf = extended.to_hf()["rope_parameters"]
    assert hf["full_attention"]["factor"] == 16.0 and hf["sliding_attention"]["rope_type"] == "default"
    assert "layers 5, 11" in extended.describe()


def test_layered_rope_nope_layers_and_text_config():
    from ropekit.layered import LayeredRope

    smol = {"model_type": "smollm3", "hidden_size": 256, "num_attention_heads": 4, "num_hidden_layers": 8,
            "rope_theta": 5e6, "max_position_embeddings": 4096, "no_rope_layer_interval": 4}
    layered = LayeredRope.from_hf(smol)
    assert layered.nope_layers == (3, 7) and layered.single == RopeConfig.from_hf(smol)
    assert layered.extend("yarn", 2.0).changed_layers == (0, 1, 2, 4, 5, 6)
    wrapped = {"model_type": "mistral3", "text_config": {"model_type": "mistral", "hidden_size": 256,
                                                         "num_attention_heads": 4, "rope_theta": 1e9}}
    assert RopeConfig.from_hf(wrapped).base == 1e9


def test_llama4_llama3_scaling_with_no_blend_band():
    from ropekit.methods import frequencies

    cfg = RopeConfig(head_dim=128, base=5e5, method="llama3", factor=16.0, original_max_position=8192,
                     low_freq_factor=1.0, high_freq_factor=1.0)
    f = frequencies(cfg).inv_freq64
    plain = frequencies(RopeConfig(head_dim=128, base=5e5)).inv_freq64
    slow = 2 * math.pi / plain > 8192
    assert torch.equal(f[~slow], plain[~slow]) and torch.allclose(f[slow], plain[slow] / 16)


def test_proportional_rope_and_mrope_read():
    from ropekit.hf.config_map import hf_mrope_section
    from ropekit.methods import frequencies

    g4 = {"model_type": "gemma4_text", "head_dim": 256, "hidden_size": 1024, "num_attention_heads": 4,
          "rope_parameters": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6}}
    cfg = RopeConfig.from_hf(g4)
    assert (cfg.rotary_dim, cfg.rotated_fraction) == (256, 0.25)
    inv = frequencies(cfg).inv_freq64
    assert (inv[32:] == 0).all() and (inv[:32] > 0).all()
    assert cfg.to_hf()["rope_parameters"]["partial_rotary_factor"] == 0.25
    with pytest.raises(ValueError, match="proportional"):
        cfg.extend("yarn", 2.0, original_max_position=4096)
    vl = {"model_type": "qwen2_5_vl", "hidden_size": 3584, "num_attention_heads": 28,
          "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "rope_theta": 1e6}
    assert RopeConfig.from_hf(vl).method == "default" and hf_mrope_section(vl) == (16, 24, 24)
