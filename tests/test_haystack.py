"""Many needles in one context (``evaluation.haystack``) and answers from a cached prefix (``evaluation.cached``)."""

from __future__ import annotations

import pytest
import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.cached import answer, answer_all, prefill
from ropekit.evaluation.haystack import (
    MAX_NEEDLES,
    answer_ids,
    build_haystack,
    line_start_mask,
    qa_tokens,
    question_ids,
    with_answers,
)
from ropekit.evaluation.perplexity import rope_context, token_nll
from ropekit.methods import method_names
from tiny import TINY_TRAINED_LENGTH, byte_tokenizer

TEXT = "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(200))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def text_ids(tokenizer):
    return torch.tensor(tokenizer(TEXT, add_special_tokens=False)["input_ids"])


def test_haystack_places_distinct_needles_at_spread_depths(tokenizer):
    ids = text_ids(tokenizer)
    hay = build_haystack(tokenizer, ids, 2000, needles=6, seed=3, line_starts=line_start_mask(tokenizer, ids))
    assert hay.length == 2000 and hay.scored.shape == (2000,)
    labels = [n.label for n in hay.needles]
    values = [n.value for n in hay.needles]
    assert len(set(labels)) == 6 and len(set(values)) == 6
    starts = [n.start for n in hay.needles]
    assert starts == sorted(starts)
    text = tokenizer.decode(hay.input_ids)
    for n in hay.needles:
        sentence = tokenizer.decode(hay.input_ids[n.start:n.end])
        assert sentence.strip() == n.sentence and n.sentence in text
        assert not hay.scored[n.start:n.end].any()  # needle tokens are left out of the perplexity
        assert tokenizer.decode(hay.input_ids[n.start - 1:n.start]) == "\n"  # snapped to a line start
    # distances run from near the end to near the start of the context
    d = hay.distances()
    assert max(d) > 0.9 * hay.length and min(d) < 0.2 * hay.length
    # the real text between the needles is the text, in order
    assert torch.equal(hay.input_ids[hay.scored], ids[: int(hay.scored.sum())])
    # same seed, same haystack; another seed, other labels
    again = build_haystack(tokenizer, ids, 2000, needles=6, seed=3, line_starts=line_start_mask(tokenizer, ids))
    assert torch.equal(again.input_ids, hay.input_ids)
    other = build_haystack(tokenizer, ids, 2000, needles=6, seed=4)
    assert [n.label for n in other.needles] != labels


def test_haystack_rejects_bad_sizes(tokenizer):
    ids = text_ids(tokenizer)
    with pytest.raises(ValueError, match="needles: must be between 1 and"):
        build_haystack(tokenizer, ids, 2000, needles=MAX_NEEDLES + 1)
    with pytest.raises(ValueError, match="length:"):
        build_haystack(tokenizer, ids, 100, needles=6)
    with pytest.raises(ValueError, match="text: too short"):
        build_haystack(tokenizer, ids[:50], 2000, needles=2)


def test_with_answers_marks_only_answer_tokens(tokenizer):
    ids = text_ids(tokenizer)
    hay = build_haystack(tokenizer, ids, 1500, needles=4)
    qa = with_answers(tokenizer, hay)
    assert torch.equal(qa.input_ids[:1500], hay.input_ids)
    assert qa.input_ids.numel() - 1500 <= qa_tokens(tokenizer, 4)
    answers = [tokenizer.decode(qa.input_ids[qa.answer_mask][i:]) for i in range(1)]
    assert answers[0].startswith(" " + qa.needles[0].value + ".")
    assert int(qa.answer_mask.sum()) == sum(len(answer_ids(tokenizer, n)) for n in hay.needles)
    assert qa.nll_mask().shape == (qa.input_ids.numel() - 1,)


@pytest.mark.parametrize("method", method_names(comparable=True))
def test_cached_prefix_answers_equal_fresh_full_prompts(method, tiny_model, tokenizer):
    """Answer from the cached context == greedy generation on context + question, same tokens, every method
    (length-dependent ones with the scale fixed at the context's length); the prefill NLL == token_nll."""
    model = tiny_model("llama")
    base = RopeConfig.from_hf(model.config)
    target = 8 * TINY_TRAINED_LENGTH
    if method == "longrope":
        pairs = base.rotary_dim // 2
        rope = base.extend("longrope", 8.0, short_factor=[1.0] * pairs,
                           long_factor=[1.0 + 7.0 * i / (pairs - 1) for i in range(pairs)])
    elif method == "base":
        rope = base.extend("base", new_base=50000.0)
    elif method == "default":
        rope = base
    else:
        rope = base.extend(method, 8.0)
    ids = text_ids(tokenizer)
    hay = build_haystack(tokenizer, ids, target - 100, needles=3, seed=1, style="objects")
    with rope_context(model, rope) as patch:
        if rope.length_dependent:
            patch.fix_length(target)
        context = prefill(model, hay.input_ids)
        assert torch.allclose(context.nll, token_nll(model, hay.input_ids[None])[0], atol=1e-4)
        together = answer_all(model, tokenizer, context, [question_ids(tokenizer, n) for n in hay.needles],
                              max_new_tokens=6, stop_after_number=False)
        assert context.cache.get_seq_length() == hay.length
        for needle, packed in zip(hay.needles, together):
            q = question_ids(tokenizer, needle)
            cached = answer(model, tokenizer, context, q, max_new_tokens=6, stop_after_number=False)
            assert context.cache.get_seq_length() == hay.length  # cropped back
            full = torch.cat([hay.input_ids, torch.tensor(q)])[None]
            out = model.generate(full, attention_mask=torch.ones_like(full), max_new_tokens=6, do_sample=False,
                                 pad_token_id=0, eos_token_id=2)
            fresh = tokenizer.decode(out[0, full.shape[1]:], skip_special_tokens=True)
            assert cached == fresh
            assert packed == fresh  # decoded together with the other questions, same answer
