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
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ropekit.config import RopeConfig
from ropekit.methods import frequencies
from ropekit.methods._common import default_inv_freq

GENE_MODES = ("critical", "all")
REFILLS = ("ntk", "yarn")
GRID = 0.01  # genes live on this grid (LongRoPE's step), so the cache sees equal genomes as equal
CROSSOVER_TRIES = 20
SEED_METHODS = ("yarn", "ntk", "pi")


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
    name = {"pi": "linear"}.get(method, method)
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
    if base_cfg.method == "longrope" and base_cfg.long_factor and len(base_cfg.long_factor) == base_cfg.rotary_dim // 2:
        out["own"] = tuple(float(x) for x in base_cfg.long_factor)
    return out


def on_grid(x: float) -> float:
    return round(round(x / GRID) * GRID, 6)


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
        clipped = [on_grid(min(max(float(g), self.low), self.high)) for g in genes]
        # Rounding can push a value just outside the bounds: clamp on the grid once more.
        lo, hi = on_grid(self.low), on_grid(self.high)
        lo = lo if lo >= self.low else on_grid(lo + GRID)
        hi = hi if hi <= self.high else on_grid(hi - GRID)
        return tuple(sorted(min(max(g, lo), hi) for g in clipped))

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
        genes = list(genes)
        moved = [i for i in range(len(genes)) if rng.random() < self.p_mutate] or [rng.randrange(len(genes))]
        lo, hi = math.log(self.low), math.log(self.high)
        for i in moved:
            # A step in log space, reflected off the bounds (a clipped step would leave a gene at its bound
            # unchanged half the time, and YaRN's genes all sit at the lower bound s).
            x = math.log(genes[i]) + rng.gauss(0.0, self.sigma)
            for _ in range(4):
                x = 2 * lo - x if x < lo else (2 * hi - x if x > hi else x)
            genes[i] = math.exp(x)
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
               max_factor: float | None = None, min_factor: float | None = None) -> FactorSpace:
    """The search space for extending ``base_cfg`` to ``target_length``.

    Genes are bounded below by s (a pair that never turned in training must be slowed at least s-fold, else
    the new positions show it angles it never saw) and above by ``max_factor`` (default 2s); with
    ``genes="all"`` the lower bound is 1 (the fastest pairs may keep their speed).
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
    return FactorSpace(pairs=pairs, first_gene=first, low=low, high=high, refill=refill, fixed=tuple(fixed))


def as_tensor(factors: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(factors), dtype=torch.float64)
