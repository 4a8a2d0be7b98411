"""Independent references for parity checks (the tests and ``scripts/parity_report.py``).

* transformers' own RoPE driven from a config.json dict: every rotation here is transformers' code (the
  model's own rotary class and apply function), never a re-implementation;
* ``exact_*``: RoPE evaluated with mpmath (install ``mpmath``; the ``test`` extra has it), independent of
  ropekit's code, for the error of both sides.
"""

from __future__ import annotations

import copy
import importlib
import logging
from dataclasses import dataclass

import torch


def hf_config(config: dict):
    """The transformers config object for a config.json dict (its own class, via AutoConfig)."""
    from transformers import AutoConfig

    d = copy.deepcopy(config)
    logging.getLogger("transformers").setLevel(logging.ERROR)  # yarn factor/implicit-factor notes
    return AutoConfig.for_model(d.pop("model_type"), **d)


def _modeling(model_type: str):
    name = model_type.replace("-", "_")
    try:
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")
    except ModuleNotFoundError:
        if not name.endswith("_text"):
            raise
        name = name[: -len("_text")]  # Gemma 3's text model lives in the gemma3 package
        return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


def hf_inv_freq_and_scale(hf_cfg, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """transformers' (inv_freq, attention_scaling) as its rotary module holds them after a call at ``seq_len``."""
    rot = hf_rotary_module(hf_cfg)
    if seq_len is not None:
        x = torch.zeros(1, dtype=torch.float32)
        rot(x, torch.tensor([[seq_len - 1]]))
    return rot.inv_freq.clone(), float(rot.attention_scaling)


def hf_rotary_module(hf_cfg):
    """The model's own ``<Model>RotaryEmbedding`` (GPT-J has none: see ``hf_rotate``)."""
    mod = _modeling(hf_cfg.model_type)
    cls = next(getattr(mod, n) for n in dir(mod) if n.endswith("RotaryEmbedding") and not n.startswith("_"))
    return cls(hf_cfg)


def hf_rotate(hf_cfg, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rot=None):
    """Rotate q, k (batch, heads, seq, head_dim) at ``positions`` (batch, seq) the way the model does.

    ``rot``: an existing rotary module (to keep transformers' dynamic state between calls).
    Returns (q_rotated, k_rotated) in (batch, heads, seq, head_dim).
    """
    mt = hf_cfg.model_type
    mod = _modeling(mt)
    if mt == "gptj":
        # GPTJAttention: a fixed sin/cos table over rotary_dim, gathered by position, interleaved pairs.
        rd = hf_cfg.rotary_dim
        table = mod.create_sinusoidal_positions(int(positions.max()) + 1, rd)
        sincos = table[positions]  # (batch, seq, rd)
        sin, cos = torch.split(sincos, rd // 2, dim=-1)
        out = []
        for t in (q, k):
            t = t.transpose(1, 2)  # GPT-J rotates (batch, seq, heads, head_dim)
            rot_part = mod.apply_rotary_pos_emb(t[..., :rd], sin, cos)
            out.append(torch.cat([rot_part, t[..., rd:]], dim=-1).transpose(1, 2))
        return out[0], out[1]
    rot = rot if rot is not None else hf_rotary_module(hf_cfg)
    if mt == "deepseek_v2":
        freqs_cis = rot(q, positions)
        return mod.apply_rotary_emb(q, k, freqs_cis)
    cos, sin = rot(q, positions)
    if mt == "deepseek_v3":
        # rope_interleave: pairs (2i, 2i+1) in, rotate-half order out (a fixed permutation of channels).
        return mod.apply_rotary_pos_emb_interleave(q, k, cos, sin)
    return mod.apply_rotary_pos_emb(q, k, cos, sin)


def deinterleave(x: torch.Tensor) -> torch.Tensor:
    """Channel order (0, 2, 4, ..., 1, 3, 5, ...): how DeepSeek-V3's interleave path hands back its outputs."""
    return torch.cat([x[..., 0::2], x[..., 1::2]], dim=-1)


def exact_inv_freq(base: float, rotary_dim: int, digits: int = 30) -> list:
    """RoPE's base^(-2i/d) as mpmath numbers at ``digits`` digits."""
    import mpmath

    mpmath.mp.dps = digits
    b = mpmath.mpf(base)
    return [b ** (-mpmath.mpf(2 * i) / rotary_dim) for i in range(rotary_dim // 2)]


def exact_llama3(cfg) -> list:
    """Llama 3.1's rule (reference.md) evaluated in mpmath, independent of ropekit's code."""
    import mpmath

    L, s = cfg.original_max_position, cfg.factor
    low, high = cfg.low_freq_factor or 1.0, cfg.high_freq_factor or 4.0
    out = []
    for inv in exact_inv_freq(cfg.base, cfg.rotary_dim):
        wavelength = 2 * mpmath.pi / inv
        if wavelength < L / high:
            out.append(inv)
        elif wavelength > L / low:
            out.append(inv / s)
        else:
            t = (L / wavelength - low) / (high - low)
            out.append((1 - t) * inv / s + t * inv)
    return out


def exact_yarn(cfg) -> tuple[list, object]:
    """YaRN (reference.md: floor/ceil ramp over pair index, beta_fast 32, beta_slow 1) in mpmath."""
    import mpmath

    d, b, L, s = cfg.rotary_dim, mpmath.mpf(cfg.base), cfg.original_max_position, mpmath.mpf(cfg.factor)

    def dim_for(beta):
        return d * mpmath.log(L / (2 * mpmath.pi * beta)) / (2 * mpmath.log(b))

    lo = max(int(mpmath.floor(dim_for(32))), 0)
    hi = min(int(mpmath.ceil(dim_for(1))), d - 1)
    out = []
    for i, inv in enumerate(exact_inv_freq(cfg.base, d)):
        ramp = min(max((mpmath.mpf(i) - lo) / (hi - lo), 0), 1)  # 0: keep speed, 1: interpolate
        out.append(inv / s * ramp + inv * (1 - ramp))
    return out, 0.1 * mpmath.log(s) + 1


def exact_rotate(x: torch.Tensor, positions, base: float, rotary_dim: int, layout: str = "neox",
                 digits: int = 30, inv_freq: list | None = None, scale: float = 1.0) -> torch.Tensor:
    """RoPE applied in float64 with angles and cos/sin from mpmath at ``digits`` digits.

    x: (seq, head_dim) (any float dtype, taken exactly into float64); positions: seq ints.
    inv_freq: mpmath inverse frequencies (default: base^(-2i/d), plain RoPE); scale multiplies cos and sin.
    Angles position * inv_freq_i are evaluated exactly enough that the only error left is the final float64
    rounding (~1e-16 relative).
    """
    import mpmath

    mpmath.mp.dps = digits
    half = rotary_dim // 2
    pos = [int(p) for p in positions]
    cos = torch.empty(len(pos), half, dtype=torch.float64)
    sin = torch.empty_like(cos)
    inv = inv_freq if inv_freq is not None else exact_inv_freq(base, rotary_dim, digits)
    m = mpmath.mpf(scale)
    for r, p in enumerate(pos):
        for i in range(half):
            a = p * inv[i]
            cos[r, i] = float(m * mpmath.cos(a))
            sin[r, i] = float(m * mpmath.sin(a))
    x = x.to(torch.float64)
    xr = x[..., :rotary_dim]
    if layout == "neox":
        x1, x2 = xr[..., :half], xr[..., half:]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    else:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2)
    return torch.cat([out, x[..., rotary_dim:]], dim=-1)


# ---------------------------------------------------------------------- every family of the installed transformers
TINY_SEQ = 24  # tokens per check (past the tiny trained length 16, for the scaled methods)
TINY_TRAINED = 16
TINY_MAX_PARAMETERS = 8_000_000
TINY_SIZES = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=128, max_position_embeddings=TINY_TRAINED, moe_intermediate_size=32, num_experts=4,
                  n_routed_experts=4, num_local_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                  shared_intermediate_size=32, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                  qk_nope_head_dim=8, v_head_dim=16, n_embd=64, n_head=4, n_positions=2 * TINY_SEQ, rotary_dim=8,
                  n_inner=128, d_model=64, ffn_hidden_size=128, topk_group=1, n_group=1, first_k_dense_replace=1,
                  pad_token_id=0, bos_token_id=1, eos_token_id=2, sliding_window=8, attention_chunk_size=8,
                  tie_word_embeddings=False, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16,
                  global_head_dim=32)


@dataclass
class FamilyResult:
    """One family's outcome: ``status`` "supported", "refused" (apply_rope said why), "wrong" (patched without
    error but the logits differ: a bug), or "not built" (no tiny model could be made here); ``detail`` says more;
    ``text_type`` the text model's type when the family is a multimodal wrapper; ``scaled`` the scaled check."""

    model_type: str
    status: str
    detail: str = ""
    text_type: str | None = None
    scaled: str = ""
    layout: str = ""
    layers: str = ""


def tiny_family_config(model_type: str):
    """A transformers config of ``model_type`` (or its text model) with tiny sizes: (config, text model_type)."""
    from transformers import AutoConfig

    logging.getLogger("transformers").setLevel(logging.ERROR)
    base = AutoConfig.for_model(model_type)
    text_type = None
    text = getattr(base, "text_config", None)
    if text is not None and getattr(text, "model_type", None) and text.model_type != model_type:
        text_type = text.model_type
        base = AutoConfig.for_model(text_type)
    d = base.to_dict()
    kwargs = {k: v for k, v in TINY_SIZES.items() if k in d}
    if "qk_rope_head_dim" in d:
        kwargs.pop("head_dim", None)  # MLA: the head sizes come from the q/k/v parts
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", 4)  # MLA expands k to every head
    if "no_rope_layer_interval" in d or "no_rope_layers" in d:
        kwargs["no_rope_layer_interval"] = 2
        kwargs["no_rope_layers"] = [1, 0]  # SmolLM3 / Llama 4: one NoPE layer among the two
    n_old = d.get("num_hidden_layers") or d.get("n_layer") or 2
    layer_types = d.get("layer_types")
    if layer_types:
        # One layer of each type, in the order they first appear (hybrids keep an attention layer).
        keep = [layer_types.index(t) for t in dict.fromkeys(layer_types)]
        if len(keep) == 1:
            keep = [0, 1] if n_old > 1 else [0]
    elif d.get("block_types"):
        keep = list(range(len(d["block_types"])))  # RecurrentGemma: one period of its block pattern
    else:
        keep = [0, 1] if n_old > 1 else [0]
    if d.get("num_dense_layers"):
        kwargs["num_dense_layers"] = 1
    for key, value in d.items():
        if isinstance(value, list) and len(value) == n_old and key not in kwargs and n_old > 2:
            kwargs[key] = [value[i] for i in keep]
    if "attn_layer_indices" in d:  # Bamba: which layers are attention (the others Mamba)
        kwargs["attn_layer_indices"] = [len(keep) - 1]
    kwargs["num_hidden_layers" if "num_hidden_layers" in d else "n_layer"] = len(keep)
    if kwargs.get("no_rope_layers") and len(kwargs["no_rope_layers"]) != len(keep):
        kwargs["no_rope_layers"] = ([1, 0] * len(keep))[:len(keep)]
    config = AutoConfig.for_model(text_type or model_type, **kwargs)
    config._attn_implementation = "eager"
    return config, text_type


def _tiny_model(config, seed: int = 0):
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        shell = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    size = sum(p.numel() for p in shell.parameters())
    if size > TINY_MAX_PARAMETERS:
        raise ValueError(f"the tiny config still has {size} parameters")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model.eval()


def _scaled_rope_parameters(config, method: str):
    """``config``'s rope_parameters with ``method`` x2 on the layer types a ropekit extend changes."""
    from ropekit.layered import LayeredRope

    params = copy.deepcopy(dict(config.rope_parameters))
    layered = LayeredRope.from_hf(config)
    pairs = layered[layered.default_extend_types()[0]].rotary_dim // 2
    scaling = {"linear": {"rope_type": "linear", "factor": 2.0},
               "yarn": {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": TINY_TRAINED},
               "longrope": {"rope_type": "longrope", "factor": 2.0, "original_max_position_embeddings": TINY_TRAINED,
                            "short_factor": [1.0 + 0.05 * i for i in range(pairs)],
                            "long_factor": [1.0 + 0.5 * i for i in range(pairs)]}}[method]
    if layered.per_type:
        for key in layered.default_extend_types():
            if params[key].get("rope_type") == "proportional":
                params[key] = {**params[key], "factor": 2.0}  # Gemma 4: its own method scales by a factor
            else:
                params[key] = {**params[key], **scaling}
    else:
        params.update(scaling)
    return params


def survey_family(model_type: str, *, seq: int = TINY_SEQ, atol: float = 1e-4) -> FamilyResult:
    """Build a tiny ``model_type`` model and check ropekit's patch on it (see ``FamilyResult``)."""
    from ropekit.layered import LayeredRope
    from ropekit.hf.patch import apply_rope

    try:
        config, text_type = tiny_family_config(model_type)
        model = _tiny_model(config)
        ids = torch.randint(3, config.vocab_size, (1, seq), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            reference = model(ids).logits
    except Exception as exc:  # noqa: BLE001 - any failure to build is reported, not raised
        return FamilyResult(model_type, "not built", _one_line(exc))
    result = FamilyResult(model_type, "supported", text_type=text_type)
    try:
        layered = LayeredRope.from_hf(model.config)
        result.layout = ", ".join(sorted({c.layout for _, c in layered.ropes}))
        result.layers = _layers_text(layered)
        patch = apply_rope(model, layered)
    except ValueError as exc:
        return FamilyResult(model_type, "refused", _one_line(exc), text_type)
    try:
        with patch, torch.no_grad():
            patched = model(ids).logits
    except ValueError as exc:  # refused at the first forward (a layer that did not rotate through ropekit)
        return FamilyResult(model_type, "refused", _one_line(exc), text_type)
    except Exception as exc:  # noqa: BLE001 - the patched model broke: a bug, reported as such
        return FamilyResult(model_type, "wrong", f"the patched model fails: {_one_line(exc)}", text_type)
    error = float((patched - reference).abs().max())
    if not error <= atol:
        result.status, result.detail = "wrong", f"default patch differs from the model by {error:.3g}"
        return result
    refusals = []
    for method in ("yarn", "linear", "longrope"):
        try:
            scaled_config = copy.deepcopy(model.config)
            scaled_config.rope_parameters = _scaled_rope_parameters(model.config, method)
            scaled_config.max_position_embeddings = 2 * TINY_TRAINED
            scaled = _tiny_model(scaled_config)
            scaled.load_state_dict(model.state_dict())
            with torch.no_grad():
                want = scaled(ids).logits
        except Exception as exc:  # noqa: BLE001 - transformers refuses this scaling for the family
            refusals.append(method)
            result.scaled = f"not checked: transformers refuses {', '.join(refusals)} here ({_one_line(exc)[:80]})"
            continue
        try:
            cfg = LayeredRope.from_hf(scaled.config)
            with apply_rope(model, cfg), torch.no_grad():
                got = model(ids).logits
        except ValueError as exc:
            result.status, result.detail = "refused", f"{method} x2: {_one_line(exc)}"
            return result
        error = float((got - want).abs().max())
        moved = float((want - reference).abs().max())
        if not error <= atol:
            result.status, result.detail = "wrong", f"{method} x2 differs from transformers' by {error:.3g}"
            return result
        result.scaled = f"{method} x2 = transformers' (logits moved {moved:.2g})"
        break
    return result


def _layers_text(layered) -> str:
    parts = [f"{key}: {len(layered.layers_of(key)) if layered.layers else 'all'}" for key in layered.types]
    if layered.nope_layers:
        parts.append(f"NoPE: {len(layered.nope_layers)}")
    return "; ".join(parts)


def _one_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}" if not isinstance(exc, ValueError) else str(exc)
    return " ".join(text.split())[:300]


def family_table(results: list[FamilyResult]) -> str:
    """The results as a markdown table (docs/families.md)."""
    import transformers

    intro = ("Every causal-LM family of the installed transformers whose model has a rotary module, as "
             "`tests/test_hf_every_family_patched_or_refused.py` finds it on a tiny model: *supported* means "
             "ropekit's `default` patch gives the model's own logits and a scaled RoPE gives transformers' own `rope_type`'s; *refused* "
             "means `apply_rope` raises with the reason shown; *not built* means no tiny model of it could be made "
             "here (not checked). Written by `scripts/family_table.py`.")
    lines = [f"# Model families (transformers {transformers.__version__})", "", intro, "",
             "| family | status | layout | layers | checked / reason |", "|---|---|---|---|---|"]
    for r in results:
        name = r.model_type + (f" (text: {r.text_type})" if r.text_type else "")
        detail = (r.scaled if r.status == "supported" else r.detail).replace("|", "\\|")
        lines.append(f"| {name} | {r.status} | {r.layout} | {r.layers} | {detail} |")
    counts = {s: sum(r.status == s for r in results) for s in ("supported", "refused", "not built", "wrong")}
    lines += ["", ", ".join(f"{n} {s}" for s, n in counts.items()) + f" of {len(results)} families.", ""]
    return "\n".join(lines)
