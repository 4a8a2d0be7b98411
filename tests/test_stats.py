"""Intervals and ties (``ropekit.evaluation.stats``): coverage on known cases, pairing, separation."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ropekit.evaluation.stats import (
    bucket_sums,
    intervals_overlap,
    paired_log_ratio,
    perplexity_interval,
    queries_to_separate,
    wilson_interval,
)


def test_wilson_interval_matches_published_values():
    # Wilson 95% for 8/10: (0.490, 0.943) (Newcombe 1998, table I style check); 0/10 and 10/10 stay non-degenerate
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(0.7225, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 200), st.integers(1, 200))
def test_wilson_interval_contains_the_estimate(k, n):
    k = min(k, n)
    lo, hi = wilson_interval(k, n)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_interval_covers_the_true_rate_about_95_percent():
    rng = random.Random(0)
    p, n, trials = 0.3, 40, 2000
    covered = 0
    for _ in range(trials):
        k = sum(rng.random() < p for _ in range(n))
        lo, hi = wilson_interval(k, n)
        covered += lo <= p <= hi
    assert 0.92 <= covered / trials <= 0.98


def test_perplexity_interval_covers_the_mean_of_a_known_process():
    # tokens with NLL ~ N(mu, 1) iid: the bucket bootstrap interval should cover exp(mu) ~95% of the time
    gen = torch.Generator().manual_seed(0)
    mu, covered, trials = 2.0, 0, 200
    for t in range(trials):
        nll = mu + torch.randn(1, 4095, generator=gen)
        _, lo, hi = perplexity_interval(nll, bucket_size=256, samples=400, seed=t)
        covered += lo <= math.exp(mu) <= hi
    assert 0.88 <= covered / trials <= 0.99


def test_bucket_sums_respect_the_mask_and_positions():
    nll = torch.arange(1, 8, dtype=torch.float32)[None]  # entries predict positions 1..7
    mask = torch.tensor([[True, True, False, True, True, True, True]])
    sums, counts = bucket_sums(nll, mask, bucket_size=4)
    # bucket 0 = positions 1..3 -> entries 0..2 (entry 2 masked), bucket 1 = positions 4..7 -> entries 3..6
    assert sums.tolist() == [1 + 2, 4 + 5 + 6 + 7] and counts.tolist() == [2, 4]


def test_paired_difference_separates_a_small_consistent_gap_and_ties_noise():
    gen = torch.Generator().manual_seed(1)
    # shared difficulty of the text: some stretches are harder than others, as in real text
    stretches = 0.3 * torch.randn(2, 16, generator=gen).repeat_interleave(512, dim=1)[:, :8191]
    text = 2.0 + stretches + torch.randn(2, 8191, generator=gen)
    better = text + 0.01 * torch.randn(2, 8191, generator=gen)
    worse = better + 0.05  # 5% higher perplexity on every token
    diff = paired_log_ratio(worse, better, bucket_size=512)
    assert diff.separated and diff.low > 0 and diff.ratio == pytest.approx(math.exp(0.05), rel=1e-3)
    # the same gap is invisible to two unpaired intervals (the text's variance dominates)
    _, lo_w, hi_w = perplexity_interval(worse, bucket_size=512)
    _, lo_b, hi_b = perplexity_interval(better, bucket_size=512)
    assert intervals_overlap((lo_w, hi_w), (lo_b, hi_b))
    noise = better + 0.02 * torch.randn(2, 8191, generator=gen)
    tie = paired_log_ratio(noise, better, bucket_size=512)
    assert not tie.separated and tie.low < 0 < tie.high
    assert tie.buckets_needed is None or tie.buckets_needed > tie.buckets


def test_queries_to_separate():
    assert queries_to_separate(0.5, 0.5) is None
    n = queries_to_separate(0.9, 0.5)
    assert 10 <= n <= 40
    lo1, hi1 = wilson_interval(round(0.9 * 4 * n), 4 * n)
    lo2, hi2 = wilson_interval(round(0.5 * 4 * n), 4 * n)
    assert not intervals_overlap((lo1, hi1), (lo2, hi2))
