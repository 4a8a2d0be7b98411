"""``search_factors``: the whole search on a loaded model, with its output folder (``shipped_factors`` lives in
``ropekit.shipped``, below evaluation; re-exported here)."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

from ropekit.evaluation.data import Document
from ropekit.hf.load import LoadedModel
from ropekit.output import check_output_dir, place_own, write_own
from ropekit.search.evolution import Candidate, Evolution, SearchState, Settings
from ropekit.search.fitness import NeedleFitness, longrope_config
from ropekit.search.genome import (
    ATTENTION_GRID,
    make_attention_space,
    make_space,
    method_factors,
    seed_attentions,
    seed_factors,
)
from ropekit.shipped import SHIPPED_DIR, shipped_factors  # noqa: F401 - re-exported: users import them here

STATE_FILE = "search-state.json"
LOG_FILE = "search-log.json"
FACTORS_FILE = "factors.json"
PROGRESS_PLOT = "progress.png"
FACTORS_PLOT = "factors.png"
OUTPUT_FILES = (STATE_FILE, LOG_FILE, FACTORS_FILE, PROGRESS_PLOT, FACTORS_PLOT)
COMMAND = "search"


@dataclass
class SearchOptions:
    """The search's knobs (the CLI's options); see ``search_factors``.

    ``search_attention``: search the attention factor as one more gene (``genome.AttentionSpace``), guarded by
    the short-context ratio (``short_tolerance``); excludes ``attention_factor``.
    """

    target_length: int
    budget: int | None = None
    population: int = 8
    generations: int = 5
    patience: int = 3
    seed: int = 0
    needles: int = 32
    genes: str = "critical"
    refill: str = "ntk"
    max_factor: float | None = None
    mutation_step: float = 0.15
    attention_factor: float | None = None
    search_attention: bool = False
    short_tolerance: float = 0.01
    tolerance: float = 0.05
    text_weight: float = 1.0
    guard_weight: float = 10.0
    chunk_size: int = 1024


@dataclass
class SearchResult:
    best: Candidate
    factors: dict[str, Any]  # the factors.json content
    out: Path | None
    stopped: str | None
    forwards: int
    seconds: float


def check_search_folder(out: str | Path, *, resume: bool, overwrite: bool, option: str = "--out") -> Path:
    """The output folder's checks, before any model loads: a folder holding a search needs ``resume`` (or
    ``overwrite`` to start over); ``resume`` needs one."""
    from ropekit.output import OutputError

    state = Path(out).expanduser() / STATE_FILE
    if resume and not state.is_file():
        raise OutputError(f"--resume: {out} holds no search to continue ({STATE_FILE} not found)")
    if resume:
        try:
            SearchState.load(state)  # ropekit's own, readable: checked before any model loads
        except ValueError as exc:
            raise OutputError(f"--resume:{str(exc).partition(':')[2]}") from None
    path = check_output_dir(out, option=option, overwrite=overwrite, names=OUTPUT_FILES)
    if state.is_file() and not resume and not overwrite:
        raise OutputError(f"{option}: {out} holds a search ({STATE_FILE}); pass --resume to continue it, "
                          f"--overwrite to start it over, or choose a new folder")
    return path


def search_factors(loaded: LoadedModel, options: SearchOptions, out: str | Path | None = None, *,
                   documents: Iterable[Document] | None = None, data_name: str = "stdlib",
                   model_name: str = "", resume: bool = False, overwrite: bool = False,
                   progress: bool = True, command: str | None = None) -> SearchResult:
    """Search LongRoPE long factors for ``loaded`` at ``options.target_length``.

    Args:
        loaded: ``ropekit.hf.load_model(...)``.
        options: ``SearchOptions``.
        out: output folder (checkpoint, log, factors.json, plots); None: nothing written (no resume).
        documents: the text of the fitness haystack (default: the standard library, largest files first).
        resume: continue the search checkpointed in ``out`` (its settings must match, budget and generations
            may grow).
    Returns:
        ``SearchResult``; ``factors`` is what ``factors.json`` holds (HF longrope form plus a ``search`` record).

    With ``options.search_attention`` a candidate's vector is (pairs factors..., attention) and the best one's
    last number becomes ``attention_factor``. The budget counts the guard's reference and the candidates'
    N-token forwards; the short-context L-token forwards (one per distinct attention value) are counted apart
    (``short_forwards``).
    """
    started = time.perf_counter()
    base = loaded.rope
    trained = base.require_trained_length()
    n = int(options.target_length)
    if n <= trained:
        raise ValueError(f"target_length: must be > the trained length {trained}, got {n}")
    if options.search_attention and options.attention_factor is not None:
        raise ValueError("search_attention: searches the attention factor; it cannot be fixed (attention_factor) "
                         "as well")
    out_path = None
    if out is not None:
        out_path = check_search_folder(out, resume=resume, overwrite=overwrite)
    factor_space = make_space(base, n, genes=options.genes, refill=options.refill, max_factor=options.max_factor,
                              mutation_step=options.mutation_step)
    pairs = factor_space.pairs
    seeds = seed_factors(base, n)
    yarn_attention = method_factors(base, "yarn", n)[1]
    attention = yarn_attention if options.attention_factor is None else float(options.attention_factor)
    fitness = NeedleFitness(loaded.model, loaded.tokenizer, base, n, documents=documents, needles=options.needles,
                            seed=options.seed, tolerance=options.tolerance, guard_weight=options.guard_weight,
                            text_weight=options.text_weight, short_guard=options.search_attention,
                            short_tolerance=options.short_tolerance, chunk_size=options.chunk_size)
    if options.search_attention:
        space = make_attention_space(factor_space, n / trained)
        # Each seed with its own method's attention (YaRN's keeps YaRN, individual 0, exactly YaRN).
        seed_attention = seed_attentions(base, n)
        seeds = {name: tuple(f) + (seed_attention[name],) for name, f in seeds.items()}

        def evaluate(vector):
            return fitness.evaluate(vector[:pairs], vector[pairs])
    else:
        space = factor_space

        def evaluate(factors):
            return fitness.evaluate(factors, attention)
    # What the cached scores depend on: a resumed search must score the same haystack the same way.
    fingerprint = {"model": model_name or loaded.source, "rope": base.to_dict(), "data": data_name,
                   "documents": fitness.documents, "haystack_tokens": fitness.length,
                   "haystack_sha256": hashlib.sha256(fitness.input_ids.numpy().tobytes()).hexdigest(),
                   "attention_factor": attention, "dtype": str(loaded.dtype).replace("torch.", ""),
                   **{k: v for k, v in asdict(options).items() if k not in ("budget", "generations", "patience",
                                                                           "chunk_size")}}
    if options.search_attention:
        fingerprint["attention_space"] = [space.low, space.high, space.step, ATTENTION_GRID]
    else:
        del fingerprint["short_tolerance"]  # scores do not depend on it without the short guard
    state = None
    state_path = None
    if out_path is not None:
        state_path = out_path / STATE_FILE
        if resume:
            state = SearchState.load(state_path)
            # A key an older state lacks is not held against it (it was not recorded then), except
            # search_attention and mutation_step: a state from before they existed searched the factors alone,
            # with the steps of 0.15.
            recorded = {"search_attention": False, "mutation_step": 0.15, **state.fingerprint}
            differ = sorted(k for k in set(fingerprint) | set(recorded)
                            if k in recorded and json.dumps(fingerprint.get(k), sort_keys=True)
                            != json.dumps(recorded.get(k), sort_keys=True))
            if differ:
                raise ValueError(f"resume: the search in {out} was run with other settings ({', '.join(differ)}); "
                                 f"give the same ones, or start a new search")
    # The budget counts every forward: the guard's reference (once) and each candidate.
    if state is None:
        state = SearchState(fingerprint=fingerprint)
    if state.reference_nll is None:
        state.reference_nll = fitness.measure_reference()
    else:
        fitness.reference_nll = state.reference_nll
    if options.search_attention:
        # The short-context NLLs measured before an interruption are in the cached fitnesses (the attention is
        # the last number of each key): not measured again.
        for key, fit in state.cache.items():
            if fit.get("short_nll") is not None:
                fitness.short_cache.setdefault(key.rsplit(",", 1)[1], float(fit["short_nll"]))
    settings = Settings(population=options.population, generations=options.generations,
                        budget=None if options.budget is None else options.budget - 1, patience=options.patience,
                        seed=options.seed)
    if settings.budget is not None and settings.budget < 1:
        raise ValueError(f"budget: must be >= 2 forwards (the guard's reference and one candidate), got "
                         f"{options.budget}")
    if state.rng is None:
        import random

        from ropekit.search.evolution import _rng_state

        state.rng = _rng_state(random.Random(options.seed))

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=options.budget, initial=state.forwards + 1, desc="search", unit="forward")

    def on_evaluated(candidate: Candidate, best: Candidate | None, forwards: int) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"gen {candidate.generation} best {best.score:.4f} (#{best.id}) "
                                f"last {candidate.score:.4f}")

    evolution = Evolution(space, seeds, evaluate, settings, state_path=state_path,
                          state=state, fingerprint=fingerprint, on_evaluated=on_evaluated)
    evolution.save()
    try:
        best = evolution.run()
    finally:
        if bar is not None:
            bar.close()
    candidates = evolution.all_candidates()
    seed_scores = {c.origin.split(":", 1)[1]: c.score for c in candidates
                   if c.origin.startswith("seed:") and c.fitness is not None}
    if options.search_attention:
        long_factor, best_attention = space.split(best.factors)
        seed_factor_parts = {name: f[:pairs] for name, f in seeds.items()}
        attention_record = {"searched": True, "attention_factor": best_attention, "low": space.low,
                            "high": space.high, "grid": ATTENTION_GRID, "step": space.step,
                            "short_tolerance": options.short_tolerance,
                            "short_nll": (best.fitness or {}).get("short_nll"),
                            "short_ratio": (best.fitness or {}).get("short_ratio")}
    else:
        long_factor, best_attention = tuple(best.factors), attention
        seed_factor_parts = seeds
        # Reported once: what the fixed attention does to sequences of at most L tokens (one L-token forward,
        # none for 1.0 on a plain-RoPE model).
        short = fitness.short_nll(attention, long_factor)
        attention_record = {"searched": False, "attention_factor": attention, "short_nll": short,
                            "short_ratio": None if short is None else math.exp(short - float(fitness.reference_nll))}
    cfg = longrope_config(base, n, long_factor, best_attention)
    seconds = time.perf_counter() - started
    record = {
        "model": model_name or loaded.source,
        "target_length": n,
        "trained_length": trained,
        "best": {"id": best.id, "origin": best.origin, "generation": best.generation, **(best.fitness or {})},
        "seeds": {name: {k: v for k, v in next(c for c in candidates if c.origin == f"seed:{name}").fitness.items()}
                  for name in seed_scores},
        "improvement_over_yarn": (seed_scores["yarn"] - best.score) if "yarn" in seed_scores else None,
        "forwards": state.forwards + 1,
        "short_forwards": fitness.short_forwards,
        "attention": attention_record,
        "stopped": state.stopped,
        "generations_completed": len(state.history),
        "wall_seconds_this_run": round(seconds, 1),
        "space": {"genes": options.genes, "first_gene": factor_space.first_gene, "gene_count": factor_space.size,
                  "low": factor_space.low, "high": factor_space.high, "refill": factor_space.refill},
        "settings": {k: v for k, v in asdict(options).items()},
        "fitness": fitness.describe(),
        "data": data_name,
    }
    if command:
        record["command"] = command
    factors = {
        "rope_type": "longrope",
        "short_factor": [1.0] * (base.rotary_dim // 2),
        "long_factor": list(long_factor),
        "factor": n / trained,
        "original_max_position_embeddings": trained,
        "max_position_embeddings": n,
        "attention_factor": best_attention,
        "search": record,
    }
    cfg.to_hf()  # the result must be expressible in transformers' longrope form
    if out_path is not None:
        from ropekit.search.plots import SEED_NAMES, plot_factors, plot_progress

        write_own(out_path, FACTORS_FILE, json.dumps(factors, indent=2) + "\n", COMMAND)
        write_own(out_path, LOG_FILE, json.dumps({
            "candidates": [c.to_dict() for c in candidates], "history": state.history,
            "stopped": state.stopped, "forwards": state.forwards + 1, "short_forwards": fitness.short_forwards,
            "attention": attention_record, "fitness": fitness.describe(),
            "needles": fitness.needle_records}, indent=1) + "\n", COMMAND)
        label = f"{model_name or loaded.source}: {trained} -> {n}"
        if state.history:
            labels = {}
            if not options.search_attention and abs(attention - yarn_attention) > 1e-9:
                # The YaRN seed is YaRN's factors under this search's attention factor, not YaRN itself.
                labels["yarn"] = f"YaRN's factors at attention {attention:.3f} (YaRN: {yarn_attention:.3f})"
            place_own(out_path, PROGRESS_PLOT,
                      lambda path: plot_progress(state.history, seed_scores, path, title=f"Search progress, {label}",
                                                 seed_labels=labels), COMMAND)
        found = "searched (long_factor)" if not best.origin.startswith("seed:") else \
            f"best = the {SEED_NAMES.get(best.origin.split(':', 1)[1], 'own')} seed (no candidate beat it)"
        found += f", attention factor {best_attention:.4f}" + (" (searched)" if options.search_attention else "")
        place_own(out_path, FACTORS_PLOT,
                  lambda path: plot_factors(long_factor, seed_factor_parts, path, first_gene=factor_space.first_gene,
                                            title=f"Searched factors vs PI/NTK/YaRN, {label}", label=found), COMMAND)
    return SearchResult(best, factors, out_path, state.stopped, state.forwards + 1, seconds)


def factors_config(loaded_or_rope, factors: dict[str, Any]):
    """The RopeConfig of a ``factors.json`` content for a model (its ``LoadedModel`` or ``RopeConfig``)."""
    base = loaded_or_rope.rope if isinstance(loaded_or_rope, LoadedModel) else loaded_or_rope
    return longrope_config(base, int(factors["max_position_embeddings"]), factors["long_factor"],
                           float(factors["attention_factor"]))
