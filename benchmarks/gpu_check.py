#!/usr/bin/env python
"""GPU checks of the Triton backend that CI (CPU only) cannot run. Prints a JSON report; exit 1 on failure.

1. correctness at full size vs the float64 reference (outputs NaN-poisoned first), bf16/fp32, both layouts;
2. angle error at ~4M positions on the device (cos/sin of the kernel's reduced angles, read back by atan2);
3. torch.compile(fullgraph=True) of RotaryEmbedding(backend="triton") (the custom op ropekit::rope);
4. CUDA graph capture and replay;
5. backward vs the reference's autograd.

    python benchmarks/gpu_check.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys

import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding
from ropekit.kernels import apply_rotary_fast


def rel_err(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device", file=sys.stderr)
        return 1
    dev = torch.device("cuda")
    report = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "checks": []}
    ok = True

    def record(name, passed, **info):
        nonlocal ok
        ok &= bool(passed)
        report["checks"].append({"name": name, "passed": bool(passed), **info})
        print(("PASS " if passed else "FAIL ") + name, info, flush=True)

    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}
    for (b, hq, hk, s, d), layout, dtype, pos_kind in [
        ((1, 32, 8, 4096, 128), "neox", torch.bfloat16, "range"),
        ((8, 32, 32, 2048, 128), "neox", torch.bfloat16, "range"),
        ((8, 32, 32, 2048, 128), "gptj", torch.float32, "range"),
        ((64, 32, 8, 1, 128), "neox", torch.bfloat16, "decode"),
        ((2, 16, 4, 1024, 96), "gptj", torch.float32, "4M"),
    ]:
        cfg = RopeConfig(head_dim=d, rotary_dim=64 if d == 96 else None, layout=layout)
        f = ropekit.frequencies(cfg).to(dev)
        q = torch.randn(b, hq, s, d, device=dev, dtype=dtype)
        k = torch.randn(b, hk, s, d, device=dev, dtype=dtype)
        pos = {"range": None, "decode": torch.randint(0, 131072, (b, 1), device=dev),
               "4M": torch.randint(4_000_000, 4_190_000, (b, s), device=dev)}[pos_kind]
        real_empty_like = torch.empty_like
        torch.empty_like = lambda x, *a, **kw: real_empty_like(x, *a, **kw).fill_(float("nan"))
        try:
            oq, ok_ = apply_rotary_fast(q, k, f, pos, backend="triton")
        finally:
            torch.empty_like = real_empty_like
        rq, rk = ropekit.apply_rotary(q.double(), k.double(), f, pos, backend="reference")
        e = max(rel_err(oq, rq), rel_err(ok_, rk))
        nan = bool(torch.isnan(oq).any() or torch.isnan(ok_).any())
        record(f"full-size {b}x{hq}/{hk}x{s}x{d} {layout} {dtype} {pos_kind}", e < tol[dtype] and not nan,
               rel_err=e, nan=nan)

    # angle error on the device at ~4M positions: rotate unit pairs and read the angle back
    f = ropekit.frequencies(RopeConfig(head_dim=128)).to(dev)
    p = torch.arange(4_194_304 - 4096, 4_194_304, device=dev)
    x = torch.zeros(1, 1, p.numel(), 128, device=dev)
    x[..., :64] = 1.0  # neox pairs (i, i+64) = (1, 0)
    y, _ = apply_rotary_fast(x, None, f, p[None], backend="triton")
    ang = torch.atan2(y[0, 0, :, 64:].double(), y[0, 0, :, :64].double())
    ref = p.double()[:, None] * f.inv_freq64
    diff = torch.remainder(ang - ref + math.pi, 2 * math.pi) - math.pi
    err = float(diff.abs().max())
    record("angle error at 4M positions (device cos/sin included)", err < 1e-5, max_abs_rad=err)

    # torch.compile fullgraph with the custom op
    rope = RotaryEmbedding(RopeConfig(head_dim=128), backend="triton")
    q = torch.randn(2, 32, 512, 128, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 8, 512, 128, device=dev, dtype=torch.bfloat16)
    pos = torch.randint(0, 100_000, (2, 512), device=dev)
    try:
        cq, ck = torch.compile(rope, fullgraph=True)(q, k, pos)
        eq, ek = rope(q, k, pos)
        record("torch.compile(fullgraph=True)", torch.equal(cq, eq) and torch.equal(ck, ek))
    except Exception as err:  # noqa: BLE001
        record("torch.compile(fullgraph=True)", False, error=f"{type(err).__name__}: {err}"[:400])

    # CUDA graph capture and replay
    try:
        fq = ropekit.frequencies(RopeConfig(head_dim=128)).to(dev)
        static_q, static_k, static_pos = q.clone(), k.clone(), pos.clone()
        apply_rotary_fast(static_q, static_k, fq, static_pos, backend="triton")  # warm up (jit, caches)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            apply_rotary_fast(static_q, static_k, fq, static_pos, backend="triton")
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            gq, gk = apply_rotary_fast(static_q, static_k, fq, static_pos, backend="triton")
        new_q = torch.randn_like(q)
        static_q.copy_(new_q)
        graph.replay()
        torch.cuda.synchronize()
        eq, _ = apply_rotary_fast(new_q, static_k, fq, static_pos, backend="triton")
        record("CUDA graph capture + replay", torch.equal(gq, eq))
    except Exception as err:  # noqa: BLE001
        record("CUDA graph capture + replay", False, error=f"{type(err).__name__}: {err}"[:400])

    # backward
    f = ropekit.frequencies(RopeConfig(head_dim=64, method="yarn", factor=4.0, original_max_position=1024)).to(dev)
    grads = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        qg = torch.randn(2, 8, 256, 64, device=dev, requires_grad=True)
        kg = torch.randn(2, 2, 256, 64, device=dev, requires_grad=True)
        oq, ok_ = ropekit.apply_rotary(qg, kg, f, pos[:, :256], backend=backend)
        torch.manual_seed(1)
        ((oq * torch.randn_like(oq)).sum() + (ok_ * torch.randn_like(ok_)).sum()).backward()
        grads.append((qg.grad, kg.grad))
    e = max(rel_err(grads[1][0], grads[0][0]), rel_err(grads[1][1], grads[0][1]))
    record("backward vs reference autograd", e < 1e-5, rel_err=e)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
