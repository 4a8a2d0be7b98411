"""GGUF in and out: RoPE read as llama.cpp reads it (metadata keys and factor tensors), and a GGUF copy with a new
RoPE whose tensors are byte-identical.

llama.cpp's arithmetic is restated here from its sources (llama-model.cpp, llama-context.cpp, ggml's rope_yarn and
ggml_rope_yarn_corr_dims), independently of ropekit.gguf, and every file read is checked against it.
"""

from __future__ import annotations

import math
import warnings

import gguf
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from ropekit import RopeConfig
from ropekit.cli import build_app
from ropekit.gguf import read_rope, rope_plan
from ropekit.hf.export_gguf import export_gguf, vllm_command
from ropekit.hf.load import demo_model_path
from ropekit.methods import frequencies

runner = CliRunner()


# ---------------------------------------------------------------------- llama.cpp, restated
def _field(reader: gguf.GGUFReader, key: str, default=None):
    fld = reader.get_field(key)
    return default if fld is None else fld.contents()


LLAMA_CPP_YARN_KEY_ARCHS = {"grok", "laguna", "mistral3"}


def llama_cpp_rope(path, pos: int = 1):
    """(theta of every pair at position ``pos``, cos/sin multiplier) as llama.cpp computes them for ``path``
    (a GGUF file or a ``gguf.GGUFReader`` of one).

    Straight from the sources: hparams (llama-model.cpp load_hparams), cparams (llama-context.cpp), the ramp and
    correction dims (ggml.c ggml_rope_yarn_corr_dims, ggml-cpu rope_yarn / rope_yarn_ramp), freq factors
    (rope_freqs; rope_factors_long when the context exceeds the original length, as -c is set to the file's
    context length).
    """
    r = path if isinstance(path, gguf.GGUFReader) else gguf.GGUFReader(str(path))
    arch = _field(r, "general.architecture")
    k = lambda s, d=None: _field(r, f"{arch}.{s}", d)
    n_embd, n_head = k("embedding_length"), k("attention.head_count")
    head = k("attention.key_length", n_embd // n_head)
    n_dims = k("rope.dimension_count", head)
    base = k("rope.freq_base", 10000.0)
    n_ctx_train = k("context_length")
    n_ctx_orig = k("rope.scaling.original_context_length", n_ctx_train)
    scaling = k("rope.scaling.type", "linear")
    ropescale = k("rope.scaling.factor", 0.0) or k("rope.scale_linear", 0.0)
    freq_scale = 1.0 if ropescale == 0 else 1.0 / ropescale
    if scaling == "none":
        freq_scale = 1.0
    # The YaRN ramp keys: read by a few architectures' loaders only (grok, laguna, mistral3); defaults elsewhere.
    ramp = k if arch in LLAMA_CPP_YARN_KEY_ARCHS else (lambda s, d=None: d)
    ext = ramp("rope.scaling.yarn_ext_factor", -1.0)
    if ext < 0:
        ext = 1.0 if scaling == "yarn" else 0.0
    beta_fast, beta_slow = ramp("rope.scaling.yarn_beta_fast", 32.0), ramp("rope.scaling.yarn_beta_slow", 1.0)
    attn = k("rope.scaling.yarn_attn_factor", 1.0)
    if ext != 0:
        mscale = lambda s, m: 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0
        factor = 1.0 / freq_scale
        attn = mscale(factor, 1.0) * (1.0 / (1.0 + 0.1 * math.log(factor)))
    attn *= k("rope.scaling.attn_factor", 1.0)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors if t.name.startswith("rope_")}
    ff = tensors.get("rope_freqs.weight")
    if ff is None and "rope_factors_long.weight" in tensors:
        ff = tensors["rope_factors_long.weight" if n_ctx_train > n_ctx_orig else "rope_factors_short.weight"]
    if ff is None:
        ff = np.ones(n_dims // 2)

    def corr_dim(n_rot):
        return n_dims * math.log(n_ctx_orig / (n_rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(0.0, math.floor(corr_dim(beta_fast)))
    high = min(n_dims - 1.0, math.ceil(corr_dim(beta_slow)))
    theta_scale = base ** (-2.0 / n_dims)
    thetas, mscale_out = [], attn
    for i0 in range(0, n_dims, 2):
        theta_extrap = pos * theta_scale ** (i0 / 2) / ff[i0 // 2]
        theta_interp = freq_scale * theta_extrap
        theta = theta_interp
        if ext != 0.0:
            y = (i0 / 2 - low) / max(0.001, high - low)
            ramp_mix = (1 - min(1.0, max(0.0, y))) * ext
            theta = theta_interp * (1 - ramp_mix) + theta_extrap * ramp_mix
        thetas.append(theta)
    if ext != 0.0:
        mscale_out = attn * (1.0 + 0.1 * math.log(1.0 / freq_scale))
    return np.array(thetas), mscale_out


def assert_rotates_like_llama_cpp(path, cfg: RopeConfig):
    theta, scale = llama_cpp_rope(path)
    got = frequencies(cfg, cfg.target_length)
    np.testing.assert_allclose(got.inv_freq64.numpy(), theta, rtol=2e-6, atol=0)
    assert got.attention_scale == pytest.approx(scale, rel=2e-6)


# ---------------------------------------------------------------------- small GGUF files
def write_gguf_file(path, arch="llama", *, heads=4, head_dim=16, context=4096, keys=None, tensors=None):
    """A small GGUF with one ordinary tensor plus ``tensors`` (float32) and RoPE ``keys`` (after ``<arch>.``)."""
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(context)
    w.add_embedding_length(heads * head_dim)
    w.add_head_count(heads)
    w.add_block_count(1)
    for key, value in (keys or {}).items():
        name = f"{arch}.{key}"
        if isinstance(value, str):
            w.add_string(name, value)
        elif isinstance(value, (list, tuple)):
            w.add_array(name, list(value))
        elif isinstance(value, int) and not isinstance(value, bool):
            w.add_uint32(name, value)
        else:
            w.add_float32(name, float(value))
    w.add_tensor("token_embd.weight", np.arange(heads * head_dim * 8, dtype=np.float32).reshape(8, heads * head_dim))
    for name, values in (tensors or {}).items():
        w.add_tensor(name, np.asarray(values, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def convert_llama3_factors(base, dim, factor, low, high, original):
    """rope_freqs as convert_hf_to_gguf.py computes them for a transformers llama3 rope_scaling."""
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    out = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


# ---------------------------------------------------------------------- the demo: export yarn x2, read back
ROPE_KEYS = {"llama.rope.scaling.type", "llama.rope.scaling.factor", "llama.rope.scaling.original_context_length",
             "llama.context_length", "llama.rope.freq_base"}


def test_demo_round_trip_yarn_x2_through_the_cli(tmp_path):
    source = demo_model_path()
    out = tmp_path / "smollm2-yarn2.gguf"
    result = runner.invoke(build_app(), ["export", "demo", "--method", "yarn", "--factor", "2", "--format", "gguf",
                                         "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert f"llama-server -m {out} -c 16384" in result.stdout

    # Read back with the gguf package: the RoPE keys llama.cpp reads ...
    old, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    assert _field(new, "llama.rope.scaling.type") == "yarn"
    assert _field(new, "llama.rope.scaling.factor") == 2.0
    assert _field(new, "llama.rope.scaling.original_context_length") == 8192
    assert _field(new, "llama.context_length") == 16384
    assert _field(new, "llama.rope.freq_base") == _field(old, "llama.rope.freq_base") == 100000.0
    # ... every other key unchanged (type and value), in the same order ...
    def others(reader):
        return [(n, [int(t) for t in f.types], f.contents()) for n, f in reader.fields.items()
                if n not in ROPE_KEYS and not n.startswith("GGUF.")]
    assert others(new) == others(old)
    # ... and every tensor byte-identical (nothing requantised), same names, types and shapes.
    assert [(t.name, t.tensor_type, t.shape.tolist()) for t in new.tensors] == \
           [(t.name, t.tensor_type, t.shape.tolist()) for t in old.tensors]
    for a, b in zip(old.tensors, new.tensors):
        assert a.data.tobytes() == b.data.tobytes(), a.name

    # Read back with ropekit: the same RoPE as asked for, rotating as llama.cpp rotates the file.
    want = RopeConfig.from_gguf(source).extend("yarn", 2)
    assert RopeConfig.from_gguf(out) == want
    assert_rotates_like_llama_cpp(new, want)
    assert_rotates_like_llama_cpp(old, RopeConfig.from_gguf(source))

    # The output rules: an existing file is refused (before any copying), and nothing else was left behind.
    again = runner.invoke(build_app(), ["export", "demo", "--method", "yarn", "--factor", "2", "--format", "gguf",
                                        "--out", str(out)])
    assert again.exit_code == 2 and "already exists" in again.stderr and "--overwrite" in again.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]


@pytest.mark.parametrize("args, fragment", [
    (["--method", "dynamic", "--factor", "2"], "llama.cpp has no 'dynamic'"),
    (["--method", "yarn", "--factor", "2", "--no-truncate"], "--truncate: llama.cpp always rounds"),
    (["--method", "yarn", "--factor", "2", "--dtype", "float16"], "--dtype: the GGUF export copies"),
    (["--method", "yarn", "--factor", "2", "--format", "onnx"], "--format: 'onnx' not accepted"),
])
def test_gguf_export_refusals_are_one_line_before_any_work(tmp_path, args, fragment):
    fmt = [] if "--format" in args else ["--format", "gguf"]
    result = runner.invoke(build_app(), ["export", "demo", *args, *fmt, "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not list(tmp_path.iterdir())


def test_gguf_export_needs_a_gguf_model(tmp_path, tiny_folder):
    result = runner.invoke(build_app(), ["export", str(tiny_folder), "--method", "yarn", "--factor", "2",
                                         "--format", "gguf", "--out", str(tmp_path / "x.gguf")])
    assert result.exit_code == 2 and "--format gguf: MODEL must be a .gguf file" in result.stderr


# ---------------------------------------------------------------------- GGUF in: the factor tensors and keys
def test_llama31_rope_freqs_read_as_llama3(tmp_path):
    factors = convert_llama3_factors(500000.0, 128, 8.0, 1.0, 4.0, 8192)
    path = write_gguf_file(tmp_path / "llama31.gguf", heads=2, head_dim=128, context=131072,
                           keys={"rope.freq_base": 500000.0, "rope.dimension_count": 128},
                           tensors={"rope_freqs.weight": factors})
    cfg = RopeConfig.from_gguf(path)
    hf = RopeConfig.from_hf({"model_type": "llama", "head_dim": 128, "hidden_size": 256, "num_attention_heads": 2,
                             "max_position_embeddings": 131072, "rope_theta": 500000.0,
                             "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}})
    assert (cfg.method, cfg.factor, cfg.original_max_position, cfg.target_length) == ("llama3", 8.0, 8192, 131072)
    assert cfg.low_freq_factor in (None, 1.0) and cfg.high_freq_factor in (None, 4.0)
    assert_rotates_like_llama_cpp(path, cfg)
    np.testing.assert_allclose(frequencies(cfg).inv_freq64, frequencies(hf).inv_freq64, rtol=1e-6)


def test_llama4_rope_freqs_without_a_blend_band():
    """Llama 4: low_freq_factor == high_freq_factor == 1, so every pair is kept or divided by s."""
    plain = 500000.0 ** (-np.arange(0, 128, 2, dtype=np.float64) / 128)
    divisors = [16.0 if 2 * math.pi / f > 8192 else 1.0 for f in plain]
    meta = {"general.architecture": "llama4", "llama4.context_length": 10485760, "llama4.embedding_length": 256,
            "llama4.attention.head_count": 2, "llama4.rope.freq_base": 500000.0, "rope_freqs.weight": divisors}
    for extra in ({}, {"llama4.rope.scaling.original_context_length": 8192}):
        cfg = RopeConfig.from_gguf({**meta, **extra})
        assert (cfg.method, cfg.factor, cfg.original_max_position, cfg.high_freq_factor) == ("llama3", 16.0, 8192, 1.0)
        np.testing.assert_allclose(frequencies(cfg).inv_freq64.numpy(), plain / np.asarray(divisors), rtol=1e-12)


def test_phi3_longrope_factors_and_attn_factor(tmp_path):
    pairs = 16
    short = [1.0 + 0.01 * i for i in range(pairs)]
    long = [1.0 + 0.5 * i for i in range(pairs)]
    attn = math.sqrt(1 + math.log(131072 / 4096) / math.log(4096))
    path = write_gguf_file(tmp_path / "phi3.gguf", arch="phi3", heads=2, head_dim=32, context=131072,
                           keys={"rope.dimension_count": 32, "rope.scaling.attn_factor": attn,
                                 "rope.scaling.original_context_length": 4096},
                           tensors={"rope_factors_long.weight": long, "rope_factors_short.weight": short})
    cfg = RopeConfig.from_gguf(path)
    assert (cfg.method, cfg.original_max_position, cfg.target_length, cfg.factor) == ("longrope", 4096, 131072, 32.0)
    np.testing.assert_allclose(cfg.long_factor, np.float32(long), rtol=0)
    np.testing.assert_allclose(cfg.short_factor, np.float32(short), rtol=0)
    # Long factors past the original length (llama.cpp with -c 131072), short ones within it.
    assert_rotates_like_llama_cpp(path, cfg)
    plain = 10000.0 ** (-np.arange(0, 32, 2) / 32)
    np.testing.assert_allclose(frequencies(cfg, 4096).inv_freq64, plain / np.float32(short), rtol=1e-12)


def test_yarn_keys_betas_and_attn_factor(tmp_path):
    keys = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32768,
            "rope.scaling.yarn_beta_fast": 16.0, "rope.scaling.yarn_beta_slow": 2.0, "rope.scaling.attn_factor": 0.9,
            "rope.freq_base": 1e6}
    path = write_gguf_file(tmp_path / "yarn.gguf", arch="mistral3", heads=2, head_dim=64, context=131072, keys=keys)
    cfg = RopeConfig.from_gguf(path)
    assert (cfg.method, cfg.factor, cfg.original_max_position, cfg.beta_fast, cfg.beta_slow) == (
        "yarn", 4.0, 32768, 16.0, 2.0)
    assert cfg.attention_factor == pytest.approx(0.9 * (0.1 * math.log(4) + 1), rel=1e-6)
    assert_rotates_like_llama_cpp(path, cfg)
    # ext_factor 0: llama.cpp mixes none of the ramp in, so a yarn file is linear interpolation.
    path0 = write_gguf_file(tmp_path / "ext0.gguf", arch="mistral3", heads=2, head_dim=64, context=131072,
                            keys={**keys, "rope.scaling.yarn_ext_factor": 0.0, "rope.scaling.attn_factor": 1.0})
    linear = RopeConfig.from_gguf(path0)
    assert (linear.method, linear.factor) == ("linear", 4.0)
    assert_rotates_like_llama_cpp(path0, linear)


def test_yarn_ramp_keys_only_where_llama_cpp_reads_them(tmp_path):
    """Issue 19: llama.cpp reads rope.scaling.yarn_beta_fast / yarn_beta_slow / yarn_ext_factor only for a few
    architectures (grok, laguna, mistral3); any other runs its defaults whatever the file says. ropekit reads the
    rotation llama.cpp runs, and says which keys it ignored."""
    keys = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0, "rope.scaling.original_context_length": 32768,
            "rope.scaling.yarn_beta_fast": 24.0, "rope.scaling.yarn_beta_slow": 3.0, "rope.freq_base": 1e6}
    qwen = write_gguf_file(tmp_path / "qwen2.gguf", arch="qwen2", heads=2, head_dim=64, context=131072, keys=keys)
    with pytest.warns(UserWarning, match=r"gguf: qwen2.rope.scaling.yarn_beta_fast = 24.0, "
                                         r"qwen2.rope.scaling.yarn_beta_slow = 3.0 ignored: llama.cpp reads these "
                                         r"keys only for grok, laguna, mistral3"):
        cfg = RopeConfig.from_gguf(qwen)
    assert (cfg.method, cfg.factor, cfg.beta_fast, cfg.beta_slow) == ("yarn", 4.0, None, None)  # the defaults
    assert_rotates_like_llama_cpp(qwen, cfg)
    # An ext_factor llama.cpp does not read neither switches the ramp off nor is refused.
    llama = write_gguf_file(tmp_path / "llama.gguf", heads=2, head_dim=64, context=131072,
                            keys={**keys, "rope.scaling.yarn_ext_factor": 0.0})
    with pytest.warns(UserWarning, match=r"llama.rope.scaling.yarn_ext_factor = 0.0, .* ignored"):
        assert RopeConfig.from_gguf(llama) == cfg
    odd = write_gguf_file(tmp_path / "odd.gguf", heads=2, head_dim=64, context=131072,
                          keys={**keys, "rope.scaling.yarn_ext_factor": 0.5})
    with pytest.warns(UserWarning, match=r"yarn_ext_factor = 0.5"):
        assert RopeConfig.from_gguf(odd) == cfg
    # Where llama.cpp reads them, so does ropekit (and a fractional ext_factor is still refused).
    mistral = write_gguf_file(tmp_path / "mistral3.gguf", arch="mistral3", heads=2, head_dim=64, context=131072,
                              keys=keys)
    read = RopeConfig.from_gguf(mistral)
    assert (read.beta_fast, read.beta_slow) == (24.0, 3.0)
    assert_rotates_like_llama_cpp(mistral, read)
    half = write_gguf_file(tmp_path / "half.gguf", arch="mistral3", heads=2, head_dim=64, context=131072,
                           keys={**keys, "rope.scaling.yarn_ext_factor": 0.5})
    with pytest.raises(ValueError, match="mistral3.rope.scaling.yarn_ext_factor: 0.5 mixes YaRN's ramp in part"):
        RopeConfig.from_gguf(half)


def test_no_scaling_type_means_llama_cpp_linear(tmp_path):
    path = write_gguf_file(tmp_path / "lin.gguf", keys={"rope.scaling.factor": 2.0})
    cfg = RopeConfig.from_gguf(path)
    assert (cfg.method, cfg.factor) == ("linear", 2.0)
    assert_rotates_like_llama_cpp(path, cfg)
    none = write_gguf_file(tmp_path / "none.gguf", keys={"rope.scaling.type": "none", "rope.scaling.factor": 2.0})
    assert RopeConfig.from_gguf(none).method == "default"  # llama.cpp never scales with type none


def test_other_divisors_kept_exactly(tmp_path):
    factors = [1.0 + (i % 3) * 0.25 for i in range(8)]  # not Llama 3 (not monotone)
    path = write_gguf_file(tmp_path / "odd.gguf", keys={"rope.scaling.attn_factor": 1.25},
                           tensors={"rope_freqs.weight": factors})
    cfg = RopeConfig.from_gguf(path)
    assert cfg.method == "longrope" and cfg.short_factor == cfg.long_factor == tuple(factors)
    assert_rotates_like_llama_cpp(path, cfg)


def test_sliding_window_layers_rope(tmp_path):
    # Gemma 3: no key; llama.cpp fixes the sliding layers at base 10000 without scaling.
    gemma = write_gguf_file(tmp_path / "gemma3.gguf", arch="gemma3", heads=2, head_dim=32, context=131072,
                            keys={"rope.freq_base": 1e6, "rope.scaling.type": "linear", "rope.scaling.factor": 8.0,
                                  "attention.sliding_window": 1024})
    with pytest.raises(ValueError, match="layer_type: this GGUF has one RoPE per layer type; pass one of: "
                                         "full_attention, sliding_attention"):
        RopeConfig.from_gguf(gemma)
    full = RopeConfig.from_gguf(gemma, layer_type="full_attention")
    sliding = RopeConfig.from_gguf(gemma, layer_type="sliding_attention")
    assert (full.method, full.factor, full.base) == ("linear", 8.0, 1e6)
    assert (sliding.method, sliding.base) == ("default", 10000.0)
    # A file that states the sliding layers' base; they share the scaling (llama.cpp's default).
    other = write_gguf_file(tmp_path / "swa.gguf", arch="qwen2", keys={"rope.freq_base": 1e6,
                                                                       "rope.freq_base_swa": 1e4,
                                                                       "attention.sliding_window": 512})
    rope = read_rope(other)
    assert rope.full["base"] == 1e6 and rope.sliding["base"] == 1e4
    assert RopeConfig.from_gguf(other, layer_type="sliding_attention") == RopeConfig(**rope.sliding)
    assert set(rope.per_layer_type()) == {"full_attention", "sliding_attention"}
    # Sliding-window layers with the same RoPE: one RoPE.
    same = write_gguf_file(tmp_path / "same.gguf", keys={"attention.sliding_window": 512})
    assert read_rope(same).sliding is None and RopeConfig.from_gguf(same).method == "default"


def test_mrope_sections_are_kept(tmp_path):
    path = write_gguf_file(tmp_path / "qwen2vl.gguf", arch="qwen2vl", heads=2, head_dim=32,
                           keys={"rope.dimension_sections": [4, 6, 6, 0], "rope.freq_base": 1e6})
    assert read_rope(path).sections == (4, 6, 6, 0)
    with pytest.warns(UserWarning, match="M-RoPE"):
        cfg = RopeConfig.from_gguf(path)
    assert (cfg.method, cfg.base, cfg.rotary_dim) == ("default", 1e6, 32)


@pytest.mark.parametrize("keys, tensors, message", [
    ({}, {"rope_freqs.weight": [1.0] * 5}, "rope_freqs.weight: needs rope.dimension_count/2 = 8 entries"),
    ({}, {"rope_freqs.weight": [1.0] * 7 + [-2.0]}, "rope_freqs.weight: every entry must be a finite number > 0"),
    ({}, {"rope_factors_long.weight": [1.0] * 8}, "rope_factors_short.weight: missing"),
    ({"rope.scaling.type": "yarn", "rope.scaling.factor": 2.0}, {"rope_freqs.weight": [2.0] * 8},
     "yarn on top of the rope_freqs tensor"),
    ({"rope.scaling.type": "magic"}, {}, "llama.rope.scaling.type: 'magic' is not supported"),
    ({"rope.dimension_sections": [8, 8, 8, 0]}, {}, "dimension_sections: [8, 8, 8, 0] add up to more than"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, keys, tensors, message):
    path = write_gguf_file(tmp_path / "bad.gguf", keys=keys, tensors=tensors)
    with pytest.raises(ValueError) as info:
        RopeConfig.from_gguf(path)
    assert "\n" not in str(info.value) and message in str(info.value), str(info.value)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(factor=st.floats(1.5, 64), low=st.floats(0.5, 2.0), span=st.floats(0.5, 8.0),
       original=st.sampled_from([2048, 4096, 8192, 32768]), base=st.sampled_from([1e4, 5e5, 1e6]),
       with_original=st.booleans())
def test_any_llama3_divisors_rotate_as_llama_cpp(factor, low, span, original, base, with_original):
    """Divisors convert_hf_to_gguf.py writes for any llama3 scaling read back to the same frequencies (as llama3
    where the blend band pins the parameters down, exactly as per-pair factors otherwise)."""
    high = low + span
    divisors = convert_llama3_factors(base, 64, factor, low, high, original)
    meta = {"general.architecture": "llama", "llama.context_length": int(original * factor),
            "llama.embedding_length": 128, "llama.attention.head_count": 2, "llama.rope.freq_base": base,
            "rope_freqs.weight": divisors}
    if with_original:
        meta["llama.rope.scaling.original_context_length"] = original
    cfg = RopeConfig.from_gguf(meta)
    plain = base ** (-np.arange(0, 64, 2) / 64)
    np.testing.assert_allclose(frequencies(cfg).inv_freq64, plain / np.float32(divisors), rtol=1e-5)
    assert frequencies(cfg).attention_scale == 1.0
    if cfg.method == "llama3" and with_original:
        assert cfg.original_max_position == original


# ---------------------------------------------------------------------- GGUF out on small files
def _llama_file(tmp_path, name="src.gguf", **kw):
    return write_gguf_file(tmp_path / name, heads=2, head_dim=32, context=2048, keys={"rope.freq_base": 1e4}, **kw)


@pytest.mark.parametrize("method, params", [
    ("linear", {"factor": 4.0}),
    ("yarn", {"factor": 4.0, "beta_fast": 16.0, "attention_factor": 1.2}),
    ("llama3", {"factor": 8.0, "high_freq_factor": 8.0}),
    ("longrope", {"factor": 4.0, "short_factor": [1.0 + i / 64 for i in range(16)],
                  "long_factor": [1.0 + i / 4 for i in range(16)]}),
    ("ntk", {"factor": 4.0}),
    ("base", {"new_base": 5e5}),
])
def test_export_round_trips_and_rotates_as_llama_cpp(tmp_path, method, params):
    source = _llama_file(tmp_path)
    cfg = RopeConfig.from_gguf(source).extend(method, **params)
    out, plan = export_gguf(source, cfg, tmp_path / "out.gguf")
    back = RopeConfig.from_gguf(out)
    if method == "yarn":
        # A llama file: llama.cpp runs the default betas from the file alone (ropekit reads that), and
        # cfg's beta_fast with the serve flags.
        assert plan.serve_flags == ("--yarn-beta-fast", "16")
        assert back.beta_fast is None  # the default, 32
        assert_rotates_like_llama_cpp(out, back)
        back = back.replace(beta_fast=16.0)
    np.testing.assert_allclose(frequencies(back).inv_freq64, frequencies(cfg).inv_freq64, rtol=1e-6)
    assert frequencies(back).attention_scale == pytest.approx(frequencies(cfg).attention_scale, rel=1e-6)
    assert back.target_length == cfg.target_length == plan.context_length
    if method != "yarn":  # checked above, before the serve flag's beta_fast
        assert_rotates_like_llama_cpp(out, back)
    if method in ("linear", "yarn", "llama3"):
        # The same config; a stated attention factor comes back through float32 metadata.
        assert (back.attention_factor is None) == (cfg.attention_factor is None)
        if cfg.attention_factor is not None:
            assert back.attention_factor == pytest.approx(cfg.attention_factor, rel=1e-7)
        assert back.replace(attention_factor=cfg.attention_factor) == cfg
    if method == "yarn":
        assert plan.serve_flags == ("--yarn-beta-fast", "16")
    # The ordinary tensor is copied as it was.
    old, new = gguf.GGUFReader(str(source)), gguf.GGUFReader(str(out))
    embd = {t.name: t.data.tobytes() for t in new.tensors}["token_embd.weight"]
    assert embd == old.tensors[0].data.tobytes()


def test_export_default_drops_old_factor_tensors(tmp_path):
    factors = convert_llama3_factors(1e4, 32, 8.0, 1.0, 4.0, 1024)
    source = _llama_file(tmp_path, tensors={"rope_freqs.weight": factors})
    assert RopeConfig.from_gguf(source).method == "llama3"
    cfg = RopeConfig.from_gguf(source).extend("yarn", 2)  # YaRN over the plain frequencies, not over llama3's
    out, plan = export_gguf(source, cfg, tmp_path / "out.gguf")
    assert "rope_freqs.weight" in plan.remove_tensors
    assert [t.name for t in gguf.GGUFReader(str(out)).tensors] == ["token_embd.weight"]
    assert RopeConfig.from_gguf(out) == cfg


def test_export_refusals(tmp_path):
    source = _llama_file(tmp_path)
    cfg = RopeConfig.from_gguf(source)
    cases = [
        (cfg.extend("dynamic", 2), "method: llama.cpp has no 'dynamic'"),
        (cfg.extend("longrope", 2, short_factor=[1.0] * 16, long_factor=[2.0] * 16, n_hat=4), "n_hat: llama.cpp"),
        (cfg.replace(head_dim=64, rotary_dim=64), "cfg.head_dim: the GGUF file has 32"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=message):
            export_gguf(source, bad, tmp_path / "x.gguf")
    # An architecture llama.cpp gives no rope_freqs tensor cannot take llama3.
    gptneox = write_gguf_file(tmp_path / "neox.gguf", arch="gptneox", heads=2, head_dim=32)
    with pytest.raises(ValueError, match="'gptneox' models take no rope_freqs tensor"):
        export_gguf(gptneox, RopeConfig.from_gguf(gptneox).extend("llama3", 4, original_max_position=4096),
                    tmp_path / "x.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neox.gguf", "src.gguf"]
    # Never over an existing file without overwrite, never over the source.
    (tmp_path / "taken.gguf").write_bytes(b"mine")
    with pytest.raises(ValueError, match="already exists"):
        export_gguf(source, cfg.extend("yarn", 2), tmp_path / "taken.gguf")
    assert (tmp_path / "taken.gguf").read_bytes() == b"mine"
    with pytest.raises(ValueError, match="is the source file"):
        export_gguf(source, cfg.extend("yarn", 2), source, overwrite=True)


def test_rope_plan_on_metadata_only():
    meta = {"general.architecture": "phi3", "phi3.context_length": 4096, "phi3.embedding_length": 64,
            "phi3.attention.head_count": 2}
    cfg = RopeConfig.from_gguf(meta).extend("longrope", 8, short_factor=[1.0] * 16, long_factor=[3.0] * 16)
    plan = rope_plan(cfg, meta)
    assert plan.set_keys["phi3.rope.scaling.type"] == ("longrope", "STRING")
    assert plan.set_keys["phi3.context_length"] == (32768, "UINT32")
    assert set(plan.set_tensors) == {"rope_factors_long.weight", "rope_factors_short.weight"}


def test_vllm_command_for_transformers_exports():
    cfg = RopeConfig(head_dim=64, base=1e5, original_max_position=8192).extend("yarn", 2)
    command = vllm_command("out", cfg)
    assert command.startswith("vllm serve out --hf-overrides '{\"rope_parameters\":{")
    assert '"rope_type":"yarn"' in command and '"factor":2.0' in command and command.endswith("--max-model-len 16384")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert "max-model-len" in vllm_command("out", RopeConfig(head_dim=64, max_position=4096))
