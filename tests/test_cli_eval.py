"""`ropekit eval` and `ropekit compare` from the command line: outputs, bad input, and the real SmolLM2."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from ropekit.cli import build_app
from tiny import byte_tokenizer

runner = CliRunner()


def invoke(*args):
    return runner.invoke(build_app(), [str(a) for a in args])


def assert_one_line_error(result, *fragments):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    # one error line, the last thing printed (progress bars of model loading may come before it)
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "doc.txt"
    path.write_text("".join(f"Line {i}: a stitch in time saves nine.\n" for i in range(30)), encoding="utf-8")
    return path


def test_eval_ppl_writes_json_csv_png(tiny_folder, text_file, tmp_path):
    out, json_path = tmp_path / "out", tmp_path / "ppl.json"
    result = invoke("eval", "ppl", tiny_folder, "--method", "yarn,dynamic", "--factor", "2", "--lengths", "64,128",
                    "--data", text_file, "--bucket-size", "32", "--json", json_path, "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(json_path.read_text())
    assert data["model"] == str(tiny_folder)
    assert [(r["method"], r["factor"], r["length"]) for r in data["results"]] == [
        ("default", None, 64), ("default", None, 128), ("yarn", 2.0, 64), ("yarn", 2.0, 128),
        ("dynamic", 2.0, 64), ("dynamic", 2.0, 128)]
    for r in data["results"]:
        assert r["bucket_size"] == 32 and len(r["bucket_ppl"]) == r["length"] // 32
        assert math.isfinite(r["ppl"]) and r["ppl"] > 1
    assert sorted(p.name for p in out.iterdir()) == [".ropekit-output.json", "ppl.csv", "ppl.json", "ppl.md", "ppl.png"]
    assert "| default |" in result.output
    no_base = invoke("eval", "ppl", tiny_folder, "--method", "linear", "--factor", "2", "--lengths", "64",
                     "--data", text_file, "--no-baseline", "--json", json_path)
    assert no_base.exit_code == 2 and "--json" in no_base.output and "--overwrite" in no_base.output
    no_base = invoke("eval", "ppl", tiny_folder, "--method", "linear", "--factor", "2", "--lengths", "64",
                     "--data", text_file, "--no-baseline", "--json", json_path, "--overwrite")
    assert no_base.exit_code == 0, no_base.output
    assert [r["method"] for r in json.loads(json_path.read_text())["results"]] == ["linear"]


def test_eval_passkey_and_needle(tiny_folder, text_file, tmp_path):
    result = invoke("eval", "passkey", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "400",
                    "--depths", "0,1", "--mscale", "0.5", "--no-truncate", "--out", tmp_path / "pk")
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "pk" / "passkey.json").read_text())
    assert [r["label"] for r in data["results"]] == ["default", "yarn x2"]
    rope = data["results"][1]["rope"]
    assert rope["mscale"] == 0.5 and rope["truncate"] is False  # the method options reach passkey too
    assert data["results"][0]["depths"] == [0.0, 1.0] and (tmp_path / "pk" / "passkey.png").is_file()
    result = invoke("eval", "needle", tiny_folder, "--haystack", text_file, "--method", "ntk", "--factor", "2",
                    "--lengths", "400", "--depths", "0.5", "--json", tmp_path / "needle.json")
    assert result.exit_code == 0, result.output
    trial = json.loads((tmp_path / "needle.json").read_text())["results"][1]["trials"][0]
    assert trial["length"] == 400 and len(trial["expected"]) == 5


def test_missing_model_path(tmp_path):
    assert_one_line_error(invoke("eval", "ppl", tmp_path / "no-such-model", "--factor", "2"), "model not found")
    assert_one_line_error(invoke("compare", tmp_path / "no-such-model.gguf"), "model not found")


def test_text_shorter_than_the_longest_length(tiny_folder, text_file):
    assert_one_line_error(invoke("eval", "ppl", tiny_folder, "--factor", "2", "--lengths", "64,4096",
                                 "--data", text_file), "4096 tokens needed")


def test_method_needing_a_parameter(tiny_folder, text_file):
    assert_one_line_error(invoke("eval", "ppl", tiny_folder, "--method", "base", "--lengths", "64",
                                 "--data", text_file), "--new-base", "required")
    assert_one_line_error(invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--lengths", "64",
                                 "--data", text_file), "--factor", "required")
    assert_one_line_error(invoke("eval", "passkey", tiny_folder, "--method", "longrope", "--factor", "2",
                                 "--lengths", "400"), "--factors-file")
    assert_one_line_error(invoke("eval", "ppl", tiny_folder, "--method", "linear", "--factor", "2",
                                 "--beta-fast", "16", "--lengths", "64", "--data", text_file), "--beta-fast")


def test_model_family_without_rope(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=256, n_positions=64)).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    assert_one_line_error(invoke("eval", "ppl", folder, "--factor", "2"), "gpt2", "no rotary position embeddings")
    assert_one_line_error(invoke("compare", folder), "no rotary position embeddings")


def test_compare_bad_target_length(tiny_folder, text_file, tmp_path):
    assert_one_line_error(invoke("compare", tiny_folder, "--target-length", "32", "--data", text_file,
                                 "--out", tmp_path / "r"), "longer than the trained length 64")
    assert not (tmp_path / "r").exists()


# ---------------------------------------------------------------------- the real model
@pytest.mark.slow
def test_smollm2_ppl_baseline_and_yarn_at_2048(smollm2):
    """Real text, 2048 tokens: ropekit's plain RoPE reproduces transformers' own loss, YaRN x2 stays close."""
    import torch

    from ropekit.evaluation.data import load_documents, token_windows
    from ropekit.evaluation.perplexity import MethodRun, evaluate_perplexity

    windows = token_windows(load_documents(), smollm2.tokenizer, 2048, 1)
    runs = [MethodRun("default", smollm2.rope), MethodRun("yarn x2", smollm2.rope.with_method("yarn", factor=2.0))]
    base, yarn = evaluate_perplexity(smollm2.model, runs, [2048], {2048: windows}, progress=False)
    with torch.inference_mode():
        loss = smollm2.model(input_ids=windows[0].input_ids[None], labels=windows[0].input_ids[None]).loss
    assert math.isclose(base.ppl, math.exp(float(loss)), rel_tol=2e-3)
    assert 1.5 < base.ppl < 30 and len(base.bucket_ppl) == 2
    assert abs(yarn.ppl / base.ppl - 1) < 0.1 and yarn.ppl != base.ppl


@pytest.mark.slow
def test_smollm2_compare_cli_with_short_lengths(tmp_path):
    out = tmp_path / "report"
    result = invoke("compare", "--original-length", "512", "--target-length", "1024", "--bucket-size", "256",
                    "--methods", "default,linear,yarn,dynamic", "--needles", "8", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads((out / "results.json").read_text())
    assert data["trained_length"] == 512 and data["target_length"] == 1024
    ranking = {o["label"]: o for o in data["ranking"]}
    assert set(ranking) == {"default", "linear", "yarn", "dynamic"}
    assert all(math.isfinite(o["ppl_target"]) and o["retrieval_queries"] == 8 for o in ranking.values())
    assert (out / "perplexity.png").is_file() and (out / "retrieval.png").is_file()
    assert "## Which method to use and why" in (out / "summary.md").read_text()


@pytest.mark.parametrize("native_bf16, expected", [(True, "bfloat16"), (False, None)])
def test_demo_compare_picks_bf16_only_on_cpus_with_native_bf16(monkeypatch, native_bf16, expected):
    import ropekit.commands.compare as compare_cmd

    seen = {}

    def fake_load(source, *, device, dtype):
        seen["dtype"] = dtype
        compare_cmd.error_exit("stop after loading")

    monkeypatch.setattr(compare_cmd, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(compare_cmd, "load_model_or_exit", fake_load)
    result = invoke("compare")
    assert result.exit_code != 0 and seen == {"dtype": expected}
    # an explicit dtype is never overridden
    seen.clear()
    invoke("compare", "--dtype", "float32")
    assert seen == {"dtype": "float32"}


def test_a_command_checks_the_model_files_once(tiny_folder, text_file, tmp_path, monkeypatch):
    """The pre-flight checks the files before anything else; the load that follows does not check them again."""
    import ropekit.hf
    import ropekit.hf.load

    calls = []
    original = ropekit.hf.load.check_model_source

    def counting(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(ropekit.hf, "check_model_source", counting)
    monkeypatch.setattr(ropekit.hf.load, "check_model_source", counting)
    result = invoke("eval", "ppl", tiny_folder, "--method", "yarn", "--factor", "2", "--lengths", "64",
                    "--data", text_file, "--json", tmp_path / "ppl.json")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1
    # The library call on its own still checks (nobody did it before).
    calls.clear()
    ropekit.hf.load.load_model(tiny_folder, device="cpu")
    assert len(calls) == 1
