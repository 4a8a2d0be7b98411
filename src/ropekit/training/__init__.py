"""Fine-tuning at longer lengths: data packing, the training loop, scaling out, and the study."""

from ropekit.training.data import (
    ByteTokenizer,
    PackedRows,
    block_causal_mask,
    document_texts,
    pack_documents,
    packed_forward_kwargs,
    tokenize_documents,
)
from ropekit.training.distributed import gather_sequence, shard_indices, shard_sequence, unshard_sequence
from ropekit.training.finetune import FinetuneSettings, TrainResult, finetune, train

__all__ = [
    "ByteTokenizer",
    "FinetuneSettings",
    "PackedRows",
    "TrainResult",
    "block_causal_mask",
    "finetune",
    "gather_sequence",
    "document_texts",
    "pack_documents",
    "packed_forward_kwargs",
    "shard_indices",
    "shard_sequence",
    "tokenize_documents",
    "train",
    "unshard_sequence",
]
