"""Helpers every sub-command shares: CLI method options -> RopeConfig, model loading, one-line errors.

Typer options are shared as ``Annotated`` aliases (``MethodOpt``, ``FactorOpt``, ...): a command declares
``factor: FactorOpt = None`` and passes its method options to ``build_rope_config``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from typing_extensions import Annotated

from ropekit.config import RopeConfig
from ropekit.methods import get_method, method_names

# CLI option name -> RopeConfig field
OPTION_FIELDS = {
    "beta_fast": "beta_fast",
    "beta_slow": "beta_slow",
    "attention_factor": "attention_factor",
    "mscale": "mscale",
    "mscale_all_dim": "mscale_all_dim",
    "truncate": "truncate",
    "original_length": "original_max_position",
    "target_length": "max_position",
    "low_freq_factor": "low_freq_factor",
    "high_freq_factor": "high_freq_factor",
    "new_base": "new_base",
    "n_hat": "n_hat",
}

# ---------------------------------------------------------------------- shared typer options
MODEL_HELP = ("a model folder (config.json + safetensors), a .gguf file, a hub id, or 'demo' "
              "(the bundled SmolLM2-135M, the default)")
ModelArg = Annotated[Optional[str], typer.Argument(help=MODEL_HELP, show_default=False)]
MethodOpt = Annotated[str, typer.Option("--method", "-m", help=f"scaling method: {', '.join(method_names())}")]
FactorOpt = Annotated[Optional[float], typer.Option("--factor", "-f", help="scale s = target length / trained length")]
BetaFastOpt = Annotated[Optional[float], typer.Option("--beta-fast", help="yarn: ramp starts at pairs turning this often (32)")]
BetaSlowOpt = Annotated[Optional[float], typer.Option("--beta-slow", help="yarn: ramp ends at pairs turning this often (1)")]
AttentionFactorOpt = Annotated[Optional[float], typer.Option("--attention-factor", help="yarn/longrope: final cos/sin multiplier (default from the factor)")]
MscaleOpt = Annotated[Optional[float], typer.Option("--mscale", help="yarn (DeepSeek): mscale")]
MscaleAllDimOpt = Annotated[Optional[float], typer.Option("--mscale-all-dim", help="yarn (DeepSeek): mscale_all_dim")]
OriginalLengthOpt = Annotated[Optional[int], typer.Option("--original-length", help="trained context length L (default: the model's)")]
LowFreqOpt = Annotated[Optional[float], typer.Option("--low-freq-factor", help="llama3: low_freq_factor (1)")]
HighFreqOpt = Annotated[Optional[float], typer.Option("--high-freq-factor", help="llama3: high_freq_factor (4)")]
NewBaseOpt = Annotated[Optional[float], typer.Option("--new-base", help="base: the new rope_theta (e.g. 500000)")]
FactorsFileOpt = Annotated[Optional[Path], typer.Option("--factors-file", help="longrope: JSON with short_factor and long_factor lists (rotary_dim/2 numbers each), optional n_hat")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto (cuda when available), cpu or cuda")]
DtypeOpt = Annotated[Optional[str], typer.Option("--dtype", help="float32, bfloat16 or float16 (default: bfloat16 on GPU, float32 on CPU)")]


def error_exit(message: str, code: int = 2) -> NoReturn:
    """Print ``error: message`` (one line) to stderr and exit with ``code``."""
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    raise typer.Exit(code)


def read_factors_file(path: str | Path) -> dict[str, Any]:
    """LongRoPE factors from JSON: {"short_factor": [...], "long_factor": [...], ["n_hat": int], ["factor": s]}.

    A transformers-style {"rope_parameters": {...}} or {"rope_scaling": {...}} wrapper is accepted too.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise FileNotFoundError(f"--factors-file: {p} not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"--factors-file: {p} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if isinstance(data, dict):
        data = data.get("rope_parameters") or data.get("rope_scaling") or data
    if not isinstance(data, dict) or "short_factor" not in data or "long_factor" not in data:
        raise ValueError(f"--factors-file: {p} must hold a JSON object with 'short_factor' and 'long_factor' lists")
    out = {"short_factor": data["short_factor"], "long_factor": data["long_factor"]}
    for key in ("n_hat", "factor", "attention_factor"):
        if data.get(key) is not None:
            out[key] = data[key]
    return out


def build_rope_config(
    base_cfg: RopeConfig,
    method: str,
    factor: float | None = None,
    *,
    factors_file: str | Path | None = None,
    **options: Any,
) -> RopeConfig:
    """The model's RoPE (``base_cfg``) extended with ``method`` and CLI-style options.

    Args:
        base_cfg: the model's RoPE as trained (``LoadedModel.rope`` or ``RopeConfig.from_hf``).
        method: a name of ``ropekit.method_names()`` (aliases such as "pi", "ntk_aware" accepted).
        factor: the scale s (target length / trained length).
        factors_file: LongRoPE factors JSON (see ``read_factors_file``).
        options: ``beta_fast``, ``beta_slow``, ``attention_factor``, ``mscale``, ``mscale_all_dim``, ``truncate``,
            ``original_length``, ``target_length``, ``low_freq_factor``, ``high_freq_factor``, ``new_base``,
            ``n_hat``; None values are ignored.
    Raises:
        ValueError: a missing or unused parameter, named as the CLI option (``--new-base``, ``--factor``, ...).
    """
    from ropekit.config import METHOD_ALIASES

    unknown = set(options) - set(OPTION_FIELDS)
    if unknown:
        raise ValueError(f"options: unknown {', '.join(sorted(unknown))}; accepted: {', '.join(OPTION_FIELDS)}")
    name = METHOD_ALIASES.get(method, method)
    if name not in method_names():
        raise ValueError(f"--method: unknown scaling method {method!r}; accepted: {', '.join(method_names())}")
    spec = get_method(name)
    reads = set(spec.required) | set(spec.accepted)
    params: dict[str, Any] = {}
    for opt, value in options.items():
        if value is None:
            continue
        fld = OPTION_FIELDS[opt]
        if fld not in reads and fld not in ("original_max_position", "max_position"):
            users = [m for m in method_names() if fld in set(get_method(m).required) | set(get_method(m).accepted)]
            raise ValueError(f"--{opt.replace('_', '-')}: not used by --method {name}; it is an option of: "
                             f"{', '.join(users)}")
        params[fld] = value
    if factors_file is not None:
        if name != "longrope":
            raise ValueError(f"--factors-file: only used by --method longrope, not {name}")
        params.update({k: v for k, v in read_factors_file(factors_file).items() if k not in params or k == "n_hat"})
    if factor is not None:
        if name == "default":
            if float(factor) != 1.0:
                raise ValueError("--factor: --method default (plain RoPE) takes no factor")
        elif name == "base":
            raise ValueError("--factor: --method base takes --new-base, not --factor")
        else:
            params["factor"] = float(factor)

    if name == "base" and params.get("new_base") is None:
        raise ValueError(f"--new-base: required by --method base (the new rope_theta; the model's is "
                         f"{base_cfg.base:g}, e.g. --new-base {base_cfg.base * 10:g})")
    if name == "longrope" and (params.get("short_factor") is None or params.get("long_factor") is None):
        raise ValueError(f"--factors-file: --method longrope needs per-pair factors: a JSON file with "
                         f"'short_factor' and 'long_factor' lists of rotary_dim/2 = {base_cfg.rotary_dim // 2} "
                         f"numbers each")
    needs_factor = "factor" in spec.required or name == "longrope"
    if needs_factor and params.get("factor") is None:
        raise ValueError(f"--factor: required by --method {name} (the target length over the trained length "
                         f"{base_cfg.original_max_position or '?'})")
    if "original_max_position" in spec.required and params.get("original_max_position") is None:
        if base_cfg.original_max_position is None:
            raise ValueError(f"--original-length: required by --method {name}; the model's config does not say "
                             f"its trained length")
    if params.get("factor") is not None and "max_position" not in params:
        # The target length follows the new factor (with_method would keep the trained length).
        original = params.get("original_max_position", base_cfg.original_max_position)
        params["max_position"] = int(round(params["factor"] * original)) if original else None
    try:
        return base_cfg.with_method(name, **params)
    except ValueError as exc:
        raise ValueError(_cli_names(str(exc))) from None


def _cli_names(message: str) -> str:
    """Rename RopeConfig field names at the start of an error message to their CLI options."""
    reverse = {v: k for k, v in OPTION_FIELDS.items()} | {"factor": "factor", "short_factor": "factors_file",
                                                           "long_factor": "factors_file"}
    head, sep, rest = message.partition(":")
    if sep and head in reverse:
        return f"--{reverse[head].replace('_', '-')}:{rest}"
    return message


def load_model_or_exit(source: str | None, *, device: str = "auto", dtype: str | None = None):
    """``ropekit.models.load_model`` with its errors turned into one-line CLI errors (exit 2)."""
    from ropekit.models import load_model

    try:
        return load_model(source or "demo", device=device, dtype=dtype)
    except (FileNotFoundError, ValueError) as exc:
        error_exit(str(exc))


def rope_config_or_exit(base_cfg: RopeConfig, method: str, factor: float | None, **options: Any) -> RopeConfig:
    """``build_rope_config`` with its errors turned into one-line CLI errors (exit 2)."""
    try:
        return build_rope_config(base_cfg, method, factor, **options)
    except (FileNotFoundError, ValueError) as exc:
        error_exit(str(exc))
