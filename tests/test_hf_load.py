"""ropekit.hf.load: loading models, the file-system checks that run first, quiet output while loading."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from tiny import TINY_TRAINED_LENGTH
from hf_models import ATOL, logits, one_line, save_tiny, token_ids, transformers_log  # noqa: F401 - a fixture

from ropekit import RopeConfig, hf
from ropekit.hf import load_model
from ropekit.hf.load import GGUF_LOGGERS, GGUF_PHRASES, dropping


def test_load_model_from_a_local_folder(tmp_path):
    model, folder = save_tiny(tmp_path, "qwen2")
    loaded = load_model(folder, device="cpu")
    assert loaded.family == "qwen2" and loaded.source == str(folder)
    assert loaded.rope == RopeConfig.from_hf(model.config)
    assert loaded.rope.original_max_position == TINY_TRAINED_LENGTH
    assert not loaded.model.training and loaded.dtype == torch.float32
    assert loaded.tokenizer.convert_tokens_to_ids(["w5", "w7"]) == [5, 7]
    ids = token_ids()
    torch.testing.assert_close(logits(loaded.model, ids), logits(model, ids), atol=ATOL, rtol=0)
    loaded16 = load_model(str(folder), device="cpu", dtype="bfloat16")
    assert next(loaded16.model.parameters()).dtype == torch.bfloat16


def test_load_model_refuses_missing_paths_no_rope_families_bad_devices_and_dtypes(tmp_path):
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
    path = hf.demo_model_path()
    assert path.name == hf.DEMO_MODEL and path.is_file() and path.stat().st_size > 50_000_000


@pytest.fixture
def no_loading(monkeypatch):
    """Any weight or tokenizer load fails the test: the checks must come first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


def test_check_model_source_accepts_a_complete_folder_a_hub_id_and_the_demo(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    assert hf.check_model_source(folder) is None
    assert hf.check_model_source(str(folder)) is None
    assert hf.check_model_source("some-org/some-model") is None  # a hub id: nothing local to check
    assert hf.check_model_source("demo") is None
    assert hf.check_model_source(None) is None


def test_folder_without_weights_is_one_line_before_any_loading(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError) as info:
        hf.check_model_source(folder)
    assert one_line(info) == f"no weights (*.safetensors / pytorch_model.bin) in {folder}"
    with pytest.raises(FileNotFoundError, match="no weights"):
        load_model(folder, device="cpu")


def test_folder_without_weights_is_not_an_oserror_traceback_from_transformers(tmp_path):
    """Without the check, transformers' own OSError is what the user saw (the loader runs here for real)."""
    _, folder = save_tiny(tmp_path, "qwen2")
    for weights in folder.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_model(folder, device="cpu")
    assert "no weights" in one_line(info) and str(folder) in str(info.value)


def test_folder_without_tokenizer_is_one_line(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(FileNotFoundError) as info:
        hf.check_model_source(folder)
    assert one_line(info).startswith("no tokenizer (tokenizer.json") and str(folder) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_model(folder, device="cpu")


def test_damaged_weights_are_one_line(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # an interrupted download
    with pytest.raises(ValueError, match="model.safetensors is truncated") as info:
        hf.check_model_source(folder)
    one_line(info)
    weights.write_bytes(b"<html>404 Not Found</html>" * 4)  # not safetensors at all
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        hf.check_model_source(folder)


def test_sharded_folder_with_a_missing_shard(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    (folder / "model.safetensors").rename(folder / "model-00001-of-00002.safetensors")
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(FileNotFoundError, match="missing 1 weight shard.*model-00002-of-00002.safetensors"):
        hf.check_model_source(folder)


def test_config_problems_are_one_line(tmp_path, no_loading):
    _, folder = save_tiny(tmp_path, "llama")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON") as info:
        hf.check_model_source(folder)
    one_line(info)
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="'gpt2' has no rotary"):
        hf.check_model_source(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        hf.check_model_source(folder)
    with pytest.raises(FileNotFoundError, match="model not found"):
        hf.check_model_source(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="is a file but not a .gguf"):
        hf.check_model_source(tmp_path / "notes.txt")


def test_unreadable_and_corrupt_gguf_files_are_one_line(tmp_path, no_loading):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a GGUF" * 10)
    with pytest.raises(ValueError, match="is not a GGUF file") as info:
        hf.check_model_source(fake)
    one_line(info)
    # A real GGUF cut short (an interrupted download): its header no longer parses.
    truncated = tmp_path / "truncated.gguf"
    with open(hf.demo_model_path(), "rb") as fh:
        truncated.write_bytes(fh.read(200_000))
    with pytest.raises(ValueError, match="corrupt or truncated GGUF") as info:
        hf.check_model_source(truncated)
    one_line(info)
    with pytest.raises(ValueError, match="corrupt or truncated GGUF"):
        load_model(truncated, device="cpu")
    with pytest.raises(FileNotFoundError, match="no-such.gguf"):
        hf.check_model_source(tmp_path, gguf_file="no-such.gguf")


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_check_model_source_says_an_unreadable_gguf_cannot_be_read(tmp_path):
    locked = tmp_path / "locked.gguf"
    locked.write_bytes(b"GGUF" + bytes(100))
    locked.chmod(0)
    with pytest.raises(ValueError, match="cannot read"):
        hf.check_model_source(locked)


def test_loaded_tokenizer_does_not_warn_about_long_texts(tmp_path, transformers_log):
    from transformers import AutoTokenizer

    _, folder = save_tiny(tmp_path, "llama")
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


def test_gguf_quantization_notes_are_dropped_only_while_loading(transformers_log):
    note = ("Loading a GGUF checkpoint with its weights packed is fastest in float32 ... the weights stay "
            "quantized regardless, so this costs no extra memory.")
    logger = logging.getLogger("transformers.quantizers.quantizer_gguf")
    with dropping(GGUF_LOGGERS, GGUF_PHRASES):
        logger.warning(note)
        logger.warning("something else about this file")
    assert transformers_log == ["something else about this file"]
    logger.warning(note)
    assert transformers_log[-1] == note


# ---------------------------------------------------------------------- the RoPE of a source, from its files only
def test_rope_from_source_reads_configs_and_gguf_files(tmp_path, no_loading):
    import gguf
    import numpy as np

    from ropekit.hf.load import rope_from_source

    cfg, name = rope_from_source("demo")
    assert name == "SmolLM2-135M-Instruct (demo)" and (cfg.base, cfg.method, cfg.trained_length) == (1e5, "default", 8192)
    assert rope_from_source(None) == (cfg, name)

    _, folder = save_tiny(tmp_path, "qwen2")
    cfg, name = rope_from_source(folder / "config.json")
    assert cfg == RopeConfig.from_hf(json.loads((folder / "config.json").read_text())) and "(qwen2)" in name

    # A GGUF with Llama 3.1's rope_freqs tensor: the factors are read (not only the scalar metadata).
    gguf_folder = tmp_path / "gguf-only"
    gguf_folder.mkdir()
    writer = gguf.GGUFWriter(str(gguf_folder / "tiny.gguf"), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(4096)
    writer.add_embedding_length(64)
    writer.add_head_count(2)
    divisors = [1.0] * 4 + [1.5, 2.5, 3.5] + [4.0] * 9
    writer.add_tensor("rope_freqs.weight", np.asarray(divisors, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cfg, name = rope_from_source(gguf_folder)  # a folder holding a single .gguf
    assert name == "tiny llama" and cfg.method in ("llama3", "longrope")
    plain = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    from ropekit.methods import frequencies

    np.testing.assert_allclose(frequencies(cfg).inv_freq64.numpy(), plain / np.asarray(divisors), rtol=1e-6)


def test_rope_from_source_errors_are_one_line(tmp_path, no_loading):
    from ropekit.hf.load import rope_from_source

    with pytest.raises(FileNotFoundError, match="model not found") as info:
        rope_from_source(str(tmp_path / "missing.gguf"))
    one_line(info)
    (tmp_path / "broken.gguf").write_bytes(b"GGUF" + bytes(40))
    with pytest.raises(ValueError, match="not a readable GGUF file") as info:
        rope_from_source(str(tmp_path / "broken.gguf"))
    one_line(info)
    (tmp_path / "two").mkdir()
    for n in ("a.gguf", "b.gguf"):
        (tmp_path / "two" / n).write_bytes(b"GGUF")
    with pytest.raises(FileNotFoundError, match="2 .gguf files"):
        rope_from_source(str(tmp_path / "two"))


def test_load_model_reads_the_rope_of_an_exported_gguf(tmp_path):
    """ropekit export --format gguf, then ropekit loads the copy: its RoPE is the one written, and the note that
    transformers' GGUF loader does not read it comes once."""
    from ropekit.hf.export_gguf import export_gguf

    want = RopeConfig.from_gguf(hf.demo_model_path()).extend("yarn", 2)
    out, _ = export_gguf(hf.demo_model_path(), want, tmp_path / "yarn2.gguf")
    with pytest.warns(UserWarning, match="transformers' GGUF loader does not read"):
        loaded = load_model(out, device="cpu")
    assert loaded.rope == want and loaded.family == "llama"
