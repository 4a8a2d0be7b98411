"""The evolutionary loop: seeds, generations of mutations and crossovers, a cache, a budget, checkpoints.

Independent of models: it calls ``evaluate(factors) -> Fitness-like`` (``.score`` and ``.to_dict()``).

* Generation 0: the seeds as they are (YaRN first, then NTK, PI, the model's own), filled up to the population
  size with mutations of YaRN's genes.
* Generation g >= 1: ``population // 2`` new candidates, half mutations of a parent, half crossovers of two
  parents; parents are the better half of the population. The next population is the best ``population`` of the
  old one and the evaluated children.
* A genome already seen (evaluated or generated) is never generated again (retried up to 20 times); the cache
  (key: the full factor vector) is also what ``--resume`` reads, so nothing is evaluated twice.
* Budget: candidate forwards; a generation cut by the budget is not selected on, so resuming with a larger
  budget continues exactly as a run with that budget from the start would have.
* Early stopping: no improvement of the best score by ``min_delta`` for ``patience`` completed generations.
* Determinism: one ``random.Random(seed)``; the children of a generation are all drawn (from the RNG state saved
  at its start) before any is evaluated, so a run resumed mid-generation draws the same children and finds the
  evaluated ones in the cache.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ropekit.output import Manifest, write_own
from ropekit.search.genome import FactorSpace

STATE_VERSION = 1
RETRIES = 20


@dataclass
class Candidate:
    """One genome of the search. ``genes`` is None for a seed kept as it is (``factors`` says everything)."""

    id: int
    generation: int
    origin: str  # "seed:yarn", "mutation", "crossover", "mutation (crossover failed)"
    parents: list[int]
    factors: tuple[float, ...]
    genes: tuple[float, ...] | None = None
    fitness: dict[str, float] | None = None

    @property
    def score(self) -> float:
        return float("inf") if self.fitness is None else float(self.fitness["score"])

    @property
    def key(self) -> str:
        return factors_key(self.factors)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["factors"] = list(self.factors)
        d["genes"] = None if self.genes is None else list(self.genes)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Candidate":
        return cls(id=int(d["id"]), generation=int(d["generation"]), origin=d["origin"], parents=list(d["parents"]),
                   factors=tuple(d["factors"]), genes=None if d["genes"] is None else tuple(d["genes"]),
                   fitness=d.get("fitness"))


def factors_key(factors: Sequence[float]) -> str:
    """The cache key of a factor vector (rounded so that float noise cannot make two equal genomes differ)."""
    return ",".join(f"{float(x):.9g}" for x in factors)


@dataclass
class Settings:
    population: int = 8
    generations: int = 5
    budget: int | None = None  # candidate forwards; None: no limit
    patience: int = 3
    min_delta: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        if self.population < 2:
            raise ValueError(f"population: must be >= 2, got {self.population}")
        if self.generations < 1:
            raise ValueError(f"generations: must be >= 1, got {self.generations}")
        if self.budget is not None and self.budget < 1:
            raise ValueError(f"budget: must be >= 1 forward, got {self.budget}")
        if self.patience < 1:
            raise ValueError(f"patience: must be >= 1, got {self.patience}")


def _rng_state(rng: random.Random) -> list:
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def _set_rng_state(rng: random.Random, state: list) -> None:
    rng.setstate((state[0], tuple(state[1]), state[2]))


@dataclass
class SearchState:
    """Everything ``--resume`` needs: the start of the generation in progress, and every evaluation so far."""

    generation: int = 0  # the generation in progress (or next)
    next_id: int = 0  # the id counter at its start
    rng: list | None = None
    population: list[Candidate] = field(default_factory=list)
    log: list[Candidate] = field(default_factory=list)  # every candidate of completed generations
    cache: dict[str, dict[str, float]] = field(default_factory=dict)  # factors key -> fitness
    history: list[dict[str, Any]] = field(default_factory=list)  # per completed generation: best score, ...
    forwards: int = 0
    stopped: str | None = None
    reference_nll: float | None = None  # the fitness guard's reference (one forward, kept for --resume)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "generation": self.generation, "next_id": self.next_id, "rng": self.rng,
                "population": [c.to_dict() for c in self.population], "log": [c.to_dict() for c in self.log],
                "cache": self.cache, "history": self.history, "forwards": self.forwards, "stopped": self.stopped,
                "reference_nll": self.reference_nll, "fingerprint": self.fingerprint}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchState":
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"resume: search state version {d.get('version')!r}, this ropekit reads {STATE_VERSION}")
        return cls(generation=d["generation"], next_id=d["next_id"], rng=d["rng"],
                   population=[Candidate.from_dict(c) for c in d["population"]],
                   log=[Candidate.from_dict(c) for c in d["log"]], cache=d["cache"], history=d["history"],
                   forwards=d["forwards"], stopped=d.get("stopped"),
                   reference_nll=d.get("reference_nll"), fingerprint=d.get("fingerprint", {}))

    def save(self, path: Path, command: str = "search") -> None:
        """Write the state atomically and record it as ropekit's output of ``command`` in its folder."""
        path = Path(path)
        write_own(path.parent, path.name, json.dumps(self.to_dict()) + "\n", command)

    @classmethod
    def load(cls, path: Path) -> "SearchState":
        """The state saved at ``path``, which must be ropekit's own file (recorded in the folder's manifest, content
        unchanged); ValueError naming the file otherwise, or when it is damaged."""
        path = Path(path)
        if not Manifest.load(path.parent).owns(path.parent, path.name):
            raise ValueError(f"resume: {path} was not written by ropekit (or changed since); ropekit does not "
                             f"read it back")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except ValueError as exc:
            detail = str(exc).removeprefix("resume: ")
            raise ValueError(f"resume: {path}: {detail}" if str(exc).startswith("resume:")
                             else f"resume: {path} is damaged ({detail})") from None
        except (KeyError, TypeError, AttributeError, IndexError) as exc:
            raise ValueError(f"resume: {path} is damaged ({type(exc).__name__}: {exc})") from None


class Evolution:
    """The search. ``run()`` returns the best candidate; ``state`` holds everything (see ``SearchState``).

    Args:
        space: the ``FactorSpace``.
        seeds: ``{name: full factor vector}``; "yarn" must be one (individual 0, the parent of generation 0).
        evaluate: factors -> an object with ``.score`` (lower is better) and ``.to_dict()`` (JSON-ready).
        settings: ``Settings``.
        state_path: where to checkpoint (after every evaluation and every generation); None: nowhere.
        state: a loaded ``SearchState`` to continue (``--resume``).
        on_evaluated: called with (candidate, best candidate, forwards) after each new evaluation.
    """

    def __init__(self, space: FactorSpace, seeds: dict[str, Sequence[float]], evaluate: Callable[[tuple], Any],
                 settings: Settings, *, state_path: Path | None = None, state: SearchState | None = None,
                 fingerprint: dict[str, Any] | None = None,
                 on_evaluated: Callable[[Candidate, Candidate | None, int], None] | None = None) -> None:
        if "yarn" not in seeds:
            raise ValueError("seeds: must include 'yarn' (individual 0)")
        self.space = space
        self.seeds = {name: tuple(float(x) for x in f) for name, f in seeds.items()}
        order = ["yarn"] + [n for n in ("ntk", "pi", "own") if n in seeds] + sorted(
            n for n in seeds if n not in ("yarn", "ntk", "pi", "own"))
        self.seed_order = order
        self.evaluate_fn = evaluate
        self.settings = settings
        self.state_path = state_path
        self.on_evaluated = on_evaluated
        self.rng = random.Random(settings.seed)
        if state is None:
            state = SearchState(rng=_rng_state(self.rng), fingerprint=dict(fingerprint or {}))
        else:
            _set_rng_state(self.rng, state.rng)
        self.state = state
        self._current: list[Candidate] = []
        self._next_id = state.next_id

    # ------------------------------------------------------------------ helpers
    def _genes(self, candidate: Candidate) -> tuple[float, ...]:
        return candidate.genes if candidate.genes is not None else self.space.genes_of(candidate.factors)

    def _new(self, generation: int, origin: str, parents: list[int], genes: tuple[float, ...] | None,
             factors: Sequence[float]) -> Candidate:
        c = Candidate(self._next_id, generation, origin, parents, tuple(float(x) for x in factors), genes)
        self._next_id += 1
        return c

    def _known(self) -> set[str]:
        # The genomes of completed generations only: the cache may already hold children of the generation in
        # progress (a resumed run), and they must be drawn again, not rejected as duplicates.
        keys = {c.key for c in self.state.log}
        keys.update(c.key for c in self.state.population)
        return keys

    def evaluated(self) -> list[Candidate]:
        """Every candidate with a score so far (completed generations, then the one in progress)."""
        return [c for c in self.state.log if c.fitness is not None]

    def all_candidates(self) -> list[Candidate]:
        """Every candidate drawn: completed generations, then the evaluated ones of a generation cut short."""
        logged = {c.id for c in self.state.log}
        return list(self.state.log) + [c for c in self._current if c.id not in logged and c.fitness is not None]

    def best(self) -> Candidate | None:
        done = [c for c in self.all_candidates() if c.fitness is not None]
        return min(done, key=lambda c: (c.score, c.id)) if done else None

    def save(self) -> None:
        if self.state_path is not None:
            self.state.save(self.state_path)

    # ------------------------------------------------------------------ generations
    def _generation_zero(self) -> list[Candidate]:
        known: set[str] = set()
        out = []
        for name in self.seed_order:
            factors = self.seeds[name]
            c = self._new(0, f"seed:{name}", [], None, factors)
            if c.key not in known:
                known.add(c.key)
                out.append(c)
        yarn = out[0]
        yarn_genes = self._genes(yarn)
        tries = 0
        while len(out) < self.settings.population and tries < RETRIES * self.settings.population:
            tries += 1
            genes = self.space.mutate(yarn_genes, self.rng)
            factors = self.space.factors(genes)
            key = factors_key(factors)
            if key in known:
                continue
            known.add(key)
            out.append(self._new(0, "mutation", [yarn.id], genes, factors))
        return out

    def _children(self, generation: int) -> list[Candidate]:
        ranked = sorted(self.state.population, key=lambda c: (c.score, c.id))
        parents = ranked[: max(2, len(ranked) // 2)]
        known = self._known()
        count = max(1, self.settings.population // 2)
        out: list[Candidate] = []
        for k in range(count):
            want_cross = k % 2 == 1 and len(parents) >= 2
            child = None
            for _ in range(RETRIES):
                if want_cross:
                    a, b = self.rng.sample(parents, 2)
                    genes = self.space.crossover(self._genes(a), self._genes(b), self.rng)
                    origin, ids = "crossover", [a.id, b.id]
                    if genes is None:
                        genes = self.space.mutate(self._genes(a), self.rng)
                        origin, ids = "mutation (crossover failed)", [a.id]
                else:
                    a = self.rng.choice(parents)
                    genes = self.space.mutate(self._genes(a), self.rng)
                    origin, ids = "mutation", [a.id]
                factors = self.space.factors(genes)
                if factors_key(factors) not in known:
                    child = self._new(generation, origin, ids, genes, factors)
                    known.add(child.key)
                    break
            if child is not None:
                out.append(child)
        return out

    def _budget_left(self) -> bool:
        return self.settings.budget is None or self.state.forwards < self.settings.budget

    def run(self) -> Candidate:
        """Run (or continue) the search; returns the best candidate evaluated."""
        st = self.state
        self._current = []
        st.stopped = None
        while st.generation < self.settings.generations:
            # The generation starts from the saved RNG state and id counter (a resumed run redraws the same).
            _set_rng_state(self.rng, st.rng)
            self._next_id = st.next_id
            generation = st.generation
            self._current = self._generation_zero() if generation == 0 else self._children(generation)
            cut = False
            for c in self._current:
                if c.key in st.cache:
                    c.fitness = st.cache[c.key]
                    continue
                if not self._budget_left():
                    cut = True
                    break
                c.fitness = self.evaluate_fn(c.factors).to_dict()
                st.cache[c.key] = c.fitness
                st.forwards += 1
                self.save()
                if self.on_evaluated is not None:
                    self.on_evaluated(c, self.best(), st.forwards)
            if cut:
                # Not selected on: a resume with a larger budget redraws this generation and continues it.
                st.stopped = "budget"
                self.save()
                break
            done = [c for c in self._current if c.fitness is not None]
            st.log.extend(done)
            pool = ([] if generation == 0 else st.population) + done
            st.population = sorted(pool, key=lambda c: (c.score, c.id))[: self.settings.population]
            best = min(st.log, key=lambda c: (c.score, c.id))
            st.history.append({"generation": generation, "best_score": best.score, "best_id": best.id,
                               "generation_best": min((c.score for c in done), default=float("inf")),
                               "evaluated": len(done), "forwards": st.forwards})
            st.generation += 1
            st.next_id = self._next_id
            st.rng = _rng_state(self.rng)
            self._current = []
            self.save()
            if self._converged():
                st.stopped = "converged"
                self.save()
                break
        else:
            st.stopped = "generations"
            self.save()
        best = self.best()
        if best is None:
            raise RuntimeError("search: no candidate was evaluated (budget too small?)")
        return best

    def _converged(self) -> bool:
        p = self.settings.patience
        h = self.state.history
        if len(h) <= p:
            return False
        return h[-p - 1]["best_score"] - h[-1]["best_score"] < self.settings.min_delta
