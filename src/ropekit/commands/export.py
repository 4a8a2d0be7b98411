"""`ropekit export MODEL --method M --factor F --out DIR`: a checkpoint plain transformers loads extended."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import (
    MODEL_HELP,
    AttentionFactorOpt,
    BetaFastOpt,
    BetaSlowOpt,
    FactorOpt,
    FactorsFileOpt,
    HighFreqOpt,
    LowFreqOpt,
    ModelArg,
    MscaleAllDimOpt,
    MscaleOpt,
    NewBaseOpt,
    OriginalLengthOpt,
    error_exit,
    rope_config_or_exit,
)


def _checkpoint_dtype(source: str | None) -> str:
    """The dtype the checkpoint was saved in (config ``dtype``/``torch_dtype``), else float32 (GGUF: dequantized)."""
    from ropekit.models import DTYPES, read_model_config

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
    def export_command(
        model: ModelArg = None,
        method: Annotated[str, typer.Option("--method", "-m", help="scaling method (transformers-loadable: "
                                            "linear, ntk, dynamic, yarn, llama3, longrope, base)")] = ...,
        out: Annotated[Path, typer.Option("--out", "-o", help="output folder (must not exist or be empty)")] = ...,
        factor: FactorOpt = None,
        beta_fast: BetaFastOpt = None,
        beta_slow: BetaSlowOpt = None,
        attention_factor: AttentionFactorOpt = None,
        mscale: MscaleOpt = None,
        mscale_all_dim: MscaleAllDimOpt = None,
        original_length: OriginalLengthOpt = None,
        low_freq_factor: LowFreqOpt = None,
        high_freq_factor: HighFreqOpt = None,
        new_base: NewBaseOpt = None,
        factors_file: FactorsFileOpt = None,
        overwrite: Annotated[bool, typer.Option("--overwrite", help="replace a non-empty --out folder")] = False,
        dtype: Annotated[Optional[str], typer.Option(
            "--dtype", help="float32, bfloat16 or float16 (default: the checkpoint's own; GGUF: float32)")] = None,
    ) -> None:
        from ropekit.commands.inspect import rope_from_source
        from ropekit.models import DTYPES, export_model, load_model

        if dtype is not None and dtype not in DTYPES:
            error_exit(f"--dtype: {dtype!r} not accepted; accepted: {', '.join(DTYPES)}")
        if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
            error_exit(f"--out: {out} exists and is not empty (pass --overwrite to replace it)")
        # Check the method and its options on the config alone, before the (slow) weight loading.
        try:
            base_cfg, name = rope_from_source(model)
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        options = dict(beta_fast=beta_fast, beta_slow=beta_slow, attention_factor=attention_factor, mscale=mscale,
                       mscale_all_dim=mscale_all_dim, original_length=original_length,
                       low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor, new_base=new_base)
        cfg = rope_config_or_exit(base_cfg, method, factor, factors_file=factors_file, **options)
        try:
            cfg.to_hf()
        except ValueError as exc:
            error_exit(f"--method {cfg.method}: cannot be exported for plain transformers: {exc}")

        typer.echo(f"loading {name} ...")
        try:
            loaded = load_model(model or "demo", device="cpu", dtype=dtype or _checkpoint_dtype(model))
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        cfg = rope_config_or_exit(loaded.rope, method, factor, factors_file=factors_file, **options)
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
