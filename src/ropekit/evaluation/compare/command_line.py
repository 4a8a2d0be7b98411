"""The ``ropekit export`` command line compare recommends: the one place compare writes CLI syntax.

Flags come from the registry (``Param.flag``), so the line follows the CLI's options.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ropekit.config import RopeConfig
from ropekit.methods import get_method


def export_command(model_source: str, rope: RopeConfig, target_length: int,
                   factors_file: str | Path | None = None) -> str:
    """The ``ropekit export`` command line that writes a checkpoint with ``rope`` (flags from the registry).
    Per-pair factors (longrope) have no flag of their own: they travel as ``--factors-file``, the file they were
    read from (absolute, so the line runs from any folder)."""
    spec = get_method(rope.method)
    parts = ["ropekit", "export", model_source or "demo", "--method", spec.name]
    if factors_file is not None and any(p.type == "float_list" and getattr(rope, p.field, None) is not None
                                        for p in spec.params):
        parts += ["--factors-file", str(Path(factors_file).resolve())]
    for p in spec.params:
        value = getattr(rope, p.field, None)
        if value is None or p.field == "original_max_position" or p.type == "float_list":
            continue
        parts += [p.flag, f"{value:g}" if isinstance(value, float) else str(value)]
    name = (Path(model_source).stem if model_source else "demo") or "model"
    parts += ["--out", f"{name}-{spec.name}-{target_length}"]
    return " ".join(shlex.quote(x) for x in parts)
