"""`compare`: the method plan, shared measurements, the recommendation from numbers, the report folder."""

from __future__ import annotations

import json
import math

import pytest
import torch

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


TRAINED, TARGET = 8192, 16384


def synthetic(label, nll, hits, method=None, factor=2.0, exportable=True, queries=32):
    """A MethodOutcome measured on synthetic per-token NLL (1, TARGET - 1) and ``hits`` of ``queries`` needles."""
    from ropekit.evaluation.compare.measure import _bucket_ppl, _masked_ppl
    from ropekit.evaluation.stats import perplexity_interval

    mask = torch.ones_like(nll, dtype=torch.bool)
    position = torch.arange(1, nll.shape[1] + 1)[None]
    ppl, lo, hi = perplexity_interval(nll, mask)
    buckets, ends = _bucket_ppl(nll, mask, 1024)
    qs = [{"window": 0, "label": f"n{i}", "expected": "1", "answer": "1" if i < hits else "2", "correct": i < hits,
           "depth": i / (queries - 1), "distance": int(TARGET * (1 - i / queries))} for i in range(queries)]
    rope = SMOLLM2_ROPE if label == "default" else SMOLLM2_ROPE.extend(method or label, factor)
    return MethodOutcome(label, method or label, None if label == "default" else factor, rope.to_dict(), exportable,
                         _masked_ppl(nll, position < TRAINED), ppl, (lo, hi), _masked_ppl(nll, position >= TRAINED),
                         buckets, ends, qs, TRAINED, config=rope)


def text_nll(seed=0):
    gen = torch.Generator().manual_seed(seed)
    stretches = 0.3 * torch.randn(1, 16, generator=gen).repeat_interleave(1024, dim=1)[:, : TARGET - 1]
    return 2.0 + stretches + 0.5 * torch.randn(1, TARGET - 1, generator=gen)


def ranked(*outcomes_and_nll):
    outcomes = [o for o, _ in outcomes_and_nll]
    nll_of = {o.label: n for o, n in outcomes_and_nll}
    mask = torch.ones(1, TARGET - 1, dtype=torch.bool)
    pairs = rank_outcomes(outcomes, nll_of, mask)
    return outcomes, pairs


def test_ranking_and_recommendation_separate_only_where_the_intervals_do():
    text = text_nll()
    late = (torch.arange(1, TARGET)[None] >= TRAINED).float()
    gen = torch.Generator().manual_seed(5)
    cases = {"default": text + 2.5 * late, "yarn": text, "ntk": text + 0.002 * torch.randn(text.shape, generator=gen),
             "linear": text + 0.1}
    hits = {"default": 4, "yarn": 20, "ntk": 19, "linear": 10}
    outcomes, pairs = ranked(*[(synthetic(k, v, hits[k]), v) for k, v in cases.items()])
    assert [o.label for o in outcomes] == ["yarn", "ntk", "linear", "default"]
    by = {o.label: o for o in outcomes}
    assert by["yarn"].tied_with == ["ntk"] and by["ntk"].tied_with == ["yarn"]
    assert not by["linear"].tied_with and pairs[("linear", "yarn")].separated
    rec = recommend(outcomes, TRAINED, TARGET, "default", model_source="demo", pairs=pairs, buckets_per_window=16)
    assert rec.label == "yarn" and rec.factor == 2.0
    assert rec.text.startswith("Use yarn (factor 2) to run this model at 16384 tokens")
    assert "retrieval 20/32 = 62% [" in rec.text and "against 4/32 = 12% [" in rec.text
    assert "Tied with it at this sample size (1 context(s), 32 queries): ntk" in rec.text
    assert "queries per method the retrieval" in rec.text
    assert rec.export_command == "ropekit export demo --method yarn --factor 2 --out demo-yarn-16384"
    assert "Without scaling, the tokens past 8192 reach perplexity" in rec.text


def test_a_non_exportable_first_place_is_recommended_as_its_exportable_twin():
    text = text_nll(1)
    dyn = synthetic("dynamic_yarn", text, 25, exportable=False)
    yarn = synthetic("yarn", text.clone(), 25)
    base = synthetic("default", text + 1.0, 2)
    outcomes, pairs = ranked((dyn, text), (yarn, text.clone()), (base, text + 1.0))
    rec = recommend(outcomes, TRAINED, TARGET, "default", twins={"yarn": ["yarn", "dynamic_yarn"]}, pairs=pairs)
    assert rec.label == "yarn" and "--method yarn" in rec.export_command
    if outcomes[0].label == "dynamic_yarn":
        assert "computes the same rotation as yarn" in rec.text
    # without a twin, the best exportable method is named and the first place's problem said
    outcomes, pairs = ranked((synthetic("dynamic_yarn", text, 30, exportable=False), text),
                             (synthetic("ntk", text + 0.2, 10), text + 0.2), (base, text + 1.0))
    rec = recommend(outcomes, TRAINED, TARGET, "default", pairs=pairs)
    assert rec.label == "ntk" and "cannot be exported for plain transformers" in rec.text


def test_a_tie_with_the_unscaled_model_keeps_it():
    text = text_nll(2)
    gen = torch.Generator().manual_seed(3)
    noisy = text + 0.002 * torch.randn(text.shape, generator=gen)
    outcomes, pairs = ranked((synthetic("default", text, 16), text), (synthetic("yarn", noisy, 17), noisy))
    rec = recommend(outcomes, TRAINED, TARGET, "default", pairs=pairs)
    assert rec.label == "default" and rec.export_command is None
    assert "No method is told apart from the model's own RoPE" in rec.text or rec.text.startswith("Keep the model")


def test_compare_on_a_tiny_model_writes_the_report(tiny_model, tmp_path):
    from ropekit.hf import LoadedModel

    model = tiny_model("llama", max_position_embeddings=256)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), rope=RopeConfig.from_hf(model.config),
                         family="llama", source="tiny-llama")
    data = tmp_path / "text.txt"
    data.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(80)))
    out = tmp_path / "report"
    options = CompareOptions(target_length=512, data=data, bucket_size=128, needles=4, progress=False)
    rep = run_compare(loaded, options, out)
    assert sorted(p.name for p in out.iterdir()) == [".ropekit-output.json", "perplexity.csv", "perplexity.png",
                                                    "results.json", "retrieval.csv", "retrieval.png", "summary.md"]
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == "tiny-llama" and results["trained_length"] == 256 and results["factor"] == 2.0
    assert results["target_length"] == 512 and results["wall_time_s"] > 0
    labels = [o["label"] for o in results["ranking"]]
    assert sorted(o["rank"] for o in results["ranking"]) == list(range(1, len(labels) + 1))
    assert {"default", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3"} <= set(labels)
    for entry in results["ranking"]:
        assert {"method", "ppl_target", "ppl_target_ci", "retrieval_accuracy", "retrieval_queries",
                "retrieval_ci"} <= set(entry)
        lo, hi = entry["ppl_target_ci"]
        assert lo <= entry["ppl_target"] <= hi
        assert entry["retrieval_queries"] == 4 and len(entry["queries"]) == 4
        lo, hi = entry["retrieval_ci"]
        assert 0 <= lo <= entry["retrieval_accuracy"] <= hi <= 1
    # no LongRoPE factors in the config; arXiv 2405.14591's base for 512 tokens (4.3e3) is below the model's 1e4
    assert [s["method"] for s in results["skipped"]] == ["longrope", "base"]
    assert results["recommendation"]["text"] == rep.recommendation.text
    by = {o.label: o for o in rep.outcomes}
    assert "same rotation as yarn at 512 tokens: measured once" in by["dynamic_yarn"].notes
    assert by["dynamic_yarn"].ppl_target == by["yarn"].ppl_target
    assert by["dynamic_yarn"].queries == by["yarn"].queries
    assert by["dynamic_yarn"].timing == {"shared_with": "yarn"} and "forward" in by["yarn"].timing
    if rep.recommendation.label == "yarn" and rep.outcomes[0].label == "dynamic_yarn":
        assert "computes the same rotation as yarn" in rep.recommendation.text
    # static methods' short-context ppl is the prefix of the long pass; dynamic NTK is plain RoPE up to L
    assert math.isclose(by["dynamic"].ppl_trained, by["default"].ppl_trained)
    assert not math.isclose(by["linear"].ppl_trained, by["default"].ppl_trained)
    summary = (out / "summary.md").read_text()
    assert "| rank | method |" in summary and "## Which method to use and why" in summary
    assert rep.recommendation.text in summary and "longrope: needs per-pair factors" in summary
    assert "## Where the time went" in summary
    import csv

    with (out / "retrieval.csv").open(newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 4 * len(labels)  # one row per question and method


def test_the_recommended_configuration_exports(tiny_folder, tmp_path, monkeypatch):
    """The export command line in the recommendation runs and writes a checkpoint transformers loads."""
    import shlex

    from transformers import AutoConfig

    from ropekit.cli import main
    from ropekit.hf import load_model

    loaded = load_model(str(tiny_folder))
    data = tmp_path / "text.txt"
    data.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(80)))
    rep = run_compare(loaded, CompareOptions(target_length=512, data=data, bucket_size=128, needles=4,
                                             methods=["yarn", "linear"], progress=False))
    rec = rep.recommendation
    if rec.export_command is None:  # the unscaled model won on this random model: force a method to export
        rep = run_compare(loaded, CompareOptions(target_length=512, data=data, bucket_size=128, needles=4,
                                                 methods=["yarn"], progress=False))
        pick = next(o for o in rep.outcomes if o.label == "yarn")
        from ropekit.evaluation.compare import export_command

        command = export_command(loaded.source, pick.config, 512)
    else:
        command = rec.export_command
    argv = shlex.split(command)
    assert argv[:2] == ["ropekit", "export"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(argv[1:])
    assert done.value.code in (0, None)
    folder = tmp_path / argv[argv.index("--out") + 1]
    config = AutoConfig.from_pretrained(folder)
    params = getattr(config, "rope_parameters", None) or {}
    assert params.get("rope_type") in ("yarn", "linear") and params.get("factor") == 8.0


def test_compare_failure_leaves_no_half_written_report(tiny_model, tmp_path):
    from ropekit.hf import LoadedModel

    model = tiny_model("llama", max_position_embeddings=256)
    loaded = LoadedModel(model=model, tokenizer=byte_tokenizer(), rope=RopeConfig.from_hf(model.config),
                         family="llama", source="tiny-llama")
    short = tmp_path / "short.txt"
    short.write_text("too short")
    with pytest.raises(ValueError, match="tokens needed"):
        run_compare(loaded, CompareOptions(target_length=512, data=short, needles=4, progress=False),
                    tmp_path / "report")
    assert not (tmp_path / "report").exists() and list(tmp_path.iterdir()) == [short]


def test_plan_with_a_factors_file_adds_a_longrope_row(tmp_path):
    pairs = SMOLLM2_ROPE.rotary_dim // 2
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"short_factor": [1.0] * pairs, "long_factor": [1.0 + i / pairs for i in range(pairs)]}))
    plans = plan_methods(SMOLLM2_ROPE, 16384, factors_file=path, factors_source="searched")
    row = next(p for p in plans if p.method == "longrope")
    assert row.label == "longrope (searched)" and row.skipped is None
    assert row.rope.long_factor[-1] == pytest.approx(1.0 + (pairs - 1) / pairs) and row.rope.factor == 2.0


def test_a_longrope_recommendation_exports_with_its_factors_file(tiny_folder, tmp_path, monkeypatch):
    """Per-pair factors have no flag: the recommended export line carries the factors file, and it runs."""
    import shlex

    from transformers import AutoConfig

    from ropekit.cli import main
    from ropekit.evaluation.compare import export_command
    from ropekit.search.genome import method_factors

    base = RopeConfig.from_hf(AutoConfig.from_pretrained(tiny_folder))
    long_factor = list(method_factors(base, "yarn", 256)[0])
    path = tmp_path / "factors.json"
    path.write_text(json.dumps({"rope_type": "longrope", "short_factor": [1.0] * len(long_factor),
                                "long_factor": long_factor, "factor": 4.0, "original_max_position_embeddings": 64,
                                "max_position_embeddings": 256, "attention_factor": 1.0}))
    cfg = base.extend("longrope", 4.0, factors_file=path)
    command = export_command(str(tiny_folder), cfg, 256, factors_file=path)
    argv = shlex.split(command)
    assert argv[argv.index("--factors-file") + 1] == str(path.resolve())
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        main(argv[1:])
    assert done.value.code in (0, None)
    params = AutoConfig.from_pretrained(tmp_path / argv[argv.index("--out") + 1]).rope_parameters
    assert params["rope_type"] == "longrope" and list(params["long_factor"]) == pytest.approx(long_factor)
    # Without the file the line would not say which factors: it is only added when there are per-pair factors.
    assert "--factors-file" not in export_command(str(tiny_folder), base.extend("yarn", 4.0), 256, factors_file=path)
