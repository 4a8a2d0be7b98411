"""Context parallelism: 2 gloo ranks, each holding a shard of one sequence (contiguous or zigzag), give the loss
and gradients of a single process on the whole sequence; ``train(context_parallel=2)`` trains the same steps.
The same 2 spawned ranks also check PoSE under DDP and FSDP against one process."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ropekit import RopeConfig
from ropekit.training.context_parallel import (
    ShardLayout,
    context_parallel_attention,
    current_layout,
    shard_batch,
    shifted_targets,
)
from ropekit.training.data import IGNORE_INDEX, ByteTokenizer, pack_documents, tokenize_documents
from ropekit.training.distributed import DistContext, shard_indices, shutdown_distributed

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SEQ = 64
WORLD = 2
MODES = ("contiguous", "zigzag")
TRAIN_MODES = ("zigzag",)  # the loop's integration; both splits are checked op by op in CASES


def tiny_llama_f64(seed: int = 11):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         eos_token_id=256, bos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.float64)


def rope_for(model, method: str) -> RopeConfig:
    return RopeConfig.from_hf(model.config).with_method(method, factor=4.0)


def rows():
    """Byte-level Python source packed at SEQ: some rows hold one document, some several."""
    docs = [p.read_text()[:1500] for p in sorted((STDLIB / "json").glob("*.py"))]
    return pack_documents(tokenize_documents(docs, ByteTokenizer()), SEQ)


def packed_row(all_rows):
    """A row with a document boundary inside (positions restart): attention must stay per document."""
    for i in range(len(all_rows)):
        if int((all_rows.position_ids[i, 1:] == 0).sum()) >= 1:
            return all_rows.rows([i])
    raise AssertionError("no packed row")


def single_process(method: str, row, checkpointing: bool = True) -> tuple[float, dict]:
    """Loss (mean over predicted tokens) and gradients of one process on the whole row."""
    from ropekit.hf import apply_rope
    from ropekit.training.data import packed_forward_kwargs
    from ropekit.training.finetune import loss_forward, set_gradient_checkpointing

    model = tiny_llama_f64()
    cfg = rope_for(model, method)
    with apply_rope(model, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(SEQ)
        model.train()
        if checkpointing:
            set_gradient_checkpointing(model, True)
        n = row.predicted_tokens()
        with loss_forward(model):
            loss = model(input_ids=row.input_ids, labels=row.labels,
                         **packed_forward_kwargs(row.position_ids, torch.float64, explicit_mask=True)) / n
        loss.backward()
    return float(loss.detach()), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def sharded(rank: int, method: str, row, mode: str) -> tuple[float, dict]:
    """This rank's shard through ``context_parallel_attention``; loss and gradients summed over ranks."""
    from ropekit.hf import apply_rope
    from ropekit.training.context_parallel import all_reduce_gradients
    from ropekit.training.finetune import loss_forward, set_gradient_checkpointing

    model = tiny_llama_f64()
    cfg = rope_for(model, method)
    with apply_rope(model, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(SEQ)  # the full sequence's scale on every shard
        model.train()
        set_gradient_checkpointing(model, True)  # the recomputation in backward runs the sharded attention again
        n = row.predicted_tokens()
        ids, pos, targets, layout = shard_batch(row.input_ids, row.position_ids, row.labels, WORLD, rank, mode)
        with context_parallel_attention(model, layout), loss_forward(model):
            loss = model(input_ids=ids, targets=targets, position_ids=pos, use_cache=False) / n
            loss.backward()
        assert model.config._attn_implementation == "sdpa"  # restored
        all_reduce_gradients(list(model.parameters()))
        total = loss.detach().clone()
        dist.all_reduce(total)
    return float(total), {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def train_steps(method: str, ctx: DistContext | None, context_parallel: int, mode: str = "zigzag"):
    from ropekit.hf import apply_rope
    from ropekit.training.finetune import FinetuneSettings, train

    model = tiny_llama_f64()
    cfg = rope_for(model, method)
    settings = FinetuneSettings(seq_len=SEQ, steps=2, lr=1e-3, warmup=1, grad_accum=2, gradient_checkpointing=True,
                                context_parallel=context_parallel, cp_mode=mode)
    with apply_rope(model, cfg) as patch:
        if cfg.length_dependent:
            patch.fix_length(SEQ)
        result = train(model, rows(), settings, ctx=ctx, progress=False)
    return result.losses, {k: p.detach().clone() for k, p in model.named_parameters()}


# Both splits on one document and on a packed row (a document boundary inside); a length-dependent method
# (its scale must be the full sequence's on every shard) on the harder split.
def pose_steps(ctx: DistContext | None, strategy: str, grad_accum: int):
    """Two PoSE steps (windows of 16 with ids up to SEQ): data parallel over ``ctx`` or one process."""
    from ropekit.hf import apply_rope
    from ropekit.training.finetune import FinetuneSettings, train
    from ropekit.training.pose import pose_windows

    model = tiny_llama_f64()
    docs = [p.read_text()[:1500] for p in sorted((STDLIB / "json").glob("*.py"))]
    windows = pose_windows(tokenize_documents(docs, ByteTokenizer()), 16)
    settings = FinetuneSettings(seq_len=SEQ, steps=2, lr=1e-3, warmup=1, grad_accum=grad_accum, pose=True, window=16,
                                strategy=strategy, gradient_checkpointing=False)
    with apply_rope(model, rope_for(model, "yarn")):
        result = train(model, windows, settings, ctx=ctx, progress=False)
    weights = {k: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
               for k, p in model.named_parameters()}
    return result.losses, weights


CASES = [("yarn", mode, which) for mode in MODES for which in ("one", "packed")] + [("dynamic", "zigzag", "packed")]


def _case_row(which: str):
    all_rows = rows()
    return all_rows.rows([0]) if which == "one" else packed_row(all_rows)


def _worker(rank: int, store: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    ctx = DistContext(rank=rank, world_size=WORLD, owns_group=True)
    try:
        results = {case: sharded(rank, case[0], _case_row(case[2]), case[1]) for case in CASES}
        trained = {mode: train_steps("yarn", ctx, WORLD, mode) for mode in TRAIN_MODES}
        pose = {strategy: pose_steps(ctx, strategy, 1) for strategy in ("ddp", "fsdp")}
        torch.save({"sharded": results, "trained": trained, "pose": pose}, f"{out}.rank{rank}")
    except BaseException:
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cp")
    out = str(tmp / "result")
    mp.spawn(_worker, args=(str(tmp / "store"), out), nprocs=WORLD, join=True)
    return [torch.load(f"{out}.rank{r}", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("method, mode, which", CASES)
def test_two_ranks_give_the_single_process_loss_and_gradients(two_ranks, method, mode, which):
    loss, grads = single_process(method, _case_row(which))
    for rank in range(WORLD):
        cp_loss, cp_grads = two_ranks[rank]["sharded"][(method, mode, which)]
        assert cp_loss == pytest.approx(loss, rel=1e-12), f"rank {rank}"
        assert set(cp_grads) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(cp_grads[name], g, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("mode", TRAIN_MODES)
def test_train_with_context_parallel_matches_one_process(two_ranks, mode):
    losses, weights = train_steps("yarn", None, 1)
    for rank in range(WORLD):
        cp_losses, cp_weights = two_ranks[rank]["trained"][mode]
        assert cp_losses == pytest.approx(losses, rel=1e-10)
        for name, w in weights.items():
            torch.testing.assert_close(cp_weights[name], w, rtol=1e-9, atol=1e-12, msg=f"rank {rank}: {name}")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_pose_data_parallel_matches_one_process(two_ranks, strategy):
    """PoSE under DDP / FSDP: each rank draws the global batch's ids and keeps its rows' (2 ranks x 1 row = one
    process x 2 accumulated rows)."""
    losses, weights = pose_steps(None, "ddp", 2)
    cp_losses, cp_weights = two_ranks[0]["pose"][strategy]
    assert cp_losses == pytest.approx(losses, rel=1e-10)
    for name, w in weights.items():
        torch.testing.assert_close(cp_weights[name], w, rtol=1e-9, atol=1e-12, msg=f"{strategy}: {name}")


# ---------------------------------------------------------------------- single-process pieces
def test_targets_are_shifted_on_the_full_sequence_before_sharding():
    labels = torch.arange(8)[None]
    assert shifted_targets(labels).tolist() == [[1, 2, 3, 4, 5, 6, 7, IGNORE_INDEX]]
    ids, pos, targets, layout = shard_batch(labels, labels, labels, 2, 0, "zigzag", packed=False)
    assert ids.tolist() == [[0, 1, 6, 7]] and pos.tolist() == [[0, 1, 6, 7]]
    assert targets.tolist() == [[1, 2, 7, IGNORE_INDEX]]  # token 1's target (2) lives on rank 1: kept here
    assert layout.local_index().tolist() == shard_indices(8, 2, 0, "zigzag").tolist()


def test_mask_is_causal_by_global_index_and_per_document():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])  # two documents
    layout = ShardLayout(world_size=2, rank=1, mode="zigzag", seq_len=8,
                         document=torch.tensor([[0, 0, 0, 1, 1, 1, 1, 1]]))
    mask = layout.visible()[0, 0]  # rank 1 holds tokens 2, 3, 4, 5
    expected = torch.zeros(4, 8, dtype=torch.bool)
    expected[0, :3] = True  # token 2: document 0, keys 0..2
    expected[1, 3] = True  # token 3 starts document 1
    expected[2, 3:5] = True
    expected[3, 3:6] = True
    assert torch.equal(mask, expected)
    assert positions.shape[-1] == layout.seq_len


def test_attention_swap_is_restored_and_needs_its_context():
    from ropekit.training.context_parallel import context_parallel_sdpa

    model = tiny_llama_f64()
    layout = ShardLayout(world_size=1, rank=0, mode="contiguous", seq_len=8)
    with context_parallel_attention(model, layout):
        assert model.config._attn_implementation == "ropekit_cp" and current_layout() is layout
        # One rank holding the whole sequence: the registry's function gives transformers' own result.
        ids = torch.randint(0, 256, (1, 8))
        with torch.no_grad():
            mine = model(input_ids=ids).logits
    assert model.config._attn_implementation == "sdpa" and current_layout() is None
    with torch.no_grad():
        torch.testing.assert_close(mine, model(input_ids=ids).logits, rtol=1e-10, atol=1e-12)
    q = torch.zeros(1, 4, 2, 8)
    with pytest.raises(RuntimeError, match="outside ropekit.training.context_parallel_attention"):
        context_parallel_sdpa(model.model.layers[0].self_attn, q, q, q, None)


def test_settings_validation():
    from ropekit.training.finetune import FinetuneSettings

    with pytest.raises(ValueError, match="seq_len: 66 must be divisible by 4 for context_parallel 2"):
        FinetuneSettings(seq_len=66, steps=1, context_parallel=2)
    with pytest.raises(ValueError, match="context_parallel: .* not combined with pose"):
        FinetuneSettings(seq_len=64, steps=1, context_parallel=2, pose=True, window=16)
    with pytest.raises(ValueError, match="cp_mode: 'ring' not accepted"):
        FinetuneSettings(seq_len=64, steps=1, cp_mode="ring")
    with pytest.raises(ValueError, match="context_parallel: .* needs batch_size 1"):
        FinetuneSettings(seq_len=64, steps=1, context_parallel=2, batch_size=2)


def test_train_refuses_a_world_size_that_is_not_the_split():
    from ropekit.training.finetune import FinetuneSettings, train

    model = tiny_llama_f64()
    with pytest.raises(ValueError, match="context_parallel: 2 ranks per sequence needs exactly 2 processes"):
        train(model, rows(), FinetuneSettings(seq_len=SEQ, steps=1, context_parallel=2), progress=False)
