"""Precision at long positions against an exact reference (mpmath angles, float64 rotation).

ropekit builds angles in float64 from integer positions, so float32 inputs come back with only the output
rounding (~1e-7 relative) even at position 4M. transformers builds them in float32 (error ~ position * 2^-24
radians), which reaches ~1e-1 relative at 4M: reported by scripts/parity_report.py, not asserted here.
"""

from __future__ import annotations

import math

import pytest
import torch

import ropekit
from hf_reference import exact_llama3, exact_rotate, exact_yarn, hf_config, hf_rotate, load_models

POSITIONS = (0, 4095, 65_535, 1_048_575, 4_194_303)
ROPEKIT_REL_BOUND = 1e-6  # measured ~1e-7: float32 output rounding plus a few float32 operations


CASES = {
    "Llama-2-7B": lambda cfg: (None, 1.0),
    "Llama-3.1-8B": lambda cfg: (exact_llama3(cfg), 1.0),
    "Qwen2.5-7B yarn 4": exact_yarn,
    "GPT-J-6B": lambda cfg: (None, 1.0),  # interleaved, 64 of 256 channels rotated
}


def _inputs(cfg, n, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(1, 1, n, cfg.head_dim, generator=gen).to(dtype)


@pytest.mark.parametrize("name", list(CASES))
def test_ropekit_matches_exact_reference_up_to_4m(name):
    cfg = ropekit.RopeConfig.from_hf(load_models()[name]["config"])
    inv, scale = CASES[name](cfg)
    positions = torch.tensor(POSITIONS)
    q = _inputs(cfg, len(POSITIONS))
    rq, _ = ropekit.apply_rotary(q, None, cfg, positions)
    exact = exact_rotate(q[0, 0], POSITIONS, cfg.base, cfg.rotary_dim, cfg.layout, inv_freq=inv, scale=scale)
    err = (rq[0, 0].double() - exact).abs().max(dim=-1).values / q.abs().max().double()
    assert err.max() < ROPEKIT_REL_BOUND, f"{name}: relative errors per position {err.tolist()}"
    # Pass-through channels untouched.
    assert torch.equal(rq[..., cfg.rotary_dim:], q[..., cfg.rotary_dim:])


def test_float64_inputs_are_rotated_in_float64():
    cfg = ropekit.RopeConfig(head_dim=128, base=10000.0)
    q = _inputs(cfg, len(POSITIONS), torch.float64)
    rq, _ = ropekit.apply_rotary(q, None, cfg, torch.tensor(POSITIONS))
    assert rq.dtype == torch.float64
    exact = exact_rotate(q[0, 0], POSITIONS, cfg.base, cfg.rotary_dim)
    # float64 angles carry ~ position * 2^-52 radians of rounding (~1e-9 at 4M): far below float32's 2^-24.
    bound = 4 * max(POSITIONS) * 2.0 ** -52 * q.abs().max().item()
    assert (rq[0, 0] - exact).abs().max() < bound


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_keep_exact_angles(dtype):
    """bf16/fp16 in -> same dtype out, and the only error is the output rounding (angles are not half)."""
    cfg = ropekit.RopeConfig(head_dim=64, base=100000.0)
    q = _inputs(cfg, len(POSITIONS), dtype)
    rq, _ = ropekit.apply_rotary(q, None, cfg, torch.tensor(POSITIONS))
    assert rq.dtype == dtype
    exact = exact_rotate(q[0, 0], POSITIONS, cfg.base, cfg.rotary_dim)
    eps = torch.finfo(dtype).eps  # one ulp at 1; the output is rounded once to dtype (half an ulp)
    err = (rq[0, 0].double() - exact).abs() / exact.abs().clamp_min(1e-3)
    assert err.max() <= eps, f"{dtype}: relative error {err.max():.3g} exceeds one ulp ({eps:.3g})"


def test_autocast_does_not_change_the_rotation():
    cfg = ropekit.RopeConfig(head_dim=64, base=10000.0, method="linear", factor=4.0)
    q = _inputs(cfg, len(POSITIONS))
    plain, _ = ropekit.apply_rotary(q, None, cfg, torch.tensor(POSITIONS))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        auto, _ = ropekit.apply_rotary(q, None, cfg, torch.tensor(POSITIONS))
    assert auto.dtype == torch.float32 and torch.equal(plain, auto)


def test_transformers_float32_angles_lose_precision_where_ropekit_does_not():
    """The reason for float64 angles: at 1M transformers' error is far above ropekit's (not a bound on theirs)."""
    entry = load_models()["Llama-2-7B"]
    cfg = ropekit.RopeConfig.from_hf(entry["config"])
    positions = [1_048_575]
    q = _inputs(cfg, 1)
    exact = exact_rotate(q[0, 0], positions, cfg.base, cfg.rotary_dim)
    ours = ropekit.apply_rotary(q, None, cfg, torch.tensor(positions))[0][0, 0].double()
    theirs = hf_rotate(hf_config(entry["config"]), q, q, torch.tensor([positions]))[0][0, 0].double()
    ours_err, theirs_err = (ours - exact).abs().max().item(), (theirs - exact).abs().max().item()
    assert ours_err < ROPEKIT_REL_BOUND * q.abs().max().item() < theirs_err


def test_exact_reference_is_itself_right():
    """Guard the reference: at small positions it equals a plain float64 formula to 1e-15."""
    x = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    pos = [0, 1, 7]
    ref = exact_rotate(x, pos, 10000.0, 8)
    inv = [10000.0 ** (-2 * i / 8) for i in range(4)]
    manual = x.clone()
    for r, p in enumerate(pos):
        for i, f in enumerate(inv):
            c, s = math.cos(p * f), math.sin(p * f)
            manual[r, i] = x[r, i] * c - x[r, i + 4] * s
            manual[r, i + 4] = x[r, i + 4] * c + x[r, i] * s
    assert (ref - manual).abs().max() < 1e-14
