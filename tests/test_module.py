"""RotaryEmbedding: the KV-cache policy of length-dependent methods, dtype safety, no persisted buffers,
max_position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ropekit
from ropekit import RopeConfig, RotaryEmbedding

L = 32  # trained length of the tiny configs below
D = 16

DYNAMIC_CONFIGS = {
    "dynamic": RopeConfig(head_dim=D, base=10000.0, method="dynamic", factor=4.0, original_max_position=L),
    "dynamic_yarn": RopeConfig(head_dim=D, base=10000.0, method="dynamic_yarn", factor=4.0, original_max_position=L),
    "longrope": RopeConfig(head_dim=D, base=10000.0, method="longrope", original_max_position=L, factor=4.0,
                           short_factor=[1.0 + i / 10 for i in range(D // 2)],
                           long_factor=[1.0 + i for i in range(D // 2)]),
}


def attention(q, k, v):
    """Causal softmax attention of the last len(q) queries over all keys: (B, H, Sq, D) x (B, H, Sk, D)."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    sq, sk = q.shape[-2], k.shape[-2]
    mask = torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def _qkv(n, seed=0, heads=2):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(1, heads, n, D, generator=gen, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("method", list(DYNAMIC_CONFIGS))
@pytest.mark.parametrize("n", [L - 4, 3 * L])  # below and beyond the trained length
def test_freeze_begin_sequence_decoding_equals_full_pass(method, n):
    cfg = DYNAMIC_CONFIGS[method]
    q, k, v = _qkv(n)
    full = RotaryEmbedding(cfg)  # first call freezes the length it sees: n
    fq, fk = full(q, k)
    assert full.frozen_seq_len == n
    expected = attention(fq, fk, v)

    rope = RotaryEmbedding(cfg)
    rope.begin_sequence(n)
    cache, outs = [], []
    for t in range(n):
        tq, tk = rope(q[:, :, t : t + 1], k[:, :, t : t + 1], t)
        cache.append(tk)
        outs.append(attention(tq, torch.cat(cache, dim=2), v[:, :, : t + 1]))
    assert rope.frozen_seq_len == n
    torch.testing.assert_close(torch.cat(cache, dim=2), fk, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(outs, dim=2), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", list(DYNAMIC_CONFIGS))
def test_freeze_prefill_then_decode_keeps_the_prefill_scale(method):
    cfg = DYNAMIC_CONFIGS[method]
    prefill, n = L - 4, 2 * L  # short prefill, decoding past the trained length
    q, k, v = _qkv(n, seed=1)
    rope = RotaryEmbedding(cfg)
    pq, pk = rope(q[:, :, :prefill], k[:, :, :prefill])  # freezes at the prefill length
    cache = [pk]
    outs = [attention(pq, pk, v[:, :, :prefill])]
    for t in range(prefill, n):
        tq, tk = rope(q[:, :, t : t + 1], k[:, :, t : t + 1], torch.tensor([t]))
        cache.append(tk)
        outs.append(attention(tq, torch.cat(cache, dim=2), v[:, :, : t + 1]))
    assert rope.frozen_seq_len == prefill
    # One pass over all n tokens at the frozen scale gives the same keys and outputs.
    fq, fk = ropekit.apply_rotary(q, k, ropekit.frequencies(cfg, prefill))
    torch.testing.assert_close(torch.cat(cache, dim=2), fk, rtol=0, atol=1e-14)
    torch.testing.assert_close(torch.cat(outs, dim=2), attention(fq, fk, v), rtol=0, atol=1e-12)
    # And the frozen scale really is not the final length's (the test would not see a recompute otherwise).
    assert not torch.equal(ropekit.frequencies(cfg, prefill).inv_freq64, ropekit.frequencies(cfg, n).inv_freq64)
    rope.reset()
    assert rope.frozen_seq_len is None


@pytest.mark.parametrize("method", list(DYNAMIC_CONFIGS))
def test_recompute_with_rescaled_cache_equals_full_pass_of_each_prefix(method):
    cfg = DYNAMIC_CONFIGS[method]
    n = 2 * L + 3
    q, k, v = _qkv(n, seed=2)
    rope = RotaryEmbedding(cfg, dynamic_policy="recompute")
    start = L - 2
    _, cache = rope(None, k[:, :, :start])  # prefill at length `start`
    changed = 0
    for t in range(start, n):
        old_len, new_len = t, t + 1
        rescaled = rope.rescale_keys(cache, torch.arange(t), old_len, new_len)
        changed += not torch.equal(rescaled, cache)
        tq, tk = rope(q[:, :, t : t + 1], k[:, :, t : t + 1], t)
        cache = torch.cat([rescaled, tk], dim=2)
        # The full forward pass of the prefix 0..t: transformers' rule (current length = t + 1).
        full_q, full_k = RotaryEmbedding(cfg, dynamic_policy="recompute")(q[:, :, : t + 1], k[:, :, : t + 1])
        torch.testing.assert_close(cache, full_k, rtol=0, atol=1e-12)
        torch.testing.assert_close(attention(tq, cache, v[:, :, : t + 1]),
                                   attention(full_q[:, :, -1:], full_k, v[:, :, : t + 1]), rtol=0, atol=1e-12)
    assert changed > 0  # the scale moved during decoding, so the rescale was exercised


def test_recompute_without_rescale_is_stale():
    """Why the policy exists: keys cached under an older dynamic scale differ from a fresh pass."""
    cfg = DYNAMIC_CONFIGS["dynamic"]
    _, k, _ = _qkv(2 * L)
    rope = RotaryEmbedding(cfg, dynamic_policy="recompute")
    _, early = rope(None, k[:, :, : L + 4])
    _, full = rope(None, k)
    assert (early - full[:, :, : L + 4]).abs().max() > 1e-3


def test_length_independent_methods_ignore_policy_and_seq_len():
    cfg = RopeConfig(head_dim=D, method="yarn", factor=4.0, original_max_position=L)
    q, k, _ = _qkv(8)
    a = RotaryEmbedding(cfg)(q, k, 100)
    b = RotaryEmbedding(cfg, dynamic_policy="recompute")(q, k, 100, seq_len=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert RotaryEmbedding(cfg).resolve_seq_len(torch.arange(3)) is None


def test_frequency_cache_is_bounded():
    rope = RotaryEmbedding(DYNAMIC_CONFIGS["dynamic"], dynamic_policy="recompute")
    k = torch.randn(1, 1, 1, D)
    for t in range(200):
        rope(None, k, t)
    assert len(rope._cache) <= 16


# ---------------------------------------------------------------------- dtype and state
class TinyAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.proj = nn.Linear(D, 2 * D)
        self.rope = RotaryEmbedding(cfg)

    def forward(self, x, positions):
        q, k = self.proj(x).unsqueeze(1).chunk(2, dim=-1)
        return self.rope(q, k, positions)


@pytest.mark.parametrize("method", ["default", "yarn", "longrope"])
def test_model_to_bfloat16_keeps_float64_frequencies(method):
    cfg = DYNAMIC_CONFIGS["longrope"] if method == "longrope" else RopeConfig(
        head_dim=D, method=method, **({"factor": 4.0, "original_max_position": L} if method == "yarn" else {}))
    model = TinyAttention(cfg)
    before = model.rope.frequencies(3 * L).inv_freq64.clone()
    model = model.to(torch.bfloat16)
    after = model.rope.frequencies(3 * L)
    assert after.inv_freq64.dtype == torch.float64 and torch.equal(after.inv_freq64, before)
    x = torch.randn(1, 5, D, dtype=torch.bfloat16)
    q, k = model(x, torch.tensor([0, 1, 2, 40_000, 1_000_000]))
    assert q.dtype == k.dtype == torch.bfloat16
    # Same as rotating the bf16 projections with exact angles (nothing was computed in bf16 but the output).
    with torch.no_grad():
        pq, pk = model.proj(x).unsqueeze(1).chunk(2, dim=-1)
    eq, ek = ropekit.apply_rotary(pq.float(), pk.float(), model.rope.frequencies(3 * L),
                                  torch.tensor([0, 1, 2, 40_000, 1_000_000]))
    torch.testing.assert_close(q.float(), eq, rtol=2 ** -8, atol=1e-6)


def test_no_parameters_buffers_or_state():
    rope = RotaryEmbedding(DYNAMIC_CONFIGS["dynamic"])
    rope(torch.randn(1, 1, 4, D), None)
    assert list(rope.parameters()) == [] and list(rope.buffers()) == []
    assert rope.state_dict() == {}
    model = TinyAttention(DYNAMIC_CONFIGS["dynamic"])
    assert set(model.state_dict()) == {"proj.weight", "proj.bias"}
    assert "method=dynamic" in repr(rope)


def test_heads_last_input_rotates_exactly_as_heads_first():
    cfg = RopeConfig(head_dim=D, base=500.0)
    q = torch.randn(2, 7, 3, D)
    heads_last = RotaryEmbedding(cfg, heads_first=False)(q, None, 5)[0]
    heads_first = RotaryEmbedding(cfg)(q.transpose(1, 2), None, 5)[0]
    torch.testing.assert_close(heads_last, heads_first.transpose(1, 2), rtol=0, atol=0)


def test_module_cos_sin_are_float64_angles_times_attention_scale():
    cfg = RopeConfig(head_dim=D, method="yarn", factor=4.0, original_max_position=L)
    rope = RotaryEmbedding(cfg)
    cos, sin = rope.cos_sin(torch.arange(6))
    f = ropekit.frequencies(cfg)
    angles = torch.arange(6, dtype=torch.float64)[:, None] * f.inv_freq64
    torch.testing.assert_close(cos, (torch.cos(angles) * f.attention_scale).float()[None])
    torch.testing.assert_close(sin, (torch.sin(angles) * f.attention_scale).float()[None])


# ---------------------------------------------------------------------- max_position
def test_max_position_is_the_target_length():
    cfg = RopeConfig(head_dim=D, method="yarn", factor=4.0, original_max_position=L)
    assert RotaryEmbedding(cfg).max_position == 4 * L
    assert RotaryEmbedding(RopeConfig(head_dim=D)).max_position is None
    # Without check_positions, positions past it are rotated exactly (no table to run off).
    q = torch.randn(1, 1, 2, D, dtype=torch.float64)
    out = RotaryEmbedding(cfg)(q, None, 10 * L)[0]
    torch.testing.assert_close(out, ropekit.apply_rotary(q, None, cfg, 10 * L)[0], rtol=0, atol=0)


def test_check_positions_rejects_positions_beyond_max_position():
    cfg = RopeConfig(head_dim=D, method="linear", factor=2.0, original_max_position=L)
    rope = RotaryEmbedding(cfg, check_positions=True)
    q = torch.randn(1, 1, 4, D)
    rope(q, q, 2 * L - 4)  # last position 2L - 1: fine
    with pytest.raises(ValueError, match=r"positions: 64 is beyond max_position 64"):
        rope(q, q, 2 * L - 3)
    with pytest.raises(ValueError, match="positions: .* beyond max_position"):
        rope.cos_sin(torch.tensor([0, 2 * L]))
    with pytest.raises(ValueError, match="check_positions: the config has no target length"):
        RotaryEmbedding(RopeConfig(head_dim=D), check_positions=True)


def test_module_refuses_bad_policy_config_and_no_tensors():
    with pytest.raises(ValueError, match="dynamic_policy: 'sometimes' not accepted; accepted: freeze, recompute"):
        RotaryEmbedding(RopeConfig(head_dim=D), dynamic_policy="sometimes")
    with pytest.raises(ValueError, match="cfg: expected a RopeConfig"):
        RotaryEmbedding({"head_dim": D})
    with pytest.raises(ValueError, match="q, k: at least one tensor"):
        RotaryEmbedding(RopeConfig(head_dim=D))(None, None)


# ---------------------------------------------------------------------- multi-axis positions
def test_multi_axis_configs_and_positions_point_to_the_multi_axis_module():
    """M-RoPE's (t, h, w) positions or a MultiAxisRope given to the 1-D module: an error naming the module to use,
    not a shape error or a silent 1-D rotation."""
    cfg = RopeConfig(head_dim=D)
    section = [2, 3, 3]
    with pytest.raises(ValueError, match="cfg: a MultiAxisRope .* use ropekit.MultiAxisRotaryEmbedding"):
        RotaryEmbedding(ropekit.mrope(cfg, section))
    q = torch.randn(1, 2, 4, D)
    pos = torch.arange(4).expand(3, 1, 4)
    with pytest.raises(ValueError, match=r"positions: shape \(3, 1, 4\) looks like multi-axis positions"):
        RotaryEmbedding(cfg)(q, None, pos)
    # ... and the module it names takes them; text positions (t = h = w) rotate as the 1-D module does.
    got = ropekit.MultiAxisRotaryEmbedding(ropekit.mrope(cfg, section))(q, None, pos)[0]
    assert torch.equal(got, RotaryEmbedding(cfg)(q, None, torch.arange(4))[0])
