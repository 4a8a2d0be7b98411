"""Evaluation text loading: text file, folder, JSON lines, the standard library; token windows."""

from __future__ import annotations

import json

import pytest

from ropekit.evaluation.data import (
    concatenated_tokens,
    load_documents,
    stdlib_documents,
    token_windows,
)
from tiny import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return byte_tokenizer()


def test_text_file_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world\nsecond line", encoding="utf-8")
    docs = list(load_documents(path))
    assert [d.text for d in docs] == ["hello world\nsecond line"]
    assert docs[0].name == str(path)


def test_folder_reads_text_files_sorted_and_skips_others(tmp_path):
    (tmp_path / "b.txt").write_text("bee", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.md").write_text("sea", encoding="utf-8")
    (tmp_path / "a.py").write_text("ay", encoding="utf-8")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\xff")
    (tmp_path / ".hidden.txt").write_text("no", encoding="utf-8")
    assert [d.text for d in load_documents(tmp_path)] == ["ay", "bee", "sea"]


def test_jsonl_reads_text_field_and_names_bad_lines(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"text": "one", "id": 1}) + "\n\n" + json.dumps({"text": "two"}) + "\n")
    docs = list(load_documents(path))
    assert [d.text for d in docs] == ["one", "two"]
    assert docs[1].name.endswith(":3")
    path.write_text(json.dumps({"text": "ok"}) + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match="line 2 has no string field 'text'"):
        list(load_documents(path))
    path.write_text("{not json\n")
    with pytest.raises(ValueError, match="line 1 is not valid JSON"):
        list(load_documents(path))


def test_missing_path_and_empty_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        list(load_documents(tmp_path / "nope.txt"))
    with pytest.raises(ValueError, match="has no text files"):
        list(load_documents(tmp_path))


def test_stdlib_corpus_is_real_python_largest_first():
    docs = []
    for doc in stdlib_documents():
        docs.append(doc)
        if len(docs) == 3:
            break
    assert all(d.name.startswith("stdlib/") and d.name.endswith(".py") for d in docs)
    assert len(docs[0].text) >= len(docs[1].text) >= len(docs[2].text) > 100_000
    assert list(load_documents("stdlib"))[0] == docs[0]
    assert not any("/test/" in d.name for d in stdlib_documents())


def test_token_windows_take_the_first_tokens_of_long_documents(tokenizer):
    from ropekit.evaluation.data import Document

    docs = [Document("short", "x" * 50), Document("long1", "abcdefghij" * 20), Document("long2", "0123456789" * 30)]
    windows = token_windows(docs, tokenizer, 100)
    assert [w.name for w in windows] == ["long1", "long2"]
    assert tokenizer.decode(windows[0].input_ids) == ("abcdefghij" * 10)
    assert all(w.input_ids.shape == (100,) for w in windows)
    assert [w.name for w in token_windows(docs, tokenizer, 100, count=1)] == ["long1"]


def test_text_shorter_than_length_names_the_length_needed(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("a short text " * 20, encoding="utf-8")
    with pytest.raises(ValueError, match=r"4096 tokens needed, the longest document has 260"):
        token_windows(load_documents(path), tokenizer, 4096)


def test_prefix_windows():
    import torch

    from ropekit.evaluation.data import TokenWindow, prefix_windows

    windows = [TokenWindow("a", torch.arange(10)), TokenWindow("b", torch.arange(10, 20))]
    by = prefix_windows(windows, [4, 10])
    assert by[4][1].input_ids.tolist() == [10, 11, 12, 13] and by[10][0].input_ids.numel() == 10
    with pytest.raises(ValueError, match="11 is longer than window a"):
        prefix_windows(windows, [11])


def test_concatenated_haystack(tokenizer):
    from ropekit.evaluation.data import Document

    docs = [Document("a", "aaaa"), Document("b", "bbbb")]
    ids = concatenated_tokens(docs, tokenizer, 9)
    assert tokenizer.decode(ids) == "aaaa\n\nbbb"
    with pytest.raises(ValueError, match="50 tokens needed, it has 10"):
        concatenated_tokens(docs, tokenizer, 50)
