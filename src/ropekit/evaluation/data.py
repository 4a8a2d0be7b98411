"""Evaluation text: a text file, a folder of text files, a JSON-lines file, or the Python standard library.

``load_documents(path)`` returns whole documents; ``token_windows`` cuts the first N tokens of each
document that is long enough (perplexity is measured on "the first N tokens of each document").
"""

from __future__ import annotations

import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

# Suffixes read from a folder (anything else, e.g. images or compiled files, is not text).
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", ".text", ".tex", ".html", ".c", ".h", ".json", ".csv", "")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
DEFAULT_CORPUS = "stdlib"


@dataclass(frozen=True)
class Document:
    """One evaluation document: ``name`` (file path, or ``path:line`` for JSON lines) and its text."""

    name: str
    text: str


def stdlib_dir() -> Path:
    """The folder of the running Python's standard-library sources (present on every machine)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_files() -> list[tuple[int, str, Path]]:
    """(-size, relative path, path) of the standard library's documents, in ``stdlib_documents`` order."""
    root = stdlib_dir()
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("site-packages", "dist-packages", "idlelib", "lib2to3", "pydoc_data") or {"test", "tests"} & set(rel.parts):
            continue
        files.append((-path.stat().st_size, str(rel), path))
    return sorted(files)


def stdlib_documents() -> Iterator[Document]:
    """The standard library's ``*.py`` files, largest first (long documents are what length evaluation needs),
    ties by path; test suites and third-party ``site-packages`` are left out. Deterministic on one Python."""
    for _, rel, path in _stdlib_files():
        yield Document(f"stdlib/{rel}", path.read_text(encoding="utf-8", errors="replace"))


def _folder_files(path: Path) -> list[Path]:
    """The files ``load_documents`` reads from the folder ``path``, in its order; ValueError when there are none."""
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")
                   and (p.suffix.lower() in TEXT_SUFFIXES or p.suffix.lower() in JSONL_SUFFIXES))
    if not files:
        raise ValueError(f"data: folder {path} has no text files ({', '.join(s for s in TEXT_SUFFIXES if s)}, "
                         f"{', '.join(JSONL_SUFFIXES)})")
    return files


def load_documents(path: str | Path | None = None) -> Iterator[Document]:
    """Documents from ``path``: a text file (one document), a folder (each text file, sorted by path, is one
    document), a JSON-lines file (``*.jsonl``; each line an object with a ``text`` field), or ``None`` /
    ``"stdlib"`` for the standard library's sources.

    Raises FileNotFoundError / ValueError with the path or line at fault.
    """
    if path is None or str(path) == DEFAULT_CORPUS:
        yield from stdlib_documents()
        return
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or folder: {path}")
    if path.is_dir():
        for f in _folder_files(path):
            yield from load_documents(f)
        return
    if path.suffix.lower() in JSONL_SUFFIXES:
        yield from _jsonl_documents(path)
        return
    yield Document(str(path), _read_text(path))


def check_documents(path: str | Path | None = None) -> None:
    """The cheap checks of ``load_documents(path)``, run before any model loads: the path is not empty text and
    exists, a folder holds text files, each file (every one of a folder's) is readable and starts as UTF-8 text
    (JSON lines: its first record has a ``text`` field); a single file, or a whole folder, is not empty.

    Raises FileNotFoundError / ValueError as ``load_documents`` would (messages start with ``data:``).
    """
    if path is None or str(path) == DEFAULT_CORPUS:
        return
    if not str(path).strip():  # Path("") is the current folder: never what an empty value meant
        raise ValueError(f"data: empty path {str(path)!r}; give a text file, a folder, a .jsonl file or "
                         f"'{DEFAULT_CORPUS}'")
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or folder: {path}")
    if path.is_dir():
        if not any([_check_file(f, in_folder=True) for f in _folder_files(path)]):
            raise ValueError(f"data: folder {path} has no text")
        return
    _check_file(path)


def _check_file(path: Path, in_folder: bool = False) -> bool:
    """Whether the file ``path`` holds text; raises ValueError (``data: ...``) when it is unreadable, not UTF-8,
    or (a single file, not one of a folder's) empty."""
    if not os.access(path, os.R_OK):
        raise ValueError(f"data: {path} is not readable")
    if path.suffix.lower() in JSONL_SUFFIXES:
        if next(iter(_jsonl_documents(path)), None) is None:
            if in_folder:
                return False
            raise ValueError(f"data: {path} has no JSON lines")
        return True
    try:
        with path.open("rb") as handle:
            head = handle.read(1 << 16)
    except OSError as exc:
        raise ValueError(f"data: {path} is not readable ({exc.strerror or exc})") from None
    if not head.strip():
        if in_folder:
            return False
        raise ValueError(f"data: {path} is empty")
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 4:  # not just a character cut at the end of the sample
            raise ValueError(f"data: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return True


# ---------------------------------------------------------------------- enough text? (before a model loads)
# A text of b UTF-8 bytes gives at most b + TOKEN_MARGIN tokens: byte-level BPE and byte-fallback SentencePiece
# tokenizers spend at least one byte per token; the margin covers the special tokens a tokenizer adds and
# SentencePiece's leading "▁".
TOKEN_MARGIN = 4
# Real text runs at 2-5 bytes per token: a text of this many bytes per token needed is taken as long enough
# without tokenizing it; short of that, the tokenizer counts (``check_supply``).
SURE_BYTES_PER_TOKEN = 8
SEPARATOR = "\n\n"  # between documents joined into one text (``concatenated_tokens``)


def document_sizes(path: str | Path | None = None) -> list[tuple[str, int]]:
    """(name, UTF-8 bytes) of each document of ``load_documents(path)``, in its order, cheaply: sizes from the
    file system, without reading the files (a JSON-lines file is read: each record's text is measured).

    Raises FileNotFoundError / ValueError as ``load_documents`` would.
    """
    if path is None or str(path) == DEFAULT_CORPUS:
        return [(f"stdlib/{rel}", -negative) for negative, rel, _ in _stdlib_files()]
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"data: no such file or folder: {path}")
    sizes: list[tuple[str, int]] = []
    for f in _folder_files(path) if path.is_dir() else [path]:
        if f.suffix.lower() in JSONL_SUFFIXES:
            sizes.extend((doc.name, len(doc.text.encode("utf-8"))) for doc in _jsonl_documents(f))
        else:
            sizes.append((str(f), f.stat().st_size))
    return sizes


def check_supply(path: str | Path | None, length: int, *, count: int = 1, joined: bool = False,
                 tokenizer: Callable[[], Any] | None = None, exact_length: Callable[[Any], int] | None = None) -> None:
    """Refuse, before any model loads, a text that cannot give what a run needs: ``count`` documents of at least
    ``length`` tokens each (the windows of ``token_windows``), or with ``joined``, ``length`` tokens of all the
    documents joined (``concatenated_tokens``, a haystack).

    The UTF-8 sizes settle it where they can: a document of b bytes has at most b + ``TOKEN_MARGIN`` tokens, and
    one of ``SURE_BYTES_PER_TOKEN`` x length bytes is taken as long enough. In between, ``tokenizer()`` (called only
    then; None, or returning None: not counted) counts the tokens, and ``exact_length(tokenizer)`` is the length
    needed when it depends on the tokenizer (default: ``length``, which must then be a lower bound of it).

    Raises ValueError (``data: ... N tokens needed, ...``) with the tokens needed and what the text has.
    """
    sizes = document_sizes(path)
    if not sizes:
        raise ValueError("data: no documents found")
    if joined:
        size = sum(b for _, b in sizes) + len(SEPARATOR.encode()) * (len(sizes) - 1)
        if size + TOKEN_MARGIN < length:
            raise ValueError(f"data: the text is too short: {length} tokens needed, all of it has at most "
                             f"{size + TOKEN_MARGIN} ({len(sizes)} document{'s' * (len(sizes) > 1)}, {size} bytes); "
                             f"give a longer text or a smaller length")
        if size >= SURE_BYTES_PER_TOKEN * length:
            return
    else:
        longest = max(sizes, key=lambda item: item[1])
        possible = sum(1 for _, b in sizes if b + TOKEN_MARGIN >= length)
        if possible < count:
            if possible == 0:
                raise ValueError(f"data: the text is too short: {length} tokens needed, the longest document has at "
                                 f"most {longest[1] + TOKEN_MARGIN} ({longest[0]}: {longest[1]} bytes); give a longer "
                                 f"text or a smaller length")
            raise ValueError(f"data: {count} documents of {length} tokens needed, {possible} of the "
                             f"{len(sizes)} may have that many; give more text, fewer windows or a smaller length")
        if sum(1 for _, b in sizes if b >= SURE_BYTES_PER_TOKEN * length) >= count:
            return
    tok = tokenizer() if tokenizer is not None else None
    if tok is None:
        return
    needed = exact_length(tok) if exact_length is not None else length
    if joined:
        try:
            concatenated_tokens(load_documents(path), tok, needed)
        except ValueError as exc:
            raise ValueError(f"data:{str(exc).partition(':')[2]}; give a longer text or a smaller length") from None
        return
    found = len(token_windows(load_documents(path), tok, needed, count))  # raises when no document is long enough
    if found < count:
        raise ValueError(f"data: {count} documents of {needed} tokens needed, the text has {found}; give more text, "
                         f"fewer windows or a smaller length")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data: {path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl_documents(path: Path) -> Iterator[Document]:
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"data: {path} line {number} is not valid JSON ({err.msg})") from None
            if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                raise ValueError(f"data: {path} line {number} has no string field 'text'")
            yield Document(f"{path}:{number}", record["text"])


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """(n,) long token ids of ``text`` with the tokenizer's own special-token convention (e.g. a BOS)."""
    ids = tokenizer(text, add_special_tokens=True, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def plain_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without special tokens (a piece of a prompt)."""
    return tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]


def special_prefix_ids(tokenizer) -> list[int]:
    """The tokenizer's own leading special tokens (a BOS for Llama-style tokenizers; nothing for SmolLM2)."""
    with_special = tokenizer("x", add_special_tokens=True)["input_ids"]
    without = tokenizer("x", add_special_tokens=False)["input_ids"]
    return with_special[: len(with_special) - len(without)] if with_special[-len(without):] == without else []


def line_start_mask(tokenizer, ids: torch.Tensor) -> torch.Tensor:
    """(m,) bool: token i starts a line (the token before it ends with a newline)."""
    texts = tokenizer.batch_decode([[i] for i in ids.tolist()])
    mask = torch.zeros(len(texts), dtype=torch.bool)
    for i in range(1, len(texts)):
        mask[i] = texts[i - 1].endswith("\n")
    return mask


@dataclass(frozen=True)
class TokenWindow:
    """The first ``len(input_ids)`` tokens of document ``name``; ``input_ids`` is (length,) long."""

    name: str
    input_ids: torch.Tensor


def token_windows(documents: Iterable[Document], tokenizer, length: int, count: int | None = None) -> list[TokenWindow]:
    """The first ``length`` tokens of each document that has at least that many, up to ``count`` windows
    (None: every long-enough document).

    Raises ValueError naming the length needed when no document is long enough.
    """
    if length < 2:
        raise ValueError(f"length: must be >= 2 tokens, got {length}")
    windows: list[TokenWindow] = []
    longest, longest_name, seen = 0, "", 0
    longest_skipped = None
    for doc in documents:
        seen += 1
        if len(doc.text) < length // 8:  # no tokenizer packs 8 characters per token: skip without tokenizing
            if longest_skipped is None or len(doc.text) > len(longest_skipped.text):
                longest_skipped = doc
            continue
        ids = tokenize(tokenizer, doc.text)
        if ids.numel() > longest:
            longest, longest_name = ids.numel(), doc.name
        if ids.numel() >= length:
            windows.append(TokenWindow(doc.name, ids[:length].clone()))
            if count is not None and len(windows) >= count:
                break
    if not windows:
        if seen == 0:
            raise ValueError("data: no documents found")
        if longest_skipped is not None and len(longest_skipped.text) > longest:
            count = tokenize(tokenizer, longest_skipped.text).numel()
            if count > longest:
                longest, longest_name = count, longest_skipped.name
        raise ValueError(
            f"data: the text is too short: {length} tokens needed, the longest document has {longest} "
            f"({longest_name or 'no text'}); give a longer text or a smaller length"
        )
    return windows


def prefix_windows(windows: Iterable[TokenWindow], lengths: Iterable[int]) -> dict[int, list[TokenWindow]]:
    """``{n: [the first n tokens of each window]}`` for every length n (each at most the windows' length)."""
    windows = list(windows)
    out = {}
    for n in lengths:
        short = [w for w in windows if w.input_ids.numel() < n]
        if short:
            raise ValueError(f"lengths: {n} is longer than window {short[0].name} ({short[0].input_ids.numel()} tokens)")
        out[n] = [TokenWindow(w.name, w.input_ids[:n]) for w in windows]
    return out


def concatenated_tokens(documents: Iterable[Document], tokenizer, length: int, separator: str = "\n\n") -> torch.Tensor:
    """(length,) token ids of the documents joined by ``separator``, cut at ``length`` (a needle haystack).

    Raises ValueError naming the length needed when all documents together are shorter.
    """
    pieces: list[str] = []
    total_chars = 0
    ids = torch.empty(0, dtype=torch.long)
    for doc in documents:
        pieces.append(doc.text)
        total_chars += len(doc.text)
        if total_chars >= length:  # cheap check first: a token is at least one character here
            ids = tokenize(tokenizer, separator.join(pieces))
            if ids.numel() >= length:
                return ids[:length].clone()
    if pieces and ids.numel() < length:
        ids = tokenize(tokenizer, separator.join(pieces))
    if ids.numel() < length:
        raise ValueError(f"haystack: the text is too short: {length} tokens needed, it has {ids.numel()}")
    return ids[:length].clone()
