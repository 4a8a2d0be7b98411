"""GGUF in and out: a model's RoPE as llama.cpp reads it from a GGUF file, and a GGUF copy with a new RoPE.

One module a step: ``read`` (the file, llama.cpp's hyper-parameters), ``to_config`` (GGUF -> RopeConfig fields),
``plan`` (RopeConfig -> the keys and tensors to write), ``write`` (the copy). Their public names are here too.

Reading (``read_rope``, ``rope_fields``; ``RopeConfig.from_gguf`` builds the config from them) follows llama.cpp's
own semantics (``llama-model.cpp`` / ``llama-context.cpp`` / ggml's ``rope_yarn``), key by key:

* ``<arch>.rope.freq_base`` (default 10000), ``.rope.dimension_count`` (default the head size).
* ``.rope.scaling.type``: none / linear / yarn / longrope; llama.cpp's default when absent is ``linear``, which
  with no ``.rope.scaling.factor`` scales nothing. The factor divides every frequency (``freq_scale = 1/factor``)
  unless the type is ``none``.
* ``.rope.scaling.original_context_length`` (default ``.context_length``): YaRN's ramp and the LongRoPE
  long/short switch are measured against it.
* YaRN: ``.rope.scaling.yarn_ext_factor`` (default 1 for yarn, else 0: how much of the ramp is mixed in),
  ``.yarn_beta_fast`` / ``.yarn_beta_slow`` (32 / 1), ``.yarn_log_multiplier`` (DeepSeek's mscale_all_dim),
  ``.yarn_attn_factor``. llama.cpp reads ``yarn_ext_factor`` and the betas only for grok, laguna and mistral3
  (``read.YARN_KEY_ARCHS``); elsewhere it runs the defaults, and so does ropekit's reading (with a warning naming
  the ignored keys). The cos/sin multiplier llama.cpp ends with is ``(0.1 ln s + 1)`` (or DeepSeek's ratio)
  times ``.rope.scaling.attn_factor``.
* ``.rope.scaling.attn_factor`` (default 1): multiplies cos and sin for every scaling type (Phi-3 stores its
  LongRoPE factor sqrt(1 + ln s / ln L) here).
* Tensors ``rope_freqs.weight`` (Llama 3.1: one divisor per pair; llama.cpp divides each frequency by it) and
  ``rope_factors_long.weight`` / ``rope_factors_short.weight`` (Phi-3 LongRoPE; llama.cpp uses the long ones when
  the context it is given, ``-c``, exceeds the original length).
* ``.rope.freq_base_swa`` / ``.rope.dimension_count_swa``: the sliding-window layers' RoPE (Gemma 3 files carry no
  key: llama.cpp fixes their base at 10000 without scaling, and so does ropekit).
* ``.rope.dimension_sections``: M-RoPE (Qwen2-VL). Text tokens have t = h = w positions, where M-RoPE is plain
  RoPE, so the text RoPE is read and the sections are kept on ``GGUFRope.sections``.

Per-pair divisors are recognised as Llama 3 scaling where they are exactly that (``llama3``, its
``MethodSpec.from_gguf``); any other static divisors are kept exactly as ``longrope`` with equal short and long
factors. A file's ``rope.scaling.type`` reads as the method whose ``MethodSpec.gguf_type`` it is.

Writing (``rope_plan`` + ``write_gguf``): every tensor is copied byte for byte and every metadata key is kept,
except the RoPE keys and factor tensors, which are set the way ``convert_hf_to_gguf.py`` writes the same
transformers ``rope_parameters`` (``llama3`` -> ``rope_freqs``, ``longrope`` -> ``rope_factors_long/short``,
``yarn`` / ``linear`` -> ``rope.scaling.*``, ``ntk`` / ``base`` -> a new ``rope.freq_base``): each method says
how in its ``MethodSpec.to_gguf`` (keys named by its ``Param.gguf_key``), ``rope_plan`` applies it. What llama.cpp
cannot express (dynamic scaling, LongRoPE's n_hat, YaRN without the floor/ceil ramp) is refused before any work.
The atomic, never-overwriting file handling lives in ``ropekit.hf.export_gguf``.
"""

from ropekit.gguf.plan import LONGROPE_ARCHS_EXTRA, RopePlan, gguf_exportable_methods, rope_plan, serve_command
from ropekit.gguf.read import (
    ROPE_FACTORS_LONG,
    ROPE_FACTORS_SHORT,
    ROPE_FREQS,
    ROPE_KEYS,
    ROPE_TENSORS,
    SCALING_TYPES,
    SWA_FIXED_BASE,
    YARN_BETA_FAST,
    YARN_BETA_SLOW,
    GGUFFile,
    LlamaCppRope,
    _read_cached,  # noqa: F401  (older imports)
    llama_cpp_hparams,
    read_gguf,
    read_gguf_metadata,
)
from ropekit.gguf.to_config import GGUF_INTERLEAVED_ARCHS, LAYER_TYPES, GGUFRope, read_rope, rope_fields
from ropekit.gguf.write import write_gguf

__all__ = ["GGUF_INTERLEAVED_ARCHS", "LAYER_TYPES", "LONGROPE_ARCHS_EXTRA", "ROPE_FACTORS_LONG", "ROPE_FACTORS_SHORT",
           "ROPE_FREQS", "ROPE_KEYS", "ROPE_TENSORS", "SCALING_TYPES", "SWA_FIXED_BASE", "YARN_BETA_FAST",
           "YARN_BETA_SLOW", "GGUFFile", "GGUFRope", "LlamaCppRope", "RopePlan", "gguf_exportable_methods",
           "llama_cpp_hparams", "read_gguf", "read_gguf_metadata", "read_rope", "rope_fields", "rope_plan",
           "serve_command", "write_gguf"]
