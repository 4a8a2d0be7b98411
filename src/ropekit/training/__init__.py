"""Fine-tuning at longer lengths: data packing, PoSE windows, mixed windows, the training loop, scaling out
(data and context parallel). The study that uses them is ``ropekit.study``."""

from ropekit.training.data import (
    ByteTokenizer,
    PackedRows,
    block_causal_mask,
    document_texts,
    pack_documents,
    packed_forward_kwargs,
    tokenize_documents,
)
from ropekit.training.context_parallel import ShardLayout, context_parallel_attention, shard_batch
from ropekit.training.distributed import gather_sequence, shard_indices, shard_sequence, unshard_sequence
from ropekit.training.finetune import finetune
from ropekit.training.loop import TrainResult, train
from ropekit.training.settings import FinetuneSettings
from ropekit.training.pose import PoseSpec, pose_position_ids, pose_windows

__all__ = [
    "ByteTokenizer",
    "FinetuneSettings",
    "PackedRows",
    "PoseSpec",
    "ShardLayout",
    "TrainResult",
    "block_causal_mask",
    "context_parallel_attention",
    "finetune",
    "gather_sequence",
    "document_texts",
    "pack_documents",
    "packed_forward_kwargs",
    "pose_position_ids",
    "pose_windows",
    "shard_batch",
    "shard_indices",
    "shard_sequence",
    "tokenize_documents",
    "train",
    "unshard_sequence",
]
