"""Needle in a haystack: passkey retrieval on real text, with a sentence as the needle.

The haystack is real text (``data.load_documents``) cut to fit ``length`` tokens; the needle sentence is
inserted at ``depth`` (snapped back to the nearest line start so it does not split a line), and the model is
asked the question. A trial is correct when the greedy answer contains the needle's key fact. By default
each trial's needle names a random city and a random 5-digit number (the fact to retrieve); ``needle`` /
``question`` / ``answer`` set a fixed custom one.
"""

from __future__ import annotations

import random
from typing import Sequence

import torch

from ropekit.evaluation.data import concatenated_tokens, line_start_mask, plain_ids, special_prefix_ids
from ropekit.evaluation.passkey import (
    DEFAULT_DEPTHS,
    PromptBuilder,
    RetrievalPrompt,
    RetrievalResult,
    check_depth,
    evaluate_retrieval,
)

CITIES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quebec", "Porto", "Kyoto", "Tbilisi", "Dakar",
          "Tallinn", "Cusco", "Perth", "Bergen", "Seville", "Accra")
NEEDLE = "The secret number of {city} is {number}."
QUESTION = "What is the secret number of {city}? The secret number of {city} is"
INTRO = "Read the following text carefully; a question about it follows.\n\n"
SNAP_TOKENS = 64  # how far back the insertion point may move to reach a line start


def needle_prompt(tokenizer, haystack_ids: torch.Tensor, length: int, depth: float, needle: str, question: str,
                  answer: str, line_starts: torch.Tensor | None = None) -> RetrievalPrompt:
    """A prompt of at most ``length`` tokens: intro, haystack with ``needle`` at ``depth``, ``question``.

    ``haystack_ids``: (m,) tokens of real text, at least the room left by the other parts.
    ``line_starts``: (m,) bool, True where a haystack token starts a line (insertion snaps back to one).
    """
    depth = check_depth(depth)
    head = special_prefix_ids(tokenizer) + plain_ids(tokenizer, INTRO)
    needle_ids = plain_ids(tokenizer, "\n" + needle.strip() + "\n")
    question_ids = plain_ids(tokenizer, "\n\n" + question.strip())
    room = length - len(head) - len(needle_ids) - len(question_ids)
    if room < 1:
        raise ValueError(f"length: a needle prompt needs more than {length - room} tokens, got {length}")
    if haystack_ids.numel() < room:
        raise ValueError(f"haystack: the text is too short: {room} tokens needed, it has {haystack_ids.numel()}")
    hay = haystack_ids[:room].tolist()
    at = round(depth * room)
    if line_starts is not None and 0 < at < room:
        starts = line_starts[max(0, at - SNAP_TOKENS): at + 1].nonzero().flatten()
        if starts.numel():
            at = max(0, at - SNAP_TOKENS) + int(starts[-1])
    ids = head + hay[:at] + needle_ids + hay[at:] + question_ids
    start = len(head) + at
    return RetrievalPrompt(torch.tensor(ids, dtype=torch.long), answer, depth, start, start + len(needle_ids),
                           len(head), len(ids) - len(question_ids))


def needle_builder(tokenizer, documents, max_length: int, *, needle: str | None = None,
                   question: str | None = None, answer: str | None = None) -> PromptBuilder:
    """Prompt builder for ``evaluate_retrieval`` over a haystack of ``documents`` long enough for ``max_length``.

    Without ``needle``, each trial draws a city and a 5-digit number; with it, ``question`` and ``answer``
    (the key fact the answer must contain) are required.
    """
    custom = (needle, question, answer)
    if any(v is not None for v in custom) and not all(v is not None for v in custom):
        raise ValueError("needle, question, answer: give all three for a custom needle (or none)")
    haystack = concatenated_tokens(documents, tokenizer, max_length)
    starts = line_start_mask(tokenizer, haystack)

    def build(length: int, depth: float, rng: random.Random) -> RetrievalPrompt:
        if needle is not None:
            return needle_prompt(tokenizer, haystack, length, depth, needle, question, answer, starts)
        city, number = rng.choice(CITIES), str(rng.randint(10000, 99999))
        return needle_prompt(tokenizer, haystack, length, depth, NEEDLE.format(city=city, number=number),
                             QUESTION.format(city=city), number, starts)
    return build


def evaluate_needle(model, tokenizer, documents, runs: Sequence, lengths: Sequence[int],
                    depths: Sequence[float] = DEFAULT_DEPTHS, trials: int = 1, *, seed: int = 0,
                    needle: str | None = None, question: str | None = None, answer: str | None = None,
                    progress: bool = True) -> list[RetrievalResult]:
    """Needle retrieval accuracy over depth x length for each run (``perplexity.MethodRun``)."""
    build = needle_builder(tokenizer, documents, max(lengths), needle=needle, question=question, answer=answer)
    return evaluate_retrieval(model, tokenizer, build, runs, lengths, depths, trials, seed=seed, task="needle",
                              numeric=False, progress=progress)
