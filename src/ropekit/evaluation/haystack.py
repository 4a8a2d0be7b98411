"""Many labelled needles in one long context: retrieval at every distance for the price of one prefill.

A haystack is real text (``data.load_documents``) of ``length`` tokens with ``count`` needle sentences
("The pass key of Lisbon is 48213. Remember it. 48213 is the pass key of Lisbon.") inserted at spread depths,
each with a distinct label and value. The context is prefilled once; every question ("What is the pass key of
Lisbon?") is then answered greedily from the cached context (``cached.answer_all``: all questions decoded together),
so thirty queries cost about a tenth of the prefill and cover the distance from the question from a few tokens to
the whole context. Style "objects" ("The code for the blue box is 48213.") is harder: labels share words.

The same forward gives the perplexity of the haystack's own text: ``Haystack.scored`` marks the tokens whose
prediction counts (real text, not the instruction and not the needles).

For a search (LongRoPE2's "needle-driven perplexity"), ``with_answers`` appends every question with its answer
after the context: one teacher-forced forward then scores the answer tokens of all needles.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch

from ropekit.evaluation.data import (
    Document,
    concatenated_tokens,
    line_start_mask,
    load_documents,
    plain_ids,
    special_prefix_ids,
)

COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "silver", "golden", "brown",
          "pink", "grey", "violet", "crimson", "teal")
OBJECTS = ("box", "door", "safe", "locker", "drawer", "vault", "suitcase", "gate", "chest", "cabinet", "trunk",
           "padlock")
PLACES = ("Lisbon", "Nairobi", "Oslo", "Lima", "Hanoi", "Quebec", "Porto", "Kyoto", "Tbilisi", "Dakar", "Tallinn",
          "Cusco", "Perth", "Bergen", "Seville", "Accra", "Madrid", "Cairo", "Dublin", "Vienna", "Prague", "Havana",
          "Manila", "Jakarta", "Bogota", "Geneva", "Munich", "Athens", "Warsaw", "Helsinki", "Toronto", "Denver",
          "Zurich", "Santiago", "Montreal", "Istanbul", "Sydney", "Mumbai", "Caracas", "Budapest", "Bangkok",
          "Marseille", "Glasgow", "Krakow", "Valencia", "Beirut", "Quito", "Lagos")
INTRO = ("Read the following text carefully. Hidden in it are the pass keys of several places; questions about "
         "them follow.\n\n")
OBJECTS_INTRO = ("Read the following text carefully. Hidden in it are the codes of several objects; questions about "
                 "them follow.\n\n")


@dataclass(frozen=True)
class NeedleStyle:
    """How needles read: the label pool and the needle / question templates ({label}, {value})."""

    labels: tuple[str, ...]
    needle: str
    question: str


STYLES = {
    # distinct one-word labels, the key said twice (passkey style): a 135M model retrieves these in real text
    "places": NeedleStyle(PLACES,
                          "The pass key of {label} is {value}. Remember it. {value} is the pass key of {label}.",
                          "\n\nWhat is the pass key of {label}? The pass key of {label} is"),
    # two-word labels sharing words (harder: every needle is a distractor for the others); the search's fitness
    "objects": NeedleStyle(tuple(f"{c} {o}" for c in COLORS for o in OBJECTS), "The code for the {label} is {value}.",
                           "\n\nQuestion: What is the code for the {label}?\nAnswer: The code for the {label} is"),
}
DEFAULT_STYLE = "places"
SNAP_TOKENS = 64  # how far back an insertion point may move to reach a line start
MAX_NEEDLES = len(PLACES)
ANSWER_BOUND = 8  # tokens of " 48213." in any tokenizer that splits digits one by one, with room


@dataclass(frozen=True)
class Needle:
    """One needle in a haystack.

    Attributes:
        label: what the question names ("blue box").
        value: the answer, a 5-digit number as text.
        depth: requested position in [0, 1] of the text (0: right after the instruction, 1: at its end).
        start, end: token span of the needle sentence in ``Haystack.input_ids``.
    """

    label: str
    value: str
    depth: float
    start: int
    end: int
    style: str = DEFAULT_STYLE

    @property
    def sentence(self) -> str:
        return STYLES[self.style].needle.format(label=self.label, value=self.value)

    @property
    def question(self) -> str:
        """The question text, ending where the model's answer begins."""
        return STYLES[self.style].question.format(label=self.label)

    def distance(self, context_end: int) -> int:
        """Tokens between the needle's start and the end of the context (where the question begins)."""
        return context_end - self.start


@dataclass
class Haystack:
    """A context of real text with needles.

    Attributes:
        input_ids: (length,) long tokens: [special prefix] instruction, text with needles.
        needles: in order of position.
        scored: (length,) bool, True for tokens of real text (their prediction counts toward perplexity).
    """

    input_ids: torch.Tensor
    needles: list[Needle]
    scored: torch.Tensor

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def nll_mask(self) -> torch.Tensor:
        """(length - 1,) bool over ``perplexity.token_nll`` entries (entry j predicts token j + 1)."""
        return self.scored[1:]

    def distances(self) -> list[int]:
        return [n.distance(self.length) for n in self.needles]


def needle_labels(count: int, rng: random.Random, style: str = DEFAULT_STYLE) -> list[tuple[str, str]]:
    """``count`` distinct (label, value) pairs: labels from the style's pool, values distinct 5-digit numbers."""
    pool = STYLES[style].labels
    if not 1 <= count <= len(pool):
        raise ValueError(f"needles: must be between 1 and {len(pool)}, got {count}")
    labels = rng.sample(list(pool), count)
    values = rng.sample(range(10000, 100000), count)
    return [(label, str(value)) for label, value in zip(labels, values)]


def spread_depths(count: int) -> list[float]:
    """``count`` depths spread evenly over [0, 1] (both ends included when count > 1)."""
    if count == 1:
        return [0.5]
    return [i / (count - 1) for i in range(count)]


def build_haystack(tokenizer, text_ids: torch.Tensor, length: int, needles: int = 24, *, seed: int = 0,
                   depths: Sequence[float] | None = None, line_starts: torch.Tensor | None = None,
                   style: str = DEFAULT_STYLE) -> Haystack:
    """A haystack of exactly ``length`` tokens from ``text_ids`` (real text, at least ``length`` tokens).

    Args:
        tokenizer: the model's tokenizer.
        text_ids: (m,) long token ids of real text (``data.concatenated_tokens``).
        length: tokens of the whole context (instruction, text and needles).
        needles: how many needles; labels and values drawn from ``random.Random(seed)``.
        depths: one depth in [0, 1] per needle (default: ``spread_depths``).
        line_starts: (m,) bool mask of line starts (``line_start_mask``); needles snap back to one.
        style: a key of ``STYLES`` ("places": distinct place names; "objects": colour + object labels).
    """
    if style not in STYLES:
        raise ValueError(f"style: {style!r} not accepted; accepted: {', '.join(STYLES)}")
    depths = list(spread_depths(needles) if depths is None else depths)
    if len(depths) != needles:
        raise ValueError(f"depths: need one per needle ({needles}), got {len(depths)}")
    if any(not 0.0 <= d <= 1.0 for d in depths):
        raise ValueError(f"depths: must be in [0, 1], got {depths}")
    rng = random.Random(f"haystack-{seed}")
    pairs = needle_labels(needles, rng, style)
    template = STYLES[style]
    head = special_prefix_ids(tokenizer) + plain_ids(tokenizer, INTRO if style == "places" else OBJECTS_INTRO)
    sentences = [plain_ids(tokenizer, template.needle.format(label=label, value=value) + "\n")
                 for label, value in pairs]
    room = length - len(head) - sum(len(s) for s in sentences)
    if room < needles:
        raise ValueError(f"length: {needles} needles need more than {length - room + needles} tokens, got {length}")
    if text_ids.numel() < room:
        raise ValueError(f"text: too short: {room} tokens needed, it has {text_ids.numel()}")
    text = text_ids[:room].tolist()
    order = sorted(range(needles), key=lambda i: depths[i])
    cuts = []
    for i in order:
        at = round(depths[i] * room)
        if line_starts is not None and 0 < at <= room:
            lo = max(0, at - SNAP_TOKENS, cuts[-1] if cuts else 0)
            starts = line_starts[lo: at + 1].nonzero().flatten()
            if starts.numel():
                at = lo + int(starts[-1])
        cuts.append(max(at, cuts[-1] if cuts else 0))
    ids: list[int] = list(head)
    scored = [False] * len(head)
    placed: list[Needle] = []
    previous = 0
    for i, at in zip(order, cuts):
        ids += text[previous:at]
        scored += [True] * (at - previous)
        previous = at
        label, value = pairs[i]
        placed.append(Needle(label, value, float(depths[i]), len(ids), len(ids) + len(sentences[i]), style))
        ids += sentences[i]
        scored += [False] * len(sentences[i])
    ids += text[previous:]
    scored += [True] * (room - previous)
    return Haystack(torch.tensor(ids, dtype=torch.long), placed, torch.tensor(scored, dtype=torch.bool))


def haystack_text(tokenizer, length: int, documents: Iterable[Document] | None = None,
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, line_starts) of real text for a haystack of ``length`` tokens (default: the standard library)."""
    ids = concatenated_tokens(load_documents(None) if documents is None else documents, tokenizer, length)
    return ids, line_start_mask(tokenizer, ids)


def question_ids(tokenizer, needle: Needle) -> list[int]:
    """Tokens of ``needle``'s question, appended right after the context."""
    return plain_ids(tokenizer, needle.question)


def answer_ids(tokenizer, needle: Needle) -> list[int]:
    """Tokens of the answer that follows the question (" 48213.")."""
    return plain_ids(tokenizer, " " + needle.value + ".")


@dataclass
class AnsweredHaystack:
    """A haystack followed by every question and its answer (teacher forcing).

    Attributes:
        input_ids: (n,) long: the context, then question_1 answer_1 question_2 answer_2 ...
        answer_mask: (n,) bool, True on answer tokens (the needle-driven loss is their mean NLL).
        needles: the needles in the order their questions are asked.
    """

    input_ids: torch.Tensor
    answer_mask: torch.Tensor
    needles: list[Needle] = field(default_factory=list)

    def nll_mask(self) -> torch.Tensor:
        """(n - 1,) bool over ``token_nll`` entries (entry j predicts token j + 1)."""
        return self.answer_mask[1:]


def with_answers(tokenizer, haystack: Haystack, *, seed: int = 0) -> AnsweredHaystack:
    """``haystack`` followed by all its questions with answers, in a seeded random order (so distance from the
    question is not simply depth)."""
    order = list(haystack.needles)
    random.Random(f"answers-{seed}").shuffle(order)
    ids = haystack.input_ids.tolist()
    mask = [False] * len(ids)
    for needle in order:
        q, a = question_ids(tokenizer, needle), answer_ids(tokenizer, needle)
        ids += q + a
        mask += [False] * len(q) + [True] * len(a)
    return AnsweredHaystack(torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.bool), order)


def qa_tokens(tokenizer, needles: int, style: str = DEFAULT_STYLE) -> int:
    """An upper bound on the tokens ``with_answers`` appends for ``needles`` needles (to size the context):
    the longest question of any label plus an answer of at most ``ANSWER_BOUND`` tokens, per needle."""
    template = STYLES[style]
    longest = max(len(plain_ids(tokenizer, template.question.format(label=label))) for label in template.labels)
    return needles * (longest + ANSWER_BOUND)


def describe(haystack: Haystack) -> dict[str, Any]:
    """JSON-ready record of where the needles are."""
    return {"length": haystack.length, "needles": [
        {"label": n.label, "value": n.value, "depth": n.depth, "start": n.start,
         "distance": n.distance(haystack.length)} for n in haystack.needles]}
