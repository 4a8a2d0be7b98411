"""The retrieval scorer: whether an answer is right, and when decoding an answer may stop.

One rule, in one place: a numeric answer is right when the first number in it equals the expected one
(``is_correct``; otherwise the expected text must appear in it). The early stop follows the same rule
(``answer_state``): greedy decoding ends once the first number is complete, or once its digits already differ
from the expected answer, so stopping early never changes a verdict. ``cached.answer`` / ``answer_all`` stop by
it; ``compare`` and ``passkey`` judge by it.
"""

from __future__ import annotations

import re


def first_number(text: str) -> str | None:
    """The first run of digits in ``text`` (the model's answer), or None."""
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


def is_correct(answer_text: str, expected: str, *, numeric: bool = True) -> bool:
    """Passkey: the first number of the answer equals ``expected``. Otherwise: ``expected`` appears in it."""
    if numeric:
        return first_number(answer_text) == expected
    return expected.strip().lower() in answer_text.lower()


def answer_state(text: str, expected: str | None) -> str:
    """"open" while the first number of ``text`` may still become ``expected``; "done" once it is decided."""
    match = re.search(r"\d+", text)
    if match is None:
        return "open"
    if match.end() < len(text):
        return "done"  # the number is complete
    if expected is not None and not expected.startswith(match.group(0)):
        return "done"  # its digits already differ from the expected answer: greedy cannot recover it
    return "open"
