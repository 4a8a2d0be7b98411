"""The study's data: the Python standard library's sources split into training and held-out files, passkey
rows, the pretraining / fine-tuning / PoSE mixtures, and the held-out evaluation windows (all byte tokens)."""

from __future__ import annotations

import random
import sysconfig
import zlib
from pathlib import Path

import torch

from ropekit.evaluation.passkey import answer_ids, passkey_prompt
from ropekit.study.settings import BYTES, KEY_DIGITS
from ropekit.training.data import PackedRows, pack_documents, tokenize_documents


def stdlib_files(max_files: int) -> tuple[list[str], list[str]]:
    """(train, held-out) document texts from the Python standard library's *.py files.

    Files are split by a hash of their path (about 1 in 8 held out), so the split is the same everywhere;
    test folders are skipped. ``max_files`` caps the training documents (sorted by path).
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    train_docs, held_out = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if "test" in rel.split("/")[0] or "site-packages" in rel or "idlelib" in rel:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if not text.strip():
            continue
        if zlib.crc32(rel.encode()) % 8 == 0:
            held_out.append(text)
        elif len(train_docs) < max_files:
            train_docs.append(text)
    if not train_docs or not held_out:
        raise ValueError(f"data: no Python sources found under {root}")
    return train_docs, held_out


def passkey_ids(length: int, depth: float, key: str) -> list[int]:
    """``length`` byte tokens: the shared passkey prompt (``evaluation.passkey.passkey_prompt``, no instruction)
    with the key sentence at ``depth`` (0..1) of the filler, then the answer " KEY" as the last ANSWER_LEN bytes."""
    answer = answer_ids(BYTES, key)
    return passkey_prompt(BYTES, length - len(answer), depth, key, instruction="").input_ids.tolist() + answer


def passkey_rows(count: int, length: int, rng: random.Random) -> PackedRows:
    """``count`` rows of single passkey prompts at random depths and keys, positions 0..length-1."""
    ids = []
    for _ in range(count):
        key = str(rng.randrange(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS))
        ids.append(passkey_ids(length, rng.random(), key))
    input_ids = torch.tensor(ids, dtype=torch.long)
    positions = torch.arange(length).expand(count, length).clone()
    labels = input_ids.clone()
    labels[:, 0] = -100
    return PackedRows(input_ids, positions, labels)


def mixed_rows(docs: list[str], length: int, passkey_share: float, seed: int) -> PackedRows:
    """Packed source-code rows plus passkey rows (``passkey_share`` of the total)."""
    code = pack_documents(tokenize_documents(docs, BYTES), length)
    n_passkey = int(round(len(code) * passkey_share / (1 - passkey_share))) if passkey_share else 0
    if n_passkey == 0:
        return code
    keys = passkey_rows(n_passkey, length, random.Random(seed))
    return PackedRows(torch.cat((code.input_ids, keys.input_ids)), torch.cat((code.position_ids, keys.position_ids)),
                      torch.cat((code.labels, keys.labels)))


def pose_mixture(docs: list[str], window: int, passkey_share: float, seed: int) -> PackedRows:
    """PoSE rows: source code as consecutive ``window``-byte windows plus passkey prompts of ``window`` bytes
    (``passkey_share`` of the total); the training loop gives each row its skipped position ids per step."""
    from ropekit.training.pose import pose_windows

    code = pose_windows(tokenize_documents(docs, BYTES), window)
    n_passkey = int(round(len(code) * passkey_share / (1 - passkey_share))) if passkey_share else 0
    if n_passkey == 0:
        return code
    keys = passkey_rows(n_passkey, window, random.Random(seed))
    return PackedRows(torch.cat((code.input_ids, keys.input_ids)), torch.cat((code.position_ids, keys.position_ids)),
                      torch.cat((code.labels, keys.labels)))


def held_out_windows(docs: list[str], length: int, count: int) -> list:
    """The first ``length`` bytes of the first ``count`` held-out files that long (TokenWindow list)."""
    from ropekit.evaluation import TokenWindow

    out = []
    for i, text in enumerate(docs):
        ids = BYTES.encode(text)
        if len(ids) >= length:
            out.append(TokenWindow(f"held-out-{i}", torch.tensor(ids[:length], dtype=torch.long)))
            if len(out) == count:
                return out
    raise ValueError(f"data: only {len(out)} held-out files have {length} bytes; lower --eval-windows or the sizes")
