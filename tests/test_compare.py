"""`compare`: the method plan, shared measurements, the recommendation from numbers, the report folder."""

from __future__ import annotations

import json
import math

import pytest

from ropekit.config import RopeConfig
from ropekit.evaluation.compare import (
    CompareOptions,
    MethodOutcome,
    plan_methods,
    rank_outcomes,
    recommend,
    rotation_key,
    run_compare,
)
from ropekit.methods.base_change import suggested_base
from tiny import byte_tokenizer

SMOLLM2_ROPE = RopeConfig(head_dim=64, base=1e5, original_max_position=8192, max_position=8192)


def test_plan_for_an_unscaled_model():
    plans = plan_methods(SMOLLM2_ROPE, 16384)
    run = {p.label: p for p in plans if p.rope is not None}
    assert list(run)[0] == "default"
    assert {"linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3"} <= set(run)
    for name in ("linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3"):
        assert run[name].rope.factor == 2.0 and run[name].rope.original_max_position == 8192
    base_plan = next(p for p in plans if p.method == "base")
    assert base_plan.rope.new_base == round(suggested_base(16384)) > 1e5
    longrope = next(p for p in plans if p.method == "longrope")
    assert longrope.rope is None and "short_factor" in longrope.skipped


def test_plan_skips_base_when_the_model_base_is_already_larger_and_validates():
    big = SMOLLM2_ROPE.replace(base=5e6)
    assert next(p for p in plan_methods(big, 16384) if p.method == "base").skipped.startswith("the suggested base")
    with pytest.raises(ValueError, match="must be longer than the trained length 8192"):
        plan_methods(SMOLLM2_ROPE, 8192)
    with pytest.raises(ValueError, match="unknown bogus"):
        plan_methods(SMOLLM2_ROPE, 16384, ["yarn", "bogus"])


def test_plan_with_longrope_factors_uses_the_models_own():
    rope = RopeConfig(head_dim=8, base=1e4, method="longrope", short_factor=[1, 1, 1, 1],
                      long_factor=[1, 2, 3, 4], original_max_position=64, factor=4.0)
    plans = plan_methods(rope, 128)
    assert plans[0].rope == rope and plans[0].method == "longrope"
    assert not any(p.skipped and p.method == "longrope" for p in plans)
    assert "default" in [p.label for p in plans]


def test_dynamic_yarn_at_the_target_is_yarn():
    plans = {p.label: p.rope for p in plan_methods(SMOLLM2_ROPE, 16384) if p.rope is not None}
    assert rotation_key(plans["dynamic_yarn"], 16384) == rotation_key(plans["yarn"], 16384)
    assert rotation_key(plans["dynamic_yarn"], 8192) == rotation_key(plans["default"], 8192)
    assert rotation_key(plans["dynamic"], 8192) == rotation_key(plans["default"], 8192)
    assert rotation_key(plans["dynamic"], 16384) != rotation_key(plans["ntk"], 16384)


def outcome(label, trained, target, late, passkey=None, method=None, factor=2.0):
    return MethodOutcome(label, method or label, None if label == "default" else factor, {}, trained, target, late,
                         passkey)


def test_recommendation_follows_the_numbers():
    outcomes = [outcome("default", 7.7, 23.3, 500.0, 0.0), outcome("yarn", 7.8, 6.4, 6.1, 1.0),
                outcome("dynamic", 7.7, 6.7, 6.5, 1.0), outcome("linear", 12.0, 21.0, 20.0, 0.0)]
    rank_outcomes(outcomes)
    assert [o.label for o in outcomes] == ["yarn", "dynamic", "linear", "default"]
    text = recommend(outcomes, 8192, 16384, "default")
    assert text.startswith("Use yarn (factor 2)") and "6.40 against 23.30" in text
    assert "does not break down" in text and "blow up to 500.00" in text
    assert "Runner-up: dynamic at 6.70" in text and "linear (+55.8%)" in text
    assert "Passkey retrieval at 16384 tokens: 100% (unscaled: 0%)" in text
    # other numbers, other advice
    outcomes = [outcome("default", 7.7, 23.3, 500.0, 0.0), outcome("dynamic", 7.7, 6.2, 6.0, 1.0, "dynamic"),
                outcome("yarn", 7.8, 6.4, 12.0, 1.0)]
    rank_outcomes(outcomes)
    text = recommend(outcomes, 8192, 16384, "default")
    assert text.startswith("Use dynamic") and "depends on the sequence length" in text
    outcomes = [outcome("default", 7.7, 7.0, 6.9), outcome("yarn", 7.9, 7.5, 9.8)]
    rank_outcomes(outcomes)
    assert recommend(outcomes, 8192, 16384, "default").startswith("Keep the model's own RoPE (default)")
    outcomes = [outcome("default", 7.7, 50.0, 90.0), outcome("linear", 9.0, 20.0, 30.0)]
    rank_outcomes(outcomes)
    text = recommend(outcomes, 8192, 16384, "default")
    assert "still degrades" in text and "costs short-context quality: +16.9%" in text
    outcomes = [outcome("default", 7.7, 7.00, 7.0), outcome("yarn", 7.7, 6.98, 7.0), outcome("ntk", 7.7, 6.99, 7.0)]
    rank_outcomes(outcomes)
    assert recommend(outcomes, 8192, 16384, "default").startswith("No method clearly beats the unscaled model")
    # a perplexity tie is decided by the passkey
    outcomes = [outcome("default", 6.67, 6.41, 5.48, 0.0), outcome("yarn", 6.70, 6.43, 5.45, 1.0),
                outcome("ntk", 6.71, 6.44, 5.47, 0.0), outcome("llama3", 6.71, 6.43, 5.42, 1.0)]
    rank_outcomes(outcomes)
    assert [o.label for o in outcomes] == ["yarn", "llama3", "default", "ntk"]
    text = recommend(outcomes, 8192, 10240, "default")
    assert text.startswith("Use yarn (factor 2) at 10240 tokens: its perplexity ties") and "100% of the time against 0%" in text
    assert "Equally good on these measurements: llama3." in text


def test_compare_on_a_tiny_model_writes_the_report(tiny_model, tmp_path):
    from ropekit.hf import LoadedModel

    model = tiny_model("llama", max_position_embeddings=256)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), rope=RopeConfig.from_hf(model.config),
                         family="llama", source="tiny-llama")
    data = tmp_path / "text.txt"
    data.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40)))
    out = tmp_path / "report"
    options = CompareOptions(target_length=512, data=data, bucket_size=128, passkey_depths=(0.0, 1.0),
                             passkey_trials=1, progress=False)
    rep = run_compare(loaded, options, out)
    assert sorted(p.name for p in out.iterdir()) == [".ropekit-output.json", "passkey.csv", "passkey.png",
                                                    "perplexity.csv",
                                                    "perplexity.png", "results.json", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny-llama" and results["trained_length"] == 256 and results["factor"] == 2.0
    for r in results["results"]:
        assert {"method", "factor", "length", "ppl", "bucket_size", "bucket_ppl"} <= set(r)
        assert r["length"] == 512 and r["bucket_size"] == 128 and len(r["bucket_ppl"]) == 4
    labels = [o["label"] for o in results["ranking"]]
    assert sorted(o["rank"] for o in results["ranking"]) == list(range(1, len(labels) + 1))
    assert {"default", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3"} <= set(labels)
    # no LongRoPE factors in the config; arXiv 2405.14591's base for 512 tokens (4.3e3) is below the model's 1e4
    assert [s["method"] for s in results["skipped"]] == ["longrope", "base"]
    assert results["recommendation"] == rep.recommendation
    by = {o.label: o for o in rep.outcomes}
    assert "same rotation as yarn at 512 tokens: measured once" in by["dynamic_yarn"].notes
    assert by["dynamic_yarn"].ppl_target == by["yarn"].ppl_target
    assert any("passkey measured once" in n for n in by["dynamic_yarn"].notes)
    # static methods' short-context ppl is the prefix of the long window; dynamic NTK is plain RoPE up to L
    assert math.isclose(by["dynamic"].ppl_trained, by["default"].ppl_trained)
    assert not math.isclose(by["linear"].ppl_trained, by["default"].ppl_trained)
    summary = (out / "summary.md").read_text()
    assert "| rank | method |" in summary and "## Which method to use and why" in summary
    assert rep.recommendation in summary and "longrope: needs per-pair factors" in summary
    assert len(results["passkey"]) == len(labels) and all(len(p["trials"]) == 2 for p in results["passkey"])


def test_compare_failure_leaves_no_half_written_report(tiny_model, tmp_path):
    from ropekit.hf import LoadedModel

    model = tiny_model("llama", max_position_embeddings=256)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), rope=RopeConfig.from_hf(model.config),
                         family="llama", source="tiny-llama")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="512 tokens needed"):
        run_compare(loaded, CompareOptions(target_length=512, data=short, progress=False), tmp_path / "report")
    assert not (tmp_path / "report").exists() and list(tmp_path.iterdir()) == [short]
