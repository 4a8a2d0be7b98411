"""ropekit.search: the space (critical dimension, bounds, order), the seeds, the loop (cache, budget, exact resume),
a real search on a tiny model, and the CLI's checks before any load."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import ropekit.hf
from ropekit.config import RopeConfig
from ropekit.evaluation.data import Document
from ropekit.methods import frequencies
from ropekit.methods._common import default_inv_freq
from ropekit.search import (
    Evolution,
    FactorSpace,
    SearchOptions,
    SearchState,
    Settings,
    critical_dimension,
    factors_config,
    make_space,
    method_factors,
    search_factors,
    seed_factors,
    shipped_factors,
)
from ropekit.search.genome import GRID

DEMO_LIKE = RopeConfig(head_dim=64, base=1e5, original_max_position=8192, max_position=8192)


# ---------------------------------------------------------------------- critical dimension
@pytest.mark.parametrize("d, base, trained, expected", [
    (64, 1e5, 8192, 20),      # SmolLM2 (the demo): 12 genes of 32 pairs
    (96, 1e4, 2048, 31),      # Phi-3-mini
    (128, 5e5, 8192, 35),     # Llama-3-8B
])
def test_critical_dimension_known(d, base, trained, expected):
    assert critical_dimension(d, base, trained) == expected


@given(d=st.integers(2, 128).map(lambda x: 2 * x), log_base=st.floats(2.0, 7.0), trained=st.integers(16, 1 << 17))
@settings(max_examples=60, deadline=None)
def test_critical_dimension_is_first_pair_longer_than_trained(d, log_base, trained):
    base = 10.0 ** log_base
    cd = critical_dimension(d, base, trained)
    wavelength = [2 * math.pi * base ** (2 * i / d) for i in range(d // 2)]
    assert all(w < trained * (1 + 1e-9) for w in wavelength[:cd])
    assert all(w >= trained * (1 - 1e-9) for w in wavelength[cd:])


# ---------------------------------------------------------------------- mutation / crossover
def spaces():
    """Spaces of both refills over random geometries (the yarn refill from a real YaRN)."""
    @st.composite
    def build(draw):
        d = 2 * draw(st.integers(4, 64))
        trained = draw(st.sampled_from([64, 512, 4096, 8192]))
        s = draw(st.sampled_from([1.5, 2.0, 4.0, 8.0]))
        cfg = RopeConfig(head_dim=d, base=draw(st.sampled_from([1e4, 1e5, 5e5])), original_max_position=trained,
                         max_position=trained)
        refill = draw(st.sampled_from(["ntk", "yarn"]))
        genes = draw(st.sampled_from(["critical", "all"]))
        space = make_space(cfg, int(trained * s), genes=genes, refill=refill,
                           max_factor=draw(st.sampled_from([None, 3 * s])))
        return space
    return build()


def genome_in(space: FactorSpace, data) -> tuple:
    raw = data.draw(st.lists(st.floats(space.low, space.high), min_size=space.size, max_size=space.size))
    return space.project(raw)


def assert_valid(space: FactorSpace, genes) -> None:
    assert len(genes) == space.size
    assert all(space.low - 1e-9 <= g <= space.high + 1e-9 for g in genes), (genes, space.low, space.high)
    assert all(abs(g / GRID - round(g / GRID)) < 1e-6 for g in genes)
    full = space.factors(genes)
    assert len(full) == space.pairs
    assert all(a <= b + 1e-12 for a, b in zip(full, full[1:])), full
    assert space.valid(genes)


@given(space=spaces(), data=st.data(), seed=st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_mutation_keeps_order_and_bounds(space, data, seed):
    parent = genome_in(space, data)
    assert_valid(space, parent)
    rng = random.Random(seed)
    for _ in range(5):
        child = space.mutate(parent, rng)
        assert_valid(space, child)
        parent = child


@given(space=spaces(), data=st.data(), seed=st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_crossover_keeps_order_and_bounds(space, data, seed):
    a, b = genome_in(space, data), genome_in(space, data)
    child = space.crossover(a, b, random.Random(seed))
    if child is not None:
        assert_valid(space, child)
        assert all(c in (x, y) for c, x, y in zip(child, a, b))


def test_mutation_moves_a_flat_genome():
    """YaRN's genes all sit at the lower bound s: the first generation must still differ from it."""
    space = make_space(DEMO_LIKE, 16384, refill="yarn")
    yarn = space.genes_of(method_factors(DEMO_LIKE, "yarn", 16384)[0])
    assert set(yarn) == {2.0}
    rng = random.Random(0)
    children = {space.mutate(yarn, rng) for _ in range(20)}
    assert yarn not in children and len(children) == 20


def test_ntk_refill_contains_ntk():
    """LongRoPE2's refill is the NTK curve: NTK's own factors are a point of the (unbounded) space."""
    space = FactorSpace(pairs=32, first_gene=20, low=1.0, high=8.0, refill="ntk")
    ntk = method_factors(DEMO_LIKE, "ntk", 16384)[0]
    assert space.factors(ntk[20:]) == pytest.approx(ntk, rel=1e-12)


# ---------------------------------------------------------------------- seeds
@pytest.mark.parametrize("method", ["pi", "ntk", "yarn"])
def test_seed_factors_reproduce_the_method(method):
    """inv_freq / lambda_i of a seed is the method's own inv_freq (the factors are exact, not fitted)."""
    lam, scale = method_factors(DEMO_LIKE, method, 16384)
    cfg = DEMO_LIKE.extend({"pi": "linear"}.get(method, method), target_length=16384)
    ours = default_inv_freq(1e5, 64) / torch.tensor(lam, dtype=torch.float64)
    torch.testing.assert_close(ours, frequencies(cfg, 16384).inv_freq64, rtol=1e-13, atol=0)
    assert scale == pytest.approx(frequencies(cfg, 16384).attention_scale)


def fake_fitness(factors):
    """A cheap deterministic landscape with its optimum inside the space (for the loop's own tests)."""
    class F:
        def __init__(self, score):
            self.score = score

        def to_dict(self):
            return {"score": self.score}
    target = [1.0 + 0.09 * i for i in range(len(factors))]
    return F(sum((math.log(f) - math.log(t)) ** 2 for f, t in zip(factors, target)))


def small_space():
    cfg = RopeConfig(head_dim=32, base=1e4, original_max_position=256, max_position=256)
    return cfg, make_space(cfg, 1024, genes="all")


def test_generation_zero_starts_with_yarn_exactly():
    cfg, space = small_space()
    seeds = seed_factors(cfg, 1024)
    calls = []
    evo = Evolution(space, seeds, lambda f: calls.append(f) or fake_fitness(f), Settings(population=6, generations=1))
    evo.run()
    first = evo.state.log[0]
    assert first.origin == "seed:yarn" and first.factors == seeds["yarn"] and calls[0] == seeds["yarn"]
    assert [c.origin for c in evo.state.log[:3]] == ["seed:yarn", "seed:ntk", "seed:pi"]
    assert all(c.parents == [first.id] for c in evo.state.log[3:])


def test_yarn_seed_as_longrope_is_yarn(tiny_model):
    """The YaRN seed run through LongRoPE (factors + YaRN's attention factor) gives YaRN's own losses."""
    from tiny import byte_tokenizer

    from ropekit.evaluation.perplexity import rope_context, token_nll
    from ropekit.search import longrope_config

    model = tiny_model("llama")
    base = RopeConfig.from_hf(model.config)
    lam, scale = method_factors(base, "yarn", 512)
    ids = torch.tensor(byte_tokenizer()("def f(x):\n    return x + 1\n" * 30)["input_ids"][:400])
    with rope_context(model, longrope_config(base, 512, lam, scale)):
        ours = token_nll(model, ids)
    with rope_context(model, base.extend("yarn", target_length=512)):
        yarn = token_nll(model, ids)
    torch.testing.assert_close(ours, yarn, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------- the loop: cache, budget, resume
def run_loop(tmp_path, name, settings_, *, fail_after=None, resume=False):
    cfg, space = small_space()
    seeds = seed_factors(cfg, 1024)
    path = tmp_path / f"{name}.json"
    calls = []

    def evaluate(f):
        if fail_after is not None and len(calls) >= fail_after:
            raise KeyboardInterrupt("interrupted")
        calls.append(f)
        return fake_fitness(f)

    state = SearchState.load(path) if resume else None
    evo = Evolution(space, seeds, evaluate, settings_, state_path=path, state=state)
    return evo, evo.run(), calls


def summary(evo):
    return ([(c.id, c.origin, c.parents, c.factors, c.fitness) for c in evo.state.log], evo.state.history,
            evo.state.forwards)


def test_resume_after_interruption_equals_uninterrupted(tmp_path):
    s = Settings(population=6, generations=5, patience=5, seed=3)
    whole, best, calls = run_loop(tmp_path, "whole", s)
    assert len(calls) == whole.state.forwards > 6
    for cut in (1, 4, 7, 11):  # inside generation 0, at its end, inside later generations
        with pytest.raises(KeyboardInterrupt):
            run_loop(tmp_path, f"cut{cut}", s, fail_after=cut)
        resumed, best2, calls2 = run_loop(tmp_path, f"cut{cut}", s, resume=True)
        assert summary(resumed) == summary(whole)
        assert (best2.id, best2.factors) == (best.id, best.factors)
        # Only what the interrupted run had not evaluated is evaluated now.
        assert len(calls2) == len(calls) - cut


def test_cache_prevents_reevaluation(tmp_path):
    s = Settings(population=6, generations=4, patience=4, seed=1)
    evo, _, calls = run_loop(tmp_path, "a", s)
    keys = [",".join(f"{x:.9g}" for x in f) for f in calls]
    assert len(keys) == len(set(keys)) == len(evo.state.cache)
    # A finished search resumed with the same settings evaluates nothing.
    _, _, again = run_loop(tmp_path, "a", s, resume=True)
    assert again == []


def test_budget_cut_then_larger_budget_equals_larger_run(tmp_path):
    small = Settings(population=6, generations=5, patience=5, seed=2, budget=8)
    large = Settings(population=6, generations=5, patience=5, seed=2, budget=13)
    cut, _, calls = run_loop(tmp_path, "cut", small)
    assert len(calls) == 8 and cut.state.stopped == "budget"
    continued, _, more = run_loop(tmp_path, "cut", large, resume=True)
    straight, _, _ = run_loop(tmp_path, "straight", large)
    assert len(more) == 5
    assert summary(continued) == summary(straight)


def test_search_is_deterministic_and_improves_on_the_landscape(tmp_path):
    s = Settings(population=8, generations=8, patience=8, seed=5)
    a, best_a, _ = run_loop(tmp_path, "x", s)
    b, best_b, _ = run_loop(tmp_path, "y", s)
    assert summary(a) == summary(b)
    seeds = [c.score for c in a.state.log if c.origin.startswith("seed:")]
    assert best_a.score < min(seeds)
    assert [h["best_score"] for h in a.state.history] == sorted((h["best_score"] for h in a.state.history),
                                                                reverse=True)


# ---------------------------------------------------------------------- a real search on a tiny model
@pytest.fixture(scope="module")
def tiny_loaded(tiny_folder):
    from ropekit.hf import load_model

    return load_model(str(tiny_folder), device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def tiny_text(stdlib_text):
    return [Document("stdlib-sample", stdlib_text[:20000])]


def test_tiny_search_improves_over_seeds_and_writes_outputs(tiny_loaded, tiny_text, tmp_path):
    options = SearchOptions(target_length=512, budget=12, population=6, generations=4, patience=4, needles=2,
                            genes="all")
    result = search_factors(tiny_loaded, options, tmp_path / "out", documents=tiny_text, progress=False,
                            model_name="tiny")
    rec = result.factors["search"]
    assert result.forwards <= 12
    assert result.best.score < min(v["score"] for v in rec["seeds"].values())
    assert rec["improvement_over_yarn"] > 0
    out = tmp_path / "out"
    for name in ("factors.json", "search-log.json", "progress.png", "factors.png", "search-state.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "search-log.json").read_text())
    assert len(log["candidates"]) == result.forwards - 1  # the guard's reference is the other forward
    assert all("parents" in c and c["fitness"]["score"] == c["fitness"]["score"] for c in log["candidates"])
    # factors.json is what --factors-file reads, and the best candidate scores the same when re-applied.
    cfg = tiny_loaded.rope.extend("longrope", target_length=512, factors_file=out / "factors.json")
    assert cfg.long_factor == tuple(result.best.factors) and set(cfg.short_factor) == {1.0}
    assert cfg == factors_config(tiny_loaded, result.factors)
    assert cfg.to_hf()["rope_parameters"]["rope_type"] == "longrope"


def test_cli_search_resume_and_export(tiny_folder, tmp_path):
    """The CLI end to end (tiny budget): a search, a refusal to start over, --resume with a larger budget, and a
    longrope checkpoint plain transformers loads."""
    from transformers import AutoModelForCausalLM

    from ropekit.cli import build_app

    runner = CliRunner()
    out, export = tmp_path / "s", tmp_path / "ckpt"
    args = ["search", str(tiny_folder), "--target-length", "512", "--out", str(out), "--needles", "2",
            "--population", "4", "--generations", "3", "--quiet"]
    first = runner.invoke(build_app(), args + ["--budget", "4"])
    assert first.exit_code == 0, first.output
    assert json.loads((out / "factors.json").read_text())["search"]["stopped"] == "budget"
    again = runner.invoke(build_app(), args + ["--budget", "4"])
    assert again.exit_code == 2 and "--resume" in again.stderr
    more = runner.invoke(build_app(), args + ["--budget", "7", "--resume", "--export", str(export)])
    assert more.exit_code == 0, more.output
    data = json.loads((out / "factors.json").read_text())
    assert data["search"]["forwards"] == 7
    config = json.loads((export / "config.json").read_text())
    assert config["rope_parameters"]["rope_type"] == "longrope"
    assert config["rope_parameters"]["long_factor"] == pytest.approx(data["long_factor"])
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.max_position_embeddings == 512


# ---------------------------------------------------------------------- CLI checks before any load
@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    monkeypatch.setattr(ropekit.hf, "load_model", refuse)


@pytest.mark.parametrize("extra, option", [
    (["--target-length", "64"], "--target-length"),
    (["--target-length", "512", "--genes", "some"], "--genes"),
    (["--target-length", "512", "--refill", "pi"], "--refill"),
    (["--target-length", "512", "--population", "1"], "--population"),
    (["--target-length", "512", "--budget", "1"], "--budget"),
    (["--target-length", "512", "--max-factor", "2"], "--max-factor"),
    (["--target-length", "512", "--data", "/no/such/text"], "--data"),
    (["--target-length", "512", "--resume"], "--resume"),
    (["--target-length", "512", "--tolerance", "-1"], "--tolerance"),
])
def test_cli_bad_input_is_one_line_before_any_load(tiny_folder, tmp_path, no_loading, extra, option):
    from ropekit.cli import build_app

    result = CliRunner().invoke(build_app(), ["search", str(tiny_folder), "--out", str(tmp_path / "o"), *extra])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}"), result.stderr


def test_cli_refuses_a_folder_of_other_files(tiny_folder, tmp_path, no_loading):
    from ropekit.cli import build_app

    (tmp_path / "mine.txt").write_text("keep")
    result = CliRunner().invoke(build_app(), ["search", str(tiny_folder), "--target-length", "512", "--out",
                                              str(tmp_path)])
    assert result.exit_code == 2 and result.stderr.startswith("error: --out")
    assert (tmp_path / "mine.txt").read_text() == "keep"


# ---------------------------------------------------------------------- shipped factors
def test_shipped_factors_lookup(tmp_path):
    data = {"rope_type": "longrope", "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
            "max_position_embeddings": 16384, "search": {"model": "demo"}}
    (tmp_path / "smollm2.json").write_text(json.dumps(data))
    assert shipped_factors("demo", 16384, tmp_path) == tmp_path / "smollm2.json"
    assert shipped_factors(None, 16384, tmp_path) == tmp_path / "smollm2.json"
    assert shipped_factors("demo", 32768, tmp_path) is None
    assert shipped_factors("someone/else", 16384, tmp_path) is None
    assert shipped_factors("demo", 16384, tmp_path / "missing") is None
