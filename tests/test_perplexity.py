"""Chunked perplexity: equal to the unchunked loss, buckets consistent with the total, RoPE applied per run."""

from __future__ import annotations

import math

import pytest
import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.data import TokenWindow
from ropekit.evaluation.perplexity import (
    MethodRun,
    bucket_index,
    evaluate_perplexity,
    summarize_nll,
    token_nll,
    window_nll,
)


def full_loss_nll(model, ids):
    """Reference: the model's own full logits and transformers' loss."""
    with torch.no_grad():
        out = model(input_ids=ids, labels=ids)
    logits = out.logits[:, :-1].float()
    nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(ids.shape[0], -1), out.loss


@pytest.mark.parametrize("family", ["llama", "gemma2", "gpt_neox"])
def test_chunked_nll_equals_unchunked_loss(tiny_model, family):
    model = tiny_model(family)
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(0))
    reference, loss = full_loss_nll(model, ids)
    for chunk in (1, 7, 64, 1000):
        nll = token_nll(model, ids, chunk_size=chunk)
        assert nll.shape == (2, 149)
        torch.testing.assert_close(nll, reference, atol=1e-5, rtol=1e-5)
    assert math.isclose(float(token_nll(model, ids, chunk_size=7).mean()), float(loss), rel_tol=1e-5)


def test_token_nll_rejects_bad_input(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="at least 2 tokens"):
        token_nll(model, torch.tensor([[3]]))
    with pytest.raises(ValueError, match="chunk_size"):
        token_nll(model, torch.tensor([[3, 4]]), chunk_size=0)


def test_buckets_are_by_predicted_position():
    # 10 tokens, buckets of 4: predicted tokens 1..9 -> buckets 0,0,0,1,1,1,1,2,2
    assert bucket_index(10, 4).tolist() == [0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_bucket_ppl_consistent_with_total():
    gen = torch.Generator().manual_seed(1)
    nll = torch.rand(3, 99, generator=gen) * 5
    ppl, bucket_ppl, counts = summarize_nll(nll, 16)
    assert len(bucket_ppl) == 7 and sum(counts) == 3 * 99 and counts[0] == 3 * 15
    weighted = sum(math.log(p) * n for p, n in zip(bucket_ppl, counts)) / sum(counts)
    assert math.isclose(math.log(ppl), weighted, rel_tol=1e-9)
    assert math.isclose(ppl, math.exp(float(nll.double().mean())), rel_tol=1e-9)
    # one bucket by hand: predicted tokens 16..31 are NLL entries 15..30
    assert math.isclose(bucket_ppl[1], math.exp(float(nll[:, 15:31].double().mean())), rel_tol=1e-9)


def test_evaluate_perplexity_applies_each_rope(tiny_model):
    model = tiny_model("llama")
    base = RopeConfig.from_hf(model.config)
    gen = torch.Generator().manual_seed(2)
    windows = [TokenWindow(f"doc{i}", torch.randint(0, 256, (192,), generator=gen)) for i in range(2)]
    by_length = {n: [TokenWindow(w.name, w.input_ids[:n]) for w in windows] for n in (64, 192)}
    runs = [MethodRun("default", base), MethodRun("yarn x3", base.with_method("yarn", factor=3.0))]
    results = evaluate_perplexity(model, runs, [64, 192], by_length, bucket_size=32, progress=False)
    assert [(r.label, r.length) for r in results] == [("default", 64), ("default", 192), ("yarn x3", 64),
                                                      ("yarn x3", 192)]
    # ropekit's plain RoPE reproduces the unpatched model
    plain = math.exp(float(torch.cat([full_loss_nll(model, w.input_ids[None])[0] for w in by_length[192]]).mean()))
    assert math.isclose(results[1].ppl, plain, rel_tol=1e-4)
    # a different rotation gives different numbers, and the model is left unpatched afterwards
    assert not math.isclose(results[3].ppl, results[1].ppl, rel_tol=1e-4)
    from ropekit.hf import active_patch
    assert active_patch(model) is None
    record = results[3].to_dict()
    assert {"method", "factor", "length", "ppl", "bucket_size", "bucket_ppl"} <= set(record)
    assert record["method"] == "yarn" and record["factor"] == 3.0 and len(record["bucket_ppl"]) == 6
    # length-independent rotations read the 64-token result off the 192-token window: same as running it
    direct = window_nll(model, by_length[64], base)
    assert math.isclose(results[0].ppl, math.exp(float(direct.double().mean())), rel_tol=1e-5)
    assert math.isclose(results[0].bucket_ppl[1], results[1].bucket_ppl[1], rel_tol=1e-5)


def test_length_dependent_runs_measure_each_length(tiny_model):
    model = tiny_model("llama")
    base = RopeConfig.from_hf(model.config)
    gen = torch.Generator().manual_seed(3)
    window = TokenWindow("doc", torch.randint(0, 256, (192,), generator=gen))
    by_length = {n: [TokenWindow("doc", window.input_ids[:n])] for n in (64, 192)}
    runs = [MethodRun("default", base), MethodRun("dynamic", base.with_method("dynamic", factor=3.0))]
    plain64, plain192, dyn64, dyn192 = evaluate_perplexity(model, runs, [64, 192], by_length, bucket_size=32,
                                                           progress=False)
    assert math.isclose(dyn64.ppl, plain64.ppl, rel_tol=1e-5)  # dynamic NTK is plain RoPE up to the trained length
    assert not math.isclose(dyn192.bucket_ppl[0], plain192.bucket_ppl[0], rel_tol=1e-4)  # rescaled at 192


def test_late_ppl(tiny_model):
    from ropekit.evaluation.perplexity import PerplexityResult

    r = PerplexityResult("default", None, 300, 0.0, 100, [2.0, 4.0, 8.0], [99, 100, 100])
    assert math.isclose(r.late_ppl(100), math.exp((math.log(4) + math.log(8)) / 2))
    with pytest.raises(ValueError, match="past the window"):
        r.late_ppl(400)
