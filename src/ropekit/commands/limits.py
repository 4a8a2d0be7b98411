"""A run's size, checked before any weights load: enough text for the lengths asked, and memory to hold them.

A length the data cannot supply, or that no forward pass on this machine can hold, is refused in one line with
the tokens needed and what there is, from the files' sizes, the model's config and the tokenizer alone (the
tokenizer loads only where the sizes do not settle it: ``ropekit.evaluation.data.check_supply``).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Any, Callable

from ropekit.commands.common import error_exit, fail_on
from ropekit.evaluation.data import DEFAULT_CORPUS

# Bytes a forward pass holds per token at the least: two activations of the model's width (the residual stream
# and the normalised input of a layer) and the int64 token id. A run that needs more than the machine has is
# refused; nothing else is estimated (the real need is larger).
ACTIVATIONS_PER_TOKEN = 2
ID_BYTES = 8


def _model_path(source: str | Path | None) -> Path:
    from ropekit.hf.load import demo_model_path

    if source is None or str(source) == "demo":
        return demo_model_path()
    path = Path(str(source)).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
    return path


def load_tokenizer(source: str | Path | None) -> Any | None:
    """The tokenizer of the model ``source`` (a folder, a .gguf file, a hub id, 'demo'), without its weights;
    None where it cannot be loaded (``load_model`` reports that, later)."""
    try:
        from transformers import AutoTokenizer

        from ropekit.hf.load import GGUF_LOGGERS, GGUF_PHRASES, dropping

        path = _model_path(source)
        if path.suffix == ".json" and path.is_file():  # a config.json given as the model: its folder
            path = path.parent
        if path.suffix == ".gguf":
            with dropping(GGUF_LOGGERS, GGUF_PHRASES):
                tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        else:
            tokenizer = AutoTokenizer.from_pretrained(str(path) if path.exists() else str(source))
    except Exception:  # noqa: BLE001 - a check that cannot run is no reason to stop; the load says what is wrong
        return None
    flags = getattr(tokenizer, "deprecation_warnings", None)
    if isinstance(flags, dict):  # ropekit tokenizes past model_max_length on purpose
        flags["sequence-length-is-longer-than-the-specified-maximum"] = True
    return tokenizer


def lazy_tokenizer(source: str | Path | None) -> Callable[[], Any | None]:
    """A function that loads ``source``'s tokenizer on its first call (and returns the same one after)."""
    return functools.lru_cache(maxsize=1)(lambda: load_tokenizer(source))


def hidden_size(source: str | Path | None) -> int | None:
    """The model's width (hidden size) from its config or GGUF metadata, or None where neither says it."""
    try:
        path = _model_path(source)
        if path.suffix == ".gguf":
            from ropekit.config import read_gguf_metadata

            meta = read_gguf_metadata(path)
            value = meta.get(f"{meta.get('general.architecture')}.embedding_length")
        else:
            from ropekit.hf.load import read_model_config

            if not path.exists():  # a hub id: its config as cached by the lookup before, never a new request
                from huggingface_hub import try_to_load_from_cache

                cached = try_to_load_from_cache(str(source), "config.json")
                if not isinstance(cached, str):
                    return None
                path = Path(cached)
            config = read_model_config(path)
            text = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
            value = next((d[k] for d in (config, text) for k in ("hidden_size", "n_embd", "d_model")
                          if isinstance(d.get(k), int)), None)
    except Exception:  # noqa: BLE001 - unknown width: the memory check is skipped
        return None
    return int(value) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def machine_memory(device: str | None) -> tuple[int, str] | None:
    """(bytes, which memory) that ``device`` offers: the GPU's memory for cuda, the RAM for cpu; None if unknown."""
    try:
        import torch

        from ropekit.hf import resolve_device

        dev = resolve_device(device or "auto")
        if dev.type == "cuda":
            index = dev.index if dev.index is not None else torch.cuda.current_device()
            return int(torch.cuda.get_device_properties(index).total_memory), f"GPU ({dev})"
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "RAM"
    except Exception:  # noqa: BLE001
        return None


def _size(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


def qa_tokens_bound(needles: int, style: str | None = None) -> int:
    """An upper bound on ``ropekit.evaluation.haystack.qa_tokens(tokenizer, needles, style)`` without a tokenizer:
    a question's UTF-8 bytes (+ ``TOKEN_MARGIN``) bound its tokens."""
    from ropekit.evaluation.data import TOKEN_MARGIN
    from ropekit.evaluation.haystack import ANSWER_BOUND, DEFAULT_STYLE, STYLES

    template = STYLES[style or DEFAULT_STYLE]
    longest = max(len(template.question.format(label=label).encode("utf-8")) for label in template.labels)
    return needles * (longest + TOKEN_MARGIN + ANSWER_BOUND)


def check_memory_or_exit(source: str | Path | None, length: int, option: str, *, device: str | None,
                         dtype: str | None) -> None:
    """Refuse (one line naming ``option``, exit 2) a forward of ``length`` tokens that cannot fit the machine:
    even its least need (``ACTIVATIONS_PER_TOKEN`` activations of the model's width per token) exceeds the memory
    of the device."""
    width = hidden_size(source)
    memory = machine_memory(device)
    if not width or memory is None:
        return
    try:
        from ropekit.hf import resolve_device, resolve_dtype

        torch_dtype = resolve_dtype(dtype, resolve_device(device or "auto"))
    except Exception:  # noqa: BLE001 - a bad --dtype is reported by its own check
        return
    per_token = ACTIVATIONS_PER_TOKEN * width * torch_dtype.itemsize + ID_BYTES
    total, where = memory
    if length * per_token > total:
        name = str(torch_dtype).replace("torch.", "")
        error_exit(f"{option}: {length} tokens need at least {_size(length * per_token)} of memory "
                   f"({ACTIVATIONS_PER_TOKEN} activations of width {width} in {name} per token, the least a forward "
                   f"pass holds); this machine's {where} has {_size(total)}: at most {total // per_token} tokens")


def check_text_or_exit(source: str | Path | None, data: str | Path | None, length: int, *, length_option: str,
                       data_option: str = "--data", count: int = 1, joined: bool = False,
                       exact_length: Callable[[Any], int] | None = None,
                       tokenizer: Callable[[], Any] | None = None) -> None:
    """Refuse (one line, exit 2) a text that cannot give ``length`` tokens: ``count`` documents that long, or
    (``joined``) that many tokens of the documents joined; see ``ropekit.evaluation.data.check_supply``. The error
    names ``data_option`` when the user gave the text, ``length_option`` otherwise."""
    from ropekit.evaluation.data import check_supply

    given = data is not None and str(data) != DEFAULT_CORPUS
    try:
        check_supply(data, length, count=count, joined=joined, exact_length=exact_length,
                     tokenizer=tokenizer if tokenizer is not None else lazy_tokenizer(source))
    except (FileNotFoundError, ValueError) as exc:
        message = str(exc)
        if not given and message.startswith("data:"):
            message = message.replace("the text is", f"the text ({DEFAULT_CORPUS}, the default {data_option}) is", 1)
        fail_on(data_option if given else length_option, message)
