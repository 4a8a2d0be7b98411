"""Every scaling method against its formula and the check values of the reference sheet
(/work/shared/notes/reference.md): YaRN ramp bounds and mscale, Phi-3's LongRoPE scale, the NTK base."""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from ropekit import RopeConfig, frequencies
from ropekit.methods._common import yarn_correction_range, yarn_mscale
from ropekit.methods.base_change import BASE_LOWER_BOUNDS, suggested_base
from ropekit.methods.dynamic import dynamic_base
from ropekit.methods.ntk import ntk_base

BASE = RopeConfig(head_dim=128, base=10000.0, original_max_position=4096)


def plain(cfg: RopeConfig) -> torch.Tensor:
    d = cfg.rotary_dim
    return torch.tensor([cfg.base ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)


def test_registry_lists_every_method():
    assert ropekit.method_names() == ["default", "linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3",
                                      "longrope", "base"]
    for name in ropekit.method_names():
        spec = ropekit.get_method(name)
        assert spec.summary and spec.compute.__module__.startswith("ropekit.methods.")


def test_float32_inv_freq_is_the_rounded_float64():
    f = frequencies(BASE.with_method("yarn", factor=8.0))
    assert f.inv_freq.dtype == torch.float32 and f.inv_freq64.dtype == torch.float64
    assert torch.equal(f.inv_freq, f.inv_freq64.float())
    assert f.inv_freq.shape == (64,)
    torch.testing.assert_close(f.wavelengths, 2 * math.pi / f.inv_freq64)


# ---------------------------------------------------------------------- reference.md check values
@pytest.mark.parametrize("length, bounds", [(2048, (16, 41)), (4096, (20, 46)), (8192, (25, 50))])
def test_yarn_ramp_bounds(length, bounds):
    assert yarn_correction_range(32, 1, 128, 10000.0, length, truncate=True) == bounds
    # The bounds show in the frequencies: pairs < low keep their speed, pairs > high are divided by s.
    cfg = RopeConfig(head_dim=128, base=10000.0, method="yarn", factor=16.0, original_max_position=length)
    ratio = plain(cfg) / frequencies(cfg).inv_freq64
    low, high = bounds
    torch.testing.assert_close(ratio[: low + 1], torch.ones(low + 1, dtype=torch.float64), rtol=1e-15, atol=0)
    torch.testing.assert_close(ratio[high:], torch.full((64 - high,), 16.0, dtype=torch.float64), rtol=1e-14, atol=0)
    assert ((ratio[low + 1 : high] > 1) & (ratio[low + 1 : high] < 16)).all()


@pytest.mark.parametrize("factor, expected", [(8, 1.2079), (16, 1.2773), (32, 1.3466)])
def test_yarn_mscale(factor, expected):
    cfg = BASE.with_method("yarn", factor=float(factor))
    assert frequencies(cfg).attention_scale == pytest.approx(expected, abs=5e-5)
    assert frequencies(cfg).attention_scale == 0.1 * math.log(factor) + 1


def test_yarn_truncate_false_and_explicit_attention_factor():
    cfg = BASE.with_method("yarn", factor=8.0, truncate=False, attention_factor=1.0)
    f = frequencies(cfg)
    assert f.attention_scale == 1.0  # an explicit 1.0 is honoured, not replaced by 0.1 ln s + 1
    low, high = yarn_correction_range(32, 1, 128, 10000.0, 4096, truncate=False)
    assert low != int(low)  # fractional bounds, not floor/ceil
    ramp = ((torch.arange(64, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    expected = plain(cfg) / 8.0 * ramp + plain(cfg) * (1 - ramp)
    torch.testing.assert_close(f.inv_freq64, expected, rtol=1e-15, atol=0)
    assert not torch.equal(f.inv_freq64, frequencies(cfg.replace(truncate=True)).inv_freq64)


def test_yarn_deepseek_mscale_ratio():
    cfg = BASE.with_method("yarn", factor=40.0, mscale=1.0, mscale_all_dim=0.707)
    expected = (0.1 * 1.0 * math.log(40) + 1) / (0.1 * 0.707 * math.log(40) + 1)
    assert frequencies(cfg).attention_scale == pytest.approx(expected, rel=1e-15)
    same = BASE.with_method("yarn", factor=40.0, mscale=0.707, mscale_all_dim=0.707)
    assert frequencies(same).attention_scale == 1.0
    assert yarn_mscale(1.0, 5.0) == 1.0


def test_longrope_phi3_attention_scale():
    short = [1.0] * 48
    cfg = RopeConfig(head_dim=96, base=10000.0, method="longrope", short_factor=short, long_factor=[2.0] * 48,
                     original_max_position=4096, max_position=131072)
    assert frequencies(cfg).attention_scale == pytest.approx(1.1902, abs=5e-5)
    assert frequencies(cfg).attention_scale == math.sqrt(1 + math.log(32) / math.log(4096))
    assert frequencies(cfg.replace(attention_factor=1.0)).attention_scale == 1.0


def test_ntk_base_check_value():
    assert ntk_base(10000.0, 2.0, 128) == pytest.approx(20221, abs=1)
    cfg = BASE.with_method("ntk", factor=2.0)
    f = frequencies(cfg).inv_freq64
    p = plain(cfg)
    assert f[0] == p[0] == 1.0  # the fastest pair keeps its speed
    assert p[-1] / f[-1] == pytest.approx(2.0, rel=1e-13)  # the slowest is slowed by exactly s
    assert frequencies(cfg).attention_scale == 1.0


# ---------------------------------------------------------------------- the other formulas
def test_linear_divides_by_factor():
    cfg = BASE.with_method("linear", factor=4.0)
    torch.testing.assert_close(frequencies(cfg).inv_freq64, plain(cfg) / 4.0, rtol=1e-15, atol=0)
    assert frequencies(cfg).attention_scale == 1.0


@pytest.mark.parametrize("seq_len", [1, 1000, 4096, 4097, 8192, 50000])
def test_dynamic_ntk_formula(seq_len):
    cfg = BASE.with_method("dynamic", factor=2.0)
    f = frequencies(cfg, seq_len)
    assert f.seq_len == seq_len
    if seq_len <= 4096:
        torch.testing.assert_close(f.inv_freq64, plain(cfg), rtol=1e-15, atol=0)
    else:
        base = 10000.0 * (2.0 * seq_len / 4096 - 1.0) ** (128 / 126)
        assert dynamic_base(10000.0, 2.0, 128, seq_len, 4096) == pytest.approx(base, rel=1e-15)
        expected = torch.tensor([base ** (-2 * i / 128) for i in range(64)], dtype=torch.float64)
        torch.testing.assert_close(f.inv_freq64, expected, rtol=1e-14, atol=0)
    # Longer sequences never speed a pair up.
    assert (frequencies(cfg, seq_len + 1000).inv_freq64 <= f.inv_freq64).all()


def test_dynamic_default_length_is_the_target():
    cfg = BASE.with_method("dynamic", factor=2.0)
    assert cfg.target_length == 8192
    assert torch.equal(frequencies(cfg).inv_freq64, frequencies(cfg, 8192).inv_freq64)


def test_llama3_bands():
    cfg = RopeConfig(head_dim=128, base=500000.0, method="llama3", factor=8.0, original_max_position=8192)
    f = frequencies(cfg).inv_freq64
    p = plain(cfg)
    wavelength = 2 * math.pi / p
    fast, slow = wavelength < 8192 / 4, wavelength > 8192
    assert fast.any() and slow.any() and (~fast & ~slow).any()
    torch.testing.assert_close(f[fast], p[fast], rtol=1e-15, atol=0)
    torch.testing.assert_close(f[slow], p[slow] / 8, rtol=1e-15, atol=0)
    mid = ~fast & ~slow
    t = (8192 / wavelength[mid] - 1) / 3
    torch.testing.assert_close(f[mid], (1 - t) * p[mid] / 8 + t * p[mid], rtol=1e-15, atol=0)
    assert frequencies(cfg).attention_scale == 1.0
    # Llama 3.2's factor 32 is read, not replaced by 8.
    f32 = frequencies(cfg.replace(factor=32.0)).inv_freq64
    torch.testing.assert_close(f32[slow], p[slow] / 32, rtol=1e-15, atol=0)


def test_longrope_short_long_and_n_hat():
    short = [1.0 + i / 100 for i in range(32)]
    long = [1.0 + i for i in range(32)]
    cfg = RopeConfig(head_dim=64, base=10000.0, method="longrope", short_factor=short, long_factor=long,
                     original_max_position=2048, factor=16.0)
    p = plain(cfg)
    torch.testing.assert_close(frequencies(cfg, 2048).inv_freq64, p / torch.tensor(short, dtype=torch.float64))
    torch.testing.assert_close(frequencies(cfg, 2049).inv_freq64, p / torch.tensor(long, dtype=torch.float64))
    assert frequencies(cfg, 2049).unscaled_until == 0
    # n_hat: the first n_hat positions keep the original rotation, later ones use the factors.
    with_hat = cfg.replace(n_hat=4)
    f = frequencies(with_hat, 8192)
    angles = ropekit.rotation_angles(f, torch.tensor([0, 3, 4, 100]))
    torch.testing.assert_close(angles[:2], torch.tensor([0.0, 3.0], dtype=torch.float64)[:, None] * p)
    torch.testing.assert_close(angles[2:], torch.tensor([4.0, 100.0], dtype=torch.float64)[:, None] * f.inv_freq64)


def test_dynamic_yarn_follows_the_current_length():
    cfg = BASE.with_method("dynamic_yarn", factor=8.0)
    at_l = frequencies(cfg, 4096)
    torch.testing.assert_close(at_l.inv_freq64, plain(cfg), rtol=1e-15, atol=0)
    assert at_l.attention_scale == 1.0
    four = frequencies(cfg, 4 * 4096)
    yarn4 = frequencies(BASE.with_method("yarn", factor=4.0))
    assert torch.equal(four.inv_freq64, yarn4.inv_freq64) and four.attention_scale == yarn4.attention_scale
    assert frequencies(cfg).seq_len == 8 * 4096  # default: the target length


def test_base_change_and_suggested_base():
    cfg = BASE.with_method("base", new_base=1e6)
    torch.testing.assert_close(frequencies(cfg).inv_freq64, plain(cfg.replace(method="default", base=1e6)),
                               rtol=1e-15, atol=0)
    for length, bound in BASE_LOWER_BOUNDS:
        assert suggested_base(length) == pytest.approx(bound, rel=1e-12)
    assert BASE_LOWER_BOUNDS[3] == (8_000, 8.4e4) and BASE_LOWER_BOUNDS[5] == (32_000, 6.4e5)
    assert BASE_LOWER_BOUNDS[7] == (128_000, 7.8e6)
    assert 8.4e4 < suggested_base(12_000) < 3.1e5


def test_partial_rotary_builds_over_rotary_dim():
    cfg = RopeConfig(head_dim=96, rotary_dim=24, base=10000.0)
    f = frequencies(cfg)
    assert f.rotary_dim == 24 and f.inv_freq.shape == (12,)
    torch.testing.assert_close(f.inv_freq64, torch.tensor([1e4 ** (-2 * i / 24) for i in range(12)],
                                                          dtype=torch.float64), rtol=1e-15, atol=0)


def test_yarn_partial_rotary_matches_transformers():
    """The ramp runs over rotary_dim pairs: transformers' yarn with partial_rotary_factor agrees."""
    from hf_reference import hf_config, hf_inv_freq_and_scale

    d = {"model_type": "gpt_neox", "hidden_size": 256, "num_attention_heads": 4, "max_position_embeddings": 2048,
         "rope_parameters": {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 2048,
                             "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "truncate": False}}
    cfg = RopeConfig.from_hf(d)
    assert (cfg.head_dim, cfg.rotary_dim, cfg.truncate) == (64, 32, False)
    hf_inv, hf_scale = hf_inv_freq_and_scale(hf_config(d))
    f = frequencies(cfg)
    assert ((f.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max() < 1e-6
    assert f.attention_scale == pytest.approx(hf_scale, rel=1e-15)


def test_seq_len_is_checked():
    cfg = BASE.with_method("dynamic", factor=2.0)
    for bad in (0, -5, 2.5, True):
        with pytest.raises(ValueError, match="seq_len: must be a positive integer"):
            frequencies(cfg, bad)
