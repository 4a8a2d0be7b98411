"""Export: ``hf_config_for`` writes a RopeConfig the way transformers reads it back; ``export_model`` writes a
checkpoint plain ``transformers`` loads with the extension applied (no ropekit needed to run it)."""

from __future__ import annotations

import contextlib
import copy
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ropekit.config import RopeConfig
from ropekit.layered import LayeredRope
from ropekit.hf.families import check_family
from ropekit.hf.load import LoadedModel, resolve_dtype
from ropekit.output import OutputDir


def hf_config_for(model_config: Any, cfg: RopeConfig | LayeredRope) -> dict[str, Any]:
    """The model's config dict with ``cfg`` written the way transformers reads it back.

    A ``LayeredRope`` with one RoPE per layer type (Gemma 3/4) is written as ``rope_parameters`` {type: params}
    (Gemma 3's older top-level ``rope_scaling`` / ``rope_local_base_freq`` removed, so that nothing overrides it);
    one whose layers share a RoPE as that RoPE. A multimodal config gets it in its ``text_config``.

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
    text = d.get("text_config")
    if isinstance(text, dict) and not any(d.get(k) is not None for k in ("rope_parameters", "rope_scaling",
                                                                          "rope_theta", "hidden_size")):
        inner = hf_config_for({**text, "model_type": text.get("model_type") or d.get("model_type")}, cfg)
        d["text_config"] = inner
        return d
    if isinstance(cfg, LayeredRope):
        current_layers = LayeredRope.from_hf(d)
        if set(cfg.types) != set(current_layers.types):
            raise ValueError(f"cfg: layer types {', '.join(cfg.types)} differ from the config's "
                             f"{', '.join(current_layers.types)}")
        if not current_layers.per_type:
            if cfg.single is None:
                raise ValueError("cfg: several RoPEs, but this model has one RoPE for all layers")
            cfg = cfg.single
        else:
            return _per_type_config(d, current_layers, cfg)
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
    params = dict(hf["rope_parameters"])  # with the keys transformers requires (MethodSpec.hf_defaults)
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


def _per_type_config(d: dict[str, Any], current: LayeredRope, cfg: LayeredRope) -> dict[str, Any]:
    """``d`` with one rope_parameters per layer type (the form transformers >= 5 reads for Gemma 3/4)."""
    for key in cfg.types:
        for name in ("head_dim", "rotary_dim", "layout"):
            if getattr(current[key], name) != getattr(cfg[key], name):
                raise ValueError(f"cfg.{name}: the model's {key} layers have {name}="
                                 f"{getattr(current[key], name)!r}, the RopeConfig says {getattr(cfg[key], name)!r}")
    hf = cfg.to_hf()
    params = {k: v for k, v in (d.get("rope_parameters") or {}).items() if k not in cfg.types}
    for key in cfg.types:
        params[key] = dict(hf["rope_parameters"][key])  # with the keys transformers requires (hf_defaults)
    d["rope_parameters"] = params
    d["rope_scaling"] = None  # Gemma 3 would apply an old rope_scaling over the full layers' parameters
    d.pop("rope_local_base_freq", None)
    d.pop("rope_theta", None)
    if hf.get("max_position_embeddings") is not None:
        d["max_position_embeddings"] = max(int(hf["max_position_embeddings"]), int(d.get("max_position_embeddings") or 0))
    return d

# The files every export writes: each must be free or an earlier export's before the model is saved (the commit
# checks every other file it writes, before moving any).
EXPORT_NAMES = ("config.json", "model.safetensors", "ropekit.json")


def export_model(
    loaded_or_model: LoadedModel | nn.Module,
    cfg: RopeConfig | LayeredRope,
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
    if not isinstance(cfg, (RopeConfig, LayeredRope)):
        raise ValueError(f"cfg: expected a RopeConfig or LayeredRope, got {type(cfg).__name__}")
    hf_config_for(model.config, cfg)  # fail before writing anything
    target_dtype = None if dtype is None else resolve_dtype(dtype, torch.device("cpu"))
    source = getattr(loaded_or_model, "source", None) or getattr(model, "name_or_path", None)
    source = source if source and Path(str(source)).expanduser().is_dir() else None
    with OutputDir(out_dir, command="export", option="out_dir", overwrite=overwrite, names=EXPORT_NAMES,
                   source=source) as out:
        tmp = out.root
        save_model = model
        if target_dtype is not None and next(model.parameters()).dtype != target_dtype:
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

