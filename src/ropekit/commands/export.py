"""`ropekit export MODEL --method M --factor F --out DIR`: a checkpoint plain transformers loads extended;
`--format gguf --out NEW.gguf`: a GGUF copy llama.cpp runs extended (tensors copied as they are)."""

from __future__ import annotations

from pathlib import Path
from typing import NoReturn, Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    MODEL_HELP,
    ModelArg,
    OverwriteOpt,
    check_file_or_exit,
    check_out_or_exit,
    cli_message,
    error_exit,
    extend_or_exit,
    model_rope_or_exit,
    typed_path,
    with_method_options,
)
from ropekit.methods import get_method, method_names

FORMATS = ("transformers", "gguf")


def write_error_exit(exc: BaseException, out: Path) -> NoReturn:
    """A failed write of ``--out`` as one line: a full disk said so (an OSError ENOSPC/EDQUOT, or safetensors'
    SafetensorError "IoError(Os { code: 28, kind: StorageFull ...})"), any other error with its reason."""
    import errno

    text = str(exc)
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or any(s in text for s in ("StorageFull", "No space left", "code: 28")):
        error_exit(f"--out: no space left on device while writing {out}; free some space or choose another --out")
    reason = getattr(exc, "strerror", None) or (text.strip().splitlines() or [type(exc).__name__])[0]
    error_exit(f"--out: cannot write {out}: {reason}")


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


def _gguf_source(model: str | None) -> Path:
    """The .gguf file a GGUF export copies (the demo's for None / "demo")."""
    from ropekit.hf.load import demo_model_path

    return demo_model_path() if model in (None, "demo") else Path(model).expanduser()


def _export_gguf(model: str | None, method: str, out: Path, overwrite: bool, dtype: str | None,
                 method_options: dict) -> None:
    from ropekit.hf.export_gguf import check_gguf_export, export_gguf, llama_cpp_command

    if dtype is not None:
        error_exit("--dtype: the GGUF export copies every tensor as it is (no conversion); drop --dtype")
    if model not in (None, "demo") and Path(model).suffix != ".gguf":
        error_exit(f"--format gguf: MODEL must be a .gguf file (or demo), got {model}; a model folder or hub id "
                   f"exports with --format transformers")
    check_file_or_exit(out, overwrite, "--out")
    # The model's file, the method and its options, and whether llama.cpp can express them: all before copying.
    base_cfg, name = model_rope_or_exit(model)
    source = _gguf_source(model)
    cfg = extend_or_exit(base_cfg, method, method_options)
    try:
        check_gguf_export(source, cfg)
    except ValueError as exc:
        message = str(exc).removeprefix("method: ")
        error_exit(f"--method {cfg.method}: cannot be exported for llama.cpp: {cli_message(message)}")
    typer.echo(f"copying {name} ...")
    try:
        path, plan = export_gguf(source, cfg, out, overwrite=overwrite, option="--out")
    except ValueError as exc:
        error_exit(str(exc))
    except OSError as exc:
        write_error_exit(exc, out)
    keys = ", ".join(f"{k.split('.', 1)[1]}={v!r}" for k, (v, _) in plan.set_keys.items())
    tensors = f"; tensors {', '.join(plan.set_tensors)}" if plan.set_tensors else ""
    typer.echo(f"wrote {path}: {cfg.method}" + (f" factor {cfg.factor:g}" if cfg.factor else "") + f" ({keys}{tensors})")
    typer.echo(f"serve it with llama.cpp: {llama_cpp_command(path, plan)}")
    if get_method(cfg.method).needs_searched_factors:  # short and long factors: which one llama.cpp takes
        typer.echo("note: llama.cpp picks the long factors for every sequence when -c exceeds "
                   f"{cfg.original_max_position}, the short ones otherwise")


def register(app: typer.Typer) -> None:
    @app.command("export", help=(
        "Write MODEL with its RoPE extended by --method/--factor: as a checkpoint (safetensors + config.json with "
        "standard rope_parameters + tokenizer) that plain transformers and vLLM load without ropekit, or with "
        "--format gguf as a GGUF file llama.cpp runs (every tensor copied as it is, RoPE metadata and factor "
        "tensors set). Written atomically. MODEL: " + MODEL_HELP))
    @with_method_options
    def export_command(
        model: ModelArg = None,
        method: Annotated[str, typer.Option("--method", "-m", help="scaling method (transformers-loadable: "
                                            f"{', '.join(method_names(exportable=True))})")] = ...,
        out: Annotated[Path, typer.Option("--out", "-o", parser=typed_path, help="output folder (must not exist or be empty); with "
                                          "--format gguf the new .gguf file (must not exist)")] = ...,
        out_format: Annotated[str, typer.Option("--format", help="transformers (a checkpoint folder) or gguf (a "
                                                ".gguf copy for llama.cpp; MODEL must be a .gguf)")] = "transformers",
        overwrite: OverwriteOpt = False,
        dtype: Annotated[Optional[str], typer.Option(
            "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own; GGUF: float32)")] = None,
        method_options: dict = None,
    ) -> None:
        from ropekit.hf import DTYPES, export_model, load_model
        from ropekit.hf.export import EXPORT_NAMES
        from ropekit.hf.export_gguf import vllm_command

        if out_format not in FORMATS:
            error_exit(f"--format: {out_format!r} not accepted; accepted: {', '.join(FORMATS)}")
        if out_format == "gguf":
            _export_gguf(model, method, out, overwrite, dtype, method_options)
            return
        if dtype is not None and dtype not in DTYPES:
            error_exit(f"--dtype: {dtype!r} not accepted; accepted: {', '.join(DTYPES)}")
        check_out_or_exit(out, overwrite, names=EXPORT_NAMES, source=model)
        # Check the model's files, the method and its options on the config alone, before the weights load.
        base_cfg, name = model_rope_or_exit(model)
        cfg = extend_or_exit(base_cfg, method, method_options)
        try:
            cfg.to_hf()
        except ValueError as exc:
            error_exit(f"--method {cfg.method}: cannot be exported for plain transformers: {exc}")

        typer.echo(f"loading {name} ...")
        try:
            # model_rope_or_exit has just checked the files: no second check.
            loaded = load_model(model or "demo", device="cpu", dtype=dtype or _checkpoint_dtype(model),
                                check_files=False)
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        cfg = extend_or_exit(loaded.rope, method, method_options)
        try:
            path = export_model(loaded, cfg, out, overwrite=overwrite)
        except (FileExistsError, ValueError) as exc:
            error_exit(str(exc))
        except Exception as exc:  # noqa: BLE001 - OSError, and safetensors' SafetensorError around one
            if not (isinstance(exc, OSError) or type(exc).__name__ == "SafetensorError"):
                raise
            write_error_exit(exc, out)
        hf = cfg.to_hf()
        typer.echo(f"wrote {path}: {cfg.method}"
                   + (f" factor {cfg.factor:g}" if cfg.factor else "")
                   + f", rope_parameters {hf['rope_parameters']}, max_position_embeddings "
                     f"{hf.get('max_position_embeddings')}")
        typer.echo(f"load it with: AutoModelForCausalLM.from_pretrained({str(path)!r})")
        typer.echo(f"serve it with vLLM: {vllm_command(path, cfg)}")
