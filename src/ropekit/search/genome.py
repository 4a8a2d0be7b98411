"""The search space of a LongRoPE factor search: which pairs are genes, their bounds, mutation and crossover.

An individual is the full vector of per-pair rescale factors lambda (rotary_dim/2 numbers, inv_freq_i /
lambda_i), non-decreasing in the pair index. Only the pairs from ``first_gene`` on are searched (the genes);
the pairs below are derived from the genes (``refill``):

* ``"ntk"`` (LongRoPE2, arXiv 2502.20082): lambda_i = lambda_cd^(i / cd), the NTK-aware curve through the
  first gene (an NTK base change gives exactly this shape, so the NTK seed lies in the space).
* ``"yarn"``: the pairs below stay at YaRN's factors (``fixed``), so the search is local around YaRN, whose own
  genes are all s (every pair from the critical dimension on is fully interpolated by YaRN).

``first_gene`` is LongRoPE2's critical dimension cd = ceil((d/2) log_b(L / 2 pi)): the first pair whose
wavelength exceeds the trained length L, i.e. that never completed a turn in training (``genes="critical"``),
or 0 (LongRoPE v1: every pair is a gene, ``genes="all"``).

Seeds (PI, NTK, YaRN, the model's own factors) are full vectors kept as they are, even where they lie outside
the gene bounds; their offspring are projected into the space.

Mutation differs from LongRoPE's "redraw uniformly between the two neighbours": that redraw cannot move a flat
genome, and YaRN's genes are all equal (s), so the first generation would be copies of YaRN. Here each gene is
multiplied by exp(N(0, sigma)) with probability ``p`` (reflected off the bounds), rounded to the grid, and the genes
are sorted (the nearest non-decreasing vector with the same values). Crossover takes each gene from the second
parent with probability 1/2; a child out of order is retried (up to 20 times), then replaced by a mutation of
the first parent (as LongRoPE's code does).

The attention factor (``AttentionSpace``, ``--search-attention``): optionally one more gene after the factor
genes, the cos/sin scale of transformers' longrope. An individual is then the vector (pairs factors...,
attention). The attention gene lives on a 0.005 grid in [1, 1 + 0.2 ln s] (twice YaRN's 0.1 ln s) and moves by a
Gaussian step reflected off the bounds; the seeds carry their method's own attention (YaRN's 0.1 ln s + 1, 1.0
for PI and NTK, the model's own for its own factors).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ropekit.config import RopeConfig
from ropekit.methods import canonical_name, frequencies
from ropekit.methods._common import default_inv_freq

GENE_MODES = ("critical", "all")
REFILLS = ("ntk", "yarn")
GRID = 0.01  # genes live on this grid (LongRoPE's step), so the cache sees equal genomes as equal
CROSSOVER_TRIES = 20
SEED_METHODS = ("yarn", "ntk", "pi")
ATTENTION_GRID = 0.005  # the attention gene's grid (a step of 0.005 changes the logits by about 1%)
ATTENTION_STEP = 0.02  # sigma of the attention gene's Gaussian mutation step


def critical_dimension(rotary_dim: int, base: float, trained_length: int) -> int:
    """LongRoPE2's critical dimension cd = ceil((d/2) * log_b(L / 2 pi)), clamped to [0, d/2].

    Pair i has wavelength 2 pi b^(2i/d); cd is the first pair whose wavelength exceeds L (it never turned once
    in training). d = 64, b = 1e5, L = 8192: 20 (12 genes of 32 pairs).
    """
    if rotary_dim < 2 or rotary_dim % 2:
        raise ValueError(f"rotary_dim: must be an even number >= 2, got {rotary_dim}")
    if not base > 1:
        raise ValueError(f"base: must be > 1, got {base}")
    if trained_length < 1:
        raise ValueError(f"trained_length: must be >= 1, got {trained_length}")
    pairs = rotary_dim // 2
    cd = math.ceil(pairs * math.log(trained_length / (2 * math.pi)) / math.log(base))
    return min(max(cd, 0), pairs)


def method_factors(base_cfg: RopeConfig, method: str, target_length: int) -> tuple[tuple[float, ...], float]:
    """(per-pair factors lambda_i = inv_freq_i / inv_freq'_i, attention scale) of ``method`` extending
    ``base_cfg`` to ``target_length``: the rescale factors that method amounts to, in LongRoPE's form."""
    name = canonical_name(method)
    cfg = base_cfg.extend(name, target_length=target_length)
    freqs = frequencies(cfg, target_length)
    original = default_inv_freq(base_cfg.base, base_cfg.rotary_dim)
    lam = (original / freqs.inv_freq64).tolist()
    return tuple(float(x) for x in lam), float(freqs.attention_scale)


def seed_factors(base_cfg: RopeConfig, target_length: int, methods: Sequence[str] = SEED_METHODS,
                 ) -> dict[str, tuple[float, ...]]:
    """``{name: per-pair factors}`` of the seed methods (pi, ntk, yarn), plus ``"own"``: the model's own long
    factors when it is a LongRoPE model with factors of the right size."""
    out = {m: method_factors(base_cfg, m, target_length)[0] for m in methods}
    if _has_own_factors(base_cfg):
        out["own"] = tuple(float(x) for x in base_cfg.long_factor)
    return out


def _has_own_factors(base_cfg: RopeConfig) -> bool:
    """A LongRoPE model with long factors of the right size (the ``"own"`` seed)."""
    return bool(base_cfg.long_factor  # set only where the method reads it (LongRoPE)
                and len(base_cfg.long_factor) == base_cfg.rotary_dim // 2)


def seed_attentions(base_cfg: RopeConfig, target_length: int, methods: Sequence[str] = SEED_METHODS,
                    ) -> dict[str, float]:
    """``{name: attention factor}`` that goes with each of ``seed_factors``: the method's own (YaRN's 0.1 ln s +
    1; 1.0 for PI and NTK), and for ``"own"`` the model's own LongRoPE attention factor (its
    ``attention_factor``, else the longrope default, 1.0 when the model's own factor is <= 1)."""
    out = {m: method_factors(base_cfg, m, target_length)[1] for m in methods}
    if _has_own_factors(base_cfg):
        from ropekit.methods.longrope import attention_scale

        out["own"] = float(attention_scale(base_cfg))
    return out


def on_grid(x: float, grid: float = GRID) -> float:
    return round(round(x / grid) * grid, 6)


def grid_bounds(low: float, high: float, grid: float = GRID) -> tuple[float, float]:
    """The lowest and highest points of the grid inside [low, high] (lo > hi when there is none)."""
    lo, hi = on_grid(low, grid), on_grid(high, grid)
    lo = lo if lo >= low else on_grid(lo + grid, grid)
    hi = hi if hi <= high else on_grid(hi - grid, grid)
    return lo, hi


def project_value(x: float, low: float, high: float, grid: float = GRID) -> float:
    """``x`` clipped to [low, high] and rounded to the grid; rounding can push a value just outside the bounds,
    so it is clamped to the grid points inside them once more."""
    lo, hi = grid_bounds(low, high, grid)
    return min(max(on_grid(min(max(float(x), low), high), grid), lo), hi)


def reflect(x: float, low: float, high: float) -> float:
    """``x`` reflected off the bounds (a few times, for a step larger than the interval). Reflected, not
    clipped: a clipped step would leave a gene at its bound half the time, and YaRN's genes all sit at one."""
    for _ in range(4):
        x = 2 * low - x if x < low else (2 * high - x if x > high else x)
    return x


@dataclass
class FactorSpace:
    """Which pairs are searched and how the others follow.

    Attributes:
        pairs: rotary_dim / 2.
        first_gene: index of the first searched pair (cd, or 0).
        low, high: bounds of every gene.
        refill: "ntk" or "yarn" (module docstring).
        fixed: (pairs,) factors used below ``first_gene`` when refill is "yarn".
        sigma: log-normal step of a mutation; p_mutate: probability that a gene moves.
    """

    pairs: int
    first_gene: int
    low: float
    high: float
    refill: str = "ntk"
    fixed: tuple[float, ...] = ()
    sigma: float = 0.15
    p_mutate: float = 0.3
    p_cross: float = 0.5
    _floor: float = field(init=False, default=1.0)

    def __post_init__(self) -> None:
        if self.refill not in REFILLS:
            raise ValueError(f"refill: {self.refill!r} not accepted; accepted: {', '.join(REFILLS)}")
        if not 0 <= self.first_gene < self.pairs:
            raise ValueError(f"first_gene: must be in [0, {self.pairs - 1}], got {self.first_gene}")
        if not 0 < self.low <= self.high:
            raise ValueError(f"low/high: need 0 < low <= high, got {self.low}, {self.high}")
        if self.refill == "yarn":
            if len(self.fixed) != self.pairs:
                raise ValueError(f"fixed: refill 'yarn' needs {self.pairs} factors, got {len(self.fixed)}")
            # The first gene may not go below the last fixed pair (the vector stays non-decreasing).
            self._floor = self.fixed[self.first_gene - 1] if self.first_gene else 0.0
        else:
            if self.first_gene and self.low < 1.0:
                raise ValueError(f"low: refill 'ntk' needs genes >= 1 (the curve g^(i/cd) must rise), got {self.low}")
            self._floor = 0.0
        self.low = max(self.low, self._floor)

    @property
    def size(self) -> int:
        """Number of genes."""
        return self.pairs - self.first_gene

    # ------------------------------------------------------------------ genes <-> factors
    def factors(self, genes: Sequence[float]) -> tuple[float, ...]:
        """(pairs,) non-decreasing factors from ``genes`` (size values)."""
        genes = tuple(float(g) for g in genes)
        if len(genes) != self.size:
            raise ValueError(f"genes: need {self.size} values, got {len(genes)}")
        cd = self.first_gene
        if cd == 0:
            low_part: tuple[float, ...] = ()
        elif self.refill == "ntk":
            low_part = tuple(genes[0] ** (i / cd) for i in range(cd))
        else:
            low_part = tuple(self.fixed[:cd])
        return low_part + genes

    def genes_of(self, factors: Sequence[float]) -> tuple[float, ...]:
        """The genes of a full factor vector, projected into the space (bounds, grid, order)."""
        return self.project(factors[self.first_gene:])

    def project(self, genes: Sequence[float]) -> tuple[float, ...]:
        """Clip to [low, high], round to the grid and sort: a valid genome."""
        return tuple(sorted(project_value(g, self.low, self.high) for g in genes))

    def valid(self, genes: Sequence[float]) -> bool:
        """Within bounds and non-decreasing (the full vector too)."""
        if len(genes) != self.size or any(not (self.low - 1e-9 <= g <= self.high + 1e-9) for g in genes):
            return False
        full = self.factors(genes)
        return all(a <= b + 1e-12 for a, b in zip(full, full[1:]))

    # ------------------------------------------------------------------ operators
    def mutate(self, genes: Sequence[float], rng: random.Random) -> tuple[float, ...]:
        """Each gene moves by a log-normal step with probability ``p_mutate`` (at least one moves); the result
        is projected (clipped, on the grid, sorted)."""
        moved = [i for i in range(len(genes)) if rng.random() < self.p_mutate] or [rng.randrange(len(genes))]
        return self.move(genes, moved, rng)

    def move(self, genes: Sequence[float], moved: Sequence[int], rng: random.Random) -> tuple[float, ...]:
        """The genes at the indices ``moved`` take a log-normal step (the rest stay); the result is projected."""
        genes = list(genes)
        lo, hi = math.log(self.low), math.log(self.high)
        for i in moved:  # a step in log space, reflected off the bounds
            genes[i] = math.exp(reflect(math.log(genes[i]) + rng.gauss(0.0, self.sigma), lo, hi))
        return self.project(genes)

    def crossover(self, a: Sequence[float], b: Sequence[float], rng: random.Random) -> tuple[float, ...] | None:
        """Each gene from ``b`` with probability ``p_cross``, else from ``a``; None when no ordered child came in
        ``CROSSOVER_TRIES`` tries (the caller mutates ``a`` instead)."""
        for _ in range(CROSSOVER_TRIES):
            child = tuple(bg if rng.random() < self.p_cross else ag for ag, bg in zip(a, b))
            if all(x <= y for x, y in zip(child, child[1:])) and self.valid(child):
                return child
        return None


def make_space(base_cfg: RopeConfig, target_length: int, *, genes: str = "critical", refill: str = "ntk",
               max_factor: float | None = None, min_factor: float | None = None,
               mutation_step: float = 0.15) -> FactorSpace:
    """The search space for extending ``base_cfg`` to ``target_length``.

    Genes are bounded below by s (a pair that never turned in training must be slowed at least s-fold, else
    the new positions show it angles it never saw) and above by ``max_factor`` (default 2s); with
    ``genes="all"`` the lower bound is 1 (the fastest pairs may keep their speed). ``mutation_step``: the
    log-normal sigma of a mutation (0.15: a moved gene changes by about 15%).
    """
    if genes not in GENE_MODES:
        raise ValueError(f"genes: {genes!r} not accepted; accepted: {', '.join(GENE_MODES)}")
    trained = base_cfg.require_trained_length()
    s = target_length / trained
    pairs = base_cfg.rotary_dim // 2
    first = critical_dimension(base_cfg.rotary_dim, base_cfg.base, trained) if genes == "critical" else 0
    first = min(first, pairs - 1)
    low = (s if genes == "critical" else 1.0) if min_factor is None else float(min_factor)
    high = 2 * s if max_factor is None else float(max_factor)
    if high < low:
        raise ValueError(f"max_factor: must be >= the lowest gene value {low:g}, got {high:g}")
    fixed = method_factors(base_cfg, "yarn", target_length)[0] if refill == "yarn" else ()
    if not mutation_step > 0:
        raise ValueError(f"mutation_step: must be > 0, got {mutation_step}")
    return FactorSpace(pairs=pairs, first_gene=first, low=low, high=high, refill=refill, fixed=tuple(fixed),
                       sigma=float(mutation_step))


@dataclass
class AttentionSpace:
    """A ``FactorSpace`` plus the attention factor as one more gene (``--search-attention``).

    Genes: (inner.size factor genes..., attention); vectors (what ``factors`` returns, what the search caches and
    evaluates): (inner.pairs factors..., attention). The factor part follows every rule of ``inner``; the
    attention lies in [low, high] on the ``ATTENTION_GRID``. Same interface as ``FactorSpace`` (``Evolution``
    uses either).

    Attributes:
        inner: the factor space.
        low, high: bounds of the attention gene.
        step: sigma of its Gaussian mutation step (reflected off the bounds).
    """

    inner: FactorSpace
    low: float
    high: float
    step: float = ATTENTION_STEP

    def __post_init__(self) -> None:
        if not 0 < self.low <= self.high:
            raise ValueError(f"attention low/high: need 0 < low <= high, got {self.low}, {self.high}")
        if not self.step > 0:
            raise ValueError(f"attention step: must be > 0, got {self.step}")
        if grid_bounds(self.low, self.high, ATTENTION_GRID)[0] > self.high:
            raise ValueError(f"attention low/high: no point of the {ATTENTION_GRID} grid in [{self.low}, {self.high}]")

    @property
    def size(self) -> int:
        """Number of genes (the factor genes and the attention)."""
        return self.inner.size + 1

    @property
    def pairs(self) -> int:
        """Number of factors in a vector (the attention follows them)."""
        return self.inner.pairs

    @property
    def p_mutate(self) -> float:
        return self.inner.p_mutate

    @property
    def p_cross(self) -> float:
        return self.inner.p_cross

    def split(self, vector: Sequence[float]) -> tuple[tuple[float, ...], float]:
        """(pairs factors, attention) of a vector of pairs + 1 numbers."""
        if len(vector) != self.pairs + 1:
            raise ValueError(f"vector: need {self.pairs + 1} values (factors and attention), got {len(vector)}")
        return tuple(float(x) for x in vector[:-1]), float(vector[-1])

    # ------------------------------------------------------------------ genes <-> vectors
    def factors(self, genes: Sequence[float]) -> tuple[float, ...]:
        """(pairs + 1,) vector: the inner factors of the factor genes, then the attention."""
        if len(genes) != self.size:
            raise ValueError(f"genes: need {self.size} values, got {len(genes)}")
        return self.inner.factors(genes[:-1]) + (float(genes[-1]),)

    def genes_of(self, vector: Sequence[float]) -> tuple[float, ...]:
        """The genes of a (pairs + 1,) vector, projected into the space."""
        factors, attention = self.split(vector)
        return self.inner.genes_of(factors) + (self.project_attention(attention),)

    def project(self, genes: Sequence[float]) -> tuple[float, ...]:
        return self.inner.project(genes[:-1]) + (self.project_attention(genes[-1]),)

    def project_attention(self, attention: float) -> float:
        """Clip to [low, high] and round to the grid (staying inside the bounds)."""
        return project_value(attention, self.low, self.high, ATTENTION_GRID)

    def valid(self, genes: Sequence[float]) -> bool:
        return (len(genes) == self.size and self.inner.valid(genes[:-1])
                and self.low - 1e-9 <= genes[-1] <= self.high + 1e-9)

    # ------------------------------------------------------------------ operators
    def mutate(self, genes: Sequence[float], rng: random.Random) -> tuple[float, ...]:
        """Each gene (factor or attention) moves with probability ``p_mutate``, at least one of them: a factor
        gene by ``inner``'s log-normal step, the attention by a Gaussian step of ``step``; then projected."""
        n = self.size
        moved = [i for i in range(n) if rng.random() < self.p_mutate] or [rng.randrange(n)]
        factor_genes = self.inner.move(genes[:-1], [i for i in moved if i < n - 1], rng)
        attention = float(genes[-1])
        if n - 1 in moved:
            attention = reflect(attention + rng.gauss(0.0, self.step), self.low, self.high)
        return factor_genes + (self.project_attention(attention),)

    def crossover(self, a: Sequence[float], b: Sequence[float], rng: random.Random) -> tuple[float, ...] | None:
        """The factor genes crossed as ``inner`` does (None when that fails), the attention from ``b`` with
        probability ``p_cross``, else from ``a``."""
        child = self.inner.crossover(a[:-1], b[:-1], rng)
        if child is None:
            return None
        return child + (float(b[-1]) if rng.random() < self.p_cross else float(a[-1]),)


def attention_bounds(scale: float) -> tuple[float, float]:
    """Default bounds of the attention gene at scale s: [1, 1 + 0.2 ln s] (twice YaRN's increment)."""
    return 1.0, 1.0 + 0.2 * math.log(scale)


def make_attention_space(inner: FactorSpace, scale: float, *, low: float | None = None, high: float | None = None,
                         step: float = ATTENTION_STEP) -> AttentionSpace:
    """``inner`` with the attention gene; bounds default to ``attention_bounds(scale)``."""
    default_low, default_high = attention_bounds(scale)
    return AttentionSpace(inner, default_low if low is None else float(low),
                          default_high if high is None else float(high), float(step))


def as_tensor(factors: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(factors), dtype=torch.float64)
