"""Write docs/families.md: every causal-LM family of the installed transformers with a rotary module, and whether
ropekit patches it (checked on a tiny model, ``ropekit.hf.reference.survey_family``, the function
tests/test_hf_every_family_patched_or_refused.py runs) or refuses it and why.

    python scripts/family_table.py [--out docs/families.md] [FAMILY ...]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/families.md", help="the markdown file to write")
    parser.add_argument("families", nargs="*", help="only these model types (default: all with RoPE)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    from ropekit.hf.families import rope_families
    from ropekit.hf.reference import family_table, survey_family
    from ropekit.output import check_output_file, write_file_atomic

    out = Path(args.out)
    # Replace only a table this script wrote earlier (its first line), never another file.
    ours = out.is_file() and out.read_text(encoding="utf-8", errors="replace").startswith("# Model families")
    check_output_file(out, option="--out", overwrite=ours)
    results = []
    start = time.time()
    for model_type in args.families or rope_families():
        results.append(survey_family(model_type))
        r = results[-1]
        print(f"{r.status:10s} {model_type}", file=sys.stderr, flush=True)
    write_file_atomic(out, family_table(results))
    print(f"wrote {out} ({len(results)} families, {time.time() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
