"""`ropekit bench`: time ropekit's RoPE paths against transformers, rotary-embedding-torch, torchtune
(and on a GPU Liger-Kernel and flash-attention) and the copy bound, in one run on the same tensors."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated


def write_json_atomic(path: Path, data: dict) -> None:
    """Write ``data`` as JSON to ``path`` via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, indent=2)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def bench_command(
    quick: Annotated[bool, typer.Option("--quick", help="tiny shapes, 3 repeats (a smoke run)")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", help="also write the results as JSON here")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda")] = "auto",
    dtypes: Annotated[str, typer.Option("--dtypes", help="comma-separated: float32, bfloat16")] = "float32,bfloat16",
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="timed calls per row (default 15, quick 3)")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="untimed calls first (default 3, quick 1)")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's); 1 "
                                                   "avoids thread-barrier stalls on a busy machine")] = None,
    shapes: Annotated[Optional[str], typer.Option("--shapes", help="comma-separated subset: prefill-gqa, batch-mha, "
                                                  "decode-128k (tiny-prefill, tiny-decode)")] = None,
) -> None:
    """Time RoPE implementations (medians) and print a table of ratios to transformers and to the copy bound."""
    import torch

    from ropekit.kernels import bench

    if device not in ("auto", "cpu", "cuda"):
        typer.echo(f"error: --device: {device!r} not accepted; accepted: auto, cpu, cuda", err=True)
        raise typer.Exit(1)
    if device == "cuda" and not torch.cuda.is_available():
        typer.echo("error: --device cuda: no CUDA device is available", err=True)
        raise typer.Exit(1)
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    if threads is not None:
        if threads < 1:
            typer.echo(f"error: --threads: must be >= 1, got {threads}", err=True)
            raise typer.Exit(1)
        torch.set_num_threads(threads)
    for value, name in ((repeats, "--repeats"), (warmup, "--warmup")):
        if value is not None and value < 1:
            typer.echo(f"error: {name}: must be >= 1, got {value}", err=True)
            raise typer.Exit(1)
    try:
        shape_names = tuple(x.strip() for x in shapes.split(",") if x.strip()) if shapes else None
        result = bench.run(quick=quick, device=device, dtypes=names, repeats=repeats, warmup=warmup,
                           log=lambda line: typer.echo(line, err=True), shape_names=shape_names)
    except ValueError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(bench.format_table(result))
    if json_path is not None:
        write_json_atomic(json_path, result)
        typer.echo(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
