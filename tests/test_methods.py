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
                                      "longrope", "base", "proportional"]
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


# ---------------------------------------------------------------------- the registry as the source of truth
def test_derived_tables_equal_the_ones_config_used_to_spell_out():
    from ropekit import config
    from ropekit.methods import hf_rope_keys, method_fields

    assert set(method_fields()) == {
        "factor", "original_max_position", "attention_factor", "beta_fast", "beta_slow", "truncate", "mscale",
        "mscale_all_dim", "low_freq_factor", "high_freq_factor", "short_factor", "long_factor", "n_hat", "new_base",
        "rotated_fraction"}
    assert len(method_fields()) == 15 and set(config.METHOD_FIELDS) == set(method_fields())
    assert config.hf_keys() == config.HF_ROPE_KEYS == {
        "rope_type": None, "type": None, "rope_theta": None, "partial_rotary_factor": None,
        "factor": "factor", "original_max_position_embeddings": "original_max_position",
        "attention_factor": "attention_factor", "beta_fast": "beta_fast", "beta_slow": "beta_slow",
        "truncate": "truncate", "mscale": "mscale", "mscale_all_dim": "mscale_all_dim",
        "low_freq_factor": "low_freq_factor", "high_freq_factor": "high_freq_factor",
        "short_factor": "short_factor", "long_factor": "long_factor"}
    assert hf_rope_keys()["original_max_position_embeddings"] == "original_max_position"
    # The required / accepted fields each method had before they became Params.
    before = {"default": ((), ()), "linear": (("factor",), ()), "ntk": (("factor",), ()),
              "dynamic": (("factor", "original_max_position"), ()),
              "yarn": (("factor", "original_max_position"),
                       ("beta_fast", "beta_slow", "truncate", "attention_factor", "mscale", "mscale_all_dim")),
              "dynamic_yarn": (("original_max_position",), ("factor", "beta_fast", "beta_slow", "truncate",
                                                           "attention_factor", "mscale", "mscale_all_dim")),
              "llama3": (("factor", "original_max_position"), ("low_freq_factor", "high_freq_factor")),
              "longrope": (("short_factor", "long_factor", "original_max_position"),
                           ("factor", "attention_factor", "n_hat")),
              "base": (("new_base",), ()),
              "proportional": ((), ("factor", "rotated_fraction"))}
    for name, (required, accepted) in before.items():
        spec = ropekit.get_method(name)
        assert (set(spec.required), set(spec.accepted)) == (set(required), set(accepted)), name
    # Properties the rest of ropekit reads from the registry instead of lists of names.
    # proportional is a model's own RoPE (Gemma 4), not an extension to compare.
    assert ropekit.method_names(comparable=True) == [n for n in ropekit.method_names() if n != "proportional"]
    assert ropekit.method_names(length_dependent=True) == ["dynamic", "dynamic_yarn", "longrope"]
    assert ropekit.method_names(exportable=False) == ["dynamic_yarn"]
    assert {n: ropekit.get_method(n).hf_type for n in ropekit.method_names()} == {
        "default": "default", "linear": "linear", "ntk": None, "dynamic": "dynamic", "yarn": "yarn",
        "dynamic_yarn": None, "llama3": "llama3", "longrope": "longrope", "base": None,
        "proportional": None}
    assert {n: ropekit.get_method(n).gguf_type for n in ropekit.method_names() if ropekit.get_method(n).gguf_type} == {
        "default": "none", "linear": "linear", "yarn": "yarn", "longrope": "longrope"}


def test_every_parameter_is_described_once_for_the_cli():
    from ropekit.methods import parameters

    params = {p.field: (p, users) for p, users in parameters()}
    assert len(params) == len(parameters())
    flags = {name: p.flag for name, (p, _) in params.items()}
    assert flags["beta_fast"] == "--beta-fast" and flags["original_max_position"] == "--original-length"
    assert flags["new_base"] == "--new-base" and flags["short_factor"] == flags["long_factor"] == "--factors-file"
    assert params["factor"][1] == ("linear", "ntk", "dynamic", "yarn", "dynamic_yarn", "llama3", "longrope",
                                   "proportional")
    assert params["new_base"][1] == ("base",)
    for name, (p, users) in params.items():
        assert p.help and len(p.help.splitlines()) == 1, name
        assert p.type in ("float", "int", "bool", "float_list"), name
        assert users, name
    # Bounds as declared: factor >= 1, beta_fast > 0, n_hat >= 0.
    assert (params["factor"][0].minimum, params["factor"][0].exclusive) == (1.0, False)
    assert (params["beta_fast"][0].minimum, params["beta_fast"][0].exclusive) == (0.0, True)
    assert params["n_hat"][0].minimum == 0 and params["truncate"][0].default is True
    for name in ropekit.method_names():
        spec = ropekit.get_method(name)
        assert spec.exportable or spec.not_exportable, name
    # What inspect says about a method: its describe function, else its summary.
    assert ropekit.get_method("default").description(BASE) == "plain RoPE, no scaling"
    assert ropekit.get_method("linear").description(BASE.extend("linear", 2.0)) == "positions squeezed by s (PI)"
    assert ropekit.get_method("base").description(BASE.extend("base", new_base=5e5)) == "base -> 5e+05"


@pytest.fixture
def toy_method():
    """A method registered by a test: one parameter of its own (no RopeConfig field), inv_freq / alpha."""
    from ropekit.methods import MethodSpec, Param, register, unregister
    from ropekit.methods._common import default_inv_freq

    alpha = Param("toy_alpha", "float", "toy: divide every inverse frequency by this", minimum=1.0)
    spec = register(MethodSpec("toy", lambda cfg, seq_len=None: (default_inv_freq(cfg.base, cfg.rotary_dim)
                                                                 / cfg.toy_alpha, 1.0),
                               params=(alpha,), required=("toy_alpha",), comparable=False,
                               not_exportable="a test method", summary="toy: inv_freq / alpha"))
    yield spec
    unregister("toy")


def test_a_registered_method_appears_everywhere(toy_method):
    from ropekit.methods import parameters

    assert "toy" in ropekit.method_names() and "toy" not in ropekit.method_names(comparable=True)
    assert any(p.field == "toy_alpha" and users == ("toy",) for p, users in parameters())
    cfg = BASE.extend("toy", toy_alpha=2.0)
    assert cfg.toy_alpha == 2.0 and cfg.to_dict()["toy_alpha"] == 2.0
    torch.testing.assert_close(frequencies(cfg).inv_freq64, plain(BASE) / 2, rtol=1e-15, atol=0)
    with pytest.raises(ValueError, match=r"^toy_alpha: must be >= 1, got 0.5"):
        BASE.extend("toy", toy_alpha=0.5)
    with pytest.raises(ValueError, match=r"^toy_alpha: required by method 'toy'"):
        BASE.extend("toy")
    with pytest.raises(ValueError, match=r"^toy_alpha: not used by method 'linear'; it is a parameter of: toy"):
        BASE.extend("linear", 2.0, toy_alpha=2.0)
    with pytest.raises(ValueError, match=r"^toy_alpha: required by method 'toy'"):
        RopeConfig(head_dim=8, method="toy")
    assert cfg.extend("linear", 2.0).toy_alpha is None  # another method clears it
    with pytest.raises(ValueError, match=r"^method: transformers has no 'toy' \(a test method\)"):
        cfg.to_hf()
    with pytest.raises(ValueError, match="already registered"):
        from ropekit.methods import register

        register(toy_method)


def test_a_shared_parameter_has_one_meaning_and_unregister_removes_a_method():
    from ropekit.methods import MethodSpec, Param, register, unregister

    other_factor = Param("factor", "float", "a different factor", minimum=0.0)
    with pytest.raises(ValueError, match="params: 'factor' of 'toy2' differs from the one other methods read"):
        register(MethodSpec("toy2", lambda cfg, seq_len=None: None, params=(other_factor,),
                            not_exportable="test", summary="toy"))
    assert "toy2" not in ropekit.method_names()
    with pytest.raises(ValueError, match="not_exportable: method 'toy3' has no hf_type or to_hf"):
        MethodSpec("toy3", lambda cfg, seq_len=None: None, summary="toy")
    spec = register(MethodSpec("toy4", lambda cfg, seq_len=None: None, not_exportable="test", summary="toy"))
    assert unregister("toy4") is spec and "toy4" not in ropekit.method_names()
    with pytest.raises(ValueError, match="method: unknown scaling method 'toy4'"):
        RopeConfig(head_dim=8, method="toy4")


def test_report_labels_come_from_the_registry():
    from ropekit.config import RopeConfig
    from ropekit.methods import baseline_label, run_label

    base = RopeConfig(head_dim=64, base=10000.0, original_max_position=4096)
    assert run_label(base.extend("yarn", 2.0)) == "yarn x2"
    assert run_label(base.extend("base", new_base=500000)) == "base 500000"  # the base method's own label hook
    assert baseline_label(base) == "default"
    assert baseline_label(base.extend("yarn", 4.0)) == "yarn (model's own)"
