"""Loading a causal LM for ropekit: ``load_model`` (a hub id, a folder, a ``.gguf`` file or ``"demo"``),
device and dtype choice. The file-system checks that run first (``check_model_source``) are
``ropekit.hf.checks``'s, re-exported here.

``load_model`` returns a ``LoadedModel`` with the model's RoPE as trained (``RopeConfig`` from its config, or
from the GGUF metadata for a ``.gguf``). GGUF weights are dequantized to ``dtype`` by transformers.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ropekit.config import RopeConfig, warn_once
from ropekit.layered import LayeredRope
from ropekit.hf.checks import (  # noqa: F401  (re-exported: ropekit.hf.load's names before the split)
    DEMO_MODEL,
    DEMO_PACKAGE,
    TOKENIZER_FILES,
    TOKENIZER_PATTERNS,
    WEIGHT_INDEXES,
    WEIGHT_PATTERNS,
    _first_line,
    _looks_like_path,
    check_model_source,
    demo_model_path,
)
from ropekit.hf.families import check_family, check_rope_matches

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which source and why."""


@dataclass
class LoadedModel:
    """A causal LM ready to evaluate.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode, on ``device``.
        tokenizer: its tokenizer.
        rope: the model's RoPE as trained: a ``RopeConfig``, or a ``LayeredRope`` for a model with one RoPE per
            layer type or layers without RoPE.
        family: ``model.config.model_type`` (one of ``SUPPORTED_FAMILIES``).
        source: what was asked for (hub id, folder or .gguf path, or "demo").
        device: where the weights live.
        dtype: the weights' dtype.
    """

    model: Any
    tokenizer: Any
    rope: RopeConfig | LayeredRope
    family: str
    source: str
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> cuda when available, else cpu; "cuda" without a GPU is an error."""
    if isinstance(device, torch.device):
        return device
    if device not in DEVICES and not str(device).startswith("cuda:"):
        raise ValueError(f"device: {device!r} not accepted; accepted: {', '.join(DEVICES)}")
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' asked for but torch sees no CUDA GPU (use --device cpu or auto)")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """None -> bfloat16 on a GPU, float32 on the CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise ValueError(f"dtype: {dtype} not accepted; accepted: {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} not accepted; accepted: {', '.join(DTYPES)}")
    return DTYPES[dtype]


def read_model_config(source: str | Path, gguf_file: str | None = None) -> dict[str, Any]:
    """The config dict of a model without loading weights (folder, config.json, .gguf or hub id)."""
    path = Path(str(source)).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and gguf_file is None:
        path = path / "config.json"
    if path.is_file() and path.suffix == ".json":
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(config, dict):
            raise ValueError(f"{path}: expected a JSON object (a model's config.json)")
        return config
    from transformers import AutoConfig

    folder, name = _split_gguf(path, gguf_file) if (path.suffix == ".gguf" or gguf_file) else (str(source), None)
    kwargs = {"gguf_file": name} if name else {}
    return AutoConfig.from_pretrained(folder, **kwargs).to_dict()


def _split_gguf(path: Path, gguf_file: str | None) -> tuple[str, str]:
    if gguf_file is not None:
        return str(path), gguf_file
    return str(path.parent), path.name


# GGUF architectures without rotary embeddings (learned or ALiBi positions).
GGUF_NO_ROPE_ARCHS = {"gpt2", "bloom", "mpt", "starcoder", "refact", "bert", "nomic-bert", "jina-bert-v2", "t5",
                      "t5encoder", "mamba", "rwkv6", "jais"}
# Config keys that show a model has RoPE, for families ropekit cannot patch but can still inspect.
ROPE_CONFIG_KEYS = ("rope_theta", "rope_parameters", "rope_scaling", "rotary_pct", "rotary_dim", "rotary_emb_base",
                    "partial_rotary_factor")


def rope_from_source(source: str | Path | None) -> tuple[RopeConfig, str]:
    """(RopeConfig, display name) of a model source, from its config or GGUF file only (no weights).

    ``source``: None or "demo" (the bundled SmolLM2), a ``config.json``, a folder holding one (or a single
    .gguf), a ``.gguf`` file (its RoPE metadata and factor tensors, ``RopeConfig.from_gguf``), or a hub id.
    Raises FileNotFoundError / ValueError with a one-line message naming the source.
    """
    from ropekit.config import read_gguf_metadata
    from ropekit.hf.families import NO_ROPE_FAMILIES, SUPPORTED_FAMILIES, unsupported_family_message

    if source is None or str(source) == "demo":
        return RopeConfig.from_gguf(demo_model_path()), "SmolLM2-135M-Instruct (demo)"
    path = Path(str(source)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) != 1:
            raise FileNotFoundError(f"model folder {source} has no config.json"
                                    + (f" and {len(ggufs)} .gguf files (name one)" if ggufs else ""))
        path = ggufs[0]
    if path.suffix == ".gguf":
        if not path.is_file():
            raise FileNotFoundError(f"model not found: {source} (no such file)")
        try:
            meta = read_gguf_metadata(path)
        except FileNotFoundError:
            raise
        except Exception as exc:  # noqa: BLE001 - gguf raises ValueError, struct.error... on a damaged file
            raise ValueError(f"model {source}: not a readable GGUF file ({_first_line(exc)})") from None
        arch = meta.get("general.architecture")
        if arch in GGUF_NO_ROPE_ARCHS:
            raise ValueError(f"model architecture {arch!r} has no rotary position embeddings (RoPE)")
        return RopeConfig.from_gguf(path), meta.get("general.name") or path.stem
    if not path.exists() and _looks_like_path(str(source)):
        raise FileNotFoundError(f"model not found: {source} (no such file or folder)")
    try:
        config = read_model_config(path if path.exists() else source)
    except OSError as exc:
        raise FileNotFoundError(f"model not found: {source!r} is not a local file or folder, and its config "
                                f"could not be fetched from the Hugging Face hub ({_first_line(exc)})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{source}: expected a JSON object (a model's config.json)")
    model_type = config.get("model_type")
    if model_type in NO_ROPE_FAMILIES or (model_type not in SUPPORTED_FAMILIES
                                          and not any(k in config for k in ROPE_CONFIG_KEYS)):
        raise ValueError(unsupported_family_message(model_type))
    if path.suffix == ".json":
        fallback = path.parent.resolve().name if path.name == "config.json" else path.stem
    else:
        fallback = path.name
    name = config.get("_name_or_path") or fallback or str(source)
    where = path / "config.json" if path.is_dir() else path if path.exists() else f"{source} (config.json)"
    try:
        rope = RopeConfig.from_hf(config)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    except (TypeError, ArithmeticError) as exc:  # a value of the wrong kind the field checks do not cover
        raise ValueError(f"{where}: cannot read its RoPE ({type(exc).__name__}: {_first_line(exc)})") from None
    return rope, f"{name} ({model_type})" if model_type else name


class DropRecords(logging.Filter):
    """Drops log records whose message contains any of ``phrases`` (attached to named loggers only)."""

    def __init__(self, phrases: tuple[str, ...]) -> None:
        super().__init__()
        self.phrases = phrases

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record that cannot format is not ours to judge
            return True
        return not any(phrase in message for phrase in self.phrases)


# transformers' GGUF loader notes about (de)quantization: ropekit loads GGUF models dequantized to float on
# purpose (that is what it measures and exports), so "the weights stay quantized" / "Dequantizing the whole
# model" only alarm. Dropped from these loggers, only while load_model runs.
GGUF_LOGGERS = ("transformers.quantizers.quantizer_gguf", "transformers.modeling_gguf_pytorch_utils",
                 "transformers.integrations.ggml", "transformers.integrations.gguf.utils",
                 "transformers.integrations.gguf.kernels", "transformers.modeling_utils")
GGUF_PHRASES = ("stay quantized", "Dequantizing the whole model", "weights stay packed",
                 "its weights packed is fastest")


@contextlib.contextmanager
def dropping(loggers: tuple[str, ...], phrases: tuple[str, ...]) -> Iterator[None]:
    """Drop records containing any of ``phrases`` from ``loggers`` while the block runs."""
    flt = DropRecords(phrases)
    targets = [logging.getLogger(name) for name in loggers]
    for logger in targets:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in targets:
            logger.removeFilter(flt)


def _quiet_length_warning(tokenizer: Any) -> None:
    """ropekit tokenizes texts past model_max_length on purpose (it measures there and windows the ids itself):
    mark the tokenizer's one-time "Token indices sequence length is longer..." warning as already given.
    Only this tokenizer object is affected; model_max_length (saved with an export) is left as it was."""
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True


def load_model(
    source: str | Path,
    *,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype | None = None,
    gguf_file: str | None = None,
    check_files: bool = True,
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        source: a hub id ("org/name"), a local folder (config.json + safetensors + tokenizer), a path to a
            ``.gguf`` file, or "demo" for the bundled SmolLM2-135M.
        device: "auto" (cuda when available), "cpu" or "cuda".
        dtype: None (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16" or "float16".
        gguf_file: the file name inside ``source`` (a folder or hub repo) when loading a GGUF that way.
        check_files: run ``check_model_source`` first (False: the caller just did, as the CLI's pre-flight does).
    Raises:
        FileNotFoundError: a local path, config.json, weights or tokenizer that does not exist (or a hub id that
            cannot be found).
        ValueError: a model family without RoPE or not supported, bad device/dtype, an unreadable or corrupt
            file (see ``check_model_source``, which runs first).

    The tokenizer's "sequence length is longer than the specified maximum" warning is marked as given (ropekit
    goes past the trained length on purpose); GGUF sources load without transformers' notes about quantized
    weights (ropekit always dequantizes them to ``dtype``).

    A GGUF's ``rope`` is read as llama.cpp runs the file (``RopeConfig.from_gguf``: scaling keys, ``rope_freqs``,
    ``rope_factors_long/short``). transformers' GGUF loader reads only the base of most architectures, so the
    bare model rotates plainly; ropekit's evaluations apply ``rope`` themselves, and a UserWarning says so when
    the two differ.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    label = str(source)
    if str(source) == "demo":
        source = demo_model_path()
    if check_files:
        check_model_source(source, gguf_file)
    path = Path(str(source)).expanduser()
    is_local = path.exists()

    is_gguf = gguf_file is not None or path.suffix == ".gguf"
    folder, name = _split_gguf(path, gguf_file) if is_gguf else (str(path) if is_local else str(source), None)
    kwargs: dict[str, Any] = {"gguf_file": name} if name else {}
    try:
        config = read_model_config(source, gguf_file)
    except OSError as exc:  # hub lookups without a local path end here
        raise FileNotFoundError(
            f"model not found: {source!r} is not a local file or folder, and loading it from the Hugging Face "
            f"hub failed ({_first_line(exc)})"
        ) from None
    family = check_family(config.get("model_type"))

    def quiet() -> contextlib.AbstractContextManager:
        return dropping(GGUF_LOGGERS, GGUF_PHRASES) if is_gguf else contextlib.nullcontext()

    # The tokenizer first: it is quick, so a bad one is reported before the weights load.
    try:
        with quiet():
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:
        # tokenizers raises plain Exception on a damaged tokenizer.json; json a ValueError.
        if not (isinstance(exc, (OSError, ValueError, TypeError, KeyError)) or type(exc) is Exception):
            raise
        where = path / "tokenizer.json" if path.is_dir() and (path / "tokenizer.json").is_file() else label
        raise ValueError(f"model: could not load the tokenizer of {label} ({where}: {_first_line(exc)})") from None
    try:
        with quiet():
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
    except Exception as exc:
        # What the file checks cannot see (a damaged .bin, a hub download failing): one line, not a traceback.
        # Only errors about reading the files: OSError and the file-format errors of safetensors / pickle, and
        # weights whose shapes are not the config's (transformers' RuntimeError after its load report).
        mismatch = isinstance(exc, RuntimeError) and ("size mismatch" in str(exc)
                                                      or "ignore_mismatched_sizes" in str(exc))
        if not (mismatch or isinstance(exc, OSError)
                or type(exc).__name__ in ("SafetensorError", "UnpicklingError")):
            raise
        if mismatch:
            raise ValueError(f"model: the weights of {label} do not match its config.json (tensor shapes differ; "
                             f"weights of another model, or a config.json changed after they were saved)") from None
        raise ValueError(f"model: could not load {label} ({_first_line(exc)})") from None
    _quiet_length_warning(tokenizer)
    model.to(device=dev, dtype=torch_dtype)
    model.eval()
    if is_gguf:
        gguf_path = Path(folder) / name
        rope = RopeConfig.from_gguf(gguf_path) if gguf_path.is_file() else RopeConfig.from_hf(model.config)
        if rope.is_scaled and not RopeConfig.from_hf(model.config).is_scaled:
            warn_once(f"{label}: the GGUF file's RoPE is {rope.method!r} scaling, which transformers' GGUF loader "
                      f"does not read: the bare model rotates plainly; ropekit applies LoadedModel.rope itself "
                      f"(apply_rope(model, loaded.rope) does it for your own code)")
    else:
        # One RoPE for most models; Gemma 2/3/4-style models have one per layer type (and NoPE layers).
        layered = LayeredRope.from_hf(model.config)
        rope = layered.single if layered.single is not None else layered  # NoPE layers: the patch skips them
    check_rope_matches(model, rope)
    return LoadedModel(model=model, tokenizer=tokenizer, rope=rope, family=family, source=label, device=dev,
                       dtype=torch_dtype)
