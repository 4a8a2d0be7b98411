"""Training data: read documents, tokenize, pack them into fixed-length rows.

Packing puts several documents in one row of ``seq_len`` tokens. Each document (or the piece of one
that fits in a row) gets positions restarting at 0, and no token may attend to another document:

* transformers >= 4.5x detects packed rows from ``position_ids`` (a position that is not the previous
  one + 1 starts a new sequence) when ``attention_mask`` is None and no KV cache is used, and builds
  the block-diagonal causal mask itself (eager, sdpa, flex; flash-attention uses the positions as
  varlen boundaries). ``packed_forward_kwargs`` relies on that when it is present;
* otherwise it passes an explicit 4-D additive block-causal mask (``block_causal_mask``).

Labels: a document's first token is not predicted from the end of the previous document (label -100).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

Tensor = torch.Tensor

IGNORE_INDEX = -100

# ---------------------------------------------------------------------- reading
def document_texts(path: str | Path | None) -> list[str]:
    """The texts of ``ropekit.evaluation.load_documents(path)``, empty ones dropped: the same formats (a text
    file, a folder of text files, a .jsonl file with a "text" field per line, "stdlib") and the same errors,
    so that training and evaluation read a data path alike.

    Raises FileNotFoundError / ValueError naming ``data``.
    """
    from ropekit.evaluation.data import load_documents as documents

    docs = [doc.text for doc in documents(path) if doc.text.strip()]
    if not docs:
        raise ValueError(f"data: no non-empty documents in {path}")
    return docs


def tokenize_documents(docs: Iterable[str], tokenizer: Any, add_eos: bool = True) -> list[list[int]]:
    """Token ids per document, without special tokens, each followed by the EOS id when the tokenizer has one.

    ``tokenizer`` needs ``encode(text, add_special_tokens=False)`` (any transformers tokenizer, or
    ``ropekit.training.ByteTokenizer``) and optionally ``eos_token_id``.
    """
    eos = getattr(tokenizer, "eos_token_id", None) if add_eos else None
    out = []
    for doc in docs:
        ids = list(tokenizer.encode(doc, add_special_tokens=False))
        if eos is not None:
            ids.append(int(eos))
        if ids:
            out.append(ids)
    return out


class ByteTokenizer:
    """UTF-8 bytes as tokens 0..255, plus EOS = 256. Lossless on any text and needs no training.

    Callable like a transformers tokenizer (``tok(text)["input_ids"]``, ``batch_decode``), so the evaluation
    prompts (``ropekit.evaluation.passkey``, ``haystack``) and the factor search build the same prompts for a
    byte-level model as for a subword one. There are no special tokens to prepend.
    """

    vocab_size = 257
    eos_token_id = 256
    pad_token_id = None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def batch_decode(self, sequences: Iterable[Sequence[int]], skip_special_tokens: bool = False) -> list[str]:
        return [self.decode(ids) for ids in sequences]

    def __call__(self, text: str, add_special_tokens: bool = True, return_attention_mask: bool = False,
                 **_: Any) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text)}


# ---------------------------------------------------------------------- packing
@dataclass
class PackedRows:
    """Packed training rows, all (rows, seq_len) int64.

    Attributes:
        input_ids: token ids.
        position_ids: position of each token in its document (piece); restarts at 0 per document.
        labels: input_ids with -100 at each document start (transformers shifts labels inside the model).
    """

    input_ids: Tensor
    position_ids: Tensor
    labels: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def rows(self, index: Tensor | Sequence[int]) -> "PackedRows":
        index = torch.as_tensor(index, dtype=torch.long)
        return PackedRows(self.input_ids[index], self.position_ids[index], self.labels[index])

    def predicted_tokens(self) -> int:
        """Number of tokens that carry a loss (labels[:, 1:] that are not -100)."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    def fingerprint(self) -> str:
        """sha256 of the token ids and positions (identifies the data in a run fingerprint)."""
        h = hashlib.sha256()
        h.update(self.input_ids.numpy().tobytes())
        h.update(self.position_ids.numpy().tobytes())
        return h.hexdigest()[:16]


def pack_documents(token_lists: Sequence[Sequence[int]], seq_len: int, drop_last: bool = True) -> PackedRows:
    """Pack tokenized documents, in order, into rows of ``seq_len`` tokens.

    Documents are laid end to end; a document that does not fit in the rest of a row continues in the next
    row as a new piece with positions restarting at 0 (rows never attend to each other). The last, partial
    row is dropped (``drop_last``) or kept only if it is full.

    Raises ValueError when there is not enough data for one row.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 2:
        raise ValueError(f"seq_len: must be an integer >= 2, got {seq_len!r}")
    ids: list[int] = []
    pos: list[int] = []
    for doc in token_lists:
        start = 0
        while start < len(doc):
            room = seq_len - (len(ids) % seq_len)
            piece = doc[start:start + room]
            ids.extend(piece)
            pos.extend(range(len(piece)))
            start += len(piece)
    n_rows = len(ids) // seq_len
    if n_rows == 0:
        raise ValueError(f"data: only {len(ids)} tokens, fewer than one row of seq_len {seq_len}")
    if not drop_last and len(ids) % seq_len:
        raise ValueError("pack_documents: drop_last=False needs the tokens to fill whole rows")
    n = n_rows * seq_len
    input_ids = torch.tensor(ids[:n], dtype=torch.long).view(n_rows, seq_len)
    position_ids = torch.tensor(pos[:n], dtype=torch.long).view(n_rows, seq_len)
    labels = input_ids.clone()
    labels[position_ids == 0] = IGNORE_INDEX
    return PackedRows(input_ids, position_ids, labels)


def document_ids(position_ids: Tensor) -> Tensor:
    """(batch, seq) positions -> (batch, seq) index of the document each token belongs to (0, 0, 1, 1, 1, 2...).

    A new document starts wherever a position is not the previous one + 1 (as transformers decides).
    """
    first = position_ids[:, :1] - 1
    diff = torch.diff(position_ids, prepend=first, dim=-1)
    return (diff != 1).cumsum(-1)


def block_causal_mask(position_ids: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """(batch, seq) positions -> (batch, 1, seq, seq) additive mask: 0 where query i may see key j (same
    document, j <= i), the dtype's minimum elsewhere."""
    doc = document_ids(position_ids)
    seq = position_ids.shape[-1]
    causal = torch.ones(seq, seq, dtype=torch.bool, device=position_ids.device).tril()
    allowed = (doc[:, :, None] == doc[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=dtype, device=position_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def transformers_detects_packing() -> bool:
    """True when this transformers builds per-document masks from position_ids by itself."""
    try:
        from transformers import masking_utils
    except ImportError:
        return False
    return hasattr(masking_utils, "find_packed_sequence_indices")


def packed_forward_kwargs(position_ids: Tensor, dtype: torch.dtype = torch.float32,
                          explicit_mask: bool | None = None) -> dict[str, Any]:
    """Keyword arguments for a transformers causal LM forward over packed rows.

    Always ``position_ids`` and ``use_cache=False`` (a cache disables transformers' packing detection).
    With ``explicit_mask`` (default: when transformers cannot detect packing) also a 4-D block-causal
    ``attention_mask`` in ``dtype``.
    """
    if explicit_mask is None:
        explicit_mask = not transformers_detects_packing()
    kwargs: dict[str, Any] = {"position_ids": position_ids, "use_cache": False}
    if explicit_mask:
        kwargs["attention_mask"] = block_causal_mask(position_ids, dtype)
    return kwargs
