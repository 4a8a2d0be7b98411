#!/usr/bin/env python
"""A patched SmolLM2 forward against the unpatched one: what ropekit's patch costs (or saves) in a model.

    python benchmarks/bench_patched_forward.py                          # 4096 and 16384 tokens, fp32 and bf16
    python benchmarks/bench_patched_forward.py --lengths 4096 8192 --repeats 3 --json out.json

For each dtype and length, in one process on the same token ids (real text: Python stdlib sources): the
median wall time of ``--repeats`` forwards (after a warm-up forward of each) under ``torch.inference_mode()`` of

  * the unpatched model (transformers' own RoPE),
  * the model patched with ``apply_rope(model, lm.rope)`` ("default": the same RoPE) for each ``--backends``,

the ratio patched / unpatched, and max |logit difference| of each patched forward from the unpatched one.
Unpatched and patched forwards alternate (u, p, u, p, ...) so that load from other jobs falls on both.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch


def _text_ids(tokenizer, n: int) -> torch.Tensor:
    import sysconfig
    from pathlib import Path

    root = Path(sysconfig.get_paths()["stdlib"])
    text, ids = "", []
    for name in sorted(root.glob("*.py")):
        text += name.read_text(encoding="utf-8", errors="replace") + "\n\n"
        if len(text) > 6 * n:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            if ids.shape[1] >= n:
                break
    if ids.shape[1] < n:
        raise SystemExit(f"--lengths: not enough text for {n} tokens")
    return ids[:, :n]


def _forward(model, ids):
    with torch.inference_mode():
        start = time.perf_counter()
        logits = model(ids, use_cache=False).logits
        return time.perf_counter() - start, logits


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--backends", nargs="+", default=["auto"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from ropekit.hf import apply_rope, load_model

    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads", flush=True)
    rows = []
    for dtype in args.dtypes:
        lm = load_model("demo", device="cpu", dtype=dtype)
        for n in args.lengths:
            ids = _text_ids(lm.tokenizer, n)
            times = {"unpatched": [], **{b: [] for b in args.backends}}
            diffs = {}
            reference = None
            # Warm-up (the first patched forward compiles the CPU pass) and the logit difference.
            for backend in args.backends:
                with apply_rope(lm.model, lm.rope, backend=backend):
                    _, logits = _forward(lm.model, ids)
                if reference is None:
                    _, reference = _forward(lm.model, ids)
                diffs[backend] = (logits.float() - reference.float()).abs().max().item()
                del logits
            del reference
            for _ in range(args.repeats):
                times["unpatched"].append(_forward(lm.model, ids)[0])
                for backend in args.backends:
                    with apply_rope(lm.model, lm.rope, backend=backend):
                        times[backend].append(_forward(lm.model, ids)[0])
            base = statistics.median(times["unpatched"])
            for backend in args.backends:
                t = statistics.median(times[backend])
                row = {"dtype": dtype, "tokens": n, "backend": backend, "unpatched_s": base, "patched_s": t,
                       "ratio": t / base, "max_logit_diff": diffs[backend],
                       "unpatched_all_s": times["unpatched"], "patched_all_s": times[backend]}
                rows.append(row)
                print(f"{dtype:9s} {n:6d} tokens  unpatched {base:8.2f} s  patched[{backend}] {t:8.2f} s  "
                      f"ratio {t / base:5.3f}  max|dlogit| {diffs[backend]:.2e}  "
                      f"(all: {' '.join(f'{x:.2f}' for x in times['unpatched'])} / "
                      f"{' '.join(f'{x:.2f}' for x in times[backend])})", flush=True)
        del lm
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)


if __name__ == "__main__":
    main()
