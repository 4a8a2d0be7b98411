"""ropekit.hf.export: hf_config_for reads back to the same RoPE in transformers, and export_model writes a folder
plain transformers loads (in a process that never imports ropekit) with the patched model's logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from tiny import (
    TINY_CONFIGS,
    TINY_TRAINED_LENGTH,
    make_tiny_config,
    make_tiny_model,
)
from hf_models import hf_rope
from typer.testing import CliRunner

from ropekit import RopeConfig
from ropekit import frequencies as rk_frequencies
from ropekit.hf import apply_rope, export_model, hf_config_for

ATOL = 2e-5

# A separate interpreter: plain transformers, no ropekit anywhere (checked).
PLAIN_LOAD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    cases = json.loads(sys.argv[1])
    for folder, inputs, output in cases:
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        data = torch.load(inputs)
        with torch.no_grad():
            torch.save(model(data["ids"], position_ids=data.get("position_ids")).logits, output)
    assert not any(name.startswith("ropekit") for name in sys.modules), "ropekit was imported"
    print("plain-transformers-ok")
""")


def _plain_transformers_logits(cases, tmp_path):
    """cases: [(folder, ids, position_ids or None)] -> logits computed by plain transformers in a subprocess."""
    jobs = []
    for i, (folder, ids, positions) in enumerate(cases):
        inputs, output = tmp_path / f"in{i}.pt", tmp_path / f"out{i}.pt"
        torch.save({"ids": ids, "position_ids": positions}, inputs)
        jobs.append((str(folder), str(inputs), str(output)))
    result = subprocess.run([sys.executable, "-c", PLAIN_LOAD, json.dumps(jobs)], capture_output=True, text=True,
                            cwd=tmp_path, timeout=600)
    assert result.returncode == 0 and "plain-transformers-ok" in result.stdout, result.stderr[-3000:]
    return [torch.load(out) for _, _, out in jobs]


def _longrope_cfg(family):
    model = make_tiny_model(family)
    half = RopeConfig.from_hf(model.config).rotary_dim // 2
    rope = {"rope_type": "longrope", "factor": 4.0, "original_max_position_embeddings": TINY_TRAINED_LENGTH,
            "short_factor": [1.0 + 0.05 * i for i in range(half)], "long_factor": [1.0 + 0.6 * i for i in range(half)]}
    return model, RopeConfig.from_hf(make_tiny_config(family, rope=rope, max_position_embeddings=256))


def test_exports_load_in_plain_transformers_with_the_patched_logits(tmp_path):
    cases = []
    for family, method in [("llama", "yarn"), ("gpt_neox", "dynamic"), ("qwen2", "llama3"), ("gemma2", "linear"),
                           ("mistral", "ntk"), ("qwen3", "base"), ("phi3", "longrope"), ("gptj", "default")]:
        if method == "longrope":
            model, cfg = _longrope_cfg(family)
        else:
            model = make_tiny_model(family)
            cfg0 = RopeConfig.from_hf(model.config)
            cfg = (cfg0.extend("base", new_base=3e5) if method == "base" else
                   cfg0.extend(method, 2.0 if method != "default" else None))
        out = export_model(model, cfg, tmp_path / f"{family}-{method}")
        assert {"config.json", "model.safetensors", "ropekit.json"} <= {p.name for p in out.iterdir()}
        config = json.loads((out / "config.json").read_text())
        if method not in ("default",):
            assert config["rope_parameters"]["rope_type"] == cfg.to_hf()["rope_parameters"]["rope_type"]
        seq = TINY_TRAINED_LENGTH if family == "gptj" else 150
        ids = torch.randint(0, 256, (2, seq), generator=torch.Generator().manual_seed(1))
        positions = None
        if family == "qwen2":  # packed rows: positions restart
            positions = torch.cat([torch.arange(50), torch.arange(100)])[None].expand(2, -1).contiguous()
        with apply_rope(model, cfg), torch.no_grad():
            expected = model(ids, position_ids=positions).logits
        cases.append((out, ids, positions, expected, f"{family}-{method}"))
    got = _plain_transformers_logits([(f, i, p) for f, i, p, _, _ in cases], tmp_path)
    for (_, _, _, expected, name), logits in zip(cases, got):
        torch.testing.assert_close(logits, expected, atol=ATOL, rtol=0, msg=name)


def test_export_is_atomic_and_refuses_to_overwrite(tmp_path, monkeypatch):
    model = make_tiny_model("llama")
    cfg = RopeConfig.from_hf(model.config).extend("yarn", 2.0)
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"not empty and holds files ropekit did not write \(keep.txt\)"):
        export_model(model, cfg, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]

    # A failure halfway through (after the weights were written) leaves nothing behind.
    class BrokenTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        export_model(model, cfg, tmp_path / "new", tokenizer=BrokenTokenizer())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OSError, match="disk full"):
        export_model(model, cfg, target, tokenizer=BrokenTokenizer(), overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]  # the old folder survives a failed overwrite

    export_model(model, cfg, target, overwrite=True)
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask  # not the private mode of a temp folder
    assert (target / "keep.txt").read_text() == "mine"  # --overwrite writes beside a user's file, never over it
    assert json.loads((target / "ropekit.json").read_text())["rope"]["method"] == "yarn"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folders left


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_export_gives_files_and_folders_ordinary_permissions(tmp_path, umask):
    """Every file 0o666 & ~umask and every folder 0o777 & ~umask, as open()/mkdir() would make them
    (transformers writes model.safetensors through a private 0600 temporary file)."""
    model = make_tiny_model("llama")
    cfg = RopeConfig.from_hf(model.config).extend("yarn", 2.0)
    previous = os.umask(umask)
    try:
        out = export_model(model, cfg, tmp_path / "out" / "nested")
    finally:
        os.umask(previous)
    seen = {}
    for root, dirs, files in os.walk(out):
        seen[root] = os.stat(root).st_mode & 0o777
        for name in files:
            seen[os.path.join(root, name)] = os.stat(os.path.join(root, name)).st_mode & 0o777
    assert str(out / "model.safetensors") in seen and str(out / "config.json") in seen
    wrong = {path: oct(mode) for path, mode in seen.items()
             if mode != (0o777 if os.path.isdir(path) else 0o666) & ~umask}
    assert not wrong, f"umask {oct(umask)}: {wrong}"
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask  # a parent export_model created


def test_export_refuses_methods_transformers_lacks_before_writing(tmp_path):
    model = make_tiny_model("llama")
    cfg0 = RopeConfig.from_hf(model.config)
    with pytest.raises(ValueError, match="dynamic_yarn"):
        export_model(model, cfg0.extend("dynamic_yarn", 2.0), tmp_path / "a")
    _, longrope = _longrope_cfg("llama")
    with pytest.raises(ValueError, match="n_hat"):
        export_model(model, longrope.replace(n_hat=16), tmp_path / "b")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------- config for export
ROPE_FAMILIES = [f for f in TINY_CONFIGS if f != "gptj"]  # families with transformers rope_parameters


@pytest.mark.parametrize("family", ROPE_FAMILIES)
@pytest.mark.parametrize("method", ["linear", "yarn", "dynamic", "llama3", "longrope", "ntk"])
def test_hf_config_for_reads_back_to_the_same_rope(family, method):
    from transformers import AutoConfig

    model = make_tiny_model(family)
    cfg0 = RopeConfig.from_hf(model.config)
    if method == "longrope":
        cfg = RopeConfig.from_hf(make_tiny_config(family, rope=hf_rope("longrope", cfg0.rotary_dim),
                                                  max_position_embeddings=256))
    else:
        cfg = cfg0.extend(method, 4.0)
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
        hf_config_for(model.config, cfg0.extend("dynamic_yarn", 2.0))
    gptj = make_tiny_model("gptj")
    with pytest.raises(ValueError, match="GPT-J"):
        hf_config_for(gptj.config, RopeConfig.from_hf(gptj.config).extend("yarn", 2.0))
    with pytest.raises(ValueError, match="head_dim"):
        hf_config_for(model.config, cfg0.replace(head_dim=32, rotary_dim=32))


# ---------------------------------------------------------------------- CLI
def _cli():
    import typer

    from ropekit.commands import export, inspect

    app = typer.Typer()
    export.register(app)
    inspect.register(app)
    return app


def _tiny_folder(tmp_path, family="llama"):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_model(family)
    folder = tmp_path / f"tiny-{family}"
    model.save_pretrained(folder)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(256)}, unk_token="w0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(folder)
    return model, folder


def test_cli_export_writes_a_loadable_folder(tmp_path):
    from transformers import AutoModelForCausalLM

    model, folder = _tiny_folder(tmp_path)
    out = tmp_path / "exported"
    result = CliRunner().invoke(_cli(), ["export", str(folder), "--method", "yarn", "--factor", "2",
                                         "--beta-fast", "16", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"] == {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                         "original_max_position_embeddings": 64, "beta_fast": 16.0}
    assert config["max_position_embeddings"] == 128
    assert (out / "tokenizer.json").is_file()
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 256, (1, 100))
    cfg = RopeConfig.from_hf(model.config).extend("yarn", 2.0, beta_fast=16)
    with apply_rope(model, cfg), torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, model(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("args,message", [
    (["--method", "base"], "--new-base: required by"),
    (["--method", "yarn"], "--factor: required by"),
    (["--method", "longrope", "--factor", "2"], "--factors-file"),
    (["--method", "dynamic_yarn", "--factor", "2"], "cannot be exported"),
    (["--method", "llama3", "--factor", "2", "--beta-fast", "4"], "--beta-fast: not used by"),
    (["--method", "warp", "--factor", "2"], "--method: unknown scaling method 'warp'"),
    (["--method", "yarn", "--factor", "2", "--dtype", "int8"], "--dtype"),
])
def test_cli_export_errors_are_one_line(tmp_path, args, message):
    _, folder = _tiny_folder(tmp_path)
    result = CliRunner().invoke(_cli(), ["export", str(folder), *args, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().count("\n") == 0
    assert not (tmp_path / "o").exists()


def test_cli_export_missing_model_and_non_empty_out(tmp_path):
    result = CliRunner().invoke(_cli(), ["export", str(tmp_path / "nope"), "--method", "yarn", "--factor", "2",
                                         "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "model not found" in result.output and "nope" in result.output
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("x")
    result = CliRunner().invoke(_cli(), ["export", "demo", "--method", "yarn", "--factor", "2", "--out", str(busy)])
    assert result.exit_code == 2 and "--overwrite" in result.output


# ---------------------------------------------------------------------- the real model (slow)
@pytest.mark.slow
def test_smollm2_gguf_export_loads_in_plain_transformers(smollm2, stdlib_text, tmp_path):
    cfg = smollm2.rope.extend("yarn", 2.0)
    # transformers 5.24 marks a GGUF-loaded model as quantized (export lifts the marks while saving); 5.0
    # does not. Either way the model must come back as it was.
    marks = (smollm2.model.__dict__.get("hf_quantizer"), getattr(smollm2.model.config, "quantization_config", None))
    out = export_model(smollm2, cfg, tmp_path / "smollm2-yarn2")
    config = json.loads((out / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "yarn" and config["max_position_embeddings"] == 16384
    assert "quantization_config" not in config  # an ordinary float checkpoint
    assert smollm2.model.__dict__.get("hf_quantizer") is marks[0]  # marks restored
    assert getattr(smollm2.model.config, "quantization_config", None) is marks[1]
    assert (out / "tokenizer.json").is_file() or (out / "tokenizer.model").is_file()
    ids = smollm2.tokenizer(stdlib_text, return_tensors="pt")["input_ids"][:, :512]
    with apply_rope(smollm2.model, cfg), torch.no_grad():
        expected = smollm2.model(ids).logits
    (got,) = _plain_transformers_logits([(out, ids, None)], tmp_path)
    # float32 round-off through 30 layers (transformers builds its angles in float32, ropekit in float64)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_per_layer_type_rope_exports_per_type_and_transformers_reads_it_back():
    """Gemma 3: one RoPE per layer type. Extending changes the full-attention layers only (``changed_layers``);
    the export writes rope_parameters per type, and transformers' model built from it gives the patched logits."""
    from transformers import AutoModelForCausalLM

    from ropekit.layered import LayeredRope
    from ropekit.hf.reference import _tiny_model, tiny_family_config

    config, _ = tiny_family_config("gemma3_text")
    model = _tiny_model(config)
    layered = LayeredRope.from_hf(model.config)
    assert set(layered.types) == {"full_attention", "sliding_attention"}
    extended = layered.extend("yarn", 2.0, original_max_position=16)
    assert extended.changed == ("full_attention",)
    assert extended.changed_layers == layered.layers_of("full_attention")
    assert extended["sliding_attention"] == layered["sliding_attention"]
    written = hf_config_for(model.config, extended)
    assert set(written["rope_parameters"]) >= {"full_attention", "sliding_attention"}
    assert written["rope_parameters"]["full_attention"]["rope_type"] == "yarn"
    read_back = LayeredRope.from_hf(written)
    assert read_back["full_attention"] == extended["full_attention"]
    # The sliding layers' plain RoPE: same frequencies (its "trained length" follows max_position_embeddings).
    assert (read_back["sliding_attention"].method, read_back["sliding_attention"].base) == ("default", 10000.0)
    assert read_back.layers == extended.layers
    rebuilt = type(model.config)(**{k: v for k, v in written.items() if k not in ("model_type", "transformers_version")})
    rebuilt._attn_implementation = "eager"
    torch.manual_seed(0)
    reference = AutoModelForCausalLM.from_config(rebuilt, attn_implementation="eager").eval()
    reference.load_state_dict(model.state_dict())
    ids = torch.randint(3, 100, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = reference(ids).logits
        with apply_rope(model, extended):
            got = model(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)
