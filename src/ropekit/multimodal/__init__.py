"""Multi-axis RoPE for model builders: M-RoPE (Qwen2-VL / Qwen2.5-VL / Qwen3-VL) and 2-D axial RoPE for ViTs.

A multi-axis RoPE rotates each rotary pair by one of several position streams (axes): M-RoPE has three,
(t, h, w); a vision transformer's axial RoPE two, (row, column). It is described by ``MultiAxisRope``: one
``RopeConfig`` per axis (the 1-D RoPE whose frequencies that axis's pairs take, and how it is extended), and
per rotary pair p the axis that rotates it (``pair_axis[p]``) and the pair of that axis's RoPE that gives its
frequency (``pair_index[p]``). Every layout below is such a table:

* ``mrope(cfg, section)`` (Qwen2-VL, Qwen2.5-VL; transformers ``mrope_section``): pairs split into
  contiguous blocks, the first ``section[0]`` pairs rotated by t, the next ``section[1]`` by h, the last
  ``section[2]`` by w; pair p keeps the 1-D RoPE's frequency p.
* ``mrope(cfg, section, interleaved=True)`` (Qwen3-VL, ``mrope_interleaved``): round robin, pair p is rotated
  by h if p % 3 == 1 and p < 3 * section[1], by w if p % 3 == 2 and p < 3 * section[2], by t otherwise.
* ``axial_rope(head_dim, style=...)`` for a patch grid (rows, columns):
  - ``"qwen2_vl"`` (the ViTs of Qwen2-VL, Qwen2.5-VL, Qwen3-VL): the first half of the pairs rotated by the
    row, the second half by the column, both halves with the frequencies of a RoPE over rotary_dim/2 channels
    (base^(-4j/d)); rotate-half ("neox") channel layout.
  - ``"eva"`` (EVA-02 / timm ``RotaryEmbeddingCat``-style ViTs): the same frequencies and split, channels in
    interleaved pairs ("gptj": channels [0, d/2) for the row, [d/2, d) for the column, pairs (2i, 2i+1)).
  - ``"pixtral"`` (Pixtral's vision encoder): the 1-D RoPE over all rotary channels, its even-indexed
    frequencies to the row (first half of the pairs), its odd-indexed ones to the column (second half);
    rotate-half layout as in transformers' checkpoints.

Positions are integers, axis first: (axes, seq) shared by the batch or (axes, batch, seq) per row. ``None``
or an int offset mean text tokens (every axis at 0..seq-1 plus the offset), as M-RoPE gives text. Helpers
build the positions: ``mrope_positions`` (text and image/video grids, as Qwen2-VL's ``get_rope_index``),
``mrope_positions_from_token_types`` (the batched form on token types), ``patch_positions`` (a ViT's grids).

Angles are built in float64 from the integer positions, cos/sin rounded once to float32 (float64 for float64
inputs), the rotation runs through ``ropekit.rotate`` (the reference, or the fused CPU pass for large inputs).

Extension per axis (``MultiAxisRope.extend(method, factor, axes=...)``): each axis's RopeConfig is extended
on its own (its trained length: the text model's for M-RoPE axes, the trained grid side for a ViT axis).
* Every axis is the default, and the right choice for long text: M-RoPE text tokens advance t, h and w
  together, so a long context runs past the trained length on all three. It is also what transformers does
  with a Qwen2.5-VL config whose rope_parameters say ``yarn`` (one set of frequencies for all sections).
* ``axes=("t",)`` for long videos at trained resolutions: only the temporal positions outgrow training (but
  text after the video continues from the spatial extent under ``next_text="spatial"``, so keep the text
  within the trained length or extend every axis).
* ``axes=("row", "col")`` (both axial axes, the default) with a linear factor new_side/trained_side: a ViT run
  at a higher resolution, EVA-02's position interpolation (pt_seq_len / ft_seq_len); one axis alone for
  images stretched one way.
Each pair keeps its axis's attention scale (YaRN on t alone scales only the t pairs; extend every axis for a
global temperature). Length-dependent methods (dynamic NTK, dynamic YaRN, LongRoPE) are refused: their scale
follows "the sequence length", of which a multi-axis position has one per axis, and no published model says
which to take.
"""

from ropekit.multimodal.layout import (
    AXIAL_STYLES,
    GRID_AXES,
    MROPE_AXES,
    MultiAxisFrequencies,
    MultiAxisRope,
    axial_rope,
    mrope,
    mrope_from_hf,
)
from ropekit.multimodal.module import TABLE_CACHE_ENTRIES, MultiAxisRotaryEmbedding
from ropekit.multimodal.positions import (
    NEXT_TEXT_RULES,
    VisionGrid,
    mrope_decode_positions,
    mrope_positions,
    mrope_positions_from_token_types,
    patch_positions,
)
from ropekit.multimodal.rotate import (
    apply_multi_axis_rotary,
    axis_positions,
    multi_axis_angles,
    multi_axis_cos_sin,
)

__all__ = [
    "AXIAL_STYLES",
    "GRID_AXES",
    "MROPE_AXES",
    "NEXT_TEXT_RULES",
    "TABLE_CACHE_ENTRIES",
    "MultiAxisFrequencies",
    "MultiAxisRope",
    "MultiAxisRotaryEmbedding",
    "VisionGrid",
    "apply_multi_axis_rotary",
    "axial_rope",
    "axis_positions",
    "mrope",
    "mrope_decode_positions",
    "mrope_from_hf",
    "mrope_positions",
    "mrope_positions_from_token_types",
    "multi_axis_angles",
    "multi_axis_cos_sin",
    "patch_positions",
]
