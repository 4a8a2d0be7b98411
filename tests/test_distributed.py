"""Scaling out: the context-parallel split rotates at global positions; 2 gloo processes match one process."""

from __future__ import annotations

import os
import sysconfig
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ropekit import RopeConfig, apply_rotary, positions_from_cu_seqlens
from ropekit.training.distributed import (
    DistContext,
    gather_sequence,
    shard_indices,
    shard_sequence,
    shutdown_distributed,
    unshard_sequence,
)

STDLIB = Path(sysconfig.get_paths()["stdlib"])

CONFIGS = {
    "default": RopeConfig(head_dim=32, base=10000.0),
    "yarn": RopeConfig(head_dim=32, base=10000.0, method="yarn", factor=8.0, original_max_position=16),
    "dynamic": RopeConfig(head_dim=32, base=10000.0, method="dynamic", factor=4.0, original_max_position=16),
    "gptj-partial": RopeConfig(head_dim=32, rotary_dim=16, base=500.0, layout="gptj", method="linear", factor=2.0),
}


# ---------------------------------------------------------------------- the split itself
def test_shard_indices_contiguous_and_zigzag():
    assert shard_indices(8, 2, 0, "contiguous").tolist() == [0, 1, 2, 3]
    assert shard_indices(8, 2, 1, "contiguous").tolist() == [4, 5, 6, 7]
    assert shard_indices(8, 2, 0, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_indices(8, 2, 1, "zigzag").tolist() == [2, 3, 4, 5]
    assert shard_indices(16, 4, 1, "zigzag").tolist() == [2, 3, 12, 13]
    for mode in ("contiguous", "zigzag"):
        every = torch.cat([shard_indices(24, 3, r, mode) for r in range(3)])
        assert sorted(every.tolist()) == list(range(24))


def test_shard_errors():
    x = torch.zeros(1, 6)
    with pytest.raises(ValueError, match="seq_len: 6 must be divisible by 4 for mode 'zigzag'"):
        shard_sequence(x, None, 2, 0, "zigzag")
    with pytest.raises(ValueError, match="mode: 'ring' not accepted; accepted: contiguous, zigzag"):
        shard_sequence(x, None, 2, 0, "ring")
    with pytest.raises(ValueError, match=r"rank: must be an integer in \[0, 2\)"):
        shard_sequence(x, None, 2, 2)
    with pytest.raises(ValueError, match="positions: must be an integer tensor"):
        shard_sequence(x, torch.zeros(6), 2, 0)


@pytest.mark.parametrize("mode", ["contiguous", "zigzag"])
@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_shard_rotated_at_global_positions_equals_unsharded_slice(mode, world_size, name):
    cfg = CONFIGS[name]
    gen = torch.Generator().manual_seed(0)
    batch, seq = 2, 64
    q = torch.randn(batch, 4, seq, 32, generator=gen)
    k = torch.randn(batch, 2, seq, 32, generator=gen)
    # Row 0: one long sequence; row 1: packed documents restarting at 0.
    packed = positions_from_cu_seqlens(torch.tensor([0, 10, 37, 64]))
    positions = torch.stack((torch.arange(seq), packed))
    full_q, full_k = apply_rotary(q, k, cfg, positions, seq_len=seq)
    shards_q = []
    for rank in range(world_size):
        q_shard, pos_shard = shard_sequence(q, positions, world_size, rank, mode, dim=2)
        k_shard, _ = shard_sequence(k, positions, world_size, rank, mode, dim=2)
        index = shard_indices(seq, world_size, rank, mode)
        assert torch.equal(pos_shard, positions[:, index])
        rot_q, rot_k = apply_rotary(q_shard, k_shard, cfg, pos_shard, seq_len=seq)
        torch.testing.assert_close(rot_q, full_q[:, :, index], rtol=0, atol=0)
        torch.testing.assert_close(rot_k, full_k[:, :, index], rtol=0, atol=0)
        shards_q.append(rot_q)
    assert torch.equal(unshard_sequence(shards_q, mode, dim=2), full_q)


def test_shard_positions_default_to_global_indices():
    x = torch.arange(16)[None]
    shard, pos = shard_sequence(x, None, 2, 1, "zigzag")
    assert shard.tolist() == [[4, 5, 6, 7, 8, 9, 10, 11]]
    assert pos.tolist() == [4, 5, 6, 7, 8, 9, 10, 11]


def test_local_rotation_of_a_shard_is_wrong_without_global_positions():
    """Control: rotating a shard at 0..shard-1 (what a naive rank does) differs from the unsharded rotation."""
    cfg = CONFIGS["default"]
    q = torch.randn(1, 2, 16, 32)
    full_q, _ = apply_rotary(q, None, cfg)
    q_shard, _ = shard_sequence(q, None, 2, 1, "contiguous", dim=2)
    naive, _ = apply_rotary(q_shard, None, cfg)
    assert not torch.allclose(naive, full_q[:, :, 8:], atol=1e-3)


def test_shutdown_ends_only_a_group_its_context_created(tmp_path):
    shutdown_distributed(DistContext())  # no group: nothing to do
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        shutdown_distributed(DistContext(owns_group=False))  # someone else's group stays
        assert dist.is_initialized()
        shutdown_distributed(DistContext(owns_group=True))  # barrier, then destroy
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------- 2 processes on gloo
def _tiny_llama_f64():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(11)
    config = LlamaConfig(vocab_size=257, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16,
                         eos_token_id=256, bos_token_id=None, pad_token_id=None, attn_implementation="sdpa")
    return LlamaForCausalLM(config).to(torch.float64)


def _rows():
    from ropekit.training.data import ByteTokenizer, pack_documents, tokenize_documents

    docs = [p.read_text()[:3000] for p in sorted((STDLIB / "json").glob("*.py"))]
    return pack_documents(tokenize_documents(docs, ByteTokenizer()), 64)


def _train_once(strategy: str, batch_size: int, grad_accum: int):
    """Two optimizer steps; returns (losses, gradients of step 1 by parameter name, final weights)."""
    from ropekit.hf import apply_rope
    from ropekit.training.finetune import FinetuneSettings, train

    model = _tiny_llama_f64()
    cfg = RopeConfig.from_hf(model.config).with_method("yarn", factor=4.0)
    patch = apply_rope(model, cfg)
    grads = {}

    def keep_grads(step, m):
        if step == 0:
            for name, p in m.named_parameters():
                g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
                grads[name] = g.detach().clone()

    settings = FinetuneSettings(seq_len=64, steps=2, lr=1e-3, warmup=1, batch_size=batch_size,
                                grad_accum=grad_accum, strategy=strategy, gradient_checkpointing=False)
    result = train(model, _rows(), settings, progress=False, after_backward=keep_grads)
    weights = {}
    for name, p in model.named_parameters():
        weights[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    patch.remove()
    return result.losses, grads, weights


def _context_parallel_check(rank: int, world: int) -> dict:
    """Each rank rotates its shard at global positions; gathered, it equals the unsharded rotation."""
    ctx = DistContext(rank=rank, world_size=world)
    out = {}
    cfg = CONFIGS["yarn"]
    gen = torch.Generator().manual_seed(3)  # same tensors on every rank
    q = torch.randn(1, 4, 32, 32, generator=gen)
    positions = positions_from_cu_seqlens(torch.tensor([0, 5, 32]))[None]
    full_q, _ = apply_rotary(q, None, cfg, positions, seq_len=32)
    for mode in ("contiguous", "zigzag"):
        shard, pos = shard_sequence(q, positions, world, rank, mode, dim=2)
        rotated, _ = apply_rotary(shard, None, cfg, pos, seq_len=32)
        index = shard_indices(32, world, rank, mode)
        out[f"{mode}_shard_equal"] = torch.equal(rotated, full_q[:, :, index])
        out[f"{mode}_gather_equal"] = torch.equal(gather_sequence(rotated, ctx, mode, dim=2), full_q)
    return out


def _worker(rank: int, world: int, store: str, strategy: str, result_path: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    # A file store, not a TCP port: a port picked free can be taken by another process before gloo binds it.
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    ctx = DistContext(rank=rank, world_size=world, owns_group=True)
    try:
        losses, grads, weights = _train_once(strategy, batch_size=1, grad_accum=2)
        cp = _context_parallel_check(rank, world)
        if rank == 0:
            torch.save({"losses": losses, "grads": grads, "weights": weights, "cp": cp}, result_path)
        else:
            torch.save({"cp": cp}, result_path + ".rank1")
    except BaseException:
        shutdown_distributed(ctx, failed=True)
        raise
    shutdown_distributed(ctx)  # both ranks reach the barrier before gloo is torn down


def _spawn(strategy: str, tmp_path: Path) -> tuple[dict, dict]:
    path = str(tmp_path / f"{strategy}.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / f"{strategy}.store"), strategy, path), nprocs=2, join=True)
    return torch.load(path, weights_only=False), torch.load(path + ".rank1", weights_only=False)


@pytest.fixture(scope="module")
def single_process_run():
    # Global batch = 4 rows per step: one process with 4 micro-batches of 1 row.
    return _train_once("ddp", batch_size=1, grad_accum=4)


def _assert_matches(run: dict, single, what: str) -> None:
    losses, grads, weights = single
    assert run["losses"] == pytest.approx(losses, rel=1e-10, abs=0), what
    assert set(run["grads"]) == set(grads)
    for name, g in grads.items():
        torch.testing.assert_close(run["grads"][name], g, rtol=1e-9, atol=1e-12, msg=f"{what}: grad {name}")
    for name, w in weights.items():
        torch.testing.assert_close(run["weights"][name], w, rtol=1e-9, atol=1e-12, msg=f"{what}: weight {name}")


def test_single_process_batch_shapes_agree(single_process_run):
    """One process: 4 rows as 1 micro-batch of 4 or 4 micro-batches of 1 give the same step."""
    losses, grads, _ = _train_once("ddp", batch_size=4, grad_accum=1)
    assert losses == pytest.approx(single_process_run[0], rel=1e-10)
    for name, g in grads.items():
        torch.testing.assert_close(g, single_process_run[1][name], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_processes_match_one_process(strategy, tmp_path, single_process_run):
    rank0, rank1 = _spawn(strategy, tmp_path)
    _assert_matches(rank0, single_process_run, strategy)
    for cp in (rank0["cp"], rank1["cp"]):
        assert cp == {"contiguous_shard_equal": True, "contiguous_gather_equal": True,
                      "zigzag_shard_equal": True, "zigzag_gather_equal": True}
