"""`ropekit inspect MODEL`: the model's RoPE, what each extension method does to it, and plots.

Reads the config only (a config.json, a model folder, a .gguf's metadata, or a hub id's config): no weights.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

import typer
from typing_extensions import Annotated

from ropekit.commands.common import MODEL_HELP, ModelArg, error_exit

# GGUF architectures without rotary embeddings (learned or ALiBi positions).
GGUF_NO_ROPE_ARCHS = {"gpt2", "bloom", "mpt", "starcoder", "refact", "bert", "nomic-bert", "jina-bert-v2", "t5",
                      "t5encoder", "mamba", "rwkv6", "jais"}
# Config keys that show a model has RoPE, for families ropekit cannot patch but can still inspect.
ROPE_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_dim", "rotary_emb_base",
             "partial_rotary_factor")


def rope_from_source(source: str | None) -> tuple[Any, str]:
    """(RopeConfig, display name) of a model source, from its config or GGUF metadata only.

    ``source``: None or "demo" (the bundled SmolLM2), a ``config.json``, a folder holding one (or a single
    .gguf), a ``.gguf`` file, or a hub id.
    """
    from ropekit.config import RopeConfig, read_gguf_metadata
    from ropekit.models import NO_ROPE_FAMILIES, SUPPORTED_FAMILIES, demo_model_path, read_model_config, \
        unsupported_family_message

    if source in (None, "demo"):
        path = demo_model_path()
        return RopeConfig.from_gguf(path), "SmolLM2-135M-Instruct (demo)"
    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"model folder {source} has no config.json"
                                    + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))
        path = ggufs[0]
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {source} (no such file)")
        meta = read_gguf_metadata(path)
        arch = meta.get("general.architecture")
        if arch in GGUF_NO_ROPE_ARCHS:
            raise ValueError(f"model architecture {arch!r} has no rotary position embeddings (RoPE)")
        return RopeConfig.from_gguf(meta), meta.get("general.name") or path.stem
    if not path.exists() and (str(source).startswith((".", "/", "~")) or str(source).endswith(".json")
                              or str(source).count("/") > 1):
        raise FileNotFoundError(f"model not found: {source} (no such file or folder)")
    try:
        config = read_model_config(path if path.exists() else source)
    except OSError as exc:
        raise FileNotFoundError(f"model not found: {source!r} is not a local file or folder, and its config "
                                f"could not be fetched from the Hugging Face hub ({str(exc).splitlines()[0]})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object (a model's config.json)")
    model_type = config.get("model_type")
    if model_type in NO_ROPE_FAMILIES or (model_type not in SUPPORTED_FAMILIES
                                          and not any(k in config for k in ROPE_KEYS)):
        raise ValueError(unsupported_family_message(model_type))
    if path.suffix == ".json":
        fallback = path.parent.resolve().name if path.name == "config.json" else path.stem
    else:
        fallback = path.name
    name = config.get("_name_or_path") or fallback or str(source)
    return RopeConfig.from_hf(config), f"{name} ({model_type})" if model_type else name


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
        json_file: Annotated[Optional[Path], typer.Option("--json", help="write the full analysis as JSON")] = None,
        no_plots: Annotated[bool, typer.Option("--no-plots", help="print the table only")] = False,
    ) -> None:
        from ropekit.analysis import inspect_rope, plot_decay, plot_wavelengths

        if target_length is not None and target_length < 1:
            error_exit(f"--target-length: must be a positive number of tokens, got {target_length}")
        try:
            cfg, name = rope_from_source(model)
            report = inspect_rope(cfg, target_length, name=name)
        except (FileNotFoundError, ValueError) as exc:
            error_exit(str(exc))
        typer.echo(report.table())
        written = []
        if not no_plots:
            try:
                written.append(plot_wavelengths(report, out / "wavelengths.png"))
                written.append(plot_decay(report, out / "decay.png"))
            except OSError as exc:
                error_exit(f"--out: cannot write plots to {out}: {exc.strerror or exc}")
        if json_file is not None:
            try:
                json_file.parent.mkdir(parents=True, exist_ok=True)
                json_file.write_text(json.dumps(report.to_dict(), indent=2) + "\n")
            except OSError as exc:
                error_exit(f"--json: cannot write {json_file}: {exc.strerror or exc}")
            written.append(json_file)
        if written:
            typer.echo("\nwrote: " + ", ".join(str(p) for p in written))
