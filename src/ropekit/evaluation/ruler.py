"""A RULER-style suite (Hsieh et al., arXiv 2404.06654), synthesised locally and seeded.

Tasks (templates follow RULER's ``synthetic/constants.py``; the texts are generated here, nothing is fetched):

* ``niah_single``: one "special magic number" for a key hidden in real text; one question.
* ``niah_multikey``: several keys each with a number (the others are distractors for each question); every key
  is asked, all from one prefill.
* ``niah_multivalue``: two keys with four numbers each; the answer must contain all four.
* ``variable_tracking``: chains of ``VAR X = 12345`` / ``VAR Y = VAR X`` assignments hidden in filler; for each
  chain's value, name every variable that holds it.
* ``common_words``: a numbered list of words where ten words are frequent; name the ten most common.
* ``frequent_words``: a coded text of random words with Zipf frequencies; name the three most frequent.

Scoring is RULER's ``string_match_all``: the fraction of the reference strings found (case-insensitively) in the
greedy answer. Each sample is prefilled once and all of its questions are answered from the cached context
(``evaluation.cached.answer_all``: all of a context's questions decoded together). Results per (method, task,
length): mean score, n questions and a 95% interval (``stats.mean_interval``: Wilson for all-or-nothing scores,
otherwise a bootstrap over questions).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ropekit.evaluation.cached import answer_all, prefill
from ropekit.evaluation.data import Document, concatenated_tokens, plain_ids, special_prefix_ids
from ropekit.evaluation.perplexity import rope_context
from ropekit.evaluation.stats import mean_interval

TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "variable_tracking", "common_words", "frequent_words")

NIAH_INTRO = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will "
              "quiz you about the numbers afterwards.\n")
NIAH_NEEDLE = "One of the special magic numbers for {key} is: {value}."
NIAH_QUESTION = ("\nWhat is the special magic number for {key} mentioned in the provided text? The special magic "
                 "number for {key} mentioned in the provided text is")
NIAH_QUESTION_MV = ("\nWhat are all the special magic numbers for {key} mentioned in the provided text? The special "
                    "magic numbers for {key} mentioned in the provided text are")
VT_INTRO = ("Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n")
VT_NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again.\n"
VT_QUESTION = ("\nQuestion: Find all variables that are assigned the value {value} in the text above. Answer: "
               "According to the chain(s) of variable assignment in the text above, {count} variables are assigned "
               "the value {value}, they are:")
CWE_INTRO = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
             "ones that appear most often.\n")
CWE_QUESTION = ("\nQuestion: What are the 10 most common words in the above list? Answer: The top 10 words that "
                "appear most often in the list are:")
FWE_INTRO = ("Read the following coded text and track the frequency of each coded word. Find the three most "
             "frequently appeared coded words.\n")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text? Answer: According to the coded text above, the "
                "three most frequently appeared words are:")
KEY_WORDS = ("amber", "basalt", "cedar", "dune", "ember", "fjord", "granite", "harbor", "indigo", "juniper", "kelp",
             "lagoon", "marble", "nectar", "orchid", "pebble", "quartz", "russet", "saffron", "thistle", "umber",
             "velvet", "willow", "yarrow", "zephyr", "bramble", "cobalt", "delta", "falcon", "glacier", "hazel",
             "iris")
ANSWER_TOKENS = {"niah_single": 12, "niah_multikey": 12, "niah_multivalue": 48, "variable_tracking": 40,
                 "common_words": 80, "frequent_words": 30}


@dataclass
class RulerQuestion:
    """A question asked after a sample's context: its tokens and the strings a full answer contains."""

    question: str
    references: list[str]


@dataclass
class RulerSample:
    """One context (``context_ids``, (n,) long) and the questions asked about it."""

    task: str
    context_ids: torch.Tensor
    questions: list[RulerQuestion]


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's score: the fraction of ``references`` that occur in ``prediction`` (case-insensitive)."""
    text = prediction.lower()
    return sum(ref.lower() in text for ref in references) / len(references)


def _fit(tokenizer, render: Callable[[int], str], room: int, high: int) -> str:
    """The longest ``render(k)`` (k in 1..high) that fits ``room`` tokens (binary search on k)."""
    lo, hi, best = 1, high, None
    while lo <= hi:
        mid = (lo + hi) // 2
        text = render(mid)
        if len(plain_ids(tokenizer, text)) <= room:
            best, lo = text, mid + 1
        else:
            hi = mid - 1
    if best is None:
        raise ValueError(f"length: too short for this task ({room} tokens of room)")
    return best


def _keys(rng: random.Random, count: int) -> list[str]:
    words = rng.sample(KEY_WORDS, min(count * 2, len(KEY_WORDS)))
    return [f"{words[2 * i % len(words)]}-{words[(2 * i + 1) % len(words)]}-{rng.randint(10, 99)}"
            for i in range(count)]


def _numbers(rng: random.Random, count: int) -> list[str]:
    return [str(v) for v in rng.sample(range(1_000_000, 10_000_000), count)]


def _insert_lines(tokenizer, text_ids: torch.Tensor, room: int, lines: Sequence[str], rng: random.Random,
                  head: list[int]) -> list[int]:
    """``head`` + the first tokens of ``text_ids`` with ``lines`` inserted at random increasing positions, fitting
    ``room`` tokens in all (the lines keep their order)."""
    pieces = [plain_ids(tokenizer, "\n" + line + "\n") for line in lines]
    free = room - len(head) - sum(len(p) for p in pieces)
    if free < len(lines):
        raise ValueError(f"length: too short for {len(lines)} needles ({room} tokens of room)")
    text = text_ids[:free].tolist()
    cuts = sorted(rng.randint(0, free) for _ in lines)
    out, previous = list(head), 0
    for at, piece in zip(cuts, pieces):
        out += text[previous:at] + piece
        previous = at
    return out + text[previous:]


def _question_room(tokenizer, task: str, questions: Sequence[str]) -> int:
    return max(len(plain_ids(tokenizer, q)) for q in questions) + ANSWER_TOKENS[task]


def build_sample(task: str, tokenizer, length: int, rng: random.Random, text_ids: torch.Tensor,
                 vocabulary: Sequence[str]) -> RulerSample:
    """One sample of ``task`` whose context plus its longest question and answer fit ``length`` tokens.

    ``text_ids``: real text (the NIAH haystack); ``vocabulary``: plain words for the word tasks.
    """
    if task in ("niah_single", "niah_multikey", "niah_multivalue"):
        nkeys = {"niah_single": 1, "niah_multikey": 4, "niah_multivalue": 2}[task]
        nvalues = 4 if task == "niah_multivalue" else 1
        keys = _keys(rng, nkeys)
        values = {k: _numbers(rng, nvalues) for k in keys}
        lines = [NIAH_NEEDLE.format(key=k, value=v) for k in keys for v in values[k]]
        rng.shuffle(lines)
        template = NIAH_QUESTION_MV if task == "niah_multivalue" else NIAH_QUESTION
        questions = [RulerQuestion(template.format(key=k), values[k]) for k in keys]
        room = length - _question_room(tokenizer, task, [q.question for q in questions])
        ids = _insert_lines(tokenizer, text_ids, room, lines, rng, special_prefix_ids(tokenizer) + plain_ids(tokenizer, NIAH_INTRO))
        return RulerSample(task, torch.tensor(ids, dtype=torch.long), questions)
    if task == "variable_tracking":
        chains, hops = 2, 4
        names = rng.sample(["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(4 * chains * (hops + 1))],
                           chains * (hops + 1))
        values = _numbers(rng, chains)
        lines, questions = [], []
        for c in range(chains):
            chain = names[c * (hops + 1):(c + 1) * (hops + 1)]
            lines.append([f"VAR {chain[0]} = {values[c]}."] + [f"VAR {b} = VAR {a}." for a, b in zip(chain, chain[1:])])
            questions.append(RulerQuestion(VT_QUESTION.format(value=values[c], count=hops + 1), chain))
        # interleave the chains, keeping each chain's order
        merged: list[str] = []
        cursors = [0] * chains
        while any(cursors[c] < len(lines[c]) for c in range(chains)):
            c = rng.choice([c for c in range(chains) if cursors[c] < len(lines[c])])
            merged.append(lines[c][cursors[c]])
            cursors[c] += 1
        room = length - _question_room(tokenizer, task, [q.question for q in questions])
        unit = plain_ids(tokenizer, VT_NOISE)
        noise = torch.tensor(unit * (room // max(1, len(unit)) + 1), dtype=torch.long)
        ids = _insert_lines(tokenizer, noise, room, merged, rng, special_prefix_ids(tokenizer) + plain_ids(tokenizer, VT_INTRO))
        return RulerSample(task, torch.tensor(ids, dtype=torch.long), questions)
    if task == "common_words":
        words = rng.sample(list(vocabulary), min(len(vocabulary), 2000))
        common, rest = words[:10], words[10:]
        room = length - _question_room(tokenizer, task, [CWE_QUESTION])

        def render(uncommon: int) -> str:
            # RULER: common words 30x, others 3x (fewer of each when the context is short)
            freq_common = 30 if uncommon >= 100 else max(4, uncommon * 30 // 100)
            items = common * freq_common + rest[:uncommon] * 3
            random.Random(uncommon).shuffle(items)
            return CWE_INTRO + " ".join(f"{i + 1}. {w}" for i, w in enumerate(items))

        text = _fit(tokenizer, render, room - len(special_prefix_ids(tokenizer)), len(rest))
        ids = special_prefix_ids(tokenizer) + plain_ids(tokenizer, text)
        return RulerSample(task, torch.tensor(ids, dtype=torch.long), [RulerQuestion(CWE_QUESTION, common)])
    if task == "frequent_words":
        vocab = ["".join(rng.choices(string.ascii_lowercase, k=5)) for _ in range(1000)]
        weights = [1.0 / (r + 1) ** 2 for r in range(len(vocab))]  # Zipf, alpha 2 (RULER's default)
        room = length - _question_room(tokenizer, task, [FWE_QUESTION])
        stream = rng.choices(vocab, weights=weights, k=8 * length)

        def render(count: int) -> str:
            return FWE_INTRO + " ".join(stream[:count]) + " ...."

        text = _fit(tokenizer, render, room - len(special_prefix_ids(tokenizer)), len(stream))
        used = text[len(FWE_INTRO):].split()
        top = [w for w, _ in Counter(w for w in used if w != "....").most_common(3)]
        ids = special_prefix_ids(tokenizer) + plain_ids(tokenizer, text)
        return RulerSample(task, torch.tensor(ids, dtype=torch.long), [RulerQuestion(FWE_QUESTION, top)])
    raise ValueError(f"task: unknown {task!r}; accepted: {', '.join(TASKS)}")


def word_vocabulary(documents: Iterable[Document], limit: int = 5000) -> list[str]:
    """Distinct plain lowercase words (4-10 letters) of ``documents``, sorted: the word tasks' vocabulary."""
    words: set[str] = set()
    for doc in documents:
        words.update(re.findall(r"\b[a-z]{4,10}\b", doc.text))
        if len(words) >= limit:
            break
    if len(words) < 200:
        raise ValueError(f"data: too few distinct words for the word tasks ({len(words)}; 200 needed)")
    return sorted(words)[:limit] if len(words) > limit else sorted(words)


@dataclass
class RulerResult:
    """One method's RULER scores: ``cells[task][length]`` = {score, n, ci}; ``answers`` every question."""

    label: str
    method: str
    factor: float | None
    rope: dict[str, Any]
    lengths: list[int]
    tasks: list[str]
    cells: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    answers: list[dict[str, Any]] = field(default_factory=list)

    @property
    def average(self) -> float:
        """Mean over tasks and lengths (RULER's headline number per length averaged)."""
        scores = [cell["score"] for row in self.cells.values() for cell in row.values()]
        return sum(scores) / len(scores)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["average"] = self.average
        return out


def evaluate_ruler(model, tokenizer, runs: Sequence, lengths: Sequence[int], tasks: Sequence[str] = TASKS,
                   samples: int = 1, *, data=None, seed: int = 0, progress: bool = True) -> list[RulerResult]:
    """Run every task at every length ``samples`` times for each run (``perplexity.MethodRun``).

    ``data``: the text of the haystacks and of the word tasks' vocabulary (``data.load_documents``: a path, or
    None for the standard library's sources). Every run sees the same samples (drawn from
    ``random.Random(f"{seed}-{task}-{length}-{i}")``). Length-dependent methods are measured with their scale
    fixed at each length.
    """
    from ropekit.evaluation.data import load_documents

    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"tasks: unknown {', '.join(unknown)}; accepted: {', '.join(TASKS)}")
    if samples < 1:
        raise ValueError(f"samples: must be >= 1, got {samples}")
    # documents are read lazily, as far as needed (the standard library is thousands of files)
    text_ids = concatenated_tokens(load_documents(data), tokenizer, max(lengths))
    vocabulary = word_vocabulary(load_documents(data)) if "common_words" in tasks else []
    built = {(t, n, i): build_sample(t, tokenizer, n, random.Random(f"{seed}-{t}-{n}-{i}"), text_ids, vocabulary)
             for t in tasks for n in lengths for i in range(samples)}
    total = len(runs) * sum(len(s.questions) for s in built.values())
    bar = tqdm(total=total, desc="ruler", unit="question", disable=not progress)
    results = []
    try:
        for run in runs:
            scores: dict[tuple[str, int], list[float]] = {(t, n): [] for t in tasks for n in lengths}
            records = []
            with rope_context(model, run.rope) as patch:
                for (t, n, i), sample in built.items():
                    if run.rope is not None and run.rope.length_dependent:
                        patch.fix_length(n)
                    bar.set_postfix_str(f"{run.label} {t} @ {n}")
                    context = prefill(model, sample.context_ids, nll=False)
                    texts = answer_all(model, tokenizer, context,
                                       [plain_ids(tokenizer, q.question) for q in sample.questions],
                                       max_new_tokens=ANSWER_TOKENS[t], stop_after_number=False)
                    for q, text in zip(sample.questions, texts):
                        score = string_match_all(text, q.references)
                        scores[(t, n)].append(score)
                        records.append({"task": t, "length": n, "sample": i, "references": q.references,
                                        "answer": text, "score": score})
                        bar.update(1)
                    del context
            cells: dict[str, dict[str, dict[str, Any]]] = {}
            for t in tasks:
                for n in lengths:
                    values = scores[(t, n)]
                    lo, hi = mean_interval(values, seed=seed)
                    cells.setdefault(t, {})[str(n)] = {"score": sum(values) / len(values), "n": len(values),
                                                       "ci": [lo, hi]}
            rope = run.rope
            result = RulerResult(run.label, rope.method if rope else "model", rope.factor if rope else None,
                                 rope.to_dict() if rope else {}, list(lengths), list(tasks), cells, records)
            if progress:
                bar.write(f"  {run.label:<16} RULER average {result.average:.0%}")
            results.append(result)
    finally:
        bar.close()
    return results


def ruler_markdown(results: Sequence[RulerResult]) -> str:
    """One table per length: tasks as columns, methods as rows, score with n and 95% interval."""
    from ropekit.evaluation.report import markdown_table

    lines = []
    first = results[0]
    for n in first.lengths:
        rows = []
        for r in results:
            row = [r.label]
            for t in r.tasks:
                cell = r.cells[t][str(n)]
                row.append(f"{cell['score']:.0%} [{cell['ci'][0]:.0%}, {cell['ci'][1]:.0%}] n={cell['n']}")
            rows.append(row)
        lines += [f"### {n} tokens", "", markdown_table(["method"] + list(first.tasks), rows), ""]
    return "\n".join(lines)


def plot_ruler(results: Sequence[RulerResult], path, *, model_name: str, trained_length: int | None = None):
    """One panel per task: score against length per method, 95% intervals as error bars."""
    from ropekit.evaluation.report import _pyplot, _save, _style

    plt = _pyplot()
    tasks = results[0].tasks
    cols = min(3, len(tasks))
    rows = (len(tasks) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols + 2.2, 3.2 * rows), squeeze=False, sharey=True)
    lengths = results[0].lengths
    xs = list(range(len(lengths)))
    for k, t in enumerate(tasks):
        ax = axes[k // cols][k % cols]
        for i, r in enumerate(results):
            cells = [r.cells[t][str(n)] for n in lengths]
            ys = [c["score"] for c in cells]
            err = [[y - c["ci"][0] for y, c in zip(ys, cells)], [c["ci"][1] - y for y, c in zip(ys, cells)]]
            style = _style(i, plt)
            ax.errorbar([x + 0.06 * (i - len(results) / 2) for x in xs], ys, yerr=err, color=style["color"],
                        marker=style["marker"], linestyle=style["linestyle"], capsize=2, markersize=4,
                        label=r.label if k == 0 else None)
        if trained_length:
            past = [x for x, n in zip(xs, lengths) if n > trained_length]
            if past:
                ax.axvspan(past[0] - 0.5, xs[-1] + 0.5, color="0.92", zorder=0)
        ax.set_xticks(xs, [str(n) for n in lengths])
        ax.set_xlim(-0.5, xs[-1] + 0.5)
        ax.set_ylim(-0.05, 1.05)
        ax.set_title(f"{t} (n={results[0].cells[t][str(lengths[0])]['n']} per point)", fontsize=9)
        ax.grid(True, axis="y", alpha=0.3)
    for k in range(len(tasks), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.legend(loc="upper left", bbox_to_anchor=(1.0, 0.95), fontsize=9, title="method")
    fig.suptitle(f"{model_name}: RULER-style tasks by context length (shaded: past the trained length)")
    fig.supxlabel("context length (tokens)")
    fig.supylabel("score (string match, 95% interval)")
    fig.tight_layout()
    return _save(fig, plt, path)
