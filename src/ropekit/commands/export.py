"""`ropekit export MODEL --method M --factor F --out DIR`: a checkpoint plain transformers loads extended."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    MODEL_HELP,
    ModelArg,
    OverwriteOpt,
    check_out_or_exit,
    error_exit,
    extend_or_exit,
    model_rope_or_exit,
    with_method_options,
)
from ropekit.methods import method_names


def _checkpoint_dtype(source: str | None) -> str:
    """The dtype the checkpoint was saved in (config ``dtype``/``torch_dtype``), else float32 (GGUF: dequantized)."""
    from ropekit.hf import DTYPES, read_model_config

    if source in (None, "demo") or str(source).endswith(".gguf"):
        return "float32"
    try:
        config = read_model_config(source)
    except Exception:  # noqa: BLE001 - the loader reports unreadable sources itself
        return "float32"
    dtype = config.get("dtype") or config.get("torch_dtype")
    return dtype if dtype in DTYPES else "float32"


def register(app: typer.Typer) -> None:
    @app.command("export", help=(
        "Write MODEL with its RoPE extended by --method/--factor as a checkpoint (safetensors + config.json with "
        "standard rope_parameters + tokenizer) that plain transformers loads without ropekit. Written atomically. "
        "MODEL: " + MODEL_HELP))
    @with_method_options
    def export_command(
        model: ModelArg = None,
        method: Annotated[str, typer.Option("--method", "-m", help="scaling method (transformers-loadable: "
                                            f"{', '.join(method_names(exportable=True))})")] = ...,
        out: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")] = ...,
        overwrite: OverwriteOpt = False,
        dtype: Annotated[Optional[str], typer.Option(
            "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own; GGUF: float32)")] = None,
        method_options: dict = None,
    ) -> None:
        from ropekit.hf import DTYPES, export_model, load_model

        if dtype is not None and dtype not in DTYPES:
            error_exit(f"--dtype: {dtype!r} not accepted; accepted: {', '.join(DTYPES)}")
        check_out_or_exit(out, overwrite)
        # Check the model's files, the method and its options on the config alone, before the weights load.
        base_cfg, name = model_rope_or_exit(model)
        cfg = extend_or_exit(base_cfg, method, method_options)
        try:
            cfg.to_hf()
        except ValueError as exc:
            error_exit(f"--method {cfg.method}: cannot be exported for plain transformers: {exc}")

        typer.echo(f"loading {name} ...")
        try:
            loaded = load_model(model or "demo", device="cpu", dtype=dtype or _checkpoint_dtype(model))
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        cfg = extend_or_exit(loaded.rope, method, method_options)
        try:
            path = export_model(loaded, cfg, out, overwrite=overwrite)
        except (FileExistsError, ValueError) as exc:
            error_exit(str(exc))
        except OSError as exc:
            error_exit(f"--out: cannot write {out}: {exc.strerror or exc}")
        hf = cfg.to_hf()
        typer.echo(f"wrote {path}: {cfg.method}"
                   + (f" factor {cfg.factor:g}" if cfg.factor else "")
                   + f", rope_parameters {hf['rope_parameters']}, max_position_embeddings "
                     f"{hf.get('max_position_embeddings')}")
        typer.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(path)!r})")
