#!/usr/bin/env python
"""Print ropekit's parity with transformers on published configs, and both against an exact reference.

    python scripts/parity_report.py            # both tables (~15 s on 2 CPU cores)

Table 1, per model (tests/data/hf_configs.json): ropekit vs transformers' own rotary class + apply function.
  dinv_freq  max |Δinv_freq| / inv_freq (at the trained length for length-dependent methods)
  dscale     |Δ attention scale|
  dqk p<16   max |Δ| of the rotated q and k at positions 0..15 (where both sides' angles are exact)
  dq, dk     max |Δ| of the rotated q and k (float32, randn inputs, 4 q heads / 2 k heads) at 16 positions
             spread over 0 .. target length - 1; at the target length transformers' own float32 angles err
             by ~1e-7 * position radians, which dominates these figures (Table 2 shows whose error it is).
Table 2: error of float32 q rotated by ropekit (reference path) and by transformers, against RoPE evaluated exactly (mpmath
  angles, float64 rotation), as max |Δ| / max |q|, at the given positions.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

import ropekit
from ropekit.hf.reference import (
    deinterleave,
    exact_llama3,
    exact_rotate,
    hf_config,
    hf_inv_freq_and_scale,
    hf_rotate,
)

# The published configs the parity tests use (data, read as such; no test code is imported).
CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "data" / "hf_configs.json"


def load_models() -> dict[str, dict]:
    return json.loads(CONFIGS.read_text())["models"]

ERROR_POSITIONS = (4_096, 65_536, 1_048_576, 4_194_304)


def parity_rows():
    rows = []
    for name, entry in load_models().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cfg = ropekit.RopeConfig.from_hf(entry["config"])
        hc = hf_config(entry["config"])
        seq = cfg.original_max_position if cfg.length_dependent else None
        ours = ropekit.frequencies(cfg, seq)
        if hc.model_type == "gptj":
            from transformers.models.gptj.modeling_gptj import (
                create_sinusoidal_positions,
            )

            table = create_sinusoidal_positions(2, cfg.rotary_dim)
            hf_inv, hf_scale = torch.asin(table[1, : cfg.rotary_dim // 2].double()), 1.0
        else:
            hf_inv, hf_scale = hf_inv_freq_and_scale(hc, seq)
        dinv = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()

        length = cfg.target_length or 4096
        positions = torch.linspace(0, length - 1, 16).round().long()[None]
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 16, cfg.head_dim, generator=gen)
        k = torch.randn(1, 2, 16, cfg.head_dim, generator=gen)
        # Length-dependent methods at transformers' rule: current length = max position + 1.
        f = ropekit.frequencies(cfg, length) if cfg.length_dependent else ours
        rq, rk = ropekit.apply_rotary(q, k, f, positions, backend="reference")
        hq, hk = hf_rotate(hc, q, k, positions)
        if hc.model_type == "deepseek_v3":
            rq, rk = deinterleave(rq), deinterleave(rk)
        # Positions 0..15, where transformers' float32 angles are still exact to ~1e-6 rad.
        f16 = ropekit.frequencies(cfg, 16) if cfg.length_dependent else ours  # current length 16
        sq, sk = ropekit.apply_rotary(q, k, f16, torch.arange(16), backend="reference")
        hsq, hsk = hf_rotate(hc, q, k, torch.arange(16)[None])
        if hc.model_type == "deepseek_v3":
            sq, sk = deinterleave(sq), deinterleave(sk)
        small = max((sq - hsq).abs().max().item(), (sk - hsk).abs().max().item())
        rows.append((name, cfg.method, f"{cfg.rotary_dim}/{cfg.head_dim}", cfg.layout, length, dinv,
                     abs(ours.attention_scale - hf_scale), small, (rq - hq).abs().max().item(),
                     (rk - hk).abs().max().item(), "synthetic" if entry["synthetic"] else ""))
    return rows


def error_rows():
    models = load_models()
    rows = []
    for name, exact_inv in (("Llama-2-7B", lambda cfg: None), ("Llama-3.1-8B", exact_llama3)):
        entry = models[name]
        cfg = ropekit.RopeConfig.from_hf(entry["config"])
        hc = hf_config(entry["config"])
        inv = exact_inv(cfg)
        gen = torch.Generator().manual_seed(0)
        for pos in ERROR_POSITIONS:
            positions = [pos - 3, pos - 2, pos - 1]
            q = torch.randn(1, 1, 3, cfg.head_dim, generator=gen)
            exact = exact_rotate(q[0, 0], positions, cfg.base, cfg.rotary_dim, inv_freq=inv)
            ours = ropekit.apply_rotary(q, None, cfg, torch.tensor(positions), backend="reference")[0][0, 0].double()
            theirs = hf_rotate(hc, q, q, torch.tensor([positions]))[0][0, 0].double()
            scale = q.abs().max().item()
            rows.append((name, cfg.method, pos, (ours - exact).abs().max().item() / scale,
                         (theirs - exact).abs().max().item() / scale))
    return rows


def main() -> None:
    torch.set_num_threads(2)
    print(f"ropekit {ropekit.__version__}, transformers {__import__('transformers').__version__}, "
          f"torch {torch.__version__}\n")
    print("Table 1: ropekit vs transformers on published configs (float32 q/k, positions up to the target length)")
    header = (f"{'model':40s} {'method':8s} {'rot/head':>8s} {'layout':6s} {'target':>8s} "
              f"{'dinv_freq':>9s} {'dscale':>8s} {'dqk p<16':>9s} {'dq':>9s} {'dk':>9s}")
    print(header)
    print("-" * len(header))
    for name, method, dims, layout, length, dinv, dscale, small, dq, dk, note in parity_rows():
        print(f"{name:40s} {method:8s} {dims:>8s} {layout:6s} {length:8d} {dinv:9.1e} {dscale:8.1e} "
              f"{small:9.1e} {dq:9.2e} {dk:9.2e} {note}")
    print("\nTable 2: error vs exact RoPE (mpmath angles), max |Δq| / max |q|, float32 inputs")
    header = f"{'model':14s} {'method':8s} {'position':>9s} {'ropekit':>10s} {'transformers':>13s}"
    print(header)
    print("-" * len(header))
    for name, method, pos, ours, theirs in error_rows():
        print(f"{name:14s} {method:8s} {pos:9d} {ours:10.1e} {theirs:13.1e}")


if __name__ == "__main__":
    main()
