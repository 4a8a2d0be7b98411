"""The public API in every calling context: torch.inference_mode(), torch.no_grad(), autograd, torch.compile.

Small inputs run the float64 reference path, large ones (2^18+ elements) the fused CPU path with its caches
(tables, output pool, in-place scratch); the Triton kernel runs interpreted on the CPU where triton is
installed. Layouts neox and gptj, partial rotary, a plain method and a length-dependent one (dynamic NTK).
Every output is checked against the reference computed outside any special context (bit for bit where the
path is bit-identical to it), and every gradient against the float64 reference.
"""

import contextlib
import importlib.util

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding
from ropekit.kernels import apply_rotary_fast

HAVE_TRITON = importlib.util.find_spec("triton") is not None

CONFIGS = {
    "plain-neox": RopeConfig(head_dim=64, base=1e4),
    "partial-gptj-yarn": RopeConfig(head_dim=64, rotary_dim=48, layout="gptj", method="yarn", factor=2.0,
                                    original_max_position=64),
    "dynamic-partial": RopeConfig(head_dim=64, rotary_dim=32, method="dynamic", factor=4.0,
                                  original_max_position=32),
}
# (batch, q heads, k heads, seq): small takes the reference path, large (2^18 elements) the cpu path.
SIZES = {"small": (2, 3, 1, 12), "large": (1, 8, 8, 256)}
CONTEXTS = {"inference_mode": torch.inference_mode, "no_grad": torch.no_grad, "plain": contextlib.nullcontext}


@pytest.fixture(autouse=True)
def fresh_caches():
    """Each test starts and ends with empty fast-path caches, so a test sees the caches it filled itself."""
    from ropekit.kernels import cpu

    cpu.clear_cache()
    yield
    cpu.clear_cache()


@pytest.fixture
def triton_interpreted(monkeypatch):
    if not HAVE_TRITON:
        pytest.skip("triton is not installed")
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(size, heads_first, seed=0, dtype=torch.float32):
    b, hq, hk, s = SIZES[size] if isinstance(size, str) else size
    gen = torch.Generator().manual_seed(seed)
    shape = (lambda h: (b, h, s, 64)) if heads_first else (lambda h: (b, s, h, 64))
    q = torch.randn(shape(hq), generator=gen).to(dtype)
    k = torch.randn(shape(hk), generator=gen).to(dtype)
    pos = torch.randint(0, 5000, (b, s), generator=gen)
    return q, k, pos


def _freqs(cfg, pos):
    return ropekit.frequencies(cfg, int(pos.max()) + 1 if cfg.length_dependent else None)


def _check(out, expected, exact):
    assert out.dtype == expected.dtype and out.shape == expected.shape
    if exact:
        assert torch.equal(out, expected)
    else:  # the Triton kernel computes its angles in fixed point: close, not bit-identical
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _backend_of(backend, size):
    from ropekit.kernels import resolve_backend

    q, k, _ = _inputs(size, True)
    return resolve_backend(backend, q, q.numel() + k.numel())


CASES = [(size, cfg, heads_first) for size in SIZES for cfg in CONFIGS for heads_first in (True, False)]


def _run_everything(cfg_name, size, heads_first, backend, q, k, pos):
    """Every public entry point once on (q, k, pos): a dict of named outputs."""
    cfg = CONFIGS[cfg_name]
    f = _freqs(cfg, pos)
    out = {}
    out["apply_rotary"] = ropekit.apply_rotary(q, k, f, pos, heads_first=heads_first, backend=backend)
    out["apply_rotary offset"] = ropekit.apply_rotary(q, k, f, 1000, heads_first=heads_first, backend=backend)
    out["inverse"] = ropekit.apply_rotary(q, None, f, pos, heads_first=heads_first, backend=backend,
                                          inverse=True)[:1]
    out["module"] = RotaryEmbedding(cfg, heads_first=heads_first, backend=backend)(q, k, pos)
    out["fast"] = apply_rotary_fast(q, k, f, pos, heads_first=heads_first, backend=backend)
    qi, ki = q.clone(), k.clone()
    ret = apply_rotary_fast(qi, ki, f, pos, heads_first=heads_first, backend=backend, inplace=True)
    assert ret[0] is qi and ret[1] is ki
    out["fast inplace"] = (qi, ki)
    out["rerotate"] = (ropekit.rerotate(k, 7, f, heads_first=heads_first),)
    if heads_first:
        cos, sin = ropekit.cos_sin(f, pos)
        out["rotate"] = (ropekit.rotate(q, cos[:, None], sin[:, None], f.layout),)
    return out


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("size,cfg_name,heads_first", CASES)
def test_public_api_in_context_equals_reference_and_leaves_caches_usable(context, size, cfg_name, heads_first):
    """Under the context every entry point returns the reference (twice: cold and warm caches); afterwards
    the same calls still work outside it, also with autograd, and on inputs made inside the context."""
    q, k, pos = _inputs(size, heads_first)
    expected = _run_everything(cfg_name, size, heads_first, "reference", q, k, pos)
    exact = True  # the reference and the cpu path are bit-identical
    for _ in range(2):
        with CONTEXTS[context]():
            got = _run_everything(cfg_name, size, heads_first, "auto", q, k, pos)
        for name, outs in expected.items():
            for o, e in zip(got[name], outs):
                _check(o, e, exact)
                if context == "inference_mode":
                    assert o.is_inference()
    # Inputs made inside the context, used outside it (inference tensors have no version counter and cannot
    # be written outside inference mode).
    with CONTEXTS[context]():
        q2, k2, pos2 = (t.clone() for t in (q, k, pos))
    got = _run_everything(cfg_name, size, heads_first, "auto", q2, k2, pos2)
    for name, outs in expected.items():
        for o, e in zip(got[name], outs):
            _check(o, e, exact)
    # Autograd afterwards, through whatever the context left in the caches.
    _check_gradients(cfg_name, size, heads_first, "auto", pos)


def _check_gradients(cfg_name, size, heads_first, backend, pos, tol=1e-5):
    """Gradients of sum(out * w) through apply_rotary, RotaryEmbedding and rerotate against the float64 reference."""
    cfg = CONFIGS[cfg_name]
    f = _freqs(cfg, pos)
    q0, k0, _ = _inputs(size, heads_first, seed=3)
    gen = torch.Generator().manual_seed(4)
    wq, wk = torch.randn(q0.shape, generator=gen), torch.randn(k0.shape, generator=gen)

    def grads(dtype, backend_, fn):
        q = q0.to(dtype).clone().requires_grad_()
        k = k0.to(dtype).clone().requires_grad_()
        oq, ok = fn(q, k, backend_)
        loss = (oq * wq.to(dtype)).sum() + (0 if ok is None else (ok * wk.to(dtype)).sum())
        loss.backward()
        return q.grad, k.grad

    fns = {
        "apply_rotary": lambda q, k, b: ropekit.apply_rotary(q, k, f, pos, heads_first=heads_first, backend=b),
        "module": lambda q, k, b: RotaryEmbedding(cfg, heads_first=heads_first, backend=b)(q, k, pos),
        "fast": lambda q, k, b: apply_rotary_fast(q, k, f, pos, heads_first=heads_first, backend=b),
        "rerotate": lambda q, k, b: (ropekit.rerotate(q, -5, f, heads_first=heads_first), None),
    }
    for name, fn in fns.items():
        ref_b = "reference"
        expect = grads(torch.float64, ref_b, fn)
        got = grads(torch.float32, backend, fn)
        for g, e in zip(got, expect):
            if g is None and e is None:
                continue
            torch.testing.assert_close(g.double(), e, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("size,cfg_name,heads_first", CASES[::2])
def test_gradients_after_inference_mode_calls(size, cfg_name, heads_first):
    """A serving process that also trains: inference-mode calls fill the caches (the module's frequencies,
    the cpu path's tables), then the same module, frequencies and positions run under autograd."""
    cfg = CONFIGS[cfg_name]
    q, k, pos = _inputs(size, heads_first)
    f = _freqs(cfg, pos)
    rope = RotaryEmbedding(cfg, heads_first=heads_first)
    fns = [lambda q, k: rope(q, k, pos), lambda q, k: ropekit.apply_rotary(q, k, f, pos, heads_first=heads_first)]
    with torch.inference_mode():
        for fn in fns:
            fn(q, k)
    w = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))
    qd = q.double().requires_grad_()
    (ropekit.apply_rotary(qd, None, f, pos, heads_first=heads_first, backend="reference")[0] * w.double()).sum().backward()
    for fn in fns:
        x = q.clone().requires_grad_()
        (fn(x, k)[0] * w).sum().backward()
        torch.testing.assert_close(x.grad.double(), qd.grad, atol=1e-5, rtol=1e-5)


def test_inplace_on_non_leaf_under_autograd_has_correct_gradient():
    """apply_rotary_fast(inplace=True) on an intermediate tensor (a projection's output) back-propagates the
    transposed rotation, on the reference and on the cpu path."""
    cfg = CONFIGS["partial-gptj-yarn"]
    for size in ("small", "large"):
        q0, k0, pos = _inputs(size, True)
        f = _freqs(cfg, pos)
        w = torch.randn(q0.shape)
        x = q0.clone().requires_grad_()
        y = x * 1.0  # not a leaf: may be rotated in place
        apply_rotary_fast(y, None, f, pos, inplace=True)
        (y * w).sum().backward()
        xd = q0.double().requires_grad_()
        (ropekit.apply_rotary(xd, None, f, pos, backend="reference")[0] * w.double()).sum().backward()
        torch.testing.assert_close(x.grad.double(), xd.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cfg_name", list(CONFIGS))
def test_gradcheck_float64_reference(cfg_name):
    """torch.autograd.gradcheck on small float64 inputs: apply_rotary (also inverse), the module, rotate, rerotate."""
    cfg = CONFIGS[cfg_name]
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    k = torch.randn(1, 1, 3, 64, dtype=torch.float64, generator=gen, requires_grad=True)
    pos = torch.tensor([[5, 90, 4000]])
    f = _freqs(cfg, pos)
    rope = RotaryEmbedding(cfg)
    cos, sin = ropekit.cos_sin(f, pos, dtype=torch.float64)
    checks = {
        "apply_rotary": lambda q, k: ropekit.apply_rotary(q, k, f, pos),
        "inverse": lambda q, k: ropekit.apply_rotary(q, k, f, pos, inverse=True),
        "module": lambda q, k: rope(q, k, pos),
        "rotate": lambda q, k: ropekit.rotate(q, cos[:, None], sin[:, None], f.layout),
        "rerotate": lambda q, k: ropekit.rerotate(k, 11, f),
    }
    for name, fn in checks.items():
        assert torch.autograd.gradcheck(fn, (q, k)), name
    with torch.inference_mode():
        rope(q.detach(), k.detach(), pos)  # an inference-mode call in between changes nothing
    assert torch.autograd.gradcheck(lambda q, k: rope(q, k, pos), (q, k))


# ------------------------------------------------------------------ the Triton kernel (interpreted)
@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("cfg_name,heads_first", [("plain-neox", True), ("partial-gptj-yarn", False),
                                                  ("dynamic-partial", True)])
def test_triton_matches_the_reference_in_every_context(triton_interpreted, context, cfg_name, heads_first):
    size = (1, 2, 1, 5)
    q, k, pos = _inputs(size, heads_first)
    expected = _run_everything(cfg_name, size, heads_first, "reference", q, k, pos)
    for _ in range(2):
        with CONTEXTS[context]():
            got = _run_everything(cfg_name, size, heads_first, "triton", q, k, pos)
        for name in ("apply_rotary", "apply_rotary offset", "inverse", "module", "fast", "fast inplace"):
            for o, e in zip(got[name], expected[name]):
                _check(o, e, exact=False)
    with CONTEXTS[context]():
        q2, k2, pos2 = (t.clone() for t in (q, k, pos))
    got = _run_everything(cfg_name, size, heads_first, "triton", q2, k2, pos2)
    for name in ("apply_rotary", "module", "fast", "fast inplace"):
        for o, e in zip(got[name], expected[name]):
            _check(o, e, exact=False)
    _check_gradients(cfg_name, size, heads_first, "triton", pos)


# ------------------------------------------------------------------ torch.compile
LENGTHS = (40, 57, 77, 103, 130)
COMPILE_CASES = [
    # size (b, hq, hk) at each length, cfg, heads_first, backend
    ((1, 2, 1), "plain-neox", True, "auto"),                   # reference path
    ((1, 2, 1), "partial-gptj-yarn", False, "auto"),
    ((1, 64, 64), "plain-neox", False, "auto"),                # 2^18+ elements: the cpu path
    ((1, 64, 64), "dynamic-partial", True, "auto"),
    ((1, 2, 1), "dynamic-partial", False, "auto"),
]


def _compiled_runs(cfg_name, heads, heads_first, backend, dynamic, fullgraph, policy="freeze", lengths=LENGTHS):
    """Compile ``f(q, k, pos)`` (which calls a RotaryEmbedding) once and run it at every length; returns the
    frame count after each length. Each output must equal the same call in eager mode."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    cfg = CONFIGS[cfg_name]
    rope = RotaryEmbedding(cfg, heads_first=heads_first, backend=backend, dynamic_policy=policy)

    def f(q, k, pos):
        rope.reset()  # a new sequence each call (length-dependent methods freeze their scale per sequence)
        return rope(q, k, pos)

    counter = CompileCounterWithBackend("inductor")
    compiled = torch.compile(f, backend=counter, dynamic=dynamic, fullgraph=fullgraph)
    frames = []
    for i, s in enumerate(lengths):
        q, k, _ = _inputs(heads + (s,), heads_first, seed=i)
        pos = torch.arange(s) + (i % 2) * 3
        got = compiled(q, k, pos)
        rope.reset()
        want = RotaryEmbedding(cfg, heads_first=heads_first, backend="reference")(q, k, pos)
        for o, e in zip(got, want):
            torch.testing.assert_close(o, e, atol=1e-5, rtol=1e-5)
        frames.append(counter.frame_count)
    return frames


@pytest.mark.parametrize("heads,cfg_name,heads_first,backend", COMPILE_CASES)
def test_compile_dynamic_lengths_compile_once(heads, cfg_name, heads_first, backend):
    """Compiled with dynamic shapes, the rotation compiles once for every length; a plain method compiles to
    one graph with no graph break (fullgraph=True), a length-dependent one resolves its scale outside it."""
    plain = not CONFIGS[cfg_name].length_dependent
    frames = _compiled_runs(cfg_name, heads, heads_first, backend, dynamic=True, fullgraph=plain)
    assert frames[-1] == frames[0], f"recompiled for new lengths: frames after each length {frames}"
    if plain:
        assert frames[0] == 1


@pytest.mark.parametrize("cfg_name,policy", [("plain-neox", "freeze"), ("dynamic-partial", "recompute")])
def test_compile_default_settings_stop_recompiling_after_the_second_length(cfg_name, policy):
    """Default torch.compile: the second length makes the graph dynamic (PyTorch's automatic dynamic shapes),
    after which no length recompiles."""
    frames = _compiled_runs(cfg_name, (1, 2, 1), True, "auto", dynamic=None, fullgraph=False, policy=policy)
    assert frames[-1] == frames[1], f"frames after each length {frames}"


def test_compile_under_inference_mode():
    with torch.inference_mode():
        frames = _compiled_runs("partial-gptj-yarn", (1, 64, 64), True, "auto", dynamic=True, fullgraph=True,
                                lengths=LENGTHS[:4])
    assert frames == [1, 1, 1, 1]


def test_compile_triton_dynamic_lengths(triton_interpreted):
    """The custom op ropekit::rope in one graph (fullgraph=True) for every length. (Dynamo traces the frame a
    second time on the first call, to specialise the float scale the op takes: counted, but not a recompile.)"""
    frames = _compiled_runs("partial-gptj-yarn", (1, 2, 1), True, "triton", dynamic=True, fullgraph=True,
                            lengths=(5, 7, 9, 11))
    assert frames[-1] == frames[0] <= 2, frames
