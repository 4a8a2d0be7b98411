"""`ropekit inspect MODEL`: the model's RoPE, what each extension method does to it, and plots.

Reads the config only (a config.json, a model folder, a .gguf's metadata, or a hub id's config): no weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    MODEL_HELP,
    ModelArg,
    OverwriteOpt,
    check_file_or_exit,
    check_out_or_exit,
    error_exit,
    typed_path,
)

def register(app: typer.Typer) -> None:
    @app.command("inspect", help=(
        "What RoPE MODEL has and what extending it does: per-pair wavelengths against the trained length, "
        "each method's wavelengths and attention scale at the target length, RoPE's long-term decay; "
        "writes wavelengths.png and decay.png. Needs only the config, no weights. MODEL: " + MODEL_HELP))
    def inspect_command(
        model: ModelArg = None,
        target_length: Annotated[Optional[int], typer.Option(
            "--target-length", "-t", help="length to extend to (default: twice the trained length; an already "
                                          "scaled model: its own target)")] = None,
        out: Annotated[Path, typer.Option("--out", "-o", help="folder for the plots")] = Path("ropekit-inspect"),
        json_file: Annotated[Optional[Path], typer.Option("--json", parser=typed_path, help="write the full analysis as JSON")] = None,
        no_plots: Annotated[bool, typer.Option("--no-plots", help="print the table only")] = False,
        overwrite: OverwriteOpt = False,
    ) -> None:
        import json

        from ropekit.analysis import inspect_rope, plot_decay, plot_wavelengths
        from ropekit.output import OutputDir, write_file_atomic

        if target_length is not None and target_length < 1:
            error_exit(f"--target-length: must be a positive number of tokens, got {target_length}")
        if not no_plots:
            check_out_or_exit(out, overwrite, names=("wavelengths.png", "decay.png"), source=model)
        check_file_or_exit(json_file, overwrite, out=None if no_plots else out, source=model)
        try:
            from ropekit.hf.load import rope_from_source

            cfg, name = rope_from_source(model)
            report = inspect_rope(cfg, target_length, name=name)
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        typer.echo(report.table())
        written = []
        if not no_plots:
            try:
                with OutputDir(out, command="inspect", overwrite=overwrite) as folder:
                    plot_wavelengths(report, folder.path("wavelengths.png"))
                    plot_decay(report, folder.path("decay.png"))
                written += [out / "wavelengths.png", out / "decay.png"]
            except OSError as exc:
                error_exit(f"--out: cannot write plots to {out}: {exc.strerror or exc}")
        if json_file is not None:
            try:
                write_file_atomic(json_file, json.dumps(report.to_dict(), indent=2) + "\n")
            except OSError as exc:
                error_exit(f"--json: cannot write {json_file}: {exc.strerror or exc}")
            written.append(json_file)
        if written:
            typer.echo("\nwrote: " + ", ".join(str(p) for p in written))
