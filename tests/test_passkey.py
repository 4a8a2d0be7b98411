"""Passkey and needle prompts: the key lands at the requested depth; answers are scored; runs are seeded."""

from __future__ import annotations

import random

import pytest
import torch

from ropekit.config import RopeConfig
from ropekit.evaluation.data import Document
from ropekit.evaluation.needle import needle_builder, needle_prompt
from ropekit.evaluation.passkey import (
    FILLER,
    KEY_SENTENCE,
    QUESTION,
    evaluate_passkey,
    first_number,
    is_correct,
    passkey_prompt,
)
from ropekit.evaluation.perplexity import MethodRun
from tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.9, 1.0])
def test_passkey_prompt_places_the_key_at_the_depth(tokenizer, depth):
    length = 3000
    prompt = passkey_prompt(tokenizer, length, depth, "52817")
    ids = prompt.input_ids
    unit = len(FILLER.encode())
    assert ids.numel() == length
    text = tokenizer.decode(ids)
    key_sentence = KEY_SENTENCE.format(key="52817")
    assert tokenizer.decode(ids[prompt.needle_start:prompt.needle_end]) == key_sentence
    assert text.count("52817") == 2 and text.endswith(QUESTION)
    # the filler before the key is depth x all filler, to within one filler sentence
    filler_tokens = prompt.context_end - prompt.context_start - len(key_sentence)
    before = prompt.needle_start - prompt.context_start
    assert abs(before - depth * filler_tokens) <= unit + 1
    assert abs(prompt.actual_depth - depth) <= unit / filler_tokens
    assert tokenizer.decode(ids[prompt.context_start:prompt.needle_start]) == FILLER * (before // unit)


def test_passkey_prompt_rejects_bad_depth_and_tiny_length(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        passkey_prompt(tokenizer, 3000, 1.5, "12345")
    with pytest.raises(ValueError, match="needs at least"):
        passkey_prompt(tokenizer, 100, 0.5, "12345")


def test_answer_scoring():
    assert first_number(" 52817. Remember it.") == "52817"
    assert first_number("no digits") is None
    assert is_correct(" 52817.", "52817")
    assert not is_correct(" 5281", "52817")
    assert not is_correct(" 528170", "52817")
    assert not is_correct(" the key 11111 or 52817", "52817")  # the first number counts
    assert is_correct("It is 48213, I think", "48213", numeric=False)
    assert not is_correct("It is 4821", "48213", numeric=False)


def test_needle_prompt_snaps_to_a_line_start(tokenizer):
    lines = [f"line {i:03d} of the haystack text" for i in range(200)]
    hay_text = "\n".join(lines)
    haystack = torch.tensor(tokenizer(hay_text)["input_ids"])
    from ropekit.evaluation.data import line_start_mask

    starts = line_start_mask(tokenizer, haystack)
    prompt = needle_prompt(tokenizer, haystack, 2000, 0.5, "The secret number of Oslo is 12345.",
                           "What is the secret number of Oslo?", "12345", starts)
    assert prompt.input_ids.numel() <= 2000
    needle = tokenizer.decode(prompt.input_ids[prompt.needle_start:prompt.needle_end])
    assert needle == "\nThe secret number of Oslo is 12345.\n"
    before = tokenizer.decode(prompt.input_ids[prompt.context_start:prompt.needle_start])
    assert before.endswith("\n") or before == ""
    assert abs(prompt.actual_depth - 0.5) < 0.05
    with pytest.raises(ValueError, match="too short"):
        needle_prompt(tokenizer, haystack[:100], 2000, 0.5, "n", "q", "a", None)


def test_needle_builder_is_seeded_and_validates_custom_needles(tokenizer):
    docs = [Document("a", "\n".join(f"row {i} some words here" for i in range(300)))]
    build = needle_builder(tokenizer, docs, 1500)
    one = build(1500, 0.3, random.Random("s"))
    two = build(1500, 0.3, random.Random("s"))
    assert torch.equal(one.input_ids, two.input_ids) and one.answer.isdigit() and len(one.answer) == 5
    with pytest.raises(ValueError, match="give all three"):
        needle_builder(tokenizer, docs, 1500, needle="The sky is green.")


def test_evaluate_passkey_on_a_tiny_model_is_reproducible(tiny_model, tokenizer):
    model = tiny_model("llama", max_position_embeddings=512)
    base = RopeConfig.from_hf(model.config)
    runs = [MethodRun("default", base), MethodRun("yarn x2", base.with_method("yarn", factor=2.0))]
    first = evaluate_passkey(model, tokenizer, runs, [400, 600], [0.0, 1.0], trials=2, seed=3, progress=False)
    again = evaluate_passkey(model, tokenizer, runs[:1], [400, 600], [0.0, 1.0], trials=2, seed=3, progress=False)
    result = first[0]
    assert [r.label for r in first] == ["default", "yarn x2"]
    assert len(result.accuracy) == 2 and all(len(row) == 2 for row in result.accuracy)
    assert len(result.trials) == 8 and all(0 <= a <= 1 for row in result.accuracy for a in row)
    assert [t["answer"] for t in result.trials] == [t["answer"] for t in again[0].trials]
    keys = [t["expected"] for t in result.trials]
    assert keys == [t["expected"] for t in first[1].trials]  # every method sees the same prompts
    assert len(set(keys)) > 1 and all(len(k) == 5 for k in keys)
    assert result.to_dict()["mean_accuracy"] == result.mean_accuracy
