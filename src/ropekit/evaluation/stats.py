"""Intervals and ties: how sure a measurement is, and whether two methods are told apart.

* Accuracy over n queries: the Wilson score interval (it stays inside [0, 1] and behaves at 0/n and n/n,
  where the normal approximation gives a zero-width interval).
* Perplexity: a bootstrap over position buckets. Tokens next to each other are not independent, so the unit
  resampled is a bucket of ``bucket_size`` consecutive tokens of one window, not a token.
* Two methods measured on the same text: a *paired* bootstrap of the per-bucket NLL difference (same buckets
  resampled for both), which is far tighter than comparing two separate intervals and is the right test.
* Two accuracies separate when their Wilson intervals do not overlap (conservative); otherwise they are tied at
  this sample size, and ``queries_to_separate`` says about how many queries per method would separate them.

All bootstraps are seeded: the same measurement gives the same interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

Z95 = 1.959963984540054  # two-sided 95%
BOOTSTRAP_SAMPLES = 2000


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """95% (by default) Wilson score interval of a binomial proportion ``successes / n``; (0, 1) for n = 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"successes, n: need 0 <= successes <= n, got {successes}, {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    lo = 0.0 if successes == 0 else max(0.0, centre - half)
    hi = 1.0 if successes == n else min(1.0, centre + half)
    return lo, hi


def intervals_overlap(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] <= b[1] and b[0] <= a[1]


def queries_to_separate(p1: float, p2: float, z: float = Z95) -> int | None:
    """About how many queries per method make the Wilson intervals of accuracies ``p1`` and ``p2`` stop
    overlapping (normal approximation: z * (sd1 + sd2) / sqrt(n) < |p1 - p2|); None when they are equal."""
    gap = abs(p1 - p2)
    if gap == 0:
        return None
    spread = math.sqrt(max(p1 * (1 - p1), 1e-4)) + math.sqrt(max(p2 * (1 - p2), 1e-4))
    return math.ceil((z * spread / gap) ** 2)


def bucket_sums(nll: torch.Tensor, mask: torch.Tensor | None, bucket_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-bucket NLL sums and token counts, float64, flattened over windows.

    Args:
        nll: (windows, length - 1) per-token NLL (``perplexity.token_nll``: entry j predicts token j + 1).
        mask: same shape, bool: the entries that count (None: all).
        bucket_size: tokens per bucket, by the predicted token's position.
    Returns:
        (sums, counts), each (windows * buckets,); buckets without a counted token are dropped.
    """
    if nll.dim() == 1:
        nll = nll[None]
    if mask is None:
        mask = torch.ones_like(nll, dtype=torch.bool)
    elif mask.dim() == 1:
        mask = mask[None].expand_as(nll)
    if mask.shape != nll.shape:
        raise ValueError(f"mask: shape {tuple(mask.shape)} does not match nll {tuple(nll.shape)}")
    index = torch.div(torch.arange(1, nll.shape[1] + 1), bucket_size, rounding_mode="floor")
    buckets = int(index.max()) + 1
    values = torch.where(mask, nll.double(), torch.zeros((), dtype=torch.float64))
    sums = torch.zeros(nll.shape[0], buckets, dtype=torch.float64).index_add_(1, index, values)
    counts = torch.zeros(nll.shape[0], buckets, dtype=torch.float64).index_add_(1, index, mask.double())
    sums, counts = sums.flatten(), counts.flatten()
    keep = counts > 0
    return sums[keep], counts[keep]


def _resample(units: int, samples: int, seed: int) -> torch.Tensor:
    """(samples, units) indices drawn with replacement."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, units, (samples, units), generator=gen)


def _percentiles(values: torch.Tensor, level: float) -> tuple[float, float]:
    lo, hi = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=values.dtype)).tolist()
    return lo, hi


def perplexity_interval(nll: torch.Tensor, mask: torch.Tensor | None = None, *, bucket_size: int = 1024,
                        samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95, seed: int = 0
                        ) -> tuple[float, float, float]:
    """(ppl, low, high): exp(mean NLL) of the counted tokens and a bucket-bootstrap interval."""
    sums, counts = bucket_sums(nll, mask, bucket_size)
    if counts.numel() == 0:
        raise ValueError("nll: no token counted")
    ppl = math.exp(float(sums.sum() / counts.sum()))
    if counts.numel() < 2:
        return ppl, float("nan"), float("nan")
    idx = _resample(counts.numel(), samples, seed)
    boot = sums[idx].sum(1) / counts[idx].sum(1)
    lo, hi = _percentiles(boot, level)
    return ppl, math.exp(lo), math.exp(hi)


def mean_interval(scores: Sequence[float], *, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                  seed: int = 0) -> tuple[float, float]:
    """Interval of the mean of per-question scores in [0, 1]: Wilson when every score is 0 or 1, else a bootstrap
    over questions; (0, 1) for no scores."""
    if not scores:
        return 0.0, 1.0
    if all(s in (0.0, 1.0) for s in scores):
        return wilson_interval(int(sum(scores)), len(scores))
    values = torch.tensor(scores, dtype=torch.float64)
    return _percentiles(values[_resample(len(scores), samples, seed)].mean(1), level)


@dataclass(frozen=True)
class PairedDifference:
    """log(ppl_a / ppl_b) on the same tokens, with a paired bucket-bootstrap interval.

    ``separated``: the interval excludes 0. ``buckets_needed``: about how many buckets (of the same size) would
    make the interval exclude 0 at the same effect and spread (None when already separated or no effect).
    """

    log_ratio: float
    low: float
    high: float
    buckets: int
    buckets_needed: int | None

    @property
    def ratio(self) -> float:
        return math.exp(self.log_ratio)

    @property
    def separated(self) -> bool:
        return self.low > 0 or self.high < 0


def paired_log_ratio(nll_a: torch.Tensor, nll_b: torch.Tensor, mask: torch.Tensor | None = None, *,
                     bucket_size: int = 1024, samples: int = BOOTSTRAP_SAMPLES, level: float = 0.95,
                     seed: int = 0) -> PairedDifference:
    """Paired bucket bootstrap of log(ppl_a / ppl_b) for two methods measured on the same tokens."""
    if nll_a.shape != nll_b.shape:
        raise ValueError(f"nll_a, nll_b: shapes differ: {tuple(nll_a.shape)} vs {tuple(nll_b.shape)}")
    sums_a, counts = bucket_sums(nll_a, mask, bucket_size)
    sums_b, _ = bucket_sums(nll_b, mask, bucket_size)
    diff = sums_a - sums_b
    total = float(counts.sum())
    effect = float(diff.sum()) / total
    units = counts.numel()
    if units < 2:
        return PairedDifference(effect, float("nan"), float("nan"), units, None)
    idx = _resample(units, samples, seed)
    boot = diff[idx].sum(1) / counts[idx].sum(1)
    lo, hi = _percentiles(boot, level)
    separated = lo > 0 or hi < 0
    needed = None
    if not separated and effect != 0:
        half = (hi - lo) / 2  # shrinks as 1 / sqrt(buckets)
        needed = math.ceil(units * (half / abs(effect)) ** 2)
    return PairedDifference(effect, lo, hi, units, needed)
