"""The fast CPU path and the backend dispatch against the reference; a quick smoke run of the benchmark.

The fused rotation's arithmetic is checked broadly in eager mode (``compile=False``: the same function the
compiled path runs), and through the compiled default path on a few cases (each compile costs seconds).
"""

import json
import threading

import pytest
import torch

import ropekit
from ropekit import RopeConfig, RotaryEmbedding
from ropekit.kernels import apply_rotary_fast, cpu, resolve_backend
from ropekit.rotation import resolve_positions

from backend_checks import backward_through

TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def run_in_threads(work, count: int) -> None:
    """``work(i)`` in ``count`` threads at once, joined."""
    threads = [threading.Thread(target=work, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def _close(a, b, dtype):
    assert not torch.isnan(a).any(), "unwritten (NaN-poisoned) elements in the output"
    torch.testing.assert_close(a.float(), b.float(), atol=TOL[dtype] * 4, rtol=TOL[dtype])


def _nan_like(x):
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("seed", range(12))
def test_fused_eager_math_random_shapes_strides_positions(seed):
    gen = torch.Generator().manual_seed(seed)
    r = lambda lo, hi: int(torch.randint(lo, hi + 1, (1,), generator=gen))  # noqa: E731
    hd = 2 * r(1, 12)
    rd = 2 * r(1, hd // 2)
    layout = ("neox", "gptj")[seed % 2]
    dtype = (torch.float32, torch.bfloat16, torch.float16)[seed % 3]
    b, s, hq = r(1, 3), r(1, 6), r(1, 4)
    hk = (1, hq)[seed % 2]
    heads_first = seed % 4 < 2
    f = ropekit.frequencies(RopeConfig(head_dim=hd, rotary_dim=rd, layout=layout, base=1e4 * (seed + 1)))
    dims = (lambda h: (b, h, s, hd)) if heads_first else (lambda h: (b, s, h, hd))
    # non-contiguous inputs: a channel-padded buffer sliced back to head_dim
    q = torch.randn(dims(hq)[:-1] + (hd + 3,), generator=gen).to(dtype)[..., :hd]
    k = torch.randn(dims(hk)[:-1] + (hd + 3,), generator=gen).to(dtype)[..., :hd]
    pos = torch.randint(0, 4_200_000, (b, s), generator=gen) if seed % 3 else None
    rq, rk = ropekit.apply_rotary(q, k, f, pos, heads_first=heads_first, backend="reference")
    p = resolve_positions(pos, b, s, q.device)
    cos, sin = cpu.tables(f, pos, p, f.attention_scale, False)
    interleaved = layout == "gptj"
    oq, ok = cpu.rotate_qk(q, k, cos, sin, rotary_dim=rd, interleaved=interleaved, heads_first=heads_first,
                           compile=False)
    for out, x, ref in ((oq, q, rq), (ok, k, rk)):
        _close(out, ref, dtype)
        if rd < hd:
            assert torch.equal(out[..., rd:], x[..., rd:])
    for x, ref in ((q, rq), (k, rk)):  # the eager pass into a NaN-poisoned output
        out = _nan_like(x)
        cos_p, sin_p = cpu.pair_tables(cos.unsqueeze(1 if heads_first else 2),
                                       sin.unsqueeze(1 if heads_first else 2), interleaved)
        cpu.fused_rotate(x, cos_p, sin_p, out, rd, interleaved)
        _close(out, ref, dtype)
    qi, ki = q.clone(), k.clone()
    cpu.rotate_qk(qi, ki, cos, sin, rotary_dim=rd, interleaved=interleaved, heads_first=heads_first,
                  inplace=True, compile=False)
    _close(qi, rq, dtype), _close(ki, rk, dtype)
    if rd < hd:
        assert torch.equal(qi[..., rd:], q[..., rd:])


def test_inplace_in_several_chunks_heads_first_and_last(monkeypatch):
    """In place, a few heads at a time through the scratch buffer: every chunk written, none twice."""
    monkeypatch.setattr(cpu, "INPLACE_CHUNK_BYTES", 4096)  # one head (2 x 16 x 24 fp32 = 3 KiB) per chunk
    f = ropekit.frequencies(RopeConfig(head_dim=32, rotary_dim=24, method="ntk", factor=2.0))
    gen = torch.Generator().manual_seed(5)
    for heads_first in (True, False):
        shape = (2, 6, 16, 32) if heads_first else (2, 16, 6, 32)
        q = torch.randn(shape, generator=gen)
        pos = torch.randint(0, 1 << 20, (2, 16), generator=gen)
        ref, _ = ropekit.apply_rotary(q, None, f, pos, heads_first=heads_first, backend="reference")
        qi = q.clone()
        cos, sin = cpu.tables(f, pos, pos, 1.0, False)
        cpu.rotate_qk(qi, None, cos, sin, rotary_dim=24, interleaved=False, heads_first=heads_first,
                      inplace=True, compile=False)
        _close(qi, ref, torch.float32)
        assert torch.equal(qi[..., 24:], q[..., 24:])
    assert cpu._heads_per_chunk(6, 1024) == 3 and cpu._heads_per_chunk(7, 1024) == 1  # equal chunks only


def test_inplace_from_two_threads_at_once(monkeypatch):
    """Each thread has its own scratch buffer: concurrent in-place rotations do not mix."""
    monkeypatch.setattr(cpu, "INPLACE_CHUNK_BYTES", 4096)
    f = ropekit.frequencies(RopeConfig(head_dim=32, method="linear", factor=2.0))
    gen = torch.Generator().manual_seed(9)
    tensors = [torch.randn(2, 6, 16, 32, generator=gen) for _ in range(4)]
    refs = [ropekit.apply_rotary(t, None, f, 7, backend="reference")[0] for t in tensors]
    errors = []

    def work(i):
        try:
            for _ in range(20):
                x = tensors[i].clone()
                cos, sin = cpu.tables(f, 7, resolve_positions(7, 2, 16, x.device), 1.0, False)
                cpu.rotate_qk(x, None, cos, sin, rotary_dim=32, interleaved=False, heads_first=True,
                              inplace=True, compile=False)
                torch.testing.assert_close(x, refs[i], atol=1e-5, rtol=1e-5)
        except Exception as err:  # reported in the main thread
            errors.append(err)

    run_in_threads(work, 4)
    assert not errors, errors[0]


def test_output_pool_never_hands_out_a_buffer_still_in_use():
    cpu.clear_cache()
    x = torch.randn(cpu.HUGE_PAGE_MIN_BYTES // 4)  # fp32: exactly the pooling threshold
    a, b = cpu.empty_output(x), cpu.empty_output(x)
    a_ptr, b_ptr = a.data_ptr(), b.data_ptr()
    assert a_ptr != b_ptr
    view = b[10:20]
    del a, b
    c = cpu.empty_output(x)  # a's buffer is free again; b's is held by its view
    assert c.data_ptr() == a_ptr
    d = cpu.empty_output(x)
    assert d.data_ptr() not in (a_ptr, b_ptr)
    arr, d_ptr = d.numpy(), d.data_ptr()  # a NumPy array over d keeps d's storage
    del d
    e = cpu.empty_output(x)
    assert e.data_ptr() not in (a_ptr, b_ptr, d_ptr)
    del view
    assert cpu.empty_output(x).data_ptr() == b_ptr  # the view is gone: b's buffer is free
    del arr, c, e
    cpu.clear_cache()
    assert cpu.cache_info().pool == ()  # nothing referenced any more: clear_cache drops every buffer


def test_output_pool_makes_room_by_dropping_free_buffers_oldest_first(monkeypatch):
    cpu.clear_cache()
    mb = 2**20
    monkeypatch.setattr(cpu, "OUTPUT_POOL_BYTES", 12 * mb)
    four, eight = torch.empty(mb, dtype=torch.float32), torch.empty(2 * mb, dtype=torch.float32)
    held = cpu.empty_output(four)  # 4 MiB, held
    dropped_ptr = cpu.empty_output(four).data_ptr()  # 4 MiB, free at once
    assert len(cpu.cache_info().pool) == 2
    big = cpu.empty_output(eight)  # 8 MiB: room is made by dropping the free 4 MiB buffer, not the held one
    pool = cpu.cache_info().pool
    assert [b.numel for b in pool] == [mb, 2 * mb] and all(b.in_use for b in pool)
    assert pool[0].data_ptr == held.data_ptr() and pool[1].data_ptr == big.data_ptr()
    assert dropped_ptr not in [b.data_ptr for b in pool]
    del held, big
    cpu.clear_cache()


def test_large_output_with_autograd_is_not_pooled_and_has_right_gradients():
    cpu.clear_cache()
    f = ropekit.frequencies(RopeConfig(head_dim=128, method="linear", factor=2.0))
    q = torch.randn(1, 8, 1024, 128, requires_grad=True)  # 4 MiB: large enough for the pool
    out, _ = ropekit.apply_rotary(q, None, f, backend="cpu")
    assert out.data_ptr() not in [b.data_ptr for b in cpu.cache_info().pool]  # autograd outputs are not pooled
    weight = torch.randn_like(out)
    (out * weight).sum().backward()
    expected = ropekit.apply_rotary(weight, None, f, backend="reference", inverse=True)[0]
    torch.testing.assert_close(q.grad, expected, atol=1e-5, rtol=1e-5)  # the gradient is the inverse rotation


@pytest.mark.parametrize("layout,rotary_dim", [("neox", 128), ("gptj", 96)])
def test_compiled_pass_writes_every_element_of_a_poisoned_pooled_output(layout, rotary_dim):
    """Pooled outputs are reused uninitialised: poison them between calls; a skipped element would show."""
    cpu.clear_cache()
    f = ropekit.frequencies(RopeConfig(head_dim=128, rotary_dim=rotary_dim, layout=layout, method="yarn",
                                       factor=4.0, original_max_position=1024))
    gen = torch.Generator().manual_seed(7)
    q = torch.randn(1, 8, 1024, 128, generator=gen)  # 4 MiB: pooled
    k = torch.randn(1, 8, 1024, 128, generator=gen)
    pos = torch.randint(0, 4_000_000, (1, 1024), generator=gen)
    rq, rk = ropekit.apply_rotary(q, k, f, pos, backend="reference")
    for _ in range(3):
        # take every free pooled buffer (as many outputs as the pool holds), poison it, give it back
        poisoned = [cpu.empty_output(q) for _ in range(max(2, len(cpu.cache_info().pool)))]
        for buf in poisoned:
            buf.fill_(float("nan"))
        del poisoned, buf
        oq, ok = ropekit.apply_rotary(q, k, f, pos, backend="cpu")
        assert oq.data_ptr() in [b.data_ptr for b in cpu.cache_info().pool]
        assert torch.equal(oq, rq) and torch.equal(ok, rk)  # bit for bit, no NaN left
        del oq, ok
    cpu.clear_cache()


def test_one_compiled_pass_serves_every_length():
    cpu.clear_cache()
    f = ropekit.frequencies(RopeConfig(head_dim=64))
    before = cpu.cache_info().compiled_passes
    for seq in (1024, 1500, 2049):  # 2**18+ elements: the auto backend's cpu path
        q = torch.randn(1, 4, seq, 64)
        out, _ = ropekit.apply_rotary(q, None, f)
        _close(out, ropekit.apply_rotary(q, None, f, backend="reference")[0], torch.float32)
    assert cpu.cache_info().compiled_passes <= before + 1


def test_compiled_default_path_fp32_bf16_gqa_one_head_seq1():
    f = ropekit.frequencies(RopeConfig(head_dim=64, rotary_dim=48, method="yarn", factor=4.0,
                                       original_max_position=512))
    gen = torch.Generator().manual_seed(0)
    for dtype, (b, hq, hk, s) in ((torch.float32, (2, 8, 2, 512)), (torch.bfloat16, (1, 1, 1, 4096)),
                                  (torch.float32, (64, 16, 4, 1))):
        q = torch.randn(b, hq, s, 64, generator=gen).to(dtype)
        k = torch.randn(b, hk, s, 64, generator=gen).to(dtype)
        pos = torch.randint(0, 131072, (b, s), generator=gen) if s == 1 else 4_000_000
        assert resolve_backend("auto", q, q.numel() + k.numel()) == ("cpu" if q.numel() + k.numel() >= 1 << 18
                                                                     else "reference")
        rq, rk = ropekit.apply_rotary(q, k, f, pos, backend="reference")
        oq, ok = ropekit.apply_rotary(q, k, f, pos, backend="cpu")
        _close(oq, rq, dtype), _close(ok, rk, dtype)
        assert torch.equal(oq[..., 48:], q[..., 48:])
        qi, ki = q.clone(), k.clone()
        apply_rotary_fast(qi, ki, f, pos, backend="cpu", inplace=True)
        _close(qi, rq, dtype), _close(ki, rk, dtype)


def test_cpu_gradients_and_inverse_match_reference():
    f = ropekit.frequencies(RopeConfig(head_dim=16, layout="gptj", method="yarn", factor=2.0,
                                       original_max_position=32))
    pos = torch.tensor([[3, 100, 4_000_000], [0, 1, 2]])
    grads = []
    for backend in ("reference", "cpu"):
        q, k, oq = backward_through(backend, f, pos)
        grads.append((q.grad, k.grad))
        back = ropekit.apply_rotary(oq.detach(), None, f, pos, backend=backend, inverse=True)[0]
        torch.testing.assert_close(back, q.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=1e-6)


def test_table_cache_keys_on_positions_and_notices_in_place_edits():
    cpu.clear_cache()
    f = ropekit.frequencies(RopeConfig(head_dim=8))
    pos = torch.tensor([[1, 2, 3]])
    c1, _ = cpu.tables(f, pos, pos, 1.0, False)
    assert cpu.tables(f, pos, pos, 1.0, False)[0] is c1  # same positions tensor: cached
    pos.add_(10)  # edited in place: version changes, tables rebuilt
    c2, _ = cpu.tables(f, pos, pos, 1.0, False)
    assert not torch.equal(c1, c2)
    ref_cos, _ = ropekit.cos_sin(f, pos)
    assert torch.equal(c2, ref_cos)
    # int offsets key by value
    p5 = resolve_positions(5, 1, 3, torch.device("cpu"))
    assert cpu.tables(f, 5, p5, 1.0, False)[0] is cpu.tables(f, 5, p5.clone(), 1.0, False)[0]


def test_table_cache_is_owned_by_the_module_and_a_plain_call_by_its_frequencies():
    """A RotaryEmbedding keeps its tables in its own cache (a copy starts empty); a plain call's tables live
    as long as the frequencies tensor, held weakly, so no id of a freed tensor can serve another."""
    import copy
    import gc

    cpu.clear_cache()
    rope = RotaryEmbedding(RopeConfig(head_dim=64), backend="cpu")
    q = torch.randn(1, 2, 16, 64)
    out = rope(q, None)[0]
    assert len(rope.table_cache) == 2  # the tables and their pair form
    clone = copy.deepcopy(rope)
    assert len(clone.table_cache) == 0 and torch.equal(clone(q, None)[0], out)
    f = ropekit.frequencies(RopeConfig(head_dim=64, method="linear", factor=2.0))
    owners = len(cpu._owned)
    ropekit.apply_rotary(q, None, f, backend="cpu")
    assert len(cpu._owned) == owners + 1 and len(cpu.cache_for(f.inv_freq64)) == 2
    del f
    gc.collect()
    assert len(cpu._owned) == owners


def test_table_cache_serves_threads_sharing_one_owner():
    cache = cpu.TableCache(entries=2)
    f = ropekit.frequencies(RopeConfig(head_dim=32))
    positions = [torch.arange(n)[None] + n for n in range(1, 7)]
    expected = [ropekit.cos_sin(f, p) for p in positions]
    errors = []

    def work(offset):
        try:
            for i in range(60):
                j = (i + offset) % len(positions)
                cos, sin = cache.tables(f, positions[j], 1.0, False)
                assert torch.equal(cos, expected[j][0]) and torch.equal(sin, expected[j][1])
                cache.pair_tables(cos, sin, False, True)
        except Exception as err:  # reported in the main thread
            errors.append(err)

    run_in_threads(work, 4)
    assert not errors, errors[0]
    assert len(cache) <= 4


def test_triton_turns_are_cached_per_frequencies_tensor_and_go_with_it():
    import gc

    from ropekit.kernels import dispatch

    f = ropekit.frequencies(RopeConfig(head_dim=64))
    turns = dispatch._turns(f.inv_freq64, torch.device("cpu"))
    assert dispatch._turns(f.inv_freq64, torch.device("cpu")) is turns
    assert dispatch._turns(f.inv_freq64.clone(), torch.device("cpu")) is not turns  # another tensor: its own
    before = len(dispatch._turns_cache)
    del f
    gc.collect()
    assert len(dispatch._turns_cache) < before


def test_table_cache_tells_packed_positions_from_a_plain_range():
    """The same tensor sizes with cu_seqlens (positions restart per document) after a call with 0..N-1:
    the cached cos/sin of the plain range must not be reused."""
    f = ropekit.frequencies(RopeConfig(head_dim=64))
    q = torch.randn(1, 8, 512, 64)
    cu = torch.tensor([0, 100, 512])
    apply_rotary_fast(q, None, f, backend="cpu")
    packed = apply_rotary_fast(q, None, f, cu_seqlens=cu, backend="cpu")[0]
    expected = ropekit.apply_rotary(q, None, f, ropekit.positions_from_cu_seqlens(cu), backend="reference")[0]
    assert torch.equal(packed, expected)


def test_auto_backend_choice_and_errors():
    small = torch.randn(1, 1, 2, 8)
    big = torch.randn(1, 8, 4096, 8)
    assert resolve_backend("auto", small, small.numel()) == "reference"
    assert resolve_backend("auto", big, big.numel()) == "cpu"
    assert resolve_backend("auto", big.double(), big.numel()) == "reference"
    f = ropekit.frequencies(RopeConfig(head_dim=8))
    with pytest.raises(ValueError, match="backend: unknown backend 'fast'"):
        ropekit.apply_rotary(small, None, f, backend="fast")
    with pytest.raises(ValueError, match="float64"):
        ropekit.apply_rotary(small.double(), None, f, backend="cpu")
    with pytest.raises(ValueError, match="backend"):
        RotaryEmbedding(RopeConfig(head_dim=8), backend="gpu")


def test_rotary_embedding_backend_and_fullgraph_compile():
    """RotaryEmbedding(backend="cpu") equals the reference module, also under torch.compile(fullgraph=True)."""
    cfg = RopeConfig(head_dim=32, method="linear", factor=2.0)
    ref_mod = RotaryEmbedding(cfg, backend="reference")
    fast_mod = RotaryEmbedding(cfg, backend="cpu")
    q = torch.randn(2, 4, 16, 32)
    k = torch.randn(2, 2, 16, 32)
    rq, rk = ref_mod(q, k, 7)
    oq, ok = fast_mod(q, k, 7)
    _close(oq, rq, torch.float32), _close(ok, rk, torch.float32)
    compiled = torch.compile(fast_mod, fullgraph=True)
    cq, ck = compiled(q, k, 7)
    _close(cq, rq, torch.float32), _close(ck, rk, torch.float32)


def test_bench_quick_smoke_json_has_every_row(tmp_path):
    from typer.testing import CliRunner

    from ropekit.cli import app, build_app
    from ropekit.kernels import bench

    build_app()
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", "--quick", "--dtypes", "float32", "--repeats", "1",
                                      "--warmup", "1", "--json", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    names = {(r["shape"], r["name"]) for r in data["rows"]}
    for shape in bench.QUICK_SHAPES:
        for name in bench.NAMES:
            assert (shape.name, name) in names
    timed = {r["name"] for r in data["rows"] if r["median_ms"] is not None}
    assert {"ropekit reference", "ropekit cpu (table cached)", "transformers (cos/sin + apply_rotary_pos_emb)",
            "copy bound: q.clone()+k.clone()"} <= timed
    for r in data["rows"]:  # every row is timed or says why not
        assert r["median_ms"] is not None or r["note"].startswith("skipped:")
    # ropekit's fast rows agree with the reference in the same run
    assert all(r["max_err"] < 1e-5 for r in data["rows"] if r["name"].startswith("ropekit") and r["max_err"] is not None)
    bad = CliRunner().invoke(app, ["bench", "--quick", "--dtypes", "float64"])
    assert bad.exit_code == 2 and "float64" in bad.output  # a usage error (the CLI's convention: exit 2)


@pytest.mark.parametrize("heads_first, layout, conjugate", [(True, "neox", False), (False, "gptj", True)])
def test_rotate_with_tables_takes_the_cpu_pass_bit_for_bit(heads_first, layout, conjugate):
    """``ropekit.rotate`` (the dispatcher's, tables given) equals the reference rotation exactly on the CPU pass."""
    from ropekit.rotation import rotate as rotate_reference

    cfg = RopeConfig(head_dim=64, rotary_dim=48, layout=layout)
    f = ropekit.frequencies(cfg)
    x = torch.randn(2, 8, 600, 64) if heads_first else torch.randn(2, 600, 8, 64)
    cos, sin = ropekit.cos_sin(f, torch.arange(600)[None].expand(2, -1))
    axis = 1 if heads_first else 2
    cos, sin = cos.unsqueeze(axis), sin.unsqueeze(axis)
    expected = rotate_reference(x, cos, sin, layout, conjugate)
    assert torch.equal(ropekit.rotate(x, cos, sin, layout, conjugate, backend="cpu"), expected)
    assert torch.equal(ropekit.rotate(x, cos, sin, layout, conjugate), expected)  # auto: large enough for cpu
    with pytest.raises(ValueError, match="backend 'triton': the kernel computes its angles from positions"):
        ropekit.rotate(x, cos, sin, layout, backend="triton")
    with pytest.raises(ValueError, match="backend 'cpu': needs a 4-D x"):
        ropekit.rotate(x[0], cos[0], sin[0], layout, backend="cpu")
