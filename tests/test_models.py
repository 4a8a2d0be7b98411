"""Model integration: ropekit's rotation inside transformers models, checked against transformers itself.

Tiny random models of every supported family (tests/conftest.py): patched with "default" they give the
unpatched logits; patched with a scaling method they give the logits of transformers' own rope_type for it.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
import os
import sys

import pytest
import torch

from conftest import TINY_CONFIGS, TINY_TRAINED_LENGTH, make_tiny_config, make_tiny_model
from ropekit import RopeConfig
from ropekit import frequencies as rk_frequencies
from ropekit import models as rk_models
from ropekit.commands.common import build_rope_config
from ropekit.models import SUPPORTED_FAMILIES, apply_rope, hf_config_for, load_model

ATOL = 2e-5
FAMILIES = list(TINY_CONFIGS)
ROPE_FAMILIES = [f for f in FAMILIES if f != "gptj"]  # families with transformers rope_parameters
LONG = 150  # > 2x the tiny models' trained length (64)


def _ids(batch=2, seq=LONG, seed=0):
    return torch.randint(0, 256, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _hf_rope(method: str, rotary_dim: int) -> dict:
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


def _logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


def _scaled_pair(family: str, method: str):
    """(tiny model without scaling, the same weights with transformers' own ``method``)."""
    base = make_tiny_model(family)
    rd = RopeConfig.from_hf(base.config).rotary_dim
    # yarn/llama3/longrope read the target length from max_position_embeddings: make it factor * L.
    extra = {"max_position_embeddings": 4 * TINY_TRAINED_LENGTH} if method in ("yarn", "llama3", "longrope") else {}
    reference = make_tiny_model(family, rope=_hf_rope(method, rd), **extra)
    reference.load_state_dict(base.state_dict())
    return base, reference


# ---------------------------------------------------------------------- parity
@pytest.mark.parametrize("family", FAMILIES)
def test_default_patch_gives_the_unpatched_logits(family, monkeypatch):
    model = make_tiny_model(family)
    seq = TINY_TRAINED_LENGTH if family == "gptj" else LONG  # GPT-J's own table stops at n_positions
    ids = _ids(seq=seq)
    reference = _logits(model, ids)
    calls = []
    real_rotate = rk_models.rotate
    monkeypatch.setattr(rk_models, "rotate", lambda *a, **k: calls.append(1) or real_rotate(*a, **k))
    with apply_rope(model, RopeConfig.from_hf(model.config)):
        patched = _logits(model, ids)
    # The numbers came from ropekit: q and k rotated by ropekit.rotate in every layer.
    assert len(calls) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(patched, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family,method",
    [(f, m) for f in ROPE_FAMILIES if f != "phi3" for m in ("linear", "yarn", "llama3", "dynamic", "longrope")]
    + [("phi3", "longrope")],  # transformers' Phi-3 config accepts only longrope scaling
)
def test_scaled_patch_matches_transformers_rope_type(family, method):
    base, reference = _scaled_pair(family, method)
    cfg = RopeConfig.from_hf(reference.config)
    assert cfg.method == method
    with apply_rope(base, cfg):
        for seq in (LONG, 40):  # beyond and within the trained length (longrope: long vs short factors)
            ids = _ids(seq=seq)
            torch.testing.assert_close(_logits(base, ids), _logits(reference, ids), atol=ATOL, rtol=0)


def test_scaling_changes_the_logits_beyond_noise():
    """The parity above is not trivially true: a scaled rotation moves the logits far more than ATOL."""
    base, reference = _scaled_pair("llama", "yarn")
    ids = _ids()
    assert (_logits(base, ids) - _logits(reference, ids)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_base_change_and_ntk_match_transformers_with_the_new_theta(family):
    base = make_tiny_model(family)
    cfg0 = RopeConfig.from_hf(base.config)
    for cfg in (build_rope_config(cfg0, "base", new_base=5e5), build_rope_config(cfg0, "ntk", 3.0)):
        theta = cfg.to_hf()["rope_parameters"]["rope_theta"]
        reference = make_tiny_model(family, rope={"rope_theta": theta})
        reference.load_state_dict(base.state_dict())
        with apply_rope(base, cfg):
            torch.testing.assert_close(_logits(base, _ids()), _logits(reference, _ids()), atol=ATOL, rtol=0)


def test_gptj_scaled_rotation_beyond_its_own_table():
    """GPT-J (interleaved, partial rotary): linear s=2 at positions 2p equals plain RoPE at p, out to 2x n_positions."""
    model = make_tiny_model("gptj")
    cfg0 = RopeConfig.from_hf(model.config)
    assert (cfg0.layout, cfg0.rotary_dim, cfg0.head_dim) == ("gptj", 8, 16)
    ids = _ids(seq=TINY_TRAINED_LENGTH)
    plain = _logits(model, ids)
    with apply_rope(model, build_rope_config(cfg0, "linear", 2.0)):
        doubled = torch.arange(0, 2 * TINY_TRAINED_LENGTH, 2)[None].expand(2, -1)
        torch.testing.assert_close(_logits(model, ids, position_ids=doubled), plain, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- positions and the KV cache
def _cache_of(out):
    """The KV cache of a forward's output: ``cache`` from transformers 5.24, ``past_key_values`` before."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _decode_logits(model, ids, prompt_len):
    """Logits of each token after the prompt, fed one at a time through the KV cache: (batch, n, vocab)."""
    # transformers 5.24 renamed the argument (``past_key_values`` is deprecated there, removed in 5.40).
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.no_grad():
        out = model(ids[:, :prompt_len], use_cache=True)
        past, steps = _cache_of(out), [out.logits[:, -1]]
        for t in range(prompt_len, ids.shape[1] - 1):
            out = model(ids[:, t:t + 1], use_cache=True, **{name: past})
            past = _cache_of(out)
            steps.append(out.logits[:, -1])
    return torch.stack(steps, dim=1)


@pytest.mark.parametrize("family,method", [("llama", "yarn"), ("gpt_neox", "linear"), ("gptj", "linear"),
                                           ("qwen3", "llama3")])
def test_kv_cache_decoding_equals_the_full_forward(family, method):
    model = make_tiny_model(family)
    cfg = build_rope_config(RopeConfig.from_hf(model.config), method, 2.0)
    ids, prompt = _ids(seq=120), 70
    with apply_rope(model, cfg):
        full = _logits(model, ids)[:, prompt - 1:-1]
        steps = _decode_logits(model, ids, prompt)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dynamic", "longrope"])
def test_length_dependent_scale_is_frozen_at_the_prefill(method):
    """Freeze policy: the prefill fixes the scale; decoding keeps it, so the cache stays consistent."""
    model = make_tiny_model("llama")
    cfg0 = RopeConfig.from_hf(model.config)
    if method == "dynamic":
        cfg = build_rope_config(cfg0, "dynamic", 2.0)
    else:
        cfg = RopeConfig.from_hf(make_tiny_config("llama", rope=_hf_rope("longrope", cfg0.rotary_dim),
                                                  max_position_embeddings=256))
    ids, prompt = _ids(seq=110), 80  # the prompt is already past the trained length (64)
    with apply_rope(model, cfg) as patch:
        steps = _decode_logits(model, ids, prompt)
        patch.fix_length(prompt)  # a full forward with the scale taken where the prefill took it
        full_at_prompt_scale = _logits(model, ids)[:, prompt - 1:-1]
        patch.fix_length(None)
        full_own_scale = _logits(model, ids)[:, prompt - 1:-1]
    torch.testing.assert_close(steps, full_at_prompt_scale, atol=ATOL, rtol=0)
    if method == "dynamic":  # the scale really depends on the length (longrope's long factors do not)
        assert (full_own_scale - full_at_prompt_scale).abs().max() > 100 * ATOL


def test_fixed_length_decoding_equals_a_full_forward_at_that_length():
    model = make_tiny_model("mistral")
    cfg = build_rope_config(RopeConfig.from_hf(model.config), "dynamic", 2.0)
    ids = _ids(seq=100)
    with apply_rope(model, cfg) as patch:
        full = _logits(model, ids)[:, 29:-1]  # scale at 100, the sequence's own length
        patch.fix_length(100)
        steps = _decode_logits(model, ids, 30)  # a short prefill, but the scale is pinned at 100
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


def test_dynamic_recompute_policy_follows_transformers_during_decoding():
    base, reference = _scaled_pair("llama", "dynamic")
    cfg = RopeConfig.from_hf(reference.config)
    ids = _ids(seq=100)
    expected = _decode_logits(reference, ids, 80)  # transformers recomputes the base as the sequence grows
    with apply_rope(base, cfg, dynamic_policy="recompute"):
        torch.testing.assert_close(_decode_logits(base, ids, 80), expected, atol=ATOL, rtol=0)


def test_packed_rows_with_restarting_positions():
    base, reference = _scaled_pair("qwen2", "yarn")
    ids = _ids(seq=140)
    packed = torch.stack([torch.cat([torch.arange(60), torch.arange(80)]),        # two documents
                          torch.cat([torch.arange(30), torch.arange(100) + 5, torch.arange(10)])])  # three, offset
    with apply_rope(base, RopeConfig.from_hf(reference.config)):
        got = _logits(base, ids, position_ids=packed)
        plain = _logits(base, ids)
    torch.testing.assert_close(got, _logits(reference, ids, position_ids=packed), atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 100 * ATOL  # the per-row positions were used


# ---------------------------------------------------------------------- patch life cycle
def test_remove_restores_the_model_exactly():
    model = make_tiny_model("llama")
    module = sys.modules[type(model.model.rotary_emb).__module__]
    original_fn, original_rotary = module.apply_rotary_pos_emb, model.model.rotary_emb
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = _ids()
    before = _logits(model, ids)
    patch = apply_rope(model, build_rope_config(RopeConfig.from_hf(model.config), "yarn", 4.0))
    assert patch.active and rk_models.active_patch(model) is patch
    assert model.model.rotary_emb is not original_rotary
    assert module.apply_rotary_pos_emb is not original_fn
    assert set(model.state_dict()) == set(state)  # the adapter adds no parameters or buffers
    scaled = _logits(model, ids)
    assert (scaled - before).abs().max() > 100 * ATOL
    patch.remove()
    patch.remove()  # idempotent
    assert model.model.rotary_emb is original_rotary
    assert module.apply_rotary_pos_emb is original_fn
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert rk_models.active_patch(model) is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(_logits(model, ids), before)


def test_patch_is_scoped_to_its_model():
    """Another model of the same family in the process keeps transformers' RoPE while one is patched."""
    patched, other = make_tiny_model("llama"), make_tiny_model("llama")
    ids = _ids()
    expected = _logits(other, ids)
    with apply_rope(patched, build_rope_config(RopeConfig.from_hf(patched.config), "linear", 4.0)):
        assert torch.equal(_logits(other, ids), expected)
        with pytest.raises(ValueError, match="already patched"):
            apply_rope(patched, RopeConfig.from_hf(patched.config))
        with apply_rope(other, RopeConfig.from_hf(other.config)):  # two live patches share the dispatcher
            torch.testing.assert_close(_logits(other, ids), expected, atol=ATOL, rtol=0)
        assert torch.equal(_logits(other, ids), expected)


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


# ---------------------------------------------------------------------- loading
def _save_tiny(tmp_path, family="llama"):
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


def test_load_model_from_a_local_folder(tmp_path):
    model, folder = _save_tiny(tmp_path, "qwen2")
    loaded = load_model(folder, device="cpu")
    assert loaded.family == "qwen2" and loaded.source == str(folder)
    assert loaded.rope == RopeConfig.from_hf(model.config)
    assert loaded.rope.original_max_position == TINY_TRAINED_LENGTH
    assert not loaded.model.training and loaded.dtype == torch.float32
    assert loaded.tokenizer.convert_tokens_to_ids(["w5", "w7"]) == [5, 7]
    ids = _ids()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(model, ids), atol=ATOL, rtol=0)
    loaded16 = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert next(loaded16.model.parameters()).dtype == torch.bfloat16


def test_load_model_errors(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        load_model(missing)
    with pytest.raises(FileNotFoundError, match="nothing.gguf"):
        load_model("./nothing.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(tmp_path / "empty")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 32, "n_head": 2}))
    with pytest.raises(ValueError, match="'gpt2' has no rotary"):
        load_model(gpt2)
    with pytest.raises(ValueError, match="device"):
        load_model(gpt2, device="tpu")
    with pytest.raises(ValueError, match="dtype"):
        load_model(gpt2, device="cpu", dtype="float8")


def test_demo_model_path_points_at_the_bundled_gguf():
    path = rk_models.demo_model_path()
    assert path.name == rk_models.DEMO_MODEL and path.is_file() and path.stat().st_size > 50_000_000


# ---------------------------------------------------------------------- checks before loading (file system only)
@pytest.fixture
def no_loading(monkeypatch):
    """Any weight or tokenizer load fails the test: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def _one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message and "Traceback" not in message
    return message


def test_check_model_source_accepts_a_complete_folder_a_hub_id_and_the_demo(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    assert rk_models.check_model_source(folder) is None
    assert rk_models.check_model_source(str(folder)) is None
    assert rk_models.check_model_source("some-org/some-model") is None  # a hub id: nothing local to check
    assert rk_models.check_model_source("demo") is None
    assert rk_models.check_model_source(None) is None


def test_folder_without_weights_is_one_line_before_any_loading(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError) as info:
        rk_models.check_model_source(folder)
    assert _one_line(info) == f"no weights (*.safetensors / pytorch_model.bin) in {folder}"
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(folder, device="cpu")


def test_folder_without_weights_is_not_an_oserror_traceback_from_transformers(tmp_path):
    """Without the check, transformers' own OSError is what the user saw (the loader runs here for real)."""
    _, folder = _save_tiny(tmp_path, "qwen2")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(folder, device="cpu")
    assert "no weights" in _one_line(info) and str(folder) in str(info.value)


def test_folder_without_tokenizer_is_one_line(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError) as info:
        rk_models.check_model_source(folder)
    assert _one_line(info).startswith("no tokenizer (tokenizer.json") and str(folder) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(folder, device="cpu")


def test_damaged_weights_are_one_line(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="model.safetensors is truncated") as info:
        rk_models.check_model_source(folder)
    _one_line(info)
    weights.write_bytes(b"<html>404 Not Found</html>" * 4)  # not safetensors at all
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        rk_models.check_model_source(folder)


def test_sharded_folder_with_a_missing_shard(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing 1 weight shard.*model-00002-of-00002.safetensors"):
        rk_models.check_model_source(folder)


def test_config_problems_are_one_line(tmp_path, no_loading):
    _, folder = _save_tiny(tmp_path, "llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON") as info:
        rk_models.check_model_source(folder)
    _one_line(info)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' has no rotary"):
        rk_models.check_model_source(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        rk_models.check_model_source(folder)
    with pytest.raises(FileNotFoundError, match="model not found"):
        rk_models.check_model_source(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        rk_models.check_model_source(tmp_path / "notes.txt")


def test_unreadable_and_corrupt_gguf_files_are_one_line(tmp_path, no_loading):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    with pytest.raises(ValueError, match="is not a GGUF file") as info:
        rk_models.check_model_source(fake)
    _one_line(info)
    # A real GGUF cut short (an interrupted download): its header no longer parses.
    truncated = tmp_path / "truncated.gguf"
    with open(rk_models.demo_model_path(), "rb") as fh:
        truncated.write_bytes(fh.read(200_000))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF") as info:
        rk_models.check_model_source(truncated)
    _one_line(info)
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_model(truncated, device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        rk_models.check_model_source(tmp_path, gguf_file="no-such.gguf")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_gguf_file(tmp_path):
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(b"GGUF" + bytes(100))
    locked.chmod(0)
    with pytest.raises(ValueError, match="cannot read"):
        rk_models.check_model_source(locked)


# ---------------------------------------------------------------------- what the patch needs from transformers
class _Sinusoids(torch.nn.Module):
    """A stand-in for a rotary module under another name (as a future transformers might have)."""

    def forward(self, x, position_ids=None, **kwargs):  # pragma: no cover - never reached
        raise AssertionError


def _structure_error(model, cfg=None):
    import transformers

    with pytest.raises(rk_models.TransformersStructureError) as info:
        apply_rope(model, cfg or RopeConfig.from_hf(model.config))
    message = _one_line(info)
    assert f"transformers {transformers.__version__}" in message
    assert isinstance(info.value, ValueError)
    assert rk_models.active_patch(model) is None
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
    message = _structure_error(model)
    assert message.startswith("gptj: GPT-J keeps its sin/cos neither")
    assert not any("gptj" in name for name in rk_models._DISPATCHERS)  # nothing was installed


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
    original_forward = attn_cls.forward

    def forward_with_its_own_rotation(self, *args, **kwargs):
        dispatcher = module.apply_rotary_pos_emb
        module.apply_rotary_pos_emb = getattr(dispatcher, "_ropekit_original", dispatcher)
        try:
            return original_forward(self, *args, **kwargs)
        finally:
            module.apply_rotary_pos_emb = dispatcher

    monkeypatch.setattr(attn_cls, "forward", forward_with_its_own_rotation)
    with apply_rope(model, build_rope_config(RopeConfig.from_hf(model.config), "yarn", 2.0)):
        with pytest.raises(rk_models.TransformersStructureError, match="did not call .*apply_rotary_pos_emb"):
            _logits(model, _ids(seq=20))


def test_gptj_uses_the_layout_transformers_has_today():
    """Whichever GPT-J structure the installed transformers has, the patch routes every layer through ropekit."""
    model = make_tiny_model("gptj")
    has_module = any(type(m).__name__ == "GPTJRotaryEmbedding" for m in model.modules())
    with apply_rope(model, RopeConfig.from_hf(model.config)) as patch:
        replaced = any(isinstance(m, rk_models.RopekitRotaryAdapter) for m in model.modules())
        assert replaced == has_module and patch.adapter.gptj_order == has_module
    assert not any(isinstance(m, rk_models.RopekitRotaryAdapter) for m in model.modules())


# ---------------------------------------------------------------------- quiet output
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


def test_loaded_tokenizer_does_not_warn_about_long_texts(tmp_path, transformers_log):
    from transformers import AutoTokenizer

    _, folder = _save_tiny(tmp_path, "llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["model_max_length"] = 16
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    text = " ".join(f"w{i % 200}" for i in range(100))
    plain = AutoTokenizer.from_pretrained(folder)
    n = len(plain(text)["input_ids"])
    assert n >= 100
    assert any("Token indices sequence length is longer" in m for m in transformers_log)  # the test can fail
    transformers_log.clear()
    loaded = load_model(folder, device="cpu")
    assert len(loaded.tokenizer(text)["input_ids"]) == n  # nothing truncated
    assert loaded.tokenizer.model_max_length == 16  # unchanged (an export saves it)
    assert not any("Token indices sequence length" in m for m in transformers_log)


def test_generation_past_the_trained_length_reminder_only_while_patched(transformers_log):
    model = make_tiny_model("llama")  # max_position_embeddings 64
    ids = _ids(batch=1, seq=70) % 250 + 3
    cfg = build_rope_config(RopeConfig.from_hf(model.config), "yarn", 2.0)

    def generate():
        logging.Logger.warning_once.cache_clear()  # transformers prints it once per process
        transformers_log.clear()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        return any("exceeded the model's predefined maximum length" in m for m in transformers_log)

    assert generate()  # unpatched: transformers' reminder
    with apply_rope(model, cfg):
        assert not generate()  # ropekit runs the model there on purpose
        other = make_tiny_model("llama")
        with apply_rope(other, RopeConfig.from_hf(other.config)):
            pass  # a second patch coming and going keeps the first one's filter
        assert not generate()
    assert generate()  # the filter went with the patch


def test_gguf_quantization_notes_are_dropped_only_while_loading(transformers_log):
    note = ("Loading a GGUF checkpoint with its weights packed is fastest in float32 ... the weights stay "
            "quantized regardless, so this costs no extra memory.")
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    with rk_models._dropping(rk_models._GGUF_LOGGERS, rk_models._GGUF_PHRASES):
        logger.warning(note)
        logger.warning("something else about this file")
    assert transformers_log == ["something else about this file"]
    logger.warning(note)
    assert transformers_log[-1] == note


# ---------------------------------------------------------------------- config for export
@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("method", ["linear", "yarn", "dynamic", "llama3", "longrope", "ntk"])
def test_hf_config_for_reads_back_to_the_same_rope(family, method):
    from transformers import AutoConfig

    model = make_tiny_model(family)
    cfg0 = RopeConfig.from_hf(model.config)
    if method == "longrope":
        cfg = RopeConfig.from_hf(make_tiny_config(family, rope=_hf_rope("longrope", cfg0.rotary_dim),
                                                  max_position_embeddings=256))
    else:
        cfg = build_rope_config(cfg0, method, 4.0)
    if family == "phi3" and method not in ("longrope", "ntk"):
        with pytest.raises(ValueError, match="Phi-3 accepts only longrope"):
            hf_config_for(model.config, cfg)
        return
    d = hf_config_for(model.config, cfg)
    back = AutoConfig.for_model(**d)  # what transformers makes of the exported config.json
    expected = cfg if method != "ntk" else cfg0.replace(base=d["rope_theta"])
    got = RopeConfig.from_hf(back)
    for name in ("method", "factor", "base", "head_dim", "rotary_dim", "short_factor", "long_factor"):
        assert getattr(got, name) == getattr(expected, name), name
    for seq_len in (40, 256):  # the same rotation within and beyond the trained length
        f_got, f_want = rk_frequencies(got, seq_len), rk_frequencies(expected, seq_len)
        assert torch.equal(f_got.inv_freq64, f_want.inv_freq64)
        assert f_got.attention_scale == f_want.attention_scale


def test_hf_config_for_refuses_what_transformers_cannot_load():
    model = make_tiny_model("llama")
    cfg0 = RopeConfig.from_hf(model.config)
    with pytest.raises(ValueError, match="dynamic_yarn"):
        hf_config_for(model.config, build_rope_config(cfg0, "dynamic_yarn", 2.0))
    gptj = make_tiny_model("gptj")
    with pytest.raises(ValueError, match="GPT-J"):
        hf_config_for(gptj.config, build_rope_config(RopeConfig.from_hf(gptj.config), "yarn", 2.0))
    with pytest.raises(ValueError, match="head_dim"):
        hf_config_for(model.config, cfg0.replace(head_dim=32, rotary_dim=32))


# ---------------------------------------------------------------------- the real model (slow)
@pytest.mark.slow
def test_smollm2_yarn_matches_transformers_builtin_yarn(smollm2, stdlib_text):
    """SmolLM2 (GGUF), yarn s=2 through ropekit vs transformers' own yarn module: same ppl within 0.5%."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.family == "llama"
    assert (smollm2.rope.base, smollm2.rope.head_dim, smollm2.rope.original_max_position) == (1e5, 64, 8192)
    ids = tok(stdlib_text, return_tensors="pt")["input_ids"][:, :2048]
    assert ids.shape[1] == 2048

    def ppl():
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())

    cfg = build_rope_config(smollm2.rope, "yarn", 2.0)
    with apply_rope(model, cfg):
        ropekit_ppl = ppl()
    hf_config = type(model.config).from_dict(hf_config_for(model.config, cfg))
    own = model.model.rotary_emb
    model.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config)
    try:
        hf_ppl = ppl()
    finally:
        model.model.rotary_emb = own
    print(f"SmolLM2 2048 tokens, yarn s=2: ropekit ppl {ropekit_ppl:.4f}, transformers ppl {hf_ppl:.4f}")
    assert abs(ropekit_ppl / hf_ppl - 1) < 0.005


def test_generate_through_the_patch_keeps_the_prefill_scale():
    """model.generate (KV cache, dynamic NTK): its logits equal full forwards with the scale of the prompt."""
    model = make_tiny_model("llama")
    cfg = build_rope_config(RopeConfig.from_hf(model.config), "dynamic", 2.0)
    ids = _ids(seq=70) % 250 + 3
    with apply_rope(model, cfg) as patch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, dim=1)  # (batch, 12, vocab)
        patch.fix_length(70)  # the length the prefill froze the scale at
        full = _logits(model, out.sequences[:, :-1])[:, 69:]
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
