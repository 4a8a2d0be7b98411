"""RULER-style tasks (``evaluation.ruler``): samples fit and hold their answers; scoring and aggregation."""

from __future__ import annotations

import random
import re
from collections import Counter

import pytest
import torch

from ropekit.config import RopeConfig
from ropekit.evaluation import ruler
from ropekit.evaluation.perplexity import MethodRun
from ropekit.evaluation.ruler import TASKS, build_sample, evaluate_ruler, string_match_all, word_vocabulary
from ropekit.evaluation.data import Document
from tiny import byte_tokenizer

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa quebec "
         "romeo sierra tango uniform victor whiskey xray yankee zulu").split()
TEXT = "\n".join(f"{w} " + " ".join(f"{a}{b}" for a in WORDS[:12] for b in ("ness", "ward", "ling")[: i % 3 + 1])
                 for i, w in enumerate(WORDS * 4))


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def ids_of(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize("task", TASKS)
def test_samples_fit_and_contain_their_answers(task, tokenizer):
    length = 4096
    text = ids_of(tokenizer, TEXT * 3)
    vocabulary = word_vocabulary([Document("d", TEXT + " " + " ".join(f"{a}{b}" for a in WORDS for b in WORDS))])
    sample = build_sample(task, tokenizer, length, random.Random(0), text, vocabulary)
    context = tokenizer.decode(sample.context_ids)
    assert sample.questions
    for q in sample.questions:
        total = sample.context_ids.numel() + len(tokenizer(q.question)["input_ids"]) + ruler.ANSWER_TOKENS[task]
        assert total <= length
        for ref in q.references:
            assert ref in context
    if task == "common_words":
        counts = Counter(re.findall(r"\d+\. (\w+)", context))
        top = {w for w, _ in counts.most_common(10)}
        assert top == set(sample.questions[0].references)
    if task == "frequent_words":
        counts = Counter(w for w in context.split("\n", 1)[1].split() if w != "....")
        assert [w for w, _ in counts.most_common(3)] == sample.questions[0].references
    if task == "variable_tracking":
        for q in sample.questions:
            first, *rest = q.references
            assert re.search(rf"VAR {first} = \d+", context)
            for a, b in zip(q.references, rest):
                assert f"VAR {b} = VAR {a}." in context
    # seeded: the same draw gives the same sample
    again = build_sample(task, tokenizer, length, random.Random(0), text, vocabulary)
    assert torch.equal(again.context_ids, sample.context_ids)


def test_string_match_all():
    assert string_match_all("The numbers are 123, 456.", ["123", "456"]) == 1.0
    assert string_match_all("the NUMBER is 123", ["123", "456"]) == 0.5
    assert string_match_all("nothing", ["x"]) == 0.0


def test_evaluate_ruler_scores_and_aggregates(tiny_model, tokenizer, tmp_path, monkeypatch):
    """With an oracle answering right on the even questions, the cells, n and intervals follow."""
    model = tiny_model("llama")
    data = tmp_path / "text.txt"
    data.write_text(TEXT * 4 + " " + " ".join(f"{a}{b}" for a in WORDS for b in WORDS))
    asked = []

    def oracle_one(tok, context, question_ids):
        question = tok.decode(question_ids)
        asked.append((context.length, question))
        sample = next(s for s in samples_seen if any(q.question == question for q in s.questions))
        q = next(q for q in sample.questions if q.question == question)
        return " ".join(q.references) if len(asked) % 2 else "no idea"

    def oracle(model, tok, context, questions, **kwargs):  # answer_all's signature: all of a context's questions
        return [oracle_one(tok, context, ids) for ids in questions]

    samples_seen = []
    real_build = ruler.build_sample

    def recording_build(*args, **kwargs):
        sample = real_build(*args, **kwargs)
        samples_seen.append(sample)
        return sample

    monkeypatch.setattr(ruler, "answer_all", oracle)
    monkeypatch.setattr(ruler, "build_sample", recording_build)
    base = RopeConfig.from_hf(model.config)
    runs = [MethodRun("default", base), MethodRun("yarn x4", base.extend("yarn", 4.0))]
    results = evaluate_ruler(model, tokenizer, runs, [2048], ["niah_multikey", "variable_tracking"], 2,
                             data=data, progress=False)
    assert [r.label for r in results] == ["default", "yarn x4"]
    for r in results:
        mk = r.cells["niah_multikey"]["2048"]
        vt = r.cells["variable_tracking"]["2048"]
        assert mk["n"] == 8 and vt["n"] == 4  # 4 keys / 2 chains per sample, 2 samples
        assert mk["score"] == 0.5 and vt["score"] == 0.5
        assert mk["ci"][0] < 0.5 < mk["ci"][1]
        assert len(r.answers) == 12
    # every question of a sample was asked after a context of that sample's length (one prefill, many questions)
    assert len({length for length, _ in asked}) <= 4


def test_unknown_task_is_refused():
    with pytest.raises(ValueError, match="tasks: unknown nope"):
        evaluate_ruler(None, None, [], [1024], ["nope"])
