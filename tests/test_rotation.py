"""The rotation: shapes, positions, layouts, helpers, and bad input (each a clear error naming the argument)."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, apply_rotary, frequencies, rerotate
from ropekit.rotation import resolve_positions

CFG = RopeConfig(head_dim=8, base=100.0)


def qk(batch=2, hq=3, hk=1, seq=5, d=8, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, hq, seq, d, generator=gen, dtype=dtype),
            torch.randn(batch, hk, seq, d, generator=gen, dtype=dtype))


def test_rotation_by_hand_neox_and_gptj():
    """One pair at position 3: the 2x2 rotation by 3 * inv_freq_i, on the channels each layout pairs."""
    x = torch.zeros(1, 1, 1, 8, dtype=torch.float64)
    x[..., 1] = 1.0  # pair 1's first member in neox (channels 1, 5); pair 0's second in gptj (channels 0, 1)
    neox, _ = apply_rotary(x, None, CFG, 3)
    theta = 3 * 100.0 ** (-2 / 8)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[1], expected[5] = math.cos(theta), math.sin(theta)
    torch.testing.assert_close(neox[0, 0, 0], expected, rtol=0, atol=1e-15)
    gptj, _ = apply_rotary(x, None, CFG.replace(layout="gptj"), 3)
    expected = torch.zeros(8, dtype=torch.float64)
    expected[0], expected[1] = -math.sin(3.0), math.cos(3.0)  # pair 0 turns at inv_freq 1
    torch.testing.assert_close(gptj[0, 0, 0], expected, rtol=0, atol=1e-15)


def test_unbatched_3d_equals_batch_of_one():
    q, k = qk(batch=1)
    rq, rk = apply_rotary(q, k, CFG, 4)
    uq, uk = apply_rotary(q[0], k[0], CFG, 4)
    assert torch.equal(uq, rq[0]) and torch.equal(uk, rk[0])


def test_one_kv_head_seq_len_one_and_non_contiguous():
    q, k = qk(hq=4, hk=1, seq=1)
    rq, rk = apply_rotary(q, k, CFG, 7)
    assert rq.shape == q.shape and rk.shape == k.shape
    big = torch.randn(2, 5, 3, 16, dtype=torch.float64)
    view = big.transpose(1, 2)[..., ::2]  # (2, 3, 5, 8), non-contiguous strides
    assert not view.is_contiguous()
    torch.testing.assert_close(apply_rotary(view, None, CFG)[0], apply_rotary(view.contiguous(), None, CFG)[0],
                               rtol=0, atol=0)


def test_q_or_k_alone_and_frequencies_or_config():
    q, k = qk()
    both = apply_rotary(q, k, CFG, 2)
    assert apply_rotary(q, None, CFG, 2)[1] is None and torch.equal(apply_rotary(q, None, CFG, 2)[0], both[0])
    assert apply_rotary(None, k, CFG, 2)[0] is None and torch.equal(apply_rotary(None, k, CFG, 2)[1], both[1])
    assert torch.equal(apply_rotary(q, k, frequencies(CFG), 2)[0], both[0])
    dyn = RopeConfig(head_dim=8, method="dynamic", factor=2.0, original_max_position=4)
    a = apply_rotary(q, k, dyn, 2, seq_len=40)[0]
    assert torch.equal(a, apply_rotary(q, k, frequencies(dyn, 40), 2)[0])


def test_positions_forms():
    q, k = qk(batch=2, seq=4)
    by_offset = apply_rotary(q, k, CFG, 3)
    by_vector = apply_rotary(q, k, CFG, torch.arange(3, 7))
    by_rows = apply_rotary(q, k, CFG, torch.arange(3, 7).expand(2, 4))
    by_scalar_tensor = apply_rotary(q, k, CFG, torch.tensor(3))
    for other in (by_vector, by_rows, by_scalar_tensor):
        assert torch.equal(other[0], by_offset[0]) and torch.equal(other[1], by_offset[1])
    assert torch.equal(apply_rotary(q, k, CFG)[0], apply_rotary(q, k, CFG, 0)[0])
    # int32 positions are integers too
    assert torch.equal(apply_rotary(q, k, CFG, torch.arange(3, 7, dtype=torch.int32))[0], by_offset[0])


def test_positions_helpers():
    cu = torch.tensor([0, 3, 3, 7])
    torch.testing.assert_close(ropekit.positions_from_cu_seqlens(cu), torch.tensor([0, 1, 2, 0, 1, 2, 3]))
    torch.testing.assert_close(ropekit.positions_from_offsets(torch.tensor([0, 5]), 3),
                               torch.tensor([[0, 1, 2], [5, 6, 7]]))
    with pytest.raises(ValueError, match="cu_seqlens: must be 1-D with at least 2 entries"):
        ropekit.positions_from_cu_seqlens(torch.tensor([0]))
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0 and be non-decreasing"):
        ropekit.positions_from_cu_seqlens(torch.tensor([0, 4, 2]))
    with pytest.raises(ValueError, match="cu_seqlens: must start at 0"):
        ropekit.positions_from_cu_seqlens(torch.tensor([1, 4]))


def test_inverse_undoes_rotation_and_scale():
    cfg = RopeConfig(head_dim=8, method="yarn", factor=8.0, original_max_position=16)
    q, k = qk()
    rq, rk = apply_rotary(q, k, cfg, 11)
    bq, bk = apply_rotary(rq, rk, cfg, 11, inverse=True)
    torch.testing.assert_close(bq, q, rtol=0, atol=1e-13)
    torch.testing.assert_close(bk, k, rtol=0, atol=1e-13)


def test_layout_permutation_and_weight_permutation():
    perm = ropekit.layout_permutation(8)  # gptj -> neox
    assert perm.tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    back = ropekit.layout_permutation(8, src="neox", dst="gptj")
    assert perm[back].tolist() == list(range(8))
    assert ropekit.layout_permutation(6, rotary_dim=4).tolist() == [0, 2, 1, 3, 4, 5]  # pass-through stays
    w = torch.arange(16.0)[:, None].expand(16, 3)  # 2 heads x 8
    out = ropekit.permute_qk_weight(w, num_heads=2, head_dim=8)
    assert out[:, 0].tolist() == [0, 2, 4, 6, 1, 3, 5, 7, 8, 10, 12, 14, 9, 11, 13, 15]
    bias = ropekit.permute_qk_weight(torch.arange(16.0), 2, 8)
    assert torch.equal(bias, out[:, 0])


# ---------------------------------------------------------------------- bad input
@pytest.mark.parametrize("q_shape, k_shape, match", [
    ((5, 8), None, r"q: expected a 4-D tensor \(batch, heads, seq, head_dim\) \(or 3-D without batch\), got shape \(5, 8\)"),
    ((1, 1, 1, 5, 8), None, r"q: expected a 4-D tensor"),
    ((1, 2, 5, 8), (2, 5, 8), r"q \(1, 2, 5, 8\) and k \(2, 5, 8\): must agree in batch, seq and head_dim"),
    ((1, 2, 5, 8), (1, 2, 4, 8), r"must agree in batch, seq and head_dim \(only the head count may differ\)"),
    ((1, 2, 5, 8), (1, 2, 5, 10), r"must agree in batch, seq and head_dim"),
    ((2, 2, 5, 8), (1, 2, 5, 8), r"must agree in batch, seq and head_dim"),
    ((1, 2, 5, 6), None, r"q: head_dim 6 is smaller than rotary_dim 8"),
    (None, (1, 2, 5, 6), r"k: head_dim 6 is smaller than rotary_dim 8"),
])
def test_bad_shapes(q_shape, k_shape, match):
    q = None if q_shape is None else torch.randn(q_shape)
    k = None if k_shape is None else torch.randn(k_shape)
    with pytest.raises(ValueError, match=match):
        apply_rotary(q, k, CFG)


def test_bad_tensors():
    with pytest.raises(ValueError, match="q: must be a floating-point tensor, got dtype torch.int64"):
        apply_rotary(torch.ones(1, 1, 2, 8, dtype=torch.long), None, CFG)
    with pytest.raises(ValueError, match="q: expected a tensor, got list"):
        apply_rotary([1.0], None, CFG)
    with pytest.raises(ValueError, match="q, k: at least one tensor is needed"):
        apply_rotary(None, None, CFG)
    with pytest.raises(ValueError, match="freqs: expected Frequencies or RopeConfig, got dict"):
        apply_rotary(torch.ones(1, 1, 2, 8), None, {"head_dim": 8})
    with pytest.raises(ValueError, match=r"q: expected a 4-D tensor \(batch, seq, heads, head_dim\)"):
        apply_rotary(torch.ones(2, 8), None, CFG, heads_first=False)


@pytest.mark.parametrize("positions, match", [
    (-1, r"positions: offset must be >= 0, got -1"),
    (torch.tensor([0, 1, -2, 3, 4]), r"positions: must be >= 0, got minimum -2"),
    (2.0, r"positions: must be integers, got 2.0"),
    (True, r"positions: must be integers, got True"),
    (torch.arange(5.0), r"positions: must be an integer tensor \(token indices\), got dtype torch.float32"),
    (torch.ones(5, dtype=torch.bool), r"positions: must be an integer tensor"),
    (torch.arange(4), r"positions: expected shape \(5,\) or \(2, 5\) for batch 2 and seq 5, got \(1, 4\)"),
    (torch.arange(15).reshape(3, 5), r"positions: expected shape \(5,\) or \(2, 5\) .* got \(3, 5\)"),
    (torch.arange(10).reshape(1, 2, 5), r"positions: expected shape \(5,\) or \(2, 5\) .* got \(1, 2, 5\)"),
    ([0, 1, 2, 3, 4], r"positions: expected None, an int offset or an integer tensor, got list"),
])
def test_bad_positions(positions, match):
    q, k = qk(batch=2, seq=5)
    with pytest.raises(ValueError, match=match):
        apply_rotary(q, k, CFG, positions)


def test_bad_layout_arguments():
    cos = sin = torch.ones(1, 4)
    with pytest.raises(ValueError, match="layout: unknown channel layout 'interleaved'; accepted: neox, gptj"):
        ropekit.rotate(torch.ones(1, 8), cos, sin, "interleaved")
    with pytest.raises(ValueError, match="rotary_dim 8 is larger than the head_dim 6"):
        ropekit.rotate(torch.ones(1, 6), cos, sin)
    with pytest.raises(ValueError, match="src: unknown channel layout 'rope'"):
        ropekit.layout_permutation(8, src="rope")
    with pytest.raises(ValueError, match="rotary_dim: must be even and <= head_dim 8, got 9"):
        ropekit.layout_permutation(8, rotary_dim=9)
    with pytest.raises(ValueError, match=r"weight: first dimension must be num_heads \* head_dim = 16, got 15"):
        ropekit.permute_qk_weight(torch.ones(15, 4), num_heads=2, head_dim=8)


def test_bad_rerotate_arguments():
    k = torch.randn(1, 1, 3, 8)
    with pytest.raises(ValueError, match="delta: must be an integer tensor, got dtype torch.float32"):
        rerotate(k, torch.tensor([1.0]), CFG)
    with pytest.raises(ValueError, match="delta: must be an int or an integer tensor, got 1.5"):
        rerotate(k, 1.5, CFG)
    with pytest.raises(ValueError, match=r"delta: a 1-D tensor is ambiguous when batch == seq \(3\)"):
        rerotate(torch.randn(3, 1, 3, 8), torch.tensor([1, 2, 3]), CFG)
    with pytest.raises(ValueError, match=r"delta: shape \(4,\) does not broadcast to \(batch, seq\) = \(1, 3\)"):
        rerotate(k, torch.tensor([1, 2, 3, 4]), CFG)
    lr = RopeConfig(head_dim=8, method="longrope", short_factor=[1.0] * 4, long_factor=[2.0] * 4,
                    original_max_position=4, n_hat=2)
    with pytest.raises(ValueError, match=r"positions: required to re-rotate with LongRoPE's unscaled leading"):
        rerotate(k, 2, lr)
    other = RopeConfig(head_dim=8, layout="gptj")
    with pytest.raises(ValueError, match="old, new: frequencies must have the same rotary_dim and layout"):
        ropekit.reapply_frequencies(k, frequencies(CFG), frequencies(other))


def test_resolve_positions_shapes():
    assert resolve_positions(None, 3, 4, torch.device("cpu")).shape == (1, 4)
    assert resolve_positions(torch.arange(4).expand(3, 4), 3, 4, torch.device("cpu")).shape == (3, 4)
    assert resolve_positions(torch.arange(4, dtype=torch.int32), 3, 4, torch.device("cpu")).dtype == torch.long
