"""Helpers every sub-command shares: method options from the registry, checks before work, one-line errors.

Method options are not declared per command: ``@with_method_options`` adds one option per parameter of
``ropekit.methods.parameters()`` (``--factor``, ``--beta-fast``, ``--factors-file``, ...) to a command, which
receives the ones given as ``method_options: dict`` and turns them into a RoPE with ``extend_rope``.
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import typing
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from typing_extensions import Annotated

from ropekit.config import RopeConfig
from ropekit.methods import get_method, method_names, parameters

# ---------------------------------------------------------------------- method options, from the registry
# Short aliases kept from before the registry drove the options.
SHORT_FLAGS = {"--factor": "-f"}
# Flags that are not a RopeConfig field of their own.
FACTORS_FILE = "--factors-file"


@functools.lru_cache(maxsize=1)
def method_option_table() -> tuple[tuple[str, str, tuple[str, ...], Any, str], ...]:
    """One row per method option: (flag, python name, RopeConfig fields it sets, annotation, help)."""
    rows: dict[str, list] = {}
    for param, users in parameters():
        dest = param.flag.lstrip("-").replace("-", "_")
        if param.flag in rows:  # --factors-file sets short_factor and long_factor
            rows[param.flag][2] += (param.field,)
            continue
        readers = ", ".join(users)
        if param.type == "float_list":
            kind, decls = Optional[Path], [param.flag]
            text = (f"{', '.join(users)}: JSON file with short_factor and long_factor lists (rotary_dim/2 numbers "
                    f"each), optional n_hat, factor, attention_factor")
        elif param.type == "bool":
            kind, decls = Optional[bool], [f"{param.flag}/--no-{param.flag[2:]}"]
            text = f"{readers}: {param.help}" + ("" if param.default is None else f" (default {param.default})")
        else:
            kind = Optional[float] if param.type == "float" else Optional[int]
            decls = [param.flag] + ([SHORT_FLAGS[param.flag]] if param.flag in SHORT_FLAGS else [])
            text = f"{readers}: {param.help}" + ("" if param.default is None else f" (default {param.default:g})")
        annotation = Annotated[kind, typer.Option(*decls, help=text, show_default=False)]
        rows[param.flag] = [param.flag, dest, (param.field,), annotation, text]
    return tuple(tuple(r) for r in rows.values())


def with_method_options(command: Callable) -> Callable:
    """Add every registry method option to a typer ``command`` that takes ``method_options``.

    The command receives ``method_options``: ``{python name: value}`` of the options the user gave
    (``{"factor": 2.0, "beta_fast": 16.0}``).
    """
    signature = inspect.signature(command)
    # Resolve the command's own (string) annotations in its module: typer reads them from the wrapper.
    hints = typing.get_type_hints(command, include_extras=True)
    own = [p.replace(annotation=hints.get(p.name, p.annotation)) for p in signature.parameters.values()
           if p.name != "method_options"]
    table = method_option_table()
    added = [inspect.Parameter(dest, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation)
             for _flag, dest, _fields, annotation, _help in table]

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        given = {dest: kwargs.pop(dest) for _f, dest, *_ in table if dest in kwargs}
        return command(*args, **kwargs, method_options={k: v for k, v in given.items() if v is not None})

    wrapper.__signature__ = signature.replace(parameters=own + added)
    wrapper.__annotations__ = {p.name: p.annotation for p in own + added}
    del wrapper.__wrapped__  # typer must read the new signature, not the wrapped function's
    return wrapper


def option_fields(dest: str) -> tuple[str, ...]:
    """RopeConfig fields set by the option ``dest`` (python name)."""
    for _flag, name, fields, *_ in method_option_table():
        if name == dest:
            return fields
    raise ValueError(f"options: unknown {dest!r}; accepted: {', '.join(r[1] for r in method_option_table())}")


def field_flags() -> dict[str, str]:
    """RopeConfig field (and extend's own argument names) -> the CLI flag a user typed."""
    flags = {field: flag for flag, _dest, fields, *_ in method_option_table() for field in fields}
    return {**flags, "method": "--method", "factors_file": FACTORS_FILE, "target_length": "--target-length"}


def cli_message(message: str, renames: dict[str, str] | None = None) -> str:
    """A library error that starts with a field name (``beta_fast: ...``, ``seq_len: ...``) restated with the flag
    the user typed: ``renames`` (a command's own ``{field: flag}``) first, then the registry's method fields.
    The one place where library field names become CLI option names."""
    head, sep, rest = message.partition(":")
    if not sep:
        return message
    # One field (``mscale: ...``) or several that are at fault together (``mscale, mscale_all_dim: ...``).
    flags = [(renames or {}).get(key) or field_flags().get(key) for key in (k.strip() for k in head.split(","))]
    if not all(flags):
        return message
    return f"{', '.join(flags)}:" + re.sub(r"\bby method '([\w.-]+)'", r"by --method \1", rest)


def flags_for(*fields: str) -> dict[str, str]:
    """``{field: --field-with-dashes}`` for fields whose flag is their name (``seq_len`` -> ``--seq-len``)."""
    return {f: "--" + f.replace("_", "-") for f in fields}


def extend_rope(base_cfg: RopeConfig, method: str, method_options: dict[str, Any] | None = None, *,
                target_length: int | None = None) -> RopeConfig:
    """``base_cfg.extend(method, ...)`` from CLI method options; ValueError / FileNotFoundError messages name
    the flag (``--factors-file: ... not found``)."""
    options = dict(method_options or {})
    factor = options.pop("factor", None)
    factors_file = options.pop("factors_file", None)
    fields = {option_fields(dest)[0]: value for dest, value in options.items() if value is not None}
    try:
        return base_cfg.extend(method, factor, target_length=target_length, factors_file=factors_file, **fields)
    except (ValueError, FileNotFoundError) as exc:
        message = cli_message(str(exc))
        if target_length is None:  # no command that calls this has a --target-length to suggest
            message = message.replace("; or give target_length", "")
        raise type(exc)(message) from None


def extend_or_exit(base_cfg: RopeConfig, method: str, method_options: dict[str, Any] | None = None, *,
                   target_length: int | None = None) -> RopeConfig:
    """``extend_rope`` with its errors as one-line CLI errors (exit 2)."""
    try:
        return extend_rope(base_cfg, method, method_options, target_length=target_length)
    except (FileNotFoundError, ValueError) as exc:
        error_exit(str(exc))


def options_for(method: str, method_options: dict[str, Any]) -> dict[str, Any]:
    """The subset of ``method_options`` that ``method`` reads (``--original-length`` goes to every method)."""
    reads = set(get_method(method).reads) | {"original_max_position"}
    return {dest: v for dest, v in method_options.items() if set(option_fields(dest)) & reads}


def check_options_used(methods: list[str], method_options: dict[str, Any]) -> None:
    """ValueError naming the first option that none of ``methods`` reads, and the methods that do."""
    for flag, dest, fields, *_ in method_option_table():
        if dest in method_options and not any(options_for(m, {dest: 1}) for m in methods):
            users = sorted({m for f in fields for m in method_names() if f in get_method(m).reads})
            raise ValueError(f"{flag}: not used by --method {','.join(methods)}; it is an option of: "
                             f"{', '.join(users)}")


# ---------------------------------------------------------------------- shared typer options
MODEL_HELP = ("a model folder (config.json + safetensors), a .gguf file, a hub id, or 'demo' "
              "(the bundled SmolLM2-135M, the default)")
ModelArg = Annotated[Optional[str], typer.Argument(help=MODEL_HELP, show_default=False)]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="write into a folder (or over a file) that holds "
                                            "files ropekit did not write; other files in the folder are kept")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")]


def error_exit(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (one line) to stderr and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


def fail_on(option: str, message: str) -> NoReturn:
    """``error_exit`` with a data error (``data: ...``) named as ``option`` (``--data``, ``--haystack``, ...)."""
    error_exit(cli_message(str(message), {"data": option, "haystack": option}))


# ---------------------------------------------------------------------- checks before any work
def check_out_or_exit(path: Path | None, overwrite: bool, option: str = "--out", *, names: tuple[str, ...] = (),
                      source: str | Path | None = None) -> None:
    """Refuse (one line, exit 2) an output folder that cannot be written without losing a user's files: see
    ``ropekit.output.check_output_dir`` (``names``: what the command writes; ``source``: the model it reads)."""
    from ropekit.output import OutputError, check_output_dir

    if path is not None:
        try:
            check_output_dir(path, option=option, overwrite=overwrite, names=names,
                             source=_local_source(source))
        except OutputError as exc:
            error_exit(str(exc))


def _local_source(source: str | Path | None) -> Path | None:
    """The local file or folder a MODEL argument names, if any (the demo and hub ids are not written over)."""
    if source is None or str(source) == "demo":
        return None
    path = Path(source).expanduser()
    return path if path.exists() else None


def check_file_or_exit(path: Path | None, overwrite: bool, option: str = "--json", *, out: Path | None = None,
                       source: str | Path | None = None) -> None:
    """Refuse (one line, exit 2) an output file that is a folder, or exists and ``--overwrite`` was not given, or
    lies inside the command's ``--out`` folder ``out``, or is the model ``source`` being read."""
    from ropekit.output import OutputError, check_file_outside, check_output_file

    if path is not None:
        try:
            if out is not None:
                check_file_outside(path, out, option=option)
            check_output_file(path, option=option, overwrite=overwrite, source=_local_source(source))
        except OutputError as exc:
            error_exit(str(exc))


class TypedPath(type(Path())):
    """A ``Path`` that remembers the text the user typed: ``Path("dir/new/")`` drops the trailing slash that says
    "a folder"; ``typed`` keeps it (``ropekit.output`` reads it)."""

    typed: str


def typed_path(text: str) -> Path:
    """typer ``parser=`` for output paths: a ``TypedPath`` of ``text``."""
    path = TypedPath(text)
    path.typed = text
    return path


def check_data_or_exit(data: str | Path | None, option: str = "--data") -> None:
    """Refuse (one line, exit 2) evaluation/training text that is missing, empty or unreadable."""
    from ropekit.evaluation.data import check_documents

    try:
        check_documents(data)
    except (FileNotFoundError, ValueError) as exc:
        fail_on(option, str(exc))


def check_device_or_exit(device: str | None, dtype: str | None = None) -> None:
    """Refuse an unknown ``--device`` / ``--dtype``, or a GPU that is not there, before any model loads."""
    from ropekit.hf import DTYPES, resolve_device

    try:
        if device is not None:
            resolve_device(device)
    except ValueError as exc:
        error_exit(f"--device:{str(exc).partition(':')[2]}")
    if dtype is not None and dtype not in DTYPES:
        error_exit(f"--dtype: {dtype!r} not accepted; accepted: {', '.join(DTYPES)}")


def check_positive(**values: float | int | None) -> None:
    """``check_positive(windows=(value, minimum))``-style bounds: one line naming ``--the-option``."""
    for name, pair in values.items():
        value, minimum = pair
        if value is not None and value < minimum:
            error_exit(f"--{name.replace('_', '-')}: must be >= {minimum}, got {value}")


def model_rope_or_exit(source: str | None):
    """(RopeConfig, display name) of ``source`` from its config alone, after checking that its weights and
    tokenizer are there: every model problem is reported before any weight is loaded."""
    from ropekit.hf.load import rope_from_source

    try:
        _check_model_files(source)
        return rope_from_source(source)
    except (FileNotFoundError, ValueError, OSError) as exc:
        error_exit(str(exc))


def _check_model_files(source: str | None) -> None:
    from ropekit.hf import check_model_source

    check_model_source(source or "demo")


def load_model_or_exit(source: str | None, *, device: str = "auto", dtype: str | None = None):
    """``ropekit.hf.load_model`` with its errors turned into one-line CLI errors (exit 2). Every command runs
    ``model_rope_or_exit`` (the file checks) first, so the load does not check the files again."""
    from ropekit.hf import load_model

    try:
        return load_model(source or "demo", device=device, dtype=dtype, check_files=False)
    except (FileNotFoundError, ValueError) as exc:
        error_exit(str(exc))
