"""Broken model files are one line naming the file and the field, exit 2, before any weights load: a config.json
with impossible or mistyped fields, one transformers' own validation rejects, weights of another shape, a
rope_scaling that is not an object, a damaged tokenizer.json; and an export onto a full disk is one line too,
leaving nothing half-written."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from cli_checks import invoke, one_error_line

import ropekit.hf


@pytest.fixture
def no_loading(no_loading, monkeypatch):
    """Also fail the test if transformers loads a model or a tokenizer: every problem here is found first."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the bad input was refused")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.fixture
def model_copy(tiny_folder, tmp_path):
    """A fresh copy of the tiny Llama folder, and an editor of its config.json."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_folder, folder)

    def edit(**changes):
        path = folder / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is ...:
                config.pop(key, None)
            else:
                config[key] = value
        path.write_text(json.dumps(config, indent=2))
        return folder

    return folder, edit


def commands(folder, text, out):
    return {
        "inspect": ["inspect", folder, "--no-plots"],
        "export": ["export", folder, "--method", "yarn", "--factor", "2", "--out", out],
        "eval ppl": ["eval", "ppl", folder, "--method", "yarn", "--factor", "2", "--lengths", "64", "--data", text],
    }


# ---------------------------------------------------------------------- 1. impossible / mistyped config fields
@pytest.mark.parametrize("command", ["inspect", "export", "eval ppl"])
def test_zero_attention_heads_names_config_and_field(command, model_copy, text_file, tmp_path, no_loading):
    # Without head_dim the head size is hidden_size / num_attention_heads: a ZeroDivisionError before.
    folder = model_copy[1](num_attention_heads=0, head_dim=...)
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    line = one_error_line(result, f"{folder / 'config.json'}: num_attention_heads:")
    assert line.endswith("must be a positive integer, got 0")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["inspect", "export", "eval ppl"])
def test_hidden_size_as_a_string_names_config_and_field(command, model_copy, text_file, tmp_path, no_loading):
    folder = model_copy[1](hidden_size="64")
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    line = one_error_line(result, f"{folder / 'config.json'}: hidden_size:")
    assert "positive integer" in line and "'64'" in line


def test_library_errors_start_with_the_config_file(model_copy):
    from ropekit.hf.load import rope_from_source

    folder = model_copy[1](num_attention_heads=0)
    with pytest.raises(ValueError) as info:
        ropekit.hf.check_model_source(folder)
    assert str(info.value) == f"{folder / 'config.json'}: num_attention_heads: must be a positive integer, got 0"
    with pytest.raises(ValueError) as info:
        rope_from_source(folder)
    assert str(info.value).startswith(f"{folder / 'config.json'}: num_attention_heads:")


# ---------------------------------------------------------------------- 2. transformers' own validation
@pytest.mark.parametrize("changes, field", [
    ({"num_attention_heads": 5}, "hidden_size"),  # head_dim 16 is given: only transformers' validator objects
    ({"layer_types": ["full_attention"] * 3}, "num_hidden_layers"),  # 3 layer types for 2 layers
])
@pytest.mark.parametrize("command", ["export", "eval ppl"])
def test_config_transformers_rejects_is_one_line(command, changes, field, model_copy, text_file, tmp_path,
                                                 no_loading):
    folder = model_copy[1](**changes)
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    line = one_error_line(result, f"{folder / 'config.json'}: {field}:")
    assert "Validation error" not in line and "Traceback" not in line


# ---------------------------------------------------------------------- 3. weights that are not the config's
@pytest.mark.parametrize("command", ["export", "eval ppl"])
def test_weights_of_another_shape_name_the_file_and_tensor(command, model_copy, text_file, tmp_path, no_loading):
    from tiny import make_tiny_model

    folder, _ = model_copy
    other = tmp_path / "wider"
    make_tiny_model("llama", hidden_size=128, intermediate_size=256).save_pretrained(other)
    shutil.copy(other / "model.safetensors", folder / "model.safetensors")
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    line = one_error_line(result, f"{folder / 'model.safetensors'}: ", "config.json")
    tensor = line.split(f"{folder / 'model.safetensors'}: ", 1)[1].split(":", 1)[0]
    assert tensor.endswith(".weight") and "[256, 128]" in line and "[256, 64]" in line


# ---------------------------------------------------------------------- 4. rope_scaling as a bare string
@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
@pytest.mark.parametrize("command", ["inspect", "export", "eval ppl"])
def test_rope_scaling_string_says_it_must_be_an_object(command, key, model_copy, text_file, tmp_path, no_loading):
    folder = model_copy[1](**{"rope_parameters": ..., key: "yarn"})
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    line = one_error_line(result, f"{folder / 'config.json'}: {key}:", '{"rope_type": "yarn", "factor": 2.0}')
    assert "dictionary update sequence" not in line


# ---------------------------------------------------------------------- 5. a damaged tokenizer.json
@pytest.mark.parametrize("command", ["export", "eval ppl"])
def test_garbage_tokenizer_names_the_file_before_weights_load(command, model_copy, text_file, tmp_path,
                                                             no_loading):
    folder, _ = model_copy
    (folder / "tokenizer.json").write_text("<html>502 Bad Gateway</html>")
    result = invoke(*commands(folder, text_file, tmp_path / "out")[command])
    one_error_line(result, f"{folder / 'tokenizer.json'}: ")


def test_library_load_names_the_tokenizer_file(model_copy):
    """Without the pre-flight (check_files=False) the load itself names the tokenizer, before the weights."""
    import transformers

    folder, _ = model_copy
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                   lambda *a, **k: pytest.fail("weights loaded before the tokenizer"))
        with pytest.raises(ValueError) as info:
            ropekit.hf.load_model(folder, device="cpu", check_files=False)
    assert str(folder / "tokenizer.json") in str(info.value) and "\n" not in str(info.value)


# ---------------------------------------------------------------------- 6. an export onto a full disk
def _disk_full_errors():
    from safetensors import SafetensorError

    return {
        "oserror": OSError(errno.ENOSPC, "No space left on device"),
        "safetensors": SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                       'message: "No space left on device" })'),
    }


@pytest.mark.parametrize("kind", ["oserror", "safetensors"])
def test_export_onto_a_full_disk_is_one_line_and_leaves_nothing(kind, tiny_folder, tmp_path, monkeypatch):
    import transformers.modeling_utils

    error = _disk_full_errors()[kind]

    def full_disk(state_dict, filename, metadata=None):
        with open(filename, "wb") as fh:
            fh.write(b"\0" * 1000)  # half a file, then the disk is full
        raise error

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full_disk)
    out = tmp_path / "export"
    result = invoke("export", tiny_folder, "--method", "yarn", "--factor", "2", "--out", out)
    one_error_line(result, f"--out: no space left on device while writing {out}", progress=True)
    assert not out.exists() or not any(out.rglob("*"))
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_gguf_export_onto_a_full_disk_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    import ropekit.hf.export_gguf

    def full_disk(source, plan, out_path):
        with open(out_path, "wb") as fh:
            fh.write(b"GGUF" + b"\0" * 1000)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ropekit.hf.export_gguf, "write_gguf", full_disk)
    out = tmp_path / "long.gguf"
    result = invoke("export", "demo", "--format", "gguf", "--method", "yarn", "--factor", "2", "--out", out)
    one_error_line(result, f"--out: no space left on device while writing {out}")
    assert list(tmp_path.iterdir()) == []
