"""GGUF export: a copy of a GGUF file with another RoPE, written the way llama.cpp reads it.

``export_gguf(source, cfg, out)`` copies every tensor byte for byte (nothing is dequantized or requantized) and
every metadata key, and sets the RoPE keys and factor tensors (``ropekit.gguf.rope_plan``). The output follows
ropekit's rules for files: an existing file is refused unless ``overwrite``; the file is written under a
temporary name in the same folder and renamed into place once complete, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ropekit.config import RopeConfig
from ropekit.gguf import RopePlan, rope_plan, serve_command, write_gguf
from ropekit.output import check_output_file, file_mode, make_dirs


def check_gguf_export(source: str | Path, cfg: RopeConfig) -> RopePlan:
    """The plan for writing ``cfg`` into ``source`` (a .gguf file), or ValueError saying why llama.cpp cannot
    take it. Reads the header only (cached), so a command calls it before any other work."""
    path = Path(source).expanduser()
    if path.suffix != ".gguf" or not path.is_file():
        raise ValueError(f"model: the GGUF export copies a .gguf file, and {source} is not one; export a model "
                         f"folder or hub id with the transformers format")
    return rope_plan(cfg, path)


def export_gguf(source: str | Path, cfg: RopeConfig, out: str | Path, *, overwrite: bool = False,
                option: str = "out") -> tuple[Path, RopePlan]:
    """Write ``source`` (a .gguf file) with its RoPE replaced by ``cfg`` to the file ``out``.

    Args:
        source: the GGUF file to copy.
        cfg: the RoPE to write (``RopeConfig.from_gguf(source).extend(...)``).
        out: the new file (must not exist unless ``overwrite``; never the source itself).
        overwrite: replace an existing ``out``.
        option: the name error messages give ``out`` (the CLI passes ``--out``).
    Returns:
        (the written path, the ``RopePlan`` applied: ``serve_command(path, plan)`` says how to run it).
    Raises:
        ValueError: a method llama.cpp cannot express, a geometry that is not the file's, an ``out`` that would
            overwrite a file (``ropekit.output.OutputError``) or is the source.
    """
    src = Path(source).expanduser()
    plan = check_gguf_export(src, cfg)
    dest = check_output_file(out, option=option, overwrite=overwrite)
    if dest.exists() and dest.resolve() == src.resolve():
        raise ValueError(f"{option}: {out} is the source file; write the export to another file")
    make_dirs(dest.parent)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write_gguf(src, plan, tmp)
        os.chmod(tmp, file_mode())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest, plan


def llama_cpp_command(path: str | Path, plan: RopePlan) -> str:
    """``llama-server -m PATH -c N [flags]`` for the written file."""
    return serve_command(path, plan)


def vllm_command(model: str | Path, cfg: RopeConfig) -> str:
    """The vLLM command that serves ``model`` with ``cfg``: ``--hf-overrides`` with transformers'
    ``rope_parameters`` (``cfg.to_hf()``) and ``--max-model-len`` the target length.

    An exported checkpoint already carries ``rope_parameters``, so the override only restates it; on the original
    model it applies the extension without an export. Raises ValueError for a method transformers lacks.
    """
    import json

    hf = cfg.to_hf()
    override = json.dumps({"rope_parameters": hf["rope_parameters"]}, separators=(",", ":"))
    parts = ["vllm", "serve", str(model), "--hf-overrides", f"'{override}'"]
    if cfg.target_length:
        parts += ["--max-model-len", str(cfg.target_length)]
    return " ".join(parts)
