"""`ropekit bench`: time ropekit's RoPE paths against transformers, rotary-embedding-torch, torchtune
(and on a GPU Liger-Kernel and flash-attention) and the copy bound, in one run on the same tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import typed_path


def bench_command(
    quick: Annotated[bool, typer.Option("--quick", help="tiny shapes, 3 repeats (a smoke run)")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json", parser=typed_path, help="also write the results as JSON here")] = None,
    device: Annotated[str, typer.Option("--device", help="auto (CUDA when present), cpu or cuda")] = "auto",
    dtypes: Annotated[str, typer.Option("--dtypes", help="comma-separated: float32, bfloat16")] = "float32,bfloat16",
    repeats: Annotated[Optional[int], typer.Option("--repeats", help="timed calls per row (default 15, quick 3)")] = None,
    warmup: Annotated[Optional[int], typer.Option("--warmup", help="untimed calls first (default 3, quick 1)")] = None,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's); 1 "
                                                   "avoids thread-barrier stalls on a busy machine")] = None,
    shapes: Annotated[Optional[str], typer.Option("--shapes", help="comma-separated subset: prefill-gqa, batch-mha, "
                                                  "decode-128k (tiny-prefill, tiny-decode)")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing --json file")] = False,
) -> None:
    """Time RoPE implementations (medians) and print a table of ratios to transformers and to the copy bound."""
    import torch

    from ropekit.kernels import bench

    from ropekit.commands.common import check_file_or_exit, check_positive, error_exit
    from ropekit.evaluation.report import write_json

    if device not in ("auto", "cpu", "cuda"):
        error_exit(f"--device: {device!r} not accepted; accepted: auto, cpu, cuda")
    if device == "cuda" and not torch.cuda.is_available():
        error_exit("--device: cuda asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    check_positive(threads=(threads, 1), repeats=(repeats, 1), warmup=(warmup, 1))
    check_file_or_exit(json_path, overwrite)
    names = tuple(d.strip() for d in dtypes.split(",") if d.strip())
    unknown_dtypes = [d for d in names if d not in bench.DTYPES]
    if unknown_dtypes or not names:
        error_exit(f"--dtypes: {dtypes!r} not accepted; accepted: {', '.join(bench.DTYPES)}")
    shape_names = tuple(x.strip() for x in shapes.split(",") if x.strip()) if shapes else None
    known = {sh.name for sh in bench.FULL_SHAPES + bench.QUICK_SHAPES}
    if shape_names is not None and (not shape_names or set(shape_names) - known):
        error_exit(f"--shapes: {shapes!r} not accepted; accepted: {', '.join(known)}")
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        result = bench.run(quick=quick, device=device, dtypes=names, repeats=repeats, warmup=warmup,
                           log=lambda line: typer.echo(line, err=True), shape_names=shape_names)
    except ValueError as err:
        error_exit(str(err))
    typer.echo(bench.format_table(result))
    if json_path is not None:
        write_json(json_path, result)
        typer.echo(f"wrote {json_path}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench_command)
