#!/usr/bin/env python
"""RoPE speed comparison: ropekit (reference, cpu, triton) vs transformers, rotary-embedding-torch,
torchtune, Liger-Kernel, flash-attention, and the copy bound. The same code as ``ropekit bench``.

    python benchmarks/bench_rope.py                 # CPU here, CUDA when present
    python benchmarks/bench_rope.py --quick --json out.json
    python benchmarks/bench_rope.py --device cuda --json gpu.json

See benchmarks/README.md.
"""

from ropekit.cli import app, build_app

if __name__ == "__main__":
    import sys

    build_app()
    app(["bench", *sys.argv[1:]])
