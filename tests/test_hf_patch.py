"""ropekit.hf.patch: ropekit's rotation inside transformers models, checked against transformers itself.

Tiny random models of every supported family (tests/conftest.py): patched with "default" they give the
unpatched logits; patched with a scaling method they give the logits of transformers' own rope_type for it.
Two models patched at once each keep their own RoPE; the rotation goes through ``ropekit.apply_rotary`` with
the backend asked for.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import traceback

import pytest
import torch
from tiny import (
    TINY_CONFIGS,
    TINY_TRAINED_LENGTH,
    make_tiny_config,
    make_tiny_model,
)
from hf_models import (  # noqa: F401 - transformers_log is a fixture
    ATOL,
    LONG,
    cache_of,
    decode_logits,
    hf_rope,
    logits,
    scaled_pair,
    token_ids,
    transformers_log,
)

import ropekit
from ropekit import RopeConfig
from ropekit.hf import active_patch, apply_rope, hf_config_for

FAMILIES = list(TINY_CONFIGS)
ROPE_FAMILIES = [f for f in FAMILIES if f != "gptj"]  # families with transformers rope_parameters


@pytest.mark.parametrize("family", FAMILIES)
def test_default_patch_gives_the_unpatched_logits(family, monkeypatch):
    model = make_tiny_model(family)
    seq = TINY_TRAINED_LENGTH if family == "gptj" else LONG  # GPT-J's own table stops at n_positions
    ids = token_ids(seq=seq)
    reference = logits(model, ids)
    rotated = []
    real_apply = ropekit.apply_rotary

    def spy(q, k, *args, **kwargs):
        rotated.extend(t for t in (q, k) if t is not None)
        return real_apply(q, k, *args, **kwargs)

    monkeypatch.setattr(ropekit, "apply_rotary", spy)
    with apply_rope(model, RopeConfig.from_hf(model.config)):
        patched = logits(model, ids)
    # The numbers came from ropekit: q and k rotated by ropekit.apply_rotary in every layer.
    assert len(rotated) == 2 * model.config.num_hidden_layers
    torch.testing.assert_close(patched, reference, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "family,method",
    [(f, m) for f in ROPE_FAMILIES if f != "phi3" for m in ("linear", "yarn", "llama3", "dynamic", "longrope")]
    + [("phi3", "longrope")],  # transformers' Phi-3 config accepts only longrope scaling
)
def test_scaled_patch_matches_transformers_rope_type(family, method):
    base, reference = scaled_pair(family, method)
    cfg = RopeConfig.from_hf(reference.config)
    assert cfg.method == method
    with apply_rope(base, cfg):
        for seq in (LONG, 40):  # beyond and within the trained length (longrope: long vs short factors)
            ids = token_ids(seq=seq)
            torch.testing.assert_close(logits(base, ids), logits(reference, ids), atol=ATOL, rtol=0)
def test_scaling_changes_the_logits_beyond_noise():
    """The parity above is not trivially true: a scaled rotation moves the logits far more than ATOL."""
    base, reference = scaled_pair("llama", "yarn")
    ids = token_ids()
    assert (logits(base, ids) - logits(reference, ids)).abs().max() > 100 * ATOL


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_base_change_and_ntk_match_transformers_with_the_new_theta(family):
    base = make_tiny_model(family)
    cfg0 = RopeConfig.from_hf(base.config)
    for cfg in (cfg0.extend("base", new_base=5e5), cfg0.extend("ntk", 3.0)):
        theta = cfg.to_hf()["rope_parameters"]["rope_theta"]
        reference = make_tiny_model(family, rope={"rope_theta": theta})
        reference.load_state_dict(base.state_dict())
        with apply_rope(base, cfg):
            torch.testing.assert_close(logits(base, token_ids()), logits(reference, token_ids()), atol=ATOL, rtol=0)
def test_gptj_scaled_rotation_beyond_its_own_table():
    """GPT-J (interleaved, partial rotary): linear s=2 at positions 2p equals plain RoPE at p, out to 2x n_positions."""
    model = make_tiny_model("gptj")
    cfg0 = RopeConfig.from_hf(model.config)
    assert (cfg0.layout, cfg0.rotary_dim, cfg0.head_dim) == ("gptj", 8, 16)
    ids = token_ids(seq=TINY_TRAINED_LENGTH)
    plain = logits(model, ids)
    with apply_rope(model, cfg0.extend("linear", 2.0)):
        doubled = torch.arange(0, 2 * TINY_TRAINED_LENGTH, 2)[None].expand(2, -1)
        torch.testing.assert_close(logits(model, ids, position_ids=doubled), plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("family,method", [("llama", "yarn"), ("gpt_neox", "linear"), ("gptj", "linear"),
                                           ("qwen3", "llama3")])
def test_kv_cache_decoding_equals_the_full_forward(family, method):
    model = make_tiny_model(family)
    cfg = RopeConfig.from_hf(model.config).extend(method, 2.0)
    ids, prompt = token_ids(seq=120), 70
    with apply_rope(model, cfg):
        full = logits(model, ids)[:, prompt - 1:-1]
        steps = decode_logits(model, ids, prompt)
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("method", ["dynamic", "dynamic_yarn", "longrope"])
def test_length_dependent_scale_is_frozen_at_the_prefill(method):
    """Freeze policy: the prefill fixes the scale; decoding keeps it, so the cache stays consistent."""
    model = make_tiny_model("llama")
    cfg0 = RopeConfig.from_hf(model.config)
    if method == "dynamic":
        cfg = cfg0.extend("dynamic", 2.0)
    else:
        cfg = RopeConfig.from_hf(make_tiny_config("llama", rope=hf_rope("longrope", cfg0.rotary_dim),
                                                  max_position_embeddings=256))
    ids, prompt = token_ids(seq=110), 80  # the prompt is already past the trained length (64)
    with apply_rope(model, cfg) as patch:
        steps = decode_logits(model, ids, prompt)
        patch.fix_length(prompt)  # a full forward with the scale taken where the prefill took it
        full_at_prompt_scale = logits(model, ids)[:, prompt - 1:-1]
        patch.fix_length(None)
        full_own_scale = logits(model, ids)[:, prompt - 1:-1]
    torch.testing.assert_close(steps, full_at_prompt_scale, atol=ATOL, rtol=0)
    if method == "dynamic":  # the scale really depends on the length (longrope's long factors do not)
        assert (full_own_scale - full_at_prompt_scale).abs().max() > 100 * ATOL


def test_fixed_length_decoding_equals_a_full_forward_at_that_length():
    model = make_tiny_model("mistral")
    cfg = RopeConfig.from_hf(model.config).extend("dynamic", 2.0)
    ids = token_ids(seq=100)
    with apply_rope(model, cfg) as patch:
        full = logits(model, ids)[:, 29:-1]  # scale at 100, the sequence's own length
        patch.fix_length(100)
        steps = decode_logits(model, ids, 30)  # a short prefill, but the scale is pinned at 100
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
def test_dynamic_recompute_policy_follows_transformers_during_decoding():
    base, reference = scaled_pair("llama", "dynamic")
    cfg = RopeConfig.from_hf(reference.config)
    ids = token_ids(seq=100)
    expected = decode_logits(reference, ids, 80)  # transformers recomputes the base as the sequence grows
    with apply_rope(base, cfg, dynamic_policy="recompute"):
        torch.testing.assert_close(decode_logits(base, ids, 80), expected, atol=ATOL, rtol=0)


def test_packed_rows_with_restarting_positions():
    base, reference = scaled_pair("qwen2", "yarn")
    ids = token_ids(seq=140)
    packed = torch.stack([torch.cat([torch.arange(60), torch.arange(80)]),        # two documents
                          torch.cat([torch.arange(30), torch.arange(100) + 5, torch.arange(10)])])  # three, offset
    with apply_rope(base, RopeConfig.from_hf(reference.config)):
        got = logits(base, ids, position_ids=packed)
        plain = logits(base, ids)
    torch.testing.assert_close(got, logits(reference, ids, position_ids=packed), atol=ATOL, rtol=0)
    assert (got - plain).abs().max() > 100 * ATOL  # the per-row positions were used


def test_remove_restores_the_model_exactly():
    model = make_tiny_model("llama")
    module = sys.modules[type(model.model.rotary_emb).__module__]
    original_fn, original_rotary = module.apply_rotary_pos_emb, model.model.rotary_emb
    state = {k: v.clone() for k, v in model.state_dict().items()}
    ids = token_ids()
    before = logits(model, ids)
    modules_before = list(model.modules())
    patch = apply_rope(model, RopeConfig.from_hf(model.config).extend("yarn", 4.0))
    assert patch.active and active_patch(model) is patch
    assert model.model.rotary_emb is not original_rotary
    assert module.apply_rotary_pos_emb is not original_fn
    assert set(model.state_dict()) == set(state)  # the adapter adds no parameters or buffers
    scaled = logits(model, ids)
    assert (scaled - before).abs().max() > 100 * ATOL
    patch.remove()
    patch.remove()  # idempotent
    assert model.model.rotary_emb is original_rotary
    assert module.apply_rotary_pos_emb is original_fn
    assert all(a is b for a, b in zip(model.modules(), modules_before, strict=True))
    assert active_patch(model) is None
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert torch.equal(logits(model, ids), before)


def test_patch_is_scoped_to_its_model():
    """Another model of the same family in the process keeps transformers' RoPE while one is patched."""
    patched, other = make_tiny_model("llama"), make_tiny_model("llama")
    ids = token_ids()
    expected = logits(other, ids)
    with apply_rope(patched, RopeConfig.from_hf(patched.config).extend("linear", 4.0)):
        assert torch.equal(logits(other, ids), expected)
        with pytest.raises(ValueError, match="already patched"):
            apply_rope(patched, RopeConfig.from_hf(patched.config))
        with apply_rope(other, RopeConfig.from_hf(other.config)):  # two live patches share the dispatcher
            torch.testing.assert_close(logits(other, ids), expected, atol=ATOL, rtol=0)
        assert torch.equal(logits(other, ids), expected)


def test_generation_past_the_trained_length_reminder_only_while_patched(transformers_log):
    model = make_tiny_model("llama")  # max_position_embeddings 64
    ids = token_ids(batch=1, seq=70) % 250 + 3
    cfg = RopeConfig.from_hf(model.config).extend("yarn", 2.0)

    def generate():
        logging.Logger.warning_once.cache_clear()  # transformers prints it once per process
        transformers_log.clear()
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False, pad_token_id=0)
        return any("exceeded the model's predefined maximum length" in m for m in transformers_log)

    assert generate()  # unpatched: transformers' reminder
    with apply_rope(model, cfg):
        assert not generate()  # ropekit runs the model there on purpose
        other = make_tiny_model("llama")
        with apply_rope(other, RopeConfig.from_hf(other.config)):
            pass  # a second patch coming and going keeps the first one's filter
        assert not generate()
    assert generate()  # the filter went with the patch


@pytest.mark.slow
def test_smollm2_yarn_matches_transformers_builtin_yarn(smollm2, stdlib_text):
    """SmolLM2 (GGUF), yarn s=2 through ropekit vs transformers' own yarn module: same ppl within 0.5%."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    model, tok = smollm2.model, smollm2.tokenizer
    assert smollm2.family == "llama"
    assert (smollm2.rope.base, smollm2.rope.head_dim, smollm2.rope.original_max_position) == (1e5, 64, 8192)
    ids = tok(stdlib_text, return_tensors="pt")["input_ids"][:, :2048]
    assert ids.shape[1] == 2048

    def ppl():
        with torch.no_grad():
            return math.exp(model(ids, labels=ids).loss.item())

    cfg = smollm2.rope.extend("yarn", 2.0)
    with apply_rope(model, cfg):
        ropekit_ppl = ppl()
    hf_config = type(model.config).from_dict(hf_config_for(model.config, cfg))
    own = model.model.rotary_emb
    model.model.rotary_emb = LlamaRotaryEmbedding(config=hf_config)
    try:
        hf_ppl = ppl()
    finally:
        model.model.rotary_emb = own
    print(f"SmolLM2 2048 tokens, yarn s=2: ropekit ppl {ropekit_ppl:.4f}, transformers ppl {hf_ppl:.4f}")
    assert abs(ropekit_ppl / hf_ppl - 1) < 0.005


def test_generate_through_the_patch_keeps_the_prefill_scale():
    """model.generate (KV cache, dynamic NTK): its logits equal full forwards with the scale of the prompt."""
    model = make_tiny_model("llama")
    cfg = RopeConfig.from_hf(model.config).extend("dynamic", 2.0)
    ids = token_ids(seq=70) % 250 + 3
    with apply_rope(model, cfg) as patch:
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                             pad_token_id=0, output_logits=True, return_dict_in_generate=True)
        steps = torch.stack(out.logits, dim=1)  # (batch, 12, vocab)
        patch.fix_length(70)  # the length the prefill froze the scale at
        full = logits(model, out.sequences[:, :-1])[:, 69:]
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


# ---------------------------------------------------------------------- two models, sequences, backends
def _cfg(model, method, factor=2.0):
    return RopeConfig.from_hf(model.config).extend(method, factor)


def test_two_models_patched_differently_each_compute_their_own_logits():
    """Same weights, yarn on one, linear on the other, a third unpatched: forwards interleaved (and from two
    threads) give each model exactly what it gives alone. A shared "last patched" state would mix them up."""
    a, b, plain = make_tiny_model("llama"), make_tiny_model("llama"), make_tiny_model("llama")
    ids = token_ids()
    with apply_rope(a, _cfg(a, "yarn", 4.0)):
        alone_a = logits(a, ids)
    with apply_rope(b, _cfg(b, "linear", 4.0)):
        alone_b = logits(b, ids)
    alone_plain = logits(plain, ids)
    assert (alone_a - alone_b).abs().max() > 100 * ATOL and (alone_a - alone_plain).abs().max() > 100 * ATOL
    with apply_rope(a, _cfg(a, "yarn", 4.0)), apply_rope(b, _cfg(b, "linear", 4.0)):
        for _ in range(2):
            assert torch.equal(logits(b, ids), alone_b)
            assert torch.equal(logits(plain, ids), alone_plain)
            assert torch.equal(logits(a, ids), alone_a)
        results = {}
        threads = [threading.Thread(target=lambda m=m, k=k: results.__setitem__(k, logits(m, ids)))
                   for k, m in (("a", a), ("b", b), ("plain", plain))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert torch.equal(results["a"], alone_a) and torch.equal(results["b"], alone_b)
    assert torch.equal(results["plain"], alone_plain)
    # Removed in any order: the other patch keeps working; transformers' function is back after the last.
    module = sys.modules[type(plain.model.rotary_emb).__module__]
    original = module.apply_rotary_pos_emb
    patch_a, patch_b = apply_rope(a, _cfg(a, "yarn", 4.0)), apply_rope(b, _cfg(b, "linear", 4.0))
    assert module.apply_rotary_pos_emb is not original
    patch_a.remove()
    assert torch.equal(logits(b, ids), alone_b) and torch.equal(logits(a, ids), alone_plain)
    patch_b.remove()
    assert module.apply_rotary_pos_emb is original and torch.equal(logits(b, ids), alone_plain)


def test_two_models_decoding_interleaved_keep_their_own_sequence_state():
    """dynamic NTK on both, prompts of 80 and 100 tokens: decoding steps alternate between the models, and each
    keeps the scale its own prefill froze."""
    a, b = make_tiny_model("llama"), make_tiny_model("llama")
    ids = token_ids(seq=110)
    with apply_rope(a, _cfg(a, "dynamic")):
        alone_a = decode_logits(a, ids, 80)
    with apply_rope(b, _cfg(b, "dynamic")):
        alone_b = decode_logits(b, ids, 100)
    with apply_rope(a, _cfg(a, "dynamic")), apply_rope(b, _cfg(b, "dynamic")), torch.no_grad():
        out_a, out_b = a(ids[:, :80], use_cache=True), b(ids[:, :100], use_cache=True)
        steps_a, steps_b = [out_a.logits[:, -1]], [out_b.logits[:, -1]]
        for t in range(80, 109):
            out_a = a(ids[:, t:t + 1], use_cache=True, cache=cache_of(out_a))
            steps_a.append(out_a.logits[:, -1])
            if t + 20 < 109:
                out_b = b(ids[:, t + 20:t + 21], use_cache=True, cache=cache_of(out_b))
                steps_b.append(out_b.logits[:, -1])
    torch.testing.assert_close(torch.stack(steps_a, 1), alone_a, atol=ATOL, rtol=0)
    torch.testing.assert_close(torch.stack(steps_b, 1), alone_b, atol=ATOL, rtol=0)


def test_a_prefill_starts_a_sequence_because_the_cache_is_empty_not_because_of_position_0():
    """After a 100-token sequence, a cache-less forward at positions 20..59 is a new sequence (within the
    trained length: unscaled), as transformers' dynamic NTK has it; it does not inherit the scale at 100."""
    base, reference = scaled_pair("llama", "dynamic")
    ids = token_ids(seq=100)
    shifted = torch.arange(20, 60)[None].expand(2, -1)
    with apply_rope(base, RopeConfig.from_hf(reference.config)):
        torch.testing.assert_close(logits(base, ids), logits(reference, ids), atol=ATOL, rtol=0)
        got = logits(base, ids[:, :40], position_ids=shifted)
    expected = logits(reference, ids[:, :40], position_ids=shifted)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    with apply_rope(base, RopeConfig.from_hf(reference.config)) as patch:
        patch.fix_length(100)
        assert (logits(base, ids[:, :40], position_ids=shifted) - expected).abs().max() > 100 * ATOL


def test_begin_sequence_takes_the_scale_at_the_length_the_caller_gives():
    model = make_tiny_model("mistral")
    ids = token_ids(seq=100)
    with apply_rope(model, _cfg(model, "dynamic")) as patch:
        full = logits(model, ids)[:, 29:-1]  # scale at 100, the sequence's own length
        patch.begin_sequence(100)
        steps = decode_logits(model, ids, 30)  # a short prefill, the scale at the 100 the caller said
        again = decode_logits(model, ids, 30)  # the next prefill: its own length (30) again
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)
    assert (again - steps).abs().max() > 100 * ATOL
    with pytest.raises(ValueError, match="total_len"):
        patch.begin_sequence(0)


class _PatchReads:
    """Counts tensor -> Python conversions (host syncs on an accelerator) made by the patch and its sequence
    state: those whose innermost ropekit frame is in ``ropekit/hf/`` or ``ropekit/module.py``. The core's
    argument checks are left out: they read CPU tensors only (``torch._assert_async`` on accelerators)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("__int__", "__bool__", "__index__", "item", "tolist"):
            real = getattr(torch.Tensor, name)

            def counted(t, *a, _real=real, **k):
                frames = [f.filename.replace(os.sep, "/") for f in traceback.extract_stack()[:-1]]
                mine = [f for f in frames if "/ropekit/" in f]
                if mine and ("/ropekit/hf/" in mine[-1] or mine[-1].endswith("/ropekit/module.py")):
                    self.count += 1
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, counted)

    def during(self, fn):
        before = self.count
        fn()
        return self.count - before


@pytest.mark.parametrize("method,prefill_reads", [("yarn", 0), ("dynamic", 1), ("longrope", 1)])
def test_only_a_prefill_of_unknown_length_reads_from_the_device(method, prefill_reads, monkeypatch):
    """Decoding steps read nothing; a length-dependent prefill reads its length once, unless the caller gave it."""
    model = make_tiny_model("llama")
    cfg = (_cfg(model, method) if method != "longrope" else RopeConfig.from_hf(
        make_tiny_config("llama", rope=hf_rope("longrope", 16), max_position_embeddings=256)))
    ids = token_ids(seq=72)
    reads = _PatchReads(monkeypatch)
    with apply_rope(model, cfg) as patch, torch.no_grad():
        out = {}
        assert reads.during(lambda: out.update(o=model(ids[:, :70], use_cache=True))) == prefill_reads
        for t in (70, 71):
            assert reads.during(lambda t=t: out.update(o=model(ids[:, t:t + 1], use_cache=True,
                                                               cache=cache_of(out["o"])))) == 0
        patch.begin_sequence(72)
        assert reads.during(lambda: model(ids[:, :70], use_cache=True)) == 0
        assert reads.during(lambda: model(ids)) == prefill_reads  # no cache, no length given: read once


def test_backend_is_honoured_or_refused(monkeypatch):
    model = make_tiny_model("qwen2")
    cfg = _cfg(model, "yarn")
    with pytest.raises(ValueError, match="backend: 'fast' not accepted"):
        apply_rope(model, cfg, backend="fast")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        with pytest.raises(ValueError, match="backend: 'triton' cannot rotate") as info:
            apply_rope(model, cfg, backend="triton")
        assert "\n" not in str(info.value)
        assert active_patch(model) is None
    ids = token_ids(seq=80)
    with apply_rope(model, cfg, backend="reference"):
        expected = logits(model, ids)
    used = []
    real_apply = ropekit.apply_rotary

    def spy(*args, **kwargs):
        used.append(kwargs.get("backend"))
        return real_apply(*args, **kwargs)

    monkeypatch.setattr(ropekit, "apply_rotary", spy)
    with apply_rope(model, cfg, backend="cpu"):
        got = logits(model, ids)
    assert used and set(used) == {"cpu"}
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


TRITON_IN_A_MODEL = """
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import ropekit
from tiny import make_tiny_model
from ropekit import RopeConfig
from ropekit.hf import apply_rope
model = make_tiny_model("qwen3")
cfg = RopeConfig.from_hf(model.config).with_method("yarn", factor=2.0)
ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))
used = []
real = ropekit.apply_rotary
ropekit.apply_rotary = lambda q, *a, **k: used.append((k["backend"], q.shape[-2])) or real(q, *a, **k)
out = {}
for backend in ("reference", "triton"):
    with apply_rope(model, cfg, backend=backend), torch.no_grad():
        out[backend] = model(ids).logits
assert used.count(("triton", 40)) == model.config.num_hidden_layers, used  # q, k of every layer
print("max-diff", (out["triton"] - out["reference"]).abs().max().item())
"""


def test_triton_backend_inside_a_model_in_the_interpreter(tmp_path):
    """backend="triton" reaches the kernel from a patched model (Triton's interpreter on the CPU: its own
    process, since TRITON_INTERPRET must be set before triton is imported) and gives the reference's logits."""
    import subprocess

    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-c", TRITON_IN_A_MODEL, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    diff = float(run.stdout.split("max-diff")[-1])
    assert diff <= ATOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_cast_to_half_precision_is_patched(dtype, tiny_model):
    """``model.to(bf16)`` casts the rotary module's inv_freq too: its own tables are then a few eps off ropekit's,
    and the structure probe must still recognise them (the demo model runs in bf16 on CPUs)."""
    model = tiny_model("llama").to(dtype)
    ids = torch.arange(3, 40)[None]
    with torch.inference_mode():
        own = model(ids).logits.float()
        with apply_rope(model, RopeConfig.from_hf(model.config)):
            patched = model(ids).logits.float()
    # ropekit's float32 angles differ from the model's half-precision ones by a few eps: close, not equal
    assert torch.allclose(patched, own, atol=0.1, rtol=0.05)
