"""LongRoPE factor search (``ropekit search``): per-pair rescale factors that extend a model's context.

* ``genome``: the search space (critical dimension, gene bounds, NTK/YaRN refill, mutation, crossover), the
  PI/NTK/YaRN seed factors, and ``AttentionSpace`` (the attention factor as one more gene).
* ``fitness``: needle-driven perplexity of one answered haystack at the target length, with a short-range guard
  (and, when the attention is searched, a short-context guard).
* ``evolution``: the evolutionary loop (cache, budget, early stopping, checkpoint and exact resume).
* ``run``: ``search_factors`` (the whole search with its output folder), ``shipped_factors``.
* ``plots``: progress and factor figures.
"""

from ropekit.search.evolution import Candidate, Evolution, SearchState, Settings, factors_key
from ropekit.search.fitness import Fitness, NeedleFitness, longrope_config, search_text
from ropekit.search.genome import (
    AttentionSpace,
    FactorSpace,
    critical_dimension,
    make_attention_space,
    make_space,
    method_factors,
    seed_attentions,
    seed_factors,
)
from ropekit.search.run import SearchOptions, SearchResult, factors_config, search_factors, shipped_factors

__all__ = ["AttentionSpace", "Candidate", "Evolution", "FactorSpace", "Fitness", "NeedleFitness", "SearchOptions",
           "SearchResult", "SearchState", "Settings", "critical_dimension", "factors_config", "factors_key",
           "longrope_config", "make_attention_space", "make_space", "method_factors", "search_factors", "search_text",
           "seed_attentions", "seed_factors", "shipped_factors"]
