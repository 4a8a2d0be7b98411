"""Property tests (hypothesis) of the rotation over random configs, layouts, shapes and positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ropekit
from ropekit import RopeConfig, apply_rotary, frequencies, rerotate

settings.register_profile("ropekit", max_examples=25, deadline=None, derandomize=True)
settings.load_profile("ropekit")

HALF_DIMS = st.sampled_from([1, 2, 4, 8, 16])


@st.composite
def configs(draw, methods=("default", "linear", "ntk", "yarn", "llama3", "base", "longrope"), partial=True):
    """A valid RopeConfig with a random method, layout, base and (maybe partial) rotary dim."""
    half = draw(HALF_DIMS)
    rotary_dim = 2 * half
    head_dim = rotary_dim + (2 * draw(st.integers(0, 3)) if partial else 0)
    method = draw(st.sampled_from(methods))
    if method == "ntk" and rotary_dim < 4:  # ntk's exponent d/(d-2) needs d >= 4 (a config error otherwise)
        rotary_dim, head_dim = 4, head_dim + 2
    kwargs = dict(head_dim=head_dim, rotary_dim=rotary_dim, layout=draw(st.sampled_from(["neox", "gptj"])),
                  base=draw(st.sampled_from([100.0, 1e4, 5e5, 1e6])), method=method)
    L = draw(st.sampled_from([64, 2048, 8192]))
    if method in ("linear", "ntk", "yarn", "llama3"):
        kwargs["factor"] = draw(st.sampled_from([1.0, 2.0, 4.0, 8.0, 32.0]))
    if method in ("yarn", "llama3", "longrope"):
        kwargs["original_max_position"] = L
    if method == "base":
        kwargs["new_base"] = draw(st.sampled_from([2e4, 1e6]))
    if method == "longrope":
        kwargs["short_factor"] = draw(st.lists(st.floats(1.0, 4.0), min_size=half, max_size=half))
        kwargs["long_factor"] = draw(st.lists(st.floats(1.0, 64.0), min_size=half, max_size=half))
        kwargs["factor"] = 16.0
    return RopeConfig(**kwargs)


def rand(shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


POSITION = st.integers(0, 5000)
OFFSET = st.one_of(st.integers(0, 100), st.integers(0, 1_000_000))


@given(cfg=configs(), m=POSITION, n=POSITION, offset=OFFSET, seed=st.integers(0, 2**16))
def test_scores_depend_only_on_relative_position(cfg, m, n, offset, seed):
    f = frequencies(cfg)
    q, k = rand((1, 1, 1, cfg.head_dim), seed), rand((1, 1, 1, cfg.head_dim), seed + 1)
    s1 = (apply_rotary(q, None, f, m)[0] * apply_rotary(None, k, f, n)[1]).sum()
    s2 = (apply_rotary(q, None, f, m + offset)[0] * apply_rotary(None, k, f, n + offset)[1]).sum()
    # float64 angles: rounding ~ position * 2^-52 rad per pair
    tol = 1e-12 + 8 * (max(m, n) + offset + 1) * 2.0 ** -52 * q.norm() * k.norm() * f.attention_scale ** 2
    assert abs(s1 - s2) <= tol


@given(cfg=configs(), pos=st.integers(0, 4_000_000), seed=st.integers(0, 2**16))
def test_norm_preserved_up_to_attention_scale(cfg, pos, seed):
    f = frequencies(cfg)
    x = rand((2, 3, 1, cfg.head_dim), seed)
    out = apply_rotary(x, None, f, pos)[0]
    rd = cfg.rotary_dim
    torch.testing.assert_close(out[..., :rd].norm(dim=-1), f.attention_scale * x[..., :rd].norm(dim=-1),
                               rtol=1e-12, atol=1e-12)
    assert torch.equal(out[..., rd:], x[..., rd:])


@given(cfg=configs(), pos=st.integers(0, 4_000_000), seed=st.integers(0, 2**16))
def test_rotation_then_inverse_is_identity(cfg, pos, seed):
    q, k = rand((2, 4, 3, cfg.head_dim), seed), rand((2, 2, 3, cfg.head_dim), seed + 1)
    rq, rk = apply_rotary(q, k, cfg, pos)
    bq, bk = apply_rotary(rq, rk, cfg, pos, inverse=True)
    torch.testing.assert_close(bq, q, rtol=0, atol=1e-12)
    torch.testing.assert_close(bk, k, rtol=0, atol=1e-12)


@given(cfg=configs(), heads=st.integers(1, 3), seed=st.integers(0, 2**16), pos=st.integers(0, 100_000))
def test_neox_and_gptj_agree_after_weight_permutation(cfg, heads, seed, pos):
    """A gptj checkpoint rotated interleaved == its permuted (neox) weights rotated rotate-half: same scores."""
    hd, hidden, seq = cfg.head_dim, 12, 4
    gptj_cfg, neox_cfg = cfg.replace(layout="gptj"), cfg.replace(layout="neox")
    wq, wk = rand((heads * hd, hidden), seed), rand((heads * hd, hidden), seed + 1)
    x = rand((1, seq, hidden), seed + 2)

    def scores(c, wq_, wk_):
        q = (x @ wq_.T).view(1, seq, heads, hd)
        k = (x @ wk_.T).view(1, seq, heads, hd)
        rq, rk = apply_rotary(q, k, c, pos, heads_first=False)
        return torch.einsum("bshd,bthd->bhst", rq, rk)

    permute = lambda w: ropekit.permute_qk_weight(w, heads, hd, cfg.rotary_dim, src="gptj", dst="neox")  # noqa: E731
    torch.testing.assert_close(scores(neox_cfg, permute(wq), permute(wk)), scores(gptj_cfg, wq, wk),
                               rtol=1e-10, atol=1e-10)


@given(cfg=configs(), dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32, torch.float64]),
       pos=st.integers(0, 1_000_000), seed=st.integers(0, 2**16))
def test_dtype_preserved_and_pass_through_untouched(cfg, dtype, pos, seed):
    q = rand((1, 2, 3, cfg.head_dim), seed).to(dtype)
    k = rand((1, 1, 3, cfg.head_dim), seed + 1).to(dtype)
    rq, rk = apply_rotary(q, k, cfg, pos)
    assert rq.dtype == rk.dtype == dtype
    assert torch.equal(rq[..., cfg.rotary_dim:], q[..., cfg.rotary_dim:])
    assert torch.equal(rk[..., cfg.rotary_dim:], k[..., cfg.rotary_dim:])
    # The rotated part equals the float32/64 computation rounded once to dtype.
    ref = apply_rotary(q.to(torch.float64), None, cfg, pos)[0]
    tol = torch.finfo(dtype).eps * (cfg.head_dim ** 0.5) * float(q.abs().max()) * 4 + 1e-5 * (dtype != torch.float64)
    assert (rq.to(torch.float64) - ref).abs().max() <= max(tol, 1e-12)


@given(cfg=configs(), hq=st.integers(1, 4), group=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16),
       heads_first=st.booleans())
def test_gqa_and_heads_layouts(cfg, hq, group, seed, heads_first):
    """Heads are independent: any head counts for q and k, and both axis orders, give the per-head result."""
    hk = hq
    hq = hq * group
    q, k = rand((2, hq, 5, cfg.head_dim), seed), rand((2, hk, 5, cfg.head_dim), seed + 1)
    rq, rk = apply_rotary(q, k, cfg, 3)
    for h in range(hq):
        assert torch.equal(rq[:, h : h + 1], apply_rotary(q[:, h : h + 1], None, cfg, 3)[0])
    for h in range(hk):
        assert torch.equal(rk[:, h : h + 1], apply_rotary(None, k[:, h : h + 1], cfg, 3)[1])
    if not heads_first:
        lq, lk = apply_rotary(q.transpose(1, 2), k.transpose(1, 2), cfg, 3, heads_first=False)
        assert torch.equal(lq.transpose(1, 2), rq) and torch.equal(lk.transpose(1, 2), rk)


@given(cfg=configs(), offsets=st.lists(st.integers(0, 100_000), min_size=1, max_size=3), seq=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_per_row_positions_and_int_offset(cfg, offsets, seq, seed):
    batch = len(offsets)
    q = rand((batch, 2, seq, cfg.head_dim), seed)
    positions = ropekit.positions_from_offsets(torch.tensor(offsets), seq)
    rows = apply_rotary(q, None, cfg, positions)[0]
    for b, off in enumerate(offsets):
        one = apply_rotary(q[b : b + 1], None, cfg, off)[0]  # int offset
        explicit = apply_rotary(q[b : b + 1], None, cfg, torch.arange(off, off + seq))[0]
        assert torch.equal(one, explicit)
        assert torch.equal(rows[b : b + 1], one)


@given(cfg=configs(), lengths=st.lists(st.integers(0, 5), min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_packed_sequences_restart_positions(cfg, lengths, seed):
    cu = torch.tensor([0] + lengths).cumsum(0)
    total = int(cu[-1])
    x = rand((1, 2, total, cfg.head_dim), seed)
    packed = apply_rotary(x, None, cfg, ropekit.positions_from_cu_seqlens(cu))[0]
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if end > start:
            alone = apply_rotary(x[:, :, start:end], None, cfg)[0]
            assert torch.equal(packed[:, :, start:end], alone)


@given(cfg=configs(methods=("default", "linear", "yarn", "llama3", "longrope")), pos=st.integers(0, 100_000),
       delta=st.integers(-1000, 100_000), seed=st.integers(0, 2**16))
def test_rerotate_equals_rotating_at_shifted_position(cfg, pos, delta, seed):
    delta = max(delta, -pos)  # never below position 0
    f = frequencies(cfg)
    k = rand((1, 2, 3, cfg.head_dim), seed)
    rotated = apply_rotary(None, k, f, pos)[1]
    shifted = rerotate(rotated, delta, f)
    direct = apply_rotary(None, k, f, pos + delta)[1]
    tol = 8 * (pos + abs(delta) + 3) * 2.0 ** -52 * float(k.abs().max()) * f.attention_scale * cfg.rotary_dim
    assert (shifted - direct).abs().max() <= max(tol, 1e-12)
    assert torch.equal(shifted[..., cfg.rotary_dim:], k[..., cfg.rotary_dim:])


@given(n_hat=st.integers(1, 8), pos=st.integers(0, 12), delta=st.integers(0, 12), seed=st.integers(0, 2**16),
       layout=st.sampled_from(["neox", "gptj"]))
def test_rerotate_longrope_n_hat_with_positions(n_hat, pos, delta, seed, layout):
    cfg = RopeConfig(head_dim=10, rotary_dim=8, layout=layout, method="longrope", original_max_position=16,
                     short_factor=[1.0, 1.5, 2.0, 3.0], long_factor=[1.0, 4.0, 8.0, 16.0], n_hat=n_hat, factor=4.0)
    f = frequencies(cfg, 64)
    k = rand((1, 1, 3, 10), seed)
    positions = torch.arange(pos, pos + 3)
    rotated = apply_rotary(None, k, f, positions)[1]
    shifted = rerotate(rotated, delta, f, positions=positions)
    direct = apply_rotary(None, k, f, positions + delta)[1]
    torch.testing.assert_close(shifted, direct, rtol=0, atol=1e-12)


def test_rerotate_per_row_delta():
    cfg = RopeConfig(head_dim=8, base=1e4)
    k = rand((2, 1, 3, 8), 0)
    rotated = apply_rotary(None, k, cfg, 5)[1]
    shifted = rerotate(rotated, torch.tensor([1, 7]), cfg)
    expected = apply_rotary(None, k, cfg, torch.tensor([[6, 7, 8], [12, 13, 14]]))[1]
    torch.testing.assert_close(shifted, expected, rtol=0, atol=1e-13)
    per_key = rerotate(rotated, torch.tensor([0, 1, 2]), cfg)  # (seq,): one shift per key
    expected = apply_rotary(None, k, cfg, torch.tensor([5, 7, 9]))[1]
    torch.testing.assert_close(per_key, expected, rtol=0, atol=1e-13)


@pytest.mark.parametrize("cfg", [
    RopeConfig(head_dim=6, rotary_dim=4, method="yarn", factor=4.0, original_max_position=16),
    RopeConfig(head_dim=4, layout="gptj", method="linear", factor=2.0),
])
def test_gradcheck_float64(cfg):
    q = rand((1, 2, 3, cfg.head_dim), 0).requires_grad_()
    k = rand((1, 1, 3, cfg.head_dim), 1).requires_grad_()
    positions = torch.tensor([0, 5, 1000])
    assert torch.autograd.gradcheck(lambda a, b: apply_rotary(a, b, cfg, positions), (q, k))
    # The gradient of s * R is s * R^T: the inverse rotation (which divides by s) times s^2 on the rotated
    # channels; pass-through channels pass the gradient unchanged.
    out = apply_rotary(q, None, cfg, positions)[0]
    g = rand(out.shape, 2)
    (grad,) = torch.autograd.grad(out, q, g)
    expected = apply_rotary(g, None, cfg, positions, inverse=True)[0]
    rd = cfg.rotary_dim
    expected[..., :rd] *= frequencies(cfg).attention_scale ** 2
    torch.testing.assert_close(grad, expected, rtol=1e-12, atol=1e-12)
