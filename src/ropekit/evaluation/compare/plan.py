"""Compare's plan: its options, and which methods it runs on a model, each as the registry says.

The registry decides how a method is planned (``MethodSpec.unscaled``, ``needs_searched_factors``,
``suggested_base``); no method is named here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ropekit.config import RopeConfig
from ropekit.evaluation.perplexity import DEFAULT_BUCKET_SIZE, DEFAULT_CHUNK_SIZE
from ropekit.methods import baseline_label, frequencies, get_method, method_names
from ropekit.shipped import shipped_factors

DEFAULT_NEEDLES = 32



@dataclass
class CompareOptions:
    """Settings of one comparison (defaults: the demo model at 2x on a 2-core CPU in about 10 minutes).

    Attributes:
        target_length: N, tokens; default twice the trained length.
        data: haystack text (file, folder, JSON lines) or None for the standard library's sources.
        windows: contexts of N tokens per method (each a different stretch of text with its own needles).
        needles: labelled needles (= retrieval queries) per context.
        bucket_size: tokens per perplexity bucket (also the bootstrap unit).
        methods: restrict to these method names (default: every comparable method of the registry,
            ``ropekit.method_names(comparable=True)``).
        seed: needle labels and values, and the bootstrap, are drawn from it.
        load_time_s: seconds the caller spent loading the model (reported in the time breakdown).
        factors_file: LongRoPE factors for a ``longrope`` row (default: the ones ``ropekit.shipped`` finds for
            this model and target length, if any).
    """

    target_length: int | None = None
    data: str | Path | None = None
    windows: int = 1
    needles: int = DEFAULT_NEEDLES
    bucket_size: int = DEFAULT_BUCKET_SIZE
    methods: Sequence[str] | None = None
    seed: int = 0
    chunk_size: int = DEFAULT_CHUNK_SIZE
    progress: bool = True
    load_time_s: float | None = None
    factors_file: str | Path | None = None



@dataclass
class MethodPlan:
    """One row of the comparison: ``rope`` to apply, or ``skipped`` with the reason."""

    label: str
    method: str
    rope: RopeConfig | None
    skipped: str | None = None



def plan_methods(base: RopeConfig, target_length: int, methods: Sequence[str] | None = None, *,
                 factors_file: str | Path | None = None, factors_source: str = "factors file") -> list[MethodPlan]:
    """The comparison's rows for a model whose RoPE is ``base``, extended to ``target_length`` tokens.

    The baseline is the model's own RoPE ("default" for an unscaled model). Every other method runs at
    factor N / L, as the registry says (``MethodSpec``): an ``unscaled`` method (default) runs as the model's
    own frequencies; a method with a ``suggested_base`` (base) uses the base it picks for N; one that
    ``needs_searched_factors`` (longrope) runs only with per-pair factors (``factors_file``, or the model's
    config's). Unknown names in ``methods`` raise ValueError.
    """
    trained = base.require_trained_length()
    if target_length <= trained:
        raise ValueError(f"target length: must be longer than the trained length {trained}, got {target_length}")
    comparable = method_names(comparable=True)
    names = list(comparable if methods is None else methods)
    unknown = [m for m in names if m not in comparable]
    if unknown:
        raise ValueError(f"methods: unknown {', '.join(unknown)}; accepted: {', '.join(comparable)}")
    factor = target_length / trained
    plans: list[MethodPlan] = []
    plans.append(MethodPlan(baseline_label(base), base.method, base))
    for name in names:
        spec = get_method(name)
        if name == base.method and not spec.needs_searched_factors:
            continue  # the baseline already is this method
        if spec.unscaled:
            plans.append(MethodPlan(name, name, base.with_method(name)))
        elif spec.needs_searched_factors:
            searched = [p.field for p in spec.params if p.type == "float_list"]
            if factors_file is not None:
                plans.append(MethodPlan(f"{name} ({factors_source})", name,
                                        base.extend(name, factor, factors_file=factors_file)))
            elif any(getattr(base, field) is None for field in searched):
                plans.append(MethodPlan(name, name, None,
                                        skipped=f"needs per-pair factors ({'/'.join(searched)}) that this "
                                                "model's config does not have: search them (`ropekit search`) "
                                                "and pass them with --factors-file"))
            elif base.method == name:
                continue  # the model's own searched factors are the baseline
        elif spec.suggested_base is not None:
            new_base = spec.suggested_base(target_length)
            if new_base <= base.base:
                plans.append(MethodPlan(name, name, None,
                                        skipped=f"the suggested base for {target_length} tokens ({new_base:.3g}, "
                                                f"arXiv 2405.14591) is not above the model's ({base.base:.3g})"))
            else:
                plans.append(MethodPlan(f"{name} {new_base:.3g}", name,
                                        base.extend(name, new_base=round(new_base))))
        else:
            plans.append(MethodPlan(name, name, base.extend(name, factor)))
    return plans



def longrope_factors(model_source: str | None, target_length: int, factors_file: str | Path | None = None
                     ) -> tuple[Path | None, str]:
    """(factors file, how it was found) for compare's longrope row: ``factors_file`` when given, else a search
    ropekit ships for this model at this target length (``ropekit.shipped.shipped_factors``), else (None, "")."""
    if factors_file is not None:
        return Path(factors_file), "factors file"
    shipped = shipped_factors(model_source, target_length)
    return (shipped, f"searched, {shipped.name}") if shipped is not None else (None, "")



def rotation_key(rope: RopeConfig, seq_len: int) -> tuple:
    """What the model computes with ``rope`` for a sequence of ``seq_len`` tokens (equal keys = same numbers)."""
    f = frequencies(rope, seq_len)
    original = None if f.original_inv_freq64 is None else tuple(f.original_inv_freq64.tolist())
    return (tuple(f.inv_freq64.tolist()), f.attention_scale, f.unscaled_until, original, f.layout, f.rotary_dim)
