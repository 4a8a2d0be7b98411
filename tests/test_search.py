"""ropekit.search: the space (critical dimension, bounds, order), the seeds, the loop (cache, budget, exact resume),
a real search on a tiny model, and the CLI's checks before any load."""

from __future__ import annotations

import json
from pathlib import Path
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
from ropekit.output import record
from ropekit.search import (
    AttentionSpace,
    Evolution,
    FactorSpace,
    NeedleFitness,
    SearchOptions,
    SearchState,
    Settings,
    critical_dimension,
    factors_config,
    make_attention_space,
    make_space,
    method_factors,
    search_factors,
    seed_attentions,
    seed_factors,
    shipped_factors,
)
from ropekit.search.genome import ATTENTION_GRID, GRID

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
    (["--target-length", "512", "--search-attention", "--attention-factor", "1.1"], "--search-attention"),
    (["--target-length", "512", "--search-attention", "--short-tolerance", "-0.1"], "--short-tolerance"),
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


def test_the_demo_search_ships_inside_the_package():
    """searches/*.json reach the package through ropekit/search/shipped (package data in pyproject.toml), so
    an installed ropekit, not only a checkout, finds the demo's factors."""
    import ropekit.search.run as run

    assert run.SHIPPED_DIR.parent == Path(run.__file__).resolve().parent
    path = shipped_factors("demo", 16384)
    assert path is not None and path.name == "smollm2-135m-16k.json"
    data = json.loads(path.read_text())
    assert len(data["long_factor"]) == len(data["short_factor"]) == 32
    assert data["search"]["model"] == "demo" and data["max_position_embeddings"] == 16384
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"ropekit.search" = ["shipped/*.json"]' in pyproject


# ---------------------------------------------------------------------- the attention factor as a gene
def attention_spaces():
    """``spaces()`` with the attention gene, at the space's own scale or with random bounds."""
    @st.composite
    def build(draw):
        inner = draw(spaces())
        scale = draw(st.sampled_from([1.5, 2.0, 4.0, 8.0]))
        if draw(st.booleans()):
            return make_attention_space(inner, scale)
        low = draw(st.floats(0.5, 1.5))
        return make_attention_space(inner, scale, low=low, high=low + draw(st.floats(0.005, 0.5)),
                                    step=draw(st.sampled_from([0.005, 0.02, 0.1])))
    return build()


def attention_genome_in(space: AttentionSpace, data) -> tuple:
    factors = genome_in(space.inner, data)
    return factors + (space.project_attention(data.draw(st.floats(space.low, space.high))),)


def assert_valid_attention(space: AttentionSpace, genes) -> None:
    assert len(genes) == space.size == space.inner.size + 1
    assert_valid(space.inner, genes[:-1])  # factors: bounds, grid, order
    attention = genes[-1]
    assert space.low - 1e-9 <= attention <= space.high + 1e-9, (attention, space.low, space.high)
    assert abs(attention / ATTENTION_GRID - round(attention / ATTENTION_GRID)) < 1e-6, attention
    vector = space.factors(genes)
    assert len(vector) == space.pairs + 1 and vector[-1] == attention
    assert space.valid(genes)


# Both kinds of space: (space strategy, a valid genome in it, the validity check).
SPACE_KINDS = {"factors": (spaces, genome_in, assert_valid),
               "factors+attention": (attention_spaces, attention_genome_in, assert_valid_attention)}


@pytest.mark.parametrize("kind", SPACE_KINDS)
@given(data=st.data(), seed=st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_mutation_keeps_order_and_bounds(kind, data, seed):
    make_space_strategy, genome, check = SPACE_KINDS[kind]
    space = data.draw(make_space_strategy())
    parent = genome(space, data)
    check(space, parent)
    rng = random.Random(seed)
    for _ in range(5):
        child = space.mutate(parent, rng)
        check(space, child)
        parent = child


@pytest.mark.parametrize("kind", SPACE_KINDS)
@given(data=st.data(), seed=st.integers(0, 2**31))
@settings(max_examples=50, deadline=None)
def test_crossover_keeps_order_and_bounds(kind, data, seed):
    make_space_strategy, genome, check = SPACE_KINDS[kind]
    space = data.draw(make_space_strategy())
    a, b = genome(space, data), genome(space, data)
    child = space.crossover(a, b, random.Random(seed))
    if child is not None:
        check(space, child)
        assert all(c in (x, y) for c, x, y in zip(child, a, b))


@given(space=attention_spaces(), data=st.data())
@settings(max_examples=40, deadline=None)
def test_attention_space_projects_any_vector(space, data):
    """A vector from anywhere (a seed outside the bounds) has valid genes."""
    factors = data.draw(st.lists(st.floats(0.5, 20.0), min_size=space.pairs, max_size=space.pairs))
    attention = data.draw(st.floats(0.1, 3.0))
    assert_valid_attention(space, space.genes_of(tuple(factors) + (attention,)))


def test_attention_gene_moves_and_spreads():
    """Mutations of YaRN's genome move the attention too (about p_mutate of them), both ways, on its grid."""
    inner = make_space(DEMO_LIKE, 16384, refill="yarn")
    space = make_attention_space(inner, 2.0)
    assert (space.low, space.high) == (1.0, pytest.approx(1 + 0.2 * math.log(2)))
    yarn = space.genes_of(method_factors(DEMO_LIKE, "yarn", 16384)[0] + (method_factors(DEMO_LIKE, "yarn", 16384)[1],))
    assert yarn[-1] == 1.07  # YaRN's 1.0693 on the grid
    rng = random.Random(0)
    attentions = [space.mutate(yarn, rng)[-1] for _ in range(400)]
    moved = [a for a in attentions if a != yarn[-1]]
    assert 0.15 < len(moved) / len(attentions) < 0.45
    assert min(moved) < 1.07 < max(moved) and max(moved) <= space.high


def test_same_factors_with_two_attentions_are_two_genomes():
    """The cache key covers the whole vector: equal factors with two attention values are both evaluated."""
    cfg, inner = small_space()
    space = make_attention_space(inner, 4.0)
    yarn = seed_factors(cfg, 1024)["yarn"]
    calls = []

    def evaluate(vector):
        calls.append(vector)
        return fake_fitness(vector[:-1])

    evo = Evolution(space, {"yarn": yarn + (1.1,), "pi": yarn + (1.0,)}, evaluate, Settings(population=2,
                                                                                           generations=1))
    evo.run()
    assert calls == [yarn + (1.1,), yarn + (1.0,)]
    assert len(evo.state.cache) == 2


def test_attention_seeds():
    """Each seed carries its method's attention: YaRN's 0.1 ln s + 1, 1.0 for PI and NTK, a LongRoPE model's own."""
    att = seed_attentions(DEMO_LIKE, 16384)
    assert att == {"yarn": pytest.approx(1 + 0.1 * math.log(2), rel=1e-12), "ntk": 1.0, "pi": 1.0}
    own = RopeConfig(head_dim=8, base=1e4, original_max_position=64, max_position=256, method="longrope",
                     short_factor=(1.0,) * 4, long_factor=(1.0, 2.0, 3.0, 4.0), attention_factor=1.25)
    assert seed_attentions(own, 256)["own"] == 1.25


# ---- on a tiny model whose first L = 256 tokens hold text (the short-context guard can measure)
TINY_L = 256


@pytest.fixture(scope="module")
def tiny256_folder(tmp_path_factory):
    from tiny import byte_tokenizer, make_tiny_model

    folder = tmp_path_factory.mktemp("tiny-llama-256")
    make_tiny_model("llama", max_position_embeddings=TINY_L).save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny256(tiny256_folder):
    from ropekit.hf import load_model

    return load_model(str(tiny256_folder), device="cpu", dtype="float32")


def tiny256_fitness(tiny256, tiny_text, **kwargs) -> NeedleFitness:
    fitness = NeedleFitness(tiny256.model, tiny256.tokenizer, tiny256.rope, 512, documents=tiny_text, needles=2,
                            **kwargs)
    assert fitness.guarded and fitness.trained == TINY_L
    return fitness


def test_short_nll_at_attention_one_is_the_reference(tiny256, tiny_text):
    """At <= L tokens longrope uses the short factors (all 1): with attention 1.0 it is the unscaled model, so the
    reference stands for it (no forward); other values need one forward each, whatever the long factors."""
    fitness = tiny256_fitness(tiny256, tiny_text)
    reference = fitness.measure_reference()
    pairs = tiny256.rope.rotary_dim // 2
    measured = fitness.measure_short(1.0, [2.0] * pairs)  # a real forward under ropekit's longrope
    assert measured == pytest.approx(reference, rel=1e-6, abs=1e-6)
    assert fitness.short_nll(1.0) == reference and fitness.short_forwards == 0
    # Only the attention reaches L tokens: the long factors do not change the short-context NLL.
    scaled = fitness.measure_short(1.3, [2.0] * pairs)
    assert fitness.measure_short(1.3, [4.0] * pairs) == scaled
    assert abs(scaled - reference) > 1e-4  # the attention factor does reach short sequences


def test_short_guard_in_evaluate(tiny256, tiny_text):
    """evaluate() adds the short-context measurement of the candidate's attention to the score with the short
    guard, and only reports nothing without it (the score stays the old one)."""
    pairs = tiny256.rope.rotary_dim // 2
    factors = [2.0] * pairs
    guarded = tiny256_fitness(tiny256, tiny_text, short_guard=True, short_tolerance=0.0)
    high, one = guarded.evaluate(factors, 1.3), guarded.evaluate(factors, 1.0)
    assert high.short_nll == guarded.measure_short(1.3)
    assert high.short_ratio == pytest.approx(math.exp(high.short_nll - guarded.reference_nll), rel=1e-12)
    assert high.short_ratio != 1.0
    # This random model's direction is arbitrary (test_short_guard_on_smollm2 has a real one); the rule is not.
    assert high.short_penalty == pytest.approx(10.0 * max(0.0, math.log(high.short_ratio)), abs=1e-12)
    assert one.short_ratio == 1.0 and one.short_penalty == 0.0
    plain = tiny256_fitness(tiny256, tiny_text)
    plain.reference_nll = guarded.reference_nll
    unguarded = plain.evaluate(factors, 1.3)
    assert unguarded.short_nll is None and unguarded.short_penalty == 0.0
    assert high.score == pytest.approx(unguarded.score + high.short_penalty, abs=1e-9)


@pytest.mark.slow
def test_short_guard_on_smollm2(smollm2, stdlib_text):
    """On a real model (SmolLM2, its trained length taken as 256 to keep the forwards short) an attention far
    above 1 costs short-context perplexity and is penalised; 1.0 is free. YaRN's 0.1 ln 2 + 1 costs too."""
    base = smollm2.rope.replace(original_max_position=256)
    fitness = NeedleFitness(smollm2.model, smollm2.tokenizer, base, 512, documents=[
        Document("stdlib-sample", stdlib_text[:20000])], needles=2, short_guard=True, short_tolerance=0.01)
    assert fitness.guarded
    high = fitness.evaluate([2.0] * (base.rotary_dim // 2), 1.3)
    assert high.short_ratio > 1.1 and high.short_penalty > 0.5 and high.penalty >= high.short_penalty
    flat = torch.full((fitness.length - 1,), 2.0, dtype=torch.float64)
    assert fitness.score(flat, short_nll=fitness.short_nll(1.0)).short_penalty == 0.0
    assert fitness.short_nll(1 + 0.1 * math.log(2)) > fitness.reference_nll
    assert fitness.short_forwards == 2  # 1.3 and YaRN's value; 1.0 is the reference


def test_short_guard_tolerance_arithmetic(tiny256, tiny_text):
    """A short-context ratio of 1.03 with a 1% tolerance costs guard_weight x ln(1.03 / 1.01); 1.005 costs
    nothing; without the guard a measured ratio changes no score bit."""
    fitness = tiny256_fitness(tiny256, tiny_text, short_guard=True, short_tolerance=0.01)
    fitness.reference_nll = 2.0
    nll = torch.full((fitness.length - 1,), 2.0, dtype=torch.float64)  # the in-sequence guard sees ratio 1
    assert fitness.score(nll, short_nll=2.0 + math.log(1.03)).short_penalty == pytest.approx(
        10.0 * math.log(1.03 / 1.01), rel=1e-12)
    assert fitness.score(nll, short_nll=2.0 + math.log(1.005)).short_penalty == 0.0
    plain = tiny256_fitness(tiny256, tiny_text)
    plain.reference_nll = 2.0
    assert plain.score(nll, short_nll=5.0).score == plain.score(nll).score == 4.0
    assert plain.score(nll, short_nll=5.0).short_ratio == pytest.approx(math.exp(3.0))


def test_short_nll_cached_per_attention_value(tiny256, tiny_text, monkeypatch):
    fitness = tiny256_fitness(tiny256, tiny_text, short_guard=True)
    measured = []
    real = NeedleFitness.measure_short

    def counting(self, attention, long_factor=None):
        measured.append(attention)
        return real(self, attention, long_factor)

    monkeypatch.setattr(NeedleFitness, "measure_short", counting)
    pairs = tiny256.rope.rotary_dim // 2
    a = fitness.evaluate([2.0] * pairs, 1.05)
    b = fitness.evaluate([2.5] * pairs, 1.05)
    c = fitness.evaluate([2.0] * pairs, 1.1)
    fitness.evaluate([3.0] * pairs, 1.0)  # the reference: no forward
    assert measured == [1.05, 1.1] and fitness.short_forwards == 2
    assert a.short_nll == b.short_nll != c.short_nll
    assert a.score != b.score  # the long factors still matter at N


def strip_times(obj):
    """A search record without its wall-clock fields (the only ones a resumed run may change)."""
    if isinstance(obj, dict):
        return {k: strip_times(v) for k, v in obj.items() if k not in ("seconds", "wall_seconds_this_run")}
    if isinstance(obj, list):
        return [strip_times(v) for v in obj]
    return obj


def attention_search(tiny256, tiny_text, out, **kwargs):
    options = SearchOptions(target_length=512, population=4, generations=3, patience=3, needles=2, genes="all",
                            search_attention=True)
    return search_factors(tiny256, options, out, documents=tiny_text, progress=False, model_name="tiny256", **kwargs)


def test_attention_search_seeds_and_result(tiny256, tiny_text, tmp_path):
    result = attention_search(tiny256, tiny_text, tmp_path / "s")
    pairs = tiny256.rope.rotary_dim // 2
    log = json.loads((tmp_path / "s" / "search-log.json").read_text())["candidates"]
    yarn, yarn_attention = method_factors(tiny256.rope, "yarn", 512)
    assert log[0]["origin"] == "seed:yarn" and tuple(log[0]["factors"]) == yarn + (yarn_attention,)
    seeds = {c["origin"]: c["factors"][-1] for c in log if c["origin"].startswith("seed:")}
    assert seeds == {"seed:yarn": yarn_attention, "seed:ntk": 1.0, "seed:pi": 1.0}
    assert all(len(c["factors"]) == pairs + 1 and c["fitness"]["short_ratio"] is not None for c in log)
    rec = result.factors["search"]
    assert rec["attention"]["searched"] and rec["attention"]["low"] == 1.0
    assert result.factors["attention_factor"] == result.best.factors[-1]
    assert result.factors["long_factor"] == list(result.best.factors[:pairs])
    # One L-token forward per distinct attention value other than 1.0.
    assert rec["short_forwards"] == len({c["factors"][-1] for c in log} - {1.0}) >= 2
    assert result.forwards == len(log) + 1


def test_fixed_attention_reports_its_short_ratio(tiny256, tiny_text, tmp_path):
    options = SearchOptions(target_length=512, budget=4, population=4, generations=2, needles=2, genes="all")
    rec = search_factors(tiny256, options, None, documents=tiny_text, progress=False).factors["search"]
    att = rec["attention"]
    assert not att["searched"] and att["attention_factor"] == pytest.approx(1 + 0.1 * math.log(2))
    assert rec["short_forwards"] == 1 and att["short_ratio"] != 1.0 and att["short_ratio"] > 0
    assert rec["forwards"] == 4
    assert all(v["short_nll"] is None for v in rec["seeds"].values())  # no per-candidate measurement


def test_attention_search_resume_equals_uninterrupted(tiny256, tiny_text, tmp_path, monkeypatch):
    measured = []
    real_short, real_evaluate = NeedleFitness.measure_short, NeedleFitness.evaluate
    monkeypatch.setattr(NeedleFitness, "measure_short",
                        lambda self, *a, **k: measured.append(a[0]) or real_short(self, *a, **k))
    whole = attention_search(tiny256, tiny_text, tmp_path / "whole")
    whole_measured = list(measured)
    whole_log = json.loads((tmp_path / "whole" / "search-log.json").read_text())
    assert len(whole_log["candidates"]) > 6
    for cut in (2, 6):  # inside generation 0, inside a later generation
        calls = []

        def interrupted(self, *a, **k):
            if len(calls) >= cut:
                raise KeyboardInterrupt("interrupted")
            calls.append(a)
            return real_evaluate(self, *a, **k)

        measured.clear()
        monkeypatch.setattr(NeedleFitness, "evaluate", interrupted)
        with pytest.raises(KeyboardInterrupt):
            attention_search(tiny256, tiny_text, tmp_path / f"cut{cut}")
        monkeypatch.setattr(NeedleFitness, "evaluate", real_evaluate)
        resumed = attention_search(tiny256, tiny_text, tmp_path / f"cut{cut}", resume=True)
        log = json.loads((tmp_path / f"cut{cut}" / "search-log.json").read_text())
        assert strip_times(log) == strip_times(whole_log)
        assert strip_times(resumed.factors) == strip_times(whole.factors)
        # The short-context NLLs measured before the cut come back from the cache, not from new forwards.
        assert sorted(measured) == sorted(whole_measured)


def test_resume_refuses_to_switch_the_attention_search_on(tiny256, tiny_text, tmp_path):
    """A search of the factors alone (even one from before --search-attention existed) is not continued as an
    attention search."""
    options = SearchOptions(target_length=512, budget=3, population=4, generations=2, needles=2, genes="all")
    search_factors(tiny256, options, tmp_path / "s", documents=tiny_text, progress=False, model_name="tiny256")
    state = json.loads((tmp_path / "s" / "search-state.json").read_text())
    del state["fingerprint"]["search_attention"]  # as written before the option existed
    (tmp_path / "s" / "search-state.json").write_text(json.dumps(state))
    record(tmp_path / "s", ["search-state.json"], "search")  # by that ropekit, which recorded its file
    with pytest.raises(ValueError, match="search_attention"):
        attention_search(tiny256, tiny_text, tmp_path / "s", resume=True)
    # The same search continues without it.
    search_factors(tiny256, SearchOptions(**{**options.__dict__, "budget": 4}), tmp_path / "s",
                   documents=tiny_text, progress=False, model_name="tiny256", resume=True)


def test_resume_of_an_older_state_refuses_another_mutation_step(tiny256, tiny_text, tmp_path):
    """A state from before --mutation-step existed was searched with steps of 0.15: only that continues it."""
    options = SearchOptions(target_length=512, budget=3, population=4, generations=2, needles=2, genes="all")
    search_factors(tiny256, options, tmp_path / "s", documents=tiny_text, progress=False, model_name="tiny256")
    state = json.loads((tmp_path / "s" / "search-state.json").read_text())
    del state["fingerprint"]["mutation_step"]  # as written before the option existed
    (tmp_path / "s" / "search-state.json").write_text(json.dumps(state))
    record(tmp_path / "s", ["search-state.json"], "search")  # by that ropekit, which recorded its file
    with pytest.raises(ValueError, match="mutation_step"):
        search_factors(tiny256, SearchOptions(**{**options.__dict__, "budget": 4, "mutation_step": 0.06}),
                       tmp_path / "s", documents=tiny_text, progress=False, model_name="tiny256", resume=True)
    search_factors(tiny256, SearchOptions(**{**options.__dict__, "budget": 4}), tmp_path / "s",
                   documents=tiny_text, progress=False, model_name="tiny256", resume=True)


def test_cli_search_attention_end_to_end(tiny256_folder, tmp_path):
    """--search-attention through the CLI: factors.json's attention_factor is within the bounds, and ropekit's
    RopeConfig and plain transformers (an exported checkpoint) both take it."""
    from transformers import AutoModelForCausalLM

    from ropekit.cli import build_app

    out, export = tmp_path / "s", tmp_path / "ckpt"
    result = CliRunner().invoke(build_app(), [
        "search", str(tiny256_folder), "--target-length", "512", "--out", str(out), "--needles", "2", "--genes",
        "all", "--population", "4", "--generations", "2", "--search-attention", "--quiet", "--export", str(export)])
    assert result.exit_code == 0, result.output
    assert "attention factor" in result.output and "searched in [1.0000, 1.1386]" in result.output
    data = json.loads((out / "factors.json").read_text())
    attention = data["attention_factor"]
    assert 1.0 <= attention <= 1 + 0.2 * math.log(2)
    assert data["search"]["attention"]["searched"] is True and data["search"]["settings"]["search_attention"]
    base = RopeConfig.from_hf(AutoModelForCausalLM.from_pretrained(tiny256_folder).config)
    cfg = base.extend("longrope", target_length=512, factors_file=out / "factors.json")
    assert cfg.attention_factor == attention and cfg.long_factor == tuple(data["long_factor"])
    assert len(data["long_factor"]) == base.rotary_dim // 2
    model = AutoModelForCausalLM.from_pretrained(export)
    assert model.config.rope_parameters["rope_type"] == "longrope"
    assert model.model.rotary_emb.attention_scaling == pytest.approx(attention)


def test_cli_search_attention_with_attention_factor_names_both(tiny_folder, tmp_path, no_loading):
    from ropekit.cli import build_app

    result = CliRunner().invoke(build_app(), ["search", str(tiny_folder), "--target-length", "512", "--out",
                                              str(tmp_path / "o"), "--search-attention", "--attention-factor", "1.1"])
    assert result.exit_code == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --search-attention") and "--attention-factor" in lines[0]
    assert not (tmp_path / "o").exists()


def test_cli_search_attention_needs_text_below_the_trained_length(tiny_folder, tmp_path):
    """The tiny model's L = 64 tokens hold only the haystack's instructions: no guard, so no attention search."""
    from ropekit.cli import build_app

    result = CliRunner().invoke(build_app(), ["search", str(tiny_folder), "--target-length", "512", "--out",
                                              str(tmp_path / "o"), "--needles", "2", "--search-attention", "--quiet"])
    assert result.exit_code == 2
    last = result.stderr.strip().splitlines()[-1]  # after the loader's progress bar
    assert last.startswith("error: --search-attention: the haystack has no scored text"), result.stderr
    assert not (tmp_path / "o" / "search-state.json").exists()
