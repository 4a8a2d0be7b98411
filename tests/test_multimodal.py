"""Multi-axis RoPE (ropekit.multimodal): M-RoPE and 2-D axial RoPE.

* against transformers' own implementations on random q/k with tiny sizes: the text rotary embeddings of
  Qwen2-VL, Qwen2.5-VL (also YaRN-scaled) and Qwen3-VL (interleaved) with ``apply_rotary_pos_emb``; the vision
  rotary embeddings of Qwen2-VL / Qwen2.5-VL / Qwen3-VL and Pixtral; ``get_rope_index`` and the vision position
  ids; EVA-02's axial layout against its published formula, written out here (timm is not installed);
* property tests (hypothesis): norm preservation, the relative-position property per axis, per-axis
  independence, text-only M-RoPE equal to 1-D RoPE bit for bit, inverse and rerotate;
* extension per axis; every calling context (inference_mode, no_grad, autograd, torch.compile with dynamic
  lengths compiling once); errors.
"""

from __future__ import annotations

import contextlib
import functools
import types

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ropekit import RopeConfig, RotaryEmbedding
from ropekit.multimodal import (
    MultiAxisRope,
    MultiAxisRotaryEmbedding,
    VisionGrid,
    apply_multi_axis_rotary,
    axial_rope,
    mrope,
    mrope_decode_positions,
    mrope_from_hf,
    mrope_positions,
    mrope_positions_from_token_types,
    patch_positions,
)

transformers = pytest.importorskip("transformers")

settings.register_profile("ropekit-multimodal", max_examples=25, deadline=None, derandomize=True)

# Transformers builds its angles in float32 (position * inv_freq); ropekit in float64. At positions below ~64
# the float32 angle error is ~1e-5 rad at most, which bounds the difference of the rotated values.
TOL = dict(atol=3e-5, rtol=3e-5)


def rand(shape, seed, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def hf_module(name):
    import importlib

    return importlib.import_module(f"transformers.models.{name}.modeling_{name}")


# ------------------------------------------------------------------ M-RoPE against transformers
# (transformers module, text config class, config kwargs, rope_parameters)
MROPE_CASES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLTextConfig", dict(hidden_size=64, num_attention_heads=4),
                 {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
    "qwen2_vl-linear": ("qwen2_vl", "Qwen2VLTextConfig", dict(hidden_size=64, num_attention_heads=4),
                        {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "mrope_section": [4, 2, 2]}),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLTextConfig", dict(hidden_size=96, num_attention_heads=4),
                   {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [4, 4, 4]}),
    "qwen2_5_vl-yarn": ("qwen2_5_vl", "Qwen2_5_VLTextConfig", dict(hidden_size=64, num_attention_heads=4),
                        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                         "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLTextConfig", dict(hidden_size=96, num_attention_heads=4, head_dim=24),
                 {"rope_type": "default", "rope_theta": 5e6, "mrope_section": [4, 4, 4], "mrope_interleaved": True}),
    # GLM-4V: partial rotary (half the head) with interleaved channel pairs.
    "glm4v": ("glm4v", "Glm4vTextConfig", dict(hidden_size=128, num_attention_heads=4),
              {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
               "partial_rotary_factor": 0.5}),
    # A section whose interleaved counts are not the section's (h, w get 4 pairs, not 5): the rule as written.
    "qwen3_vl-uneven": ("qwen3_vl", "Qwen3VLTextConfig", dict(hidden_size=96, num_attention_heads=4, head_dim=24),
                        {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 5, 5],
                         "mrope_interleaved": True}),
}


def _hf_text_config(case):
    module, cls, kwargs, rope = MROPE_CASES[case]
    return getattr(transformers, cls)(num_key_value_heads=2, max_position_embeddings=64, rope_parameters=dict(rope),
                                      **kwargs)


def _hf_rotary(case):
    module = hf_module(MROPE_CASES[case][0])
    cls = [v for k, v in vars(module).items() if k.endswith("RotaryEmbedding") and "Vision" not in k][0]
    return module, cls(_hf_text_config(case))


@pytest.mark.parametrize("case", list(MROPE_CASES))
@pytest.mark.parametrize("heads_first", [True, False])
def test_mrope_equals_transformers(case, heads_first):
    """Random q/k and random 3-D positions: ropekit's M-RoPE equals the model's rotary embedding followed by its
    apply_rotary_pos_emb, for the config read by mrope_from_hf."""
    module, hf_rope = _hf_rotary(case)
    config = _hf_text_config(case)
    # GLM-4V's layout is not in its config: transformers' code pairs channels (2i, 2i+1).
    rope = mrope_from_hf(config, **({"layout": "gptj"} if case == "glm4v" else {}))
    d = rope.head_dim
    q, k = rand((2, 3, 9, d), 0), rand((2, 1, 9, d), 1)
    pos = torch.randint(0, 60, (3, 2, 9), generator=torch.Generator().manual_seed(2))
    cos, sin = hf_rope(q, pos)
    want_q, want_k = module.apply_rotary_pos_emb(q, k, cos, sin)
    ours = MultiAxisRotaryEmbedding(rope, heads_first=heads_first)
    if heads_first:
        got_q, got_k = ours(q, k, pos)
    else:
        got_q, got_k = (t.transpose(1, 2) for t in ours(q.transpose(1, 2), k.transpose(1, 2), pos))
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)
    # The attention scale (YaRN's) is the model's, and the tables equal its cos/sin (its first half).
    ours_cos, ours_sin = ours.cos_sin(pos)
    half = slice(0, None, 2) if rope.layout == "gptj" else slice(0, rope.rotary_dim // 2)
    torch.testing.assert_close(ours_cos, cos[..., half], **TOL)
    torch.testing.assert_close(ours_sin, sin[..., half], **TOL)


def test_mrope_from_hf_reads_top_level_text_config_and_legacy_type():
    """A full Qwen2-VL config.json (the RoPE inside text_config) and an older one ({"type": "mrope"} in
    rope_scaling) give the same M-RoPE as building it by hand."""
    by_hand = mrope(RopeConfig(head_dim=16, base=1e6, original_max_position=64), [2, 3, 3])
    text = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}}
    legacy = {"hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 64, "rope_theta": 1e6,
              "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]}}
    for cfg in ({"model_type": "qwen2_vl", "text_config": text, "vision_config": {"depth": 1}}, legacy):
        got = mrope_from_hf(cfg)
        assert got.pair_axis == by_hand.pair_axis and got.kind == "mrope"
        torch.testing.assert_close(got.frequencies().inv_freq64, by_hand.frequencies().inv_freq64, rtol=0, atol=0)
    with pytest.raises(ValueError, match="mrope_section"):
        mrope_from_hf({"hidden_size": 64, "num_attention_heads": 4, "rope_parameters": {"rope_theta": 1e4}})


# ------------------------------------------------------------------ axial RoPE against transformers
VISION_CASES = {
    "qwen2_vl": ("qwen2_vl", "Qwen2VLVisionConfig", dict(embed_dim=64, num_heads=4, depth=1), "qwen2_vl", 2),
    "qwen2_5_vl": ("qwen2_5_vl", "Qwen2_5_VLVisionConfig", dict(hidden_size=64, num_heads=4, depth=1), "qwen2_vl", 2),
    "qwen3_vl": ("qwen3_vl", "Qwen3VLVisionConfig", dict(hidden_size=96, num_heads=4, depth=1), "qwen2_vl", 2),
}
GRIDS = torch.tensor([[1, 4, 6], [2, 2, 4], [1, 6, 2]])  # (t, h, w) patches, h and w multiples of the merge


@pytest.mark.parametrize("case", list(VISION_CASES))
def test_axial_qwen_vision_equals_transformers(case):
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL ViTs: their vision position ids and rotary embedding + apply function."""
    from transformers.vision_utils import get_vision_position_ids

    name, cls, kwargs, style, merge = VISION_CASES[case]
    module = hf_module(name)
    config = getattr(transformers, cls)(**kwargs)
    hf_rope = [v for k, v in vars(module).items() if k.endswith("VisionRotaryEmbedding")][0](config)
    head_dim = 64 // 4 if "embed_dim" in kwargs else kwargs["hidden_size"] // kwargs["num_heads"]
    hf_pos = get_vision_position_ids(GRIDS, merge)  # (tokens, 2)
    pos = patch_positions(GRIDS, merge)  # (2, tokens)
    assert torch.equal(pos, hf_pos.T)
    n = pos.shape[1]
    q, k = rand((n, 4, head_dim), 3), rand((n, 4, head_dim), 4)  # the ViT's (tokens, heads, head_dim)
    cos, sin = hf_rope(q, hf_pos)
    want_q, want_k = module.apply_rotary_pos_emb_vision(q, k, cos, sin)
    rope = axial_rope(head_dim, base=config.rope_parameters["rope_theta"], style=style)
    got_q, got_k = MultiAxisRotaryEmbedding(rope, heads_first=False)(q, k, pos)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)


@pytest.mark.parametrize("base", [10000.0, 1e5])
def test_axial_pixtral_equals_transformers(base):
    """Pixtral: row-major patch positions of several images, its rotary embedding and apply_rotary_pos_emb."""
    module = hf_module("pixtral")
    config = transformers.PixtralVisionConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                              rope_parameters={"rope_type": "axial", "rope_theta": base})
    hf_rope = module.PixtralVisionRotaryEmbedding(config)
    images = torch.tensor([[1, 3, 5], [1, 4, 2]])
    pos = patch_positions(images)  # Pixtral's own loop: meshgrid(arange(h), arange(w), "ij") per image
    hf_pos = torch.cat([torch.stack([h.flatten(), w.flatten()], -1) for h, w in
                        (torch.meshgrid(torch.arange(t_h_w[1]), torch.arange(t_h_w[2]), indexing="ij")
                         for t_h_w in images.tolist())])
    assert torch.equal(pos, hf_pos.T)
    q, k = rand((1, 4, pos.shape[1], 16), 5), rand((1, 4, pos.shape[1], 16), 6)
    cos, sin = hf_rope(q, hf_pos)
    want_q, want_k = module.apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=0)
    got_q, got_k = MultiAxisRotaryEmbedding(axial_rope(16, base=base, style="pixtral"))(q, k, pos)
    torch.testing.assert_close(got_q, want_q, **TOL)
    torch.testing.assert_close(got_k, want_k, **TOL)


def test_axial_eva_equals_the_published_formula():
    """EVA-02's VisionRotaryEmbeddingFast (dim = head_dim/2 per axis, frequencies repeated per interleaved pair,
    row then column channels, x*cos + rotate_interleaved(x)*sin), written out in float64."""
    head_dim, base, side = 16, 10000.0, 5
    dim = head_dim // 2
    freqs = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
    t = torch.arange(side, dtype=torch.float64)
    f = torch.repeat_interleave(t[:, None] * freqs, 2, dim=-1)  # (side, dim)
    f2d = torch.cat([f[:, None, :].expand(side, side, dim), f[None, :, :].expand(side, side, dim)], -1).reshape(-1, head_dim)

    def rotate_interleaved(x):
        x = x.unflatten(-1, (-1, 2))
        return torch.stack((-x[..., 1], x[..., 0]), -1).flatten(-2)

    q = rand((1, 2, side * side, head_dim), 7, torch.float64)
    want = q * f2d.cos() + rotate_interleaved(q) * f2d.sin()
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    pos = torch.stack([rows.flatten(), cols.flatten()])
    got = MultiAxisRotaryEmbedding(axial_rope(head_dim, base=base, style="eva"))(q, None, pos)[0]
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ position ids against get_rope_index
def _hf_get_rope_index(name, **kwargs):
    module = hf_module(name)
    model_cls = [v for k, v in vars(module).items() if k.endswith("VLModel") and isinstance(v, type)][0]
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2, tokens_per_second=4)),
        get_vision_position_ids=functools.partial(model_cls.get_vision_position_ids, None))
    return model_cls.get_rope_index(fake, **kwargs)


def _token_types(rows, width):
    """(batch, width) token types and left-padding mask from per-row lists of runs (type, count)."""
    types_ = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for b, runs in enumerate(rows):
        flat = [kind for kind, n in runs for _ in range(n)]
        types_[b, width - len(flat):] = torch.tensor(flat)
        mask[b, width - len(flat):] = 1
    return types_, mask


@pytest.mark.parametrize("name", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_positions_equal_transformers_get_rope_index(name):
    """Text, images and videos, two left-padded rows: the same (3, batch, seq) positions and deltas."""
    images = torch.tensor([[1, 4, 6], [1, 2, 2]])
    videos = torch.tensor([[3, 4, 2]])
    if name == "qwen3_vl":  # frames separated by timestamp text
        video_runs = [(2, 2), (0, 1), (2, 2), (0, 1), (2, 2)]
    else:
        video_runs = [(2, 6)]
    rows = [[(0, 3), (1, 6), (0, 2), *video_runs, (0, 4)], [(0, 2), (1, 1), (0, 5)]]
    width = max(sum(n for _, n in r) for r in rows) + 2
    token_types, mask = _token_types(rows, width)
    kwargs = dict(input_ids=token_types.clone(), mm_token_type_ids=token_types, image_grid_thw=images,
                  video_grid_thw=videos.clone(), attention_mask=mask)
    ours_kwargs = {}
    if name == "qwen2_5_vl":
        kwargs["second_per_grid_ts"] = torch.tensor([1.5])
        ours_kwargs["video_time_intervals"] = [4 * 1.5]  # tokens_per_second * second_per_grid_t
    want_pos, want_delta = _hf_get_rope_index(name, **kwargs)
    got_pos, got_delta = mrope_positions_from_token_types(token_types, images, videos, attention_mask=mask,
                                                          spatial_merge_size=2, split_video_frames=name == "qwen3_vl",
                                                          **ours_kwargs)
    assert torch.equal(got_pos, want_pos)
    assert torch.equal(got_delta, want_delta)


@settings(settings.get_profile("ropekit-multimodal"))
@given(segments=st.lists(st.one_of(st.integers(1, 4), st.tuples(st.integers(1, 3), st.sampled_from([2, 4, 6]),
                                                               st.sampled_from([2, 4]))), min_size=1, max_size=5))
def test_positions_of_any_segment_list_equal_qwen2_vl(segments):
    """Any order of text runs, images and videos (hypothesis): mrope_positions equals get_rope_index."""
    runs, images, videos = [], [], []
    for seg in segments:
        if isinstance(seg, int):
            runs.append((0, seg))
            continue
        t, h, w = seg
        (videos if t > 1 else images).append([t, h, w])
        runs.append((2 if t > 1 else 1, t * (h // 2) * (w // 2)))
    merged = []
    for kind, n in runs:  # two text runs in a row are one run of text
        if merged and merged[-1][0] == kind == 0:
            merged[-1] = (0, merged[-1][1] + n)
        else:
            merged.append((kind, n))
    if any(a[0] == b[0] != 0 for a, b in zip(merged, merged[1:])):
        return  # two grids with no text between are one run of tokens to get_rope_index: not a valid prompt
    token_types, _ = _token_types([merged], sum(n for _, n in merged))
    want, _ = _hf_get_rope_index("qwen2_vl", input_ids=token_types, mm_token_type_ids=token_types,
                                 image_grid_thw=torch.tensor(images) if images else None,
                                 video_grid_thw=torch.tensor(videos) if videos else None)
    got, next_pos = mrope_positions([s if isinstance(s, int) else VisionGrid(*s) for s in segments],
                                    spatial_merge_size=2)
    assert torch.equal(got, want[:, 0])
    assert next_pos >= int(got.max()) + (1 if isinstance(segments[-1], int) else 0)


def test_next_text_rules_differ_only_when_time_outruns_space():
    """"spatial" continues text at start + max(h, w)/m, "max" one past the largest id the grid used."""
    for grid, differ in ((VisionGrid(1, 4, 6), False), (VisionGrid(5, 2, 2), True), (VisionGrid(2, 2, 2, 3.0), True)):
        spatial, next_spatial = mrope_positions([3, grid, 2], spatial_merge_size=2)
        most, next_max = mrope_positions([3, grid, 2], spatial_merge_size=2, next_text="max")
        vision = spatial[:, 3:-2]
        assert torch.equal(vision, most[:, 3:-2])
        assert int(spatial[0, -2]) == 3 + max(grid.h, grid.w) // 2
        assert int(most[0, -2]) == int(vision.max()) + 1
        assert (next_spatial != next_max) == differ
        assert torch.equal(spatial[:, -2:], spatial[:1, -2:].expand(3, 2))  # text: all axes equal


def test_decode_positions_continue_the_prompt():
    token_types, mask = _token_types([[(0, 2), (1, 6), (0, 3)], [(0, 4)]], 11)
    pos, deltas = mrope_positions_from_token_types(token_types, [[1, 4, 6]], attention_mask=mask, spatial_merge_size=2)
    nxt = mrope_decode_positions(mask.sum(1), 2, deltas)  # tokens seen per row, padding not counted
    assert nxt.shape == (3, 2, 2)
    for b in range(2):  # the first decoded token sits one past the row's largest prompt position, on every axis
        assert nxt[:, b, 0].tolist() == [int(pos[:, b][:, mask[b].bool()].max()) + 1] * 3
        assert nxt[:, b, 1].tolist() == [int(pos[:, b][:, mask[b].bool()].max()) + 2] * 3
    # transformers' decoding rule with a mask: cumsum(mask) - 1 + delta over the grown mask
    grown = torch.cat([mask, torch.ones(2, 2, dtype=torch.long)], 1)
    assert torch.equal(nxt[0], (grown.cumsum(-1) - 1 + deltas)[:, -2:])


# ------------------------------------------------------------------ properties
@st.composite
def layouts(draw):
    """A random multi-axis RoPE: M-RoPE (blocks or interleaved) or an axial style, maybe scaled, any layout."""
    kind = draw(st.sampled_from(["mrope", "mrope_interleaved", "qwen2_vl", "eva", "pixtral"]))
    base = draw(st.sampled_from([100.0, 1e4, 1e6]))
    if kind.startswith("mrope"):
        third = draw(st.integers(1, 4))
        section = [third, third, third] if kind.endswith("interleaved") else [third, draw(st.integers(1, 4)), third]
        rd = 2 * sum(section)
        method = draw(st.sampled_from(["default", "linear", "yarn"]))
        kw = {} if method == "default" else dict(factor=draw(st.sampled_from([2.0, 8.0])), original_max_position=64)
        cfg = RopeConfig(head_dim=rd + 2 * draw(st.integers(0, 2)), rotary_dim=rd, base=base, method=method,
                         layout=draw(st.sampled_from(["neox", "gptj"])), **kw)
        return mrope(cfg, section, interleaved=kind.endswith("interleaved"))
    rd = 4 * draw(st.integers(1, 4))
    return axial_rope(rd + 2 * draw(st.integers(0, 2)), rotary_dim=rd, base=base, style=kind)


def _positions(rope, seed, seq=3, high=3000):
    return torch.randint(0, high, (rope.n_axes, 1, seq), generator=torch.Generator().manual_seed(seed))


@settings(settings.get_profile("ropekit-multimodal"))
@given(rope=layouts(), seed=st.integers(0, 2**16))
def test_rotation_preserves_norms_up_to_the_attention_scale(rope, seed):
    q = rand((1, 2, 3, rope.head_dim), seed, torch.float64)
    out = apply_multi_axis_rotary(q, None, rope, _positions(rope, seed))[0]
    freqs = rope.frequencies()
    rd = rope.rotary_dim
    pairs_in = _pair_norms(q[..., :rd], rope.layout)
    pairs_out = _pair_norms(out[..., :rd], rope.layout)
    torch.testing.assert_close(pairs_out, pairs_in * freqs.scale64, rtol=1e-12, atol=1e-12)
    assert torch.equal(out[..., rd:], q[..., rd:])  # pass-through channels untouched


def _pair_norms(x, layout):
    half = x.shape[-1] // 2
    a, b = (x[..., :half], x[..., half:]) if layout == "neox" else (x[..., 0::2], x[..., 1::2])
    return torch.sqrt(a * a + b * b)


@settings(settings.get_profile("ropekit-multimodal"))
@given(rope=layouts(), seed=st.integers(0, 2**16), shift=st.lists(st.integers(0, 10_000), min_size=3, max_size=3))
def test_scores_depend_only_on_relative_position_per_axis(rope, seed, shift):
    """q at positions P, k at P': the score is unchanged when each axis is shifted by its own offset."""
    q = rand((1, 1, 1, rope.head_dim), seed, torch.float64)
    k = rand((1, 1, 1, rope.head_dim), seed + 1, torch.float64)
    p, pk = _positions(rope, seed, seq=1), _positions(rope, seed + 7, seq=1)
    c = torch.tensor(shift[: rope.n_axes]).view(-1, 1, 1)
    s1 = (apply_multi_axis_rotary(q, None, rope, p)[0] * apply_multi_axis_rotary(None, k, rope, pk)[1]).sum()
    s2 = (apply_multi_axis_rotary(q, None, rope, p + c)[0] * apply_multi_axis_rotary(None, k, rope, pk + c)[1]).sum()
    scale = float(rope.frequencies().scale64.max())
    tol = 1e-12 + 16 * (int(max(p.max(), pk.max())) + max(shift) + 1) * 2.0 ** -52 * q.norm() * k.norm() * scale ** 2
    assert abs(s1 - s2) <= tol


@settings(settings.get_profile("ropekit-multimodal"))
@given(rope=layouts(), seed=st.integers(0, 2**16), axis=st.integers(0, 2))
def test_an_axis_position_moves_only_its_own_pairs(rope, seed, axis):
    axis %= rope.n_axes
    q = rand((1, 1, 3, rope.head_dim), seed, torch.float64)
    p = _positions(rope, seed)
    moved = p.clone()
    moved[axis] += 17
    a, b = (apply_multi_axis_rotary(q, None, rope, x)[0] for x in (p, moved))
    mine = torch.zeros(rope.head_dim, dtype=torch.bool)
    for pair in rope.pairs_of(axis):
        for ch in ((pair, pair + rope.rotary_dim // 2) if rope.layout == "neox" else (2 * pair, 2 * pair + 1)):
            mine[ch] = True
    assert torch.equal(a[..., ~mine], b[..., ~mine])
    assert not torch.equal(a[..., mine], b[..., mine])


@settings(settings.get_profile("ropekit-multimodal"))
@given(seed=st.integers(0, 2**16), interleaved=st.booleans(), method=st.sampled_from(["default", "yarn", "llama3"]),
       layout=st.sampled_from(["neox", "gptj"]), dtype=st.sampled_from([torch.float32, torch.float64]))
def test_text_only_mrope_is_one_dimensional_rope_bit_for_bit(seed, interleaved, method, layout, dtype):
    """Text tokens (t = h = w) rotate exactly as the 1-D RotaryEmbedding of the same config."""
    kw = {} if method == "default" else dict(factor=4.0, original_max_position=32)
    cfg = RopeConfig(head_dim=26, rotary_dim=24, base=1e6, method=method, layout=layout, **kw)
    rope = mrope(cfg, [4, 4, 4], interleaved=interleaved)
    q, k = rand((2, 3, 5, 26), seed, dtype), rand((2, 1, 5, 26), seed + 1, dtype)
    pos1d = torch.randint(0, 100_000, (2, 5), generator=torch.Generator().manual_seed(seed))
    want = RotaryEmbedding(cfg, backend="reference")(q, k, pos1d)
    got = MultiAxisRotaryEmbedding(rope, backend="reference")(q, k, pos1d.expand(3, 2, 5))
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    # None and an int offset are text positions too
    assert torch.equal(MultiAxisRotaryEmbedding(rope)(q, None, 7)[0], RotaryEmbedding(cfg)(q, None, 7)[0])
    assert torch.equal(MultiAxisRotaryEmbedding(rope)(q, None)[0], RotaryEmbedding(cfg)(q, None)[0])


@settings(settings.get_profile("ropekit-multimodal"))
@given(rope=layouts(), seed=st.integers(0, 2**16), delta=st.integers(0, 500))
def test_inverse_and_rerotate(rope, seed, delta):
    k = rand((1, 2, 3, rope.head_dim), seed, torch.float64)
    p = _positions(rope, seed)
    rotated = apply_multi_axis_rotary(None, k, rope, p)[1]
    torch.testing.assert_close(apply_multi_axis_rotary(None, rotated, rope, p, inverse=True)[1], k,
                               rtol=1e-12, atol=1e-12)
    module = MultiAxisRotaryEmbedding(rope)
    shifted = module.rerotate(rotated, delta)
    torch.testing.assert_close(shifted, module(None, k, p + delta)[1], rtol=1e-10, atol=1e-10)
    per_axis = [delta + a for a in range(rope.n_axes)]
    torch.testing.assert_close(module.rerotate(rotated, per_axis),
                               module(None, k, p + torch.tensor(per_axis).view(-1, 1, 1))[1], rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------ extension per axis
def test_extend_all_axes_equals_extending_the_text_rope():
    """M-RoPE extended on every axis is M-RoPE over the extended config (what transformers does)."""
    cfg = RopeConfig(head_dim=32, base=1e6, original_max_position=128)
    for method, factor in (("yarn", 4.0), ("linear", 2.0), ("ntk", 8.0)):
        a = mrope(cfg, [4, 6, 6]).extend(method, factor)
        b = mrope(cfg.extend(method, factor), [4, 6, 6])
        for fa, fb in zip((a.frequencies().inv_freq64, a.frequencies().scale64),
                          (b.frequencies().inv_freq64, b.frequencies().scale64)):
            assert torch.equal(fa, fb)


def test_extend_one_axis_changes_only_its_pairs():
    cfg = RopeConfig(head_dim=32, base=1e6, original_max_position=128)
    plain = mrope(cfg, [4, 6, 6], interleaved=False)
    temporal = plain.extend("linear", 4.0, axes=("t",))
    f0, f1 = plain.frequencies(), temporal.frequencies()
    t_pairs = torch.tensor(plain.pairs_of("t"))
    others = torch.tensor(plain.pairs_of("h") + plain.pairs_of("w"))
    assert torch.equal(f1.inv_freq64[others], f0.inv_freq64[others])
    assert torch.equal(f1.inv_freq64[t_pairs], f0.inv_freq64[t_pairs] / 4.0)
    assert temporal.config("t").target_length == 4 * 128 and temporal.config("h") == cfg
    # Per-axis attention scales: YaRN on t only scales the t pairs.
    yarn_t = plain.extend("yarn", 4.0, axes="t").frequencies()
    assert bool((yarn_t.scale64[t_pairs] > 1).all()) and bool((yarn_t.scale64[others] == 1).all())


def test_axial_linear_extension_is_position_interpolation():
    """A ViT trained on a 4x4 grid, run on 8x8 with a linear factor 2 on both axes (EVA-02's interpolation):
    patch (2r, 2c) of the new grid rotates exactly as patch (r, c) did."""
    for style in ("qwen2_vl", "eva", "pixtral"):
        trained = axial_rope(16, style=style, grid=(4, 4))
        wide = trained.extend("linear", 2.0)
        assert [c.target_length for c in wide.configs] == [8, 8]
        q = rand((1, 2, 16, 16), 9, torch.float64)
        rows, cols = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()])
        assert torch.equal(apply_multi_axis_rotary(q, None, wide, 2 * pos)[0],
                           apply_multi_axis_rotary(q, None, trained, pos)[0])
        only_rows = trained.extend("linear", 2.0, axes=["row"])
        assert only_rows.config("col").target_length == 4


def test_length_dependent_methods_are_refused():
    cfg = RopeConfig(head_dim=16, original_max_position=32)
    for method in ("dynamic", "dynamic_yarn"):
        with pytest.raises(ValueError, match="depends on the sequence length"):
            mrope(cfg, [2, 3, 3]).extend(method, 2.0)


# ------------------------------------------------------------------ calling contexts
CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}
ROPES = {
    "mrope-yarn": mrope(RopeConfig(head_dim=64, base=1e6, original_max_position=64).extend("yarn", 4.0), [8, 12, 12]),
    "mrope-interleaved-gptj": mrope(RopeConfig(head_dim=64, rotary_dim=48, layout="gptj"), [8, 8, 8],
                                    interleaved=True),
    "axial-pixtral": axial_rope(64, style="pixtral"),
}
# (batch, q heads, k heads, seq): small runs the reference rotation, large (2^18+ elements) the fused CPU pass.
SIZES = {"small": (2, 3, 1, 12), "large": (1, 16, 16, 256)}


def _inputs(rope, size, seed=0, dtype=torch.float32):
    b, hq, hk, s = size
    q, k = rand((b, hq, s, 64), seed, dtype), rand((b, hk, s, 64), seed + 1, dtype)
    pos = torch.randint(0, 4000, (rope.n_axes, b, s), generator=torch.Generator().manual_seed(seed + 2))
    return q, k, pos


# The fused CPU pass compiles once per variant (10-20 s each on 2 cores): the large cases are marked slow.
CONTEXT_CASES = [(context, size, name) if size == "small" else
                 pytest.param(context, size, name, marks=pytest.mark.slow)
                 for context in CONTEXTS for size in SIZES for name in ROPES]


@pytest.mark.parametrize("context,size,name", CONTEXT_CASES)
def test_contexts_equal_the_reference(context, size, name):
    """Under each context (twice: cold and warm caches) the module equals the reference run outside it; inputs
    made inside it work outside; gradients afterwards equal the float64 reference's."""
    rope = ROPES[name]
    q, k, pos = _inputs(rope, SIZES[size])
    want = MultiAxisRotaryEmbedding(rope, backend="reference")(q, k, pos)
    module = MultiAxisRotaryEmbedding(rope)
    for _ in range(2):
        with CONTEXTS[context]():
            got = module(q, k, pos)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=0, atol=0)  # the fused CPU pass is bit-identical
            assert g.is_inference() == (context == "inference_mode")
    with CONTEXTS[context]():
        q2, k2, pos2 = (t.clone() for t in (q, k, pos))
    for g, w in zip(module(q2, k2, pos2), want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    # autograd through the same module, against float64
    w_q = rand(q.shape, 11)
    x = q.clone().requires_grad_()
    (module(x, None, pos)[0] * w_q).sum().backward()
    xd = q.double().requires_grad_()
    (module(xd, None, pos)[0] * w_q.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xd.grad, rtol=1e-5, atol=1e-5)


def test_table_cache_serves_only_equal_positions():
    """The module reuses its cos/sin tables for equal positions (a model's layers), never for changed ones:
    positions edited in place, or a new tensor with other values and the same shape."""
    rope = ROPES["mrope-yarn"]
    module = MultiAxisRotaryEmbedding(rope)
    q, _, pos = _inputs(rope, SIZES["small"])
    first = module(q, None, pos)[0]
    assert torch.equal(module(q, None, pos.clone())[0], first)
    pos[1, 0, 3] += 5  # in place
    ref = MultiAxisRotaryEmbedding(rope, backend="reference")
    assert torch.equal(module(q, None, pos)[0], ref(q, None, pos)[0])
    assert not torch.equal(module(q, None, pos)[0], first)
    other = torch.flip(pos, [-1])
    assert torch.equal(module(q, None, other)[0], ref(q, None, other)[0])


@pytest.mark.parametrize("name", list(ROPES))
def test_gradcheck_float64(name):
    rope = ROPES[name]
    q, k, pos = _inputs(rope, (1, 1, 1, 2), dtype=torch.float64)
    module = MultiAxisRotaryEmbedding(rope)
    q.requires_grad_()
    k.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: module(a, b, pos), (q, k))
    assert torch.autograd.gradcheck(lambda a: module.rerotate(a, [3, 1, 2][: rope.n_axes]), (k,))


LENGTHS = (17, 29, 40)


def _compiled_frames(name, heads, dynamic, fullgraph, lengths=LENGTHS):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    rope = ROPES[name]
    module = MultiAxisRotaryEmbedding(rope)
    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(lambda q, k, pos: module(q, k, pos), backend=counter, dynamic=dynamic,
                             fullgraph=fullgraph)
    frames = []
    for i, s in enumerate(lengths):
        q, k, pos = _inputs(rope, (1, heads, heads, s), seed=i)
        got = compiled(q, k, pos)
        want = MultiAxisRotaryEmbedding(rope, backend="reference")(q, k, pos)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
        frames.append(counter.frame_count)
    return frames


@pytest.mark.parametrize("name", ["mrope-interleaved-gptj", "axial-pixtral"])
def test_compile_dynamic_lengths_compile_once(name):
    """One graph, no graph break (fullgraph=True), for every sequence length."""
    assert _compiled_frames(name, 2, dynamic=True, fullgraph=True) == [1] * len(LENGTHS)


def test_compile_default_settings_and_inference_mode():
    """Default torch.compile: the second length makes the graph dynamic, then no length recompiles; the same
    under inference_mode."""
    frames = _compiled_frames("mrope-yarn", 2, dynamic=None, fullgraph=True)
    assert frames[-1] == frames[1], frames
    with torch.inference_mode():
        assert _compiled_frames("axial-pixtral", 2, dynamic=True, fullgraph=True) == [1] * len(LENGTHS)


# ------------------------------------------------------------------ errors
def test_errors_name_the_argument():
    cfg = RopeConfig(head_dim=16)
    with pytest.raises(ValueError, match="section: must sum to rotary_dim/2 = 8"):
        mrope(cfg, [2, 2, 2])
    with pytest.raises(ValueError, match="style"):
        axial_rope(16, style="vit")
    with pytest.raises(ValueError, match="rotary_dim: must be a multiple of 4"):
        axial_rope(18, rotary_dim=18)
    module = MultiAxisRotaryEmbedding(mrope(cfg, [2, 3, 3]))
    q = torch.randn(1, 2, 4, 16)
    for bad, match in ((torch.zeros(2, 4, dtype=torch.long), r"expected shape \(3, 4\)"),
                       (torch.zeros(3, 4), "integer tensor"),
                       (torch.full((3, 4), -1), ">= 0"),
                       (-1, "offset must be >= 0")):
        with pytest.raises(ValueError, match=match):
            module(q, None, bad)
    with pytest.raises(ValueError, match="triton"):
        MultiAxisRotaryEmbedding(mrope(cfg, [2, 3, 3]), backend="triton")
    with pytest.raises(ValueError, match="check_positions"):
        MultiAxisRotaryEmbedding(axial_rope(16), check_positions=True)
    bounded = MultiAxisRotaryEmbedding(axial_rope(16, grid=(4, 6)), check_positions=True)
    bounded(q, None, torch.tensor([[0, 1, 2, 3], [0, 5, 5, 5]]))
    with pytest.raises(ValueError, match="axis 'col' is beyond its max position 6"):
        bounded(q, None, torch.tensor([[0, 1, 2, 3], [0, 5, 6, 5]]))
    with pytest.raises(ValueError, match="a run of 5 image tokens"):
        mrope_positions_from_token_types(torch.tensor([[0, 1, 1, 1, 1, 1]]), [[1, 4, 4]], spatial_merge_size=2)
    with pytest.raises(ValueError, match="next_text"):
        mrope_positions([1], next_text="last")
    with pytest.raises(ValueError, match="unknown axis"):
        mrope(cfg, [2, 3, 3]).extend("linear", 2.0, axes=["x"])
    with pytest.raises(ValueError, match="configs"):
        MultiAxisRope(axes=("a", "b"), configs=(cfg,), pair_axis=[0], pair_index=[0], head_dim=16)
