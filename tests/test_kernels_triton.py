"""The Triton kernel against the reference, run by Triton's interpreter on the CPU (small shapes).

TRITON_INTERPRET is set before triton is imported; ropekit builds its jitted kernel on first use, so the
setting counts even when another test module imported ropekit.kernels first.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

import ropekit  # noqa: E402
from ropekit import RopeConfig  # noqa: E402
from ropekit.kernels import apply_rotary_fast  # noqa: E402
from ropekit.kernels import triton_rope  # noqa: E402
from backend_checks import backward_through  # noqa: E402

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """Fresh output buffers start as NaN, so an element the kernel does not write shows up."""
    original = torch.empty_like

    def empty_like_nan(x, *args, **kwargs):
        out = original(x, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out

    monkeypatch.setattr(torch, "empty_like", empty_like_nan)


def _close(a, b, dtype):
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) elements in the output"
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


CASES = [
    # head_dim, rotary_dim, layout, q_heads, k_heads, batch, seq, heads_first, dtype
    (16, 16, "neox", 4, 2, 2, 5, True, torch.float32),
    (16, 12, "gptj", 3, 1, 2, 3, False, torch.float32),
    (24, 16, "neox", 1, 1, 1, 1, True, torch.bfloat16),
    (8, 8, "gptj", 2, 2, 3, 4, True, torch.float16),
    (32, 20, "neox", 5, 5, 1, 7, False, torch.bfloat16),
]


@pytest.mark.parametrize("hd,rd,layout,hq,hk,b,s,heads_first,dtype", CASES)
def test_matches_reference_per_row_positions_near_4m(poisoned_outputs, hd, rd, layout, hq, hk, b, s, heads_first, dtype):
    f = ropekit.frequencies(RopeConfig(head_dim=hd, rotary_dim=rd, layout=layout, method="yarn", factor=4.0,
                                       original_max_position=64))
    gen = torch.Generator().manual_seed(hd + rd + s)
    shape = (lambda h: (b, h, s, hd)) if heads_first else (lambda h: (b, s, h, hd))
    q = torch.randn(shape(hq), generator=gen).to(dtype)
    k = torch.randn(shape(hk), generator=gen).to(dtype)
    pos = torch.randint(4_000_000 - 1000, 4_000_000, (b, s), generator=gen)
    rq, rk = ropekit.apply_rotary(q, k, f, pos, heads_first=heads_first, backend="reference")
    oq, ok = apply_rotary_fast(q, k, f, pos, heads_first=heads_first, backend="triton")
    _close(oq, rq, dtype)
    _close(ok, rk, dtype)
    if rd < hd:  # pass-through channels copied bit for bit
        ch = slice(rd, None)
        assert torch.equal(oq[..., ch], q[..., ch]) and torch.equal(ok[..., ch], k[..., ch])
    # in place, on non-contiguous views (every other batch row of a bigger buffer)
    big_q = torch.randn((2 * b,) + tuple(q.shape[1:]), generator=gen).to(dtype)
    big_k = torch.randn((2 * b,) + tuple(k.shape[1:]), generator=gen).to(dtype)
    vq, vk = big_q[::2], big_k[::2]
    vq.copy_(q), vk.copy_(k)
    untouched = big_q[1::2].clone()
    apply_rotary_fast(vq, vk, f, pos, heads_first=heads_first, backend="triton", inplace=True)
    _close(vq, rq, dtype)
    _close(vk, rk, dtype)
    assert torch.equal(big_q[1::2], untouched)


@pytest.mark.parametrize("rotary_dim", [16, 10])
def test_offsets_none_3d_q_only_k_only_and_inverse(poisoned_outputs, rotary_dim):
    f = ropekit.frequencies(RopeConfig(head_dim=16, rotary_dim=rotary_dim))
    q = torch.randn(3, 6, 16)  # unbatched (heads, seq, dim)
    k = torch.randn(1, 6, 16)
    for positions in (None, 1234567):
        rq, rk = ropekit.apply_rotary(q, k, f, positions, backend="reference")
        oq, ok = apply_rotary_fast(q, k, f, positions, backend="triton")
        _close(oq, rq, torch.float32), _close(ok, rk, torch.float32)
        only_q = apply_rotary_fast(q, None, f, positions, backend="triton")
        only_k = apply_rotary_fast(None, k, f, positions, backend="triton")
        assert only_q[1] is None and only_k[0] is None
        _close(only_q[0], rq, torch.float32), _close(only_k[1], rk, torch.float32)
        back = apply_rotary_fast(oq, None, f, positions, backend="triton", inverse=True)[0]
        _close(back, q, torch.float32)


def test_packed_cu_seqlens_and_restarting_positions(poisoned_outputs):
    f = ropekit.frequencies(RopeConfig(head_dim=8, layout="gptj"))
    cu = torch.tensor([0, 3, 4, 9])
    q = torch.randn(1, 2, 9, 8)
    k = torch.randn(1, 1, 9, 8)
    positions = ropekit.positions_from_cu_seqlens(cu)
    rq, rk = ropekit.apply_rotary(q, k, f, positions, backend="reference")
    oq, ok = apply_rotary_fast(q, k, f, cu_seqlens=cu, backend="triton")
    _close(oq, rq, torch.float32), _close(ok, rk, torch.float32)


def test_longrope_unscaled_positions_in_kernel(poisoned_outputs):
    cfg = RopeConfig(head_dim=8, method="longrope", short_factor=(1.0, 1.5, 2.0, 4.0),
                     long_factor=(2.0, 3.0, 5.0, 8.0), original_max_position=16, max_position=64, n_hat=5)
    f = ropekit.frequencies(cfg)
    assert f.unscaled_until == 5
    q = torch.randn(1, 2, 10, 8)
    rq, _ = ropekit.apply_rotary(q, None, f, None, backend="reference")
    oq, _ = apply_rotary_fast(q, None, f, None, backend="triton")
    _close(oq, rq, torch.float32)


def test_gradients_match_reference():
    f = ropekit.frequencies(RopeConfig(head_dim=16, rotary_dim=8, method="yarn", factor=2.0,
                                       original_max_position=32))
    pos = torch.tensor([[3, 100, 4_000_000], [0, 1, 2]])
    grads = []
    for backend in ("reference", "triton"):
        q, k, _ = backward_through(backend, f, pos)
        grads.append((q.grad, k.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


def test_custom_op_passes_opcheck():
    from ropekit.kernels import ops

    f = ropekit.frequencies(RopeConfig(head_dim=8))
    turns = triton_rope.turns_fixed_point(f.inv_freq64)
    q = torch.randn(1, 2, 3, 8, requires_grad=True)
    k = torch.randn(1, 1, 3, 8, requires_grad=True)
    pos = torch.arange(3)[None]
    args = (q, k, pos, turns, turns, 0, 1.0, False, False, True, 8)
    torch.library.opcheck(ops.rope, args, test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
    torch.library.opcheck(ops.rope_, (q.detach().clone(), k.detach().clone()) + args[2:],
                          test_utils=("test_schema", "test_faketensor"))


def test_angles_precise_at_4m_positions():
    """The kernel's fixed-point angle reduction vs the float64 reference: documented bound 1e-6 rad."""
    for cfg in (RopeConfig(head_dim=128), RopeConfig(head_dim=128, base=5e5, method="linear", factor=8.0)):
        inv = ropekit.frequencies(cfg).inv_freq64
        err = triton_rope.angle_error(inv, torch.arange(4_194_304 - 4096, 4_194_304))
        assert err < 1e-6, err
    # naive float32 angles are far off at these positions (the problem this solves)
    inv = ropekit.frequencies(RopeConfig(head_dim=128)).inv_freq64
    p = torch.arange(4_194_304 - 64, 4_194_304)
    naive = (p.float()[:, None] * inv.float()).double()
    ref = p.double()[:, None] * inv
    assert float(((naive - ref + torch.pi) % (2 * torch.pi) - torch.pi).abs().max()) > 0.1


def test_explicit_triton_backend_refuses_float64():
    f = ropekit.frequencies(RopeConfig(head_dim=8))
    with pytest.raises(ValueError, match="float64"):
        ropekit.apply_rotary(torch.randn(1, 1, 2, 8, dtype=torch.float64), None, f, backend="triton")
