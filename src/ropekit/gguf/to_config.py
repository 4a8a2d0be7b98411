"""GGUF -> ``RopeConfig`` fields: which method (default, linear, yarn, llama3, longrope) rotates as llama.cpp
does with a file's hyper-parameters (``read_rope``, ``rope_fields``; ``RopeConfig.from_gguf`` builds the config).
Never imports ``ropekit.config``: it returns keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ropekit.gguf.read import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_KEYS,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    LlamaCppRope,
    _key,
    _source,
    llama_cpp_hparams,
)
from ropekit.methods import get_method, method_names
from ropekit.methods._common import yarn_mscale
from ropekit.methods.longrope import default_attention_scale
from ropekit.warn import warn_once

LAYER_TYPES = ("full_attention", "sliding_attention")
# llama.cpp's LLAMA_ROPE_TYPE_NORM architectures: q/k weights stored for interleaved pairs.
GGUF_INTERLEAVED_ARCHS = {"llama", "llama4", "baichuan", "deci", "mistral", "granite", "granitemoe", "minicpm",
                          "xverse", "command-r", "cohere2", "olmo", "arctic", "deepseek", "deepseek2", "plm",
                          "bitnet", "t5", "jais", "nemotron", "exaone", "chameleon", "solar"}

_REL_TOL = 1e-6  # float32 metadata: values equal within this are the same


# ---------------------------------------------------------------------- GGUF -> RopeConfig fields
@dataclass(frozen=True)
class GGUFRope:
    """A GGUF file's RoPE, as ``RopeConfig`` keyword arguments (``RopeConfig(**rope.full)``; no ``layout``, which
    ``RopeConfig.from_gguf`` sets).

    Attributes:
        arch: ``general.architecture``.
        full: the RoPE of the full-attention layers (all layers when ``sliding`` is None).
        sliding: the sliding-window layers' RoPE where it differs from ``full``, else None.
        sections: M-RoPE's ``rope.dimension_sections`` (pairs per t/h/w/extra section), else None.
    """

    arch: str
    full: dict[str, Any]
    sliding: dict[str, Any] | None = None
    sections: tuple[int, ...] | None = None

    def per_layer_type(self) -> dict[str, dict[str, Any]]:
        """``{"full_attention": ..., ["sliding_attention": ...]}``, the names transformers' ``layer_types`` use."""
        out = {"full_attention": self.full}
        if self.sliding is not None:
            out["sliding_attention"] = self.sliding
        return out


def _close(a: float, b: float, rel: float = _REL_TOL) -> bool:
    return abs(a - b) <= rel * max(abs(a), abs(b), 1e-300)


def read_rope(source: Any) -> GGUFRope:
    """The RoPE of a GGUF file (path, ``GGUFFile`` or metadata mapping) as llama.cpp runs it.

    Raises ValueError naming the key at fault, for what ropekit cannot express too (a fractional
    ``yarn_ext_factor``, per-pair divisors combined with YaRN, one base per layer). Unknown ``<arch>.rope.``
    keys warn once.
    """
    src = _source(source)
    meta = src.metadata
    arch = meta.get("general.architecture")
    if not arch:
        raise ValueError("general.architecture: missing from the GGUF metadata")
    known = set(ROPE_KEYS)
    for k in meta:
        if k.startswith(f"{arch}.rope.") and k[len(arch) + 6:] not in known:
            warn_once(f"gguf: unknown key {k!r} ignored")
    if _key(meta, arch, "rope.freq_base_per_layer") is not None:
        raise ValueError(f"{arch}.rope.freq_base_per_layer: one base per layer is not supported by ropekit")
    full = _to_fields(llama_cpp_hparams(src))
    sliding = None
    if meta.get(f"{arch}.attention.sliding_window"):
        swa = _to_fields(llama_cpp_hparams(src, swa=True))
        if swa != full:
            sliding = swa
    sections = _key(meta, arch, "rope.dimension_sections")
    if sections is not None:
        sections = tuple(int(s) for s in sections)
        if sum(sections) > full["rotary_dim"] // 2:
            raise ValueError(f"{arch}.rope.dimension_sections: {list(sections)} add up to more than the "
                             f"{full['rotary_dim'] // 2} rotary pairs")
    return GGUFRope(arch=arch, full=full, sliding=sliding, sections=sections)


def rope_fields(source: Any, *, layer_type: str | None = None) -> tuple[str, dict[str, Any]]:
    """(architecture, RopeConfig keyword arguments) of a GGUF file: its only RoPE, or that of ``layer_type``
    ("full_attention" / "sliding_attention") when the sliding-window layers have their own (then required, as
    in ``RopeConfig.from_hf``). M-RoPE sections warn once (the text RoPE is read)."""
    rope = read_rope(source)
    if rope.sections is not None:
        warn_once(f"gguf: {rope.arch}.rope.dimension_sections {list(rope.sections)} (M-RoPE): read as the text "
                   f"RoPE (t = h = w positions, where M-RoPE is plain RoPE); ropekit.gguf.read_rope(...).sections "
                   f"keeps the sections")
    types = rope.per_layer_type()
    if layer_type is None:
        if rope.sliding is not None:
            raise ValueError(f"layer_type: this GGUF has one RoPE per layer type; pass one of: {', '.join(types)}")
        return rope.arch, dict(rope.full)
    if layer_type not in LAYER_TYPES:
        raise ValueError(f"layer_type: {layer_type!r} not accepted; accepted: {', '.join(LAYER_TYPES)}")
    return rope.arch, dict(types.get(layer_type, rope.full))


def _to_fields(hp: LlamaCppRope) -> dict[str, Any]:
    """RopeConfig fields that rotate as llama.cpp does with ``hp`` (frequencies and the cos/sin multiplier)."""
    arch = hp.arch
    kwargs: dict[str, Any] = {"head_dim": hp.head_dim, "rotary_dim": hp.n_rot, "base": hp.freq_base}
    s = 1.0 / hp.freq_scale
    original, context = hp.n_ctx_orig, hp.n_ctx_train
    if hp.ext_factor not in (0.0, 1.0):
        raise ValueError(f"{arch}.rope.scaling.yarn_ext_factor: {hp.ext_factor:g} mixes YaRN's ramp in part; "
                         f"ropekit expresses 0 (no ramp) and 1 (YaRN)")
    yarn = hp.ext_factor == 1.0 and s > 1.0

    def done(method: str, **params: Any) -> dict[str, Any]:
        params = {k: v for k, v in params.items() if v is not None}
        fields = {**kwargs, "method": method, **params}
        if get_method(method).gguf_type == "none":  # plain RoPE
            fields["original_max_position"] = context
            fields["max_position"] = context
        else:
            fields.setdefault("original_max_position", original)
            trained = fields["original_max_position"]
            target = fields.get("factor") and trained and round(fields["factor"] * trained)
            fields["max_position"] = max(x for x in (context, target, trained, 1) if x)
        return fields

    if hp.factors_long is not None or hp.factors_short is not None:
        if hp.factors_long is None or hp.factors_short is None:
            missing = ROPE_FACTORS_SHORT if hp.factors_short is None else ROPE_FACTORS_LONG
            raise ValueError(f"{missing}: missing; LongRoPE needs both rope_factors_long and rope_factors_short")
        if yarn:
            raise ValueError(f"{arch}.rope.scaling.type: yarn on top of rope_factors_long/short is not supported")
        if not original:
            raise ValueError(f"{arch}.rope.scaling.original_context_length: needed for LongRoPE factors")
        # A linear factor (freq_scale) divides on top of the per-pair factors.
        long = tuple(v * s for v in hp.factors_long)
        short = tuple(v * s for v in hp.factors_short)
        lr_factor = context / original if context and context > original else None
        default_scale = default_attention_scale(lr_factor, original)
        return done(_method_for("longrope"), short_factor=short, long_factor=long, factor=lr_factor,
                    attention_factor=None if _close(hp.attn_factor, default_scale) else hp.attn_factor)

    if hp.rope_freqs is not None:
        if yarn:
            raise ValueError(f"{arch}.rope.scaling.type: yarn on top of the rope_freqs tensor (per-pair divisors) "
                             f"is not supported")
        divisors = tuple(v * s for v in hp.rope_freqs)
        return _from_divisors(divisors, hp, done)

    if yarn:
        if not original:
            raise ValueError(f"{arch}.rope.scaling.original_context_length / {arch}.context_length: YaRN needs "
                             f"the original length")
        derived = yarn_mscale(s, 1.0)
        return done(_method_for("yarn"), factor=s,
                    beta_fast=None if hp.beta_fast == YARN_BETA_FAST else hp.beta_fast,
                    beta_slow=None if hp.beta_slow == YARN_BETA_SLOW else hp.beta_slow,
                    attention_factor=None if _close(hp.attn_factor, derived) else hp.attn_factor)
    return _from_divisors((s,) * (hp.n_rot // 2), hp, done)


def _method_for(scaling_type: str) -> str:
    """The method a file of llama.cpp's ``rope.scaling.type`` ``scaling_type`` reads as (``MethodSpec.gguf_type``;
    "none": plain RoPE)."""
    for name in method_names():
        if get_method(name).gguf_type == scaling_type:
            return name
    raise ValueError(f"rope.scaling.type: no registered method reads llama.cpp's {scaling_type!r}")


def _from_divisors(divisors: tuple[float, ...], hp: LlamaCppRope, done) -> dict[str, Any]:
    """Per-pair divisors (and hp's attention factor) as plain RoPE, linear, llama3 or, exactly, longrope."""
    first = divisors[0]
    uniform = all(_close(v, first) for v in divisors)
    if uniform and _close(hp.attn_factor, 1.0):
        if _close(first, 1.0):
            return done(_method_for("none"))
        if first > 1.0:
            return done(_method_for("linear"), factor=first)
    if _close(hp.attn_factor, 1.0):
        original = hp.n_ctx_orig if _has_original(hp) else None
        for name in method_names():  # the methods that recognise per-pair divisors (llama3)
            spec = get_method(name)
            params = None if spec.from_gguf is None else spec.from_gguf(hp.freq_base, hp.n_rot, divisors, original)
            if params is not None:
                return done(name, **params)
    if not hp.n_ctx_orig:
        raise ValueError(f"{hp.arch}.context_length: needed to describe per-pair rope factors")
    # Any other static divisors: LongRoPE with one set of factors is the same rotation at every length.
    return done(_method_for("longrope"), short_factor=divisors, long_factor=divisors, attention_factor=hp.attn_factor)


def _has_original(hp: LlamaCppRope) -> bool:
    return hp.n_ctx_orig is not None and hp.n_ctx_orig != hp.n_ctx_train
