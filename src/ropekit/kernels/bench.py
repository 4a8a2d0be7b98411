"""The RoPE speed comparison behind ``ropekit bench`` and ``benchmarks/bench_rope.py``.

Times, in one run and on the same q/k values: ropekit's fast paths and its reference; transformers'
``LlamaRotaryEmbedding`` (cos/sin) + ``apply_rotary_pos_emb``; rotary-embedding-torch; torchtune; on CUDA
Liger-Kernel and flash-attention's Triton rotary where they import; and the memory bound (a copy of q and
k). A peer that cannot be imported is reported with the reason, never dropped silently.

Each row is the median wall time over ``repeats`` calls after ``warmup`` calls (CUDA: synchronised).
Each peer gets its native layout (heads-first (B, H, S, D) or heads-last (B, S, H, D)): the same values,
laid out the way the peer expects, so no peer pays a transpose. Outputs are checked against ropekit's
reference in the same channel layout (``max_err``).
"""

from __future__ import annotations

import importlib.util
import math
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from ropekit.config import RopeConfig
from ropekit.kernels import cpu as cpu_path
from ropekit.kernels import dispatch, triton_rope
from ropekit.methods import frequencies
from ropekit.rotation import apply_rotary


@dataclass(frozen=True)
class Shape:
    """One benchmark case: q is (batch, q_heads, seq, head_dim), k (batch, kv_heads, seq, head_dim)."""

    name: str
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    head_dim: int
    max_position: int = 0  # decode: per-row positions drawn below this; 0: positions 0..seq-1

    @property
    def elements(self) -> int:
        return self.batch * (self.q_heads + self.kv_heads) * self.seq * self.head_dim


FULL_SHAPES = (
    Shape("prefill-gqa", 1, 32, 8, 4096, 128),
    Shape("batch-mha", 8, 32, 32, 2048, 128),
    Shape("decode-128k", 64, 32, 8, 1, 128, max_position=131072),
)
QUICK_SHAPES = (
    Shape("tiny-prefill", 1, 4, 2, 64, 64),
    Shape("tiny-decode", 4, 4, 2, 1, 64, max_position=131072),
)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass
class Row:
    shape: str
    dtype: str
    name: str
    median_ms: float | None = None
    min_ms: float | None = None
    gbps: float | None = None
    speedup_vs_transformers: float | None = None
    x_copy_clone: float | None = None
    x_copy_prealloc: float | None = None
    max_err: float | None = None
    note: str = ""


@dataclass
class Case:
    """The tensors of one (shape, dtype), in both layouts, and the positions."""

    shape: Shape
    dtype: torch.dtype
    device: torch.device
    q: torch.Tensor = field(init=False)
    k: torch.Tensor = field(init=False)
    q_bshd: torch.Tensor = field(init=False)
    k_bshd: torch.Tensor = field(init=False)
    positions: torch.Tensor = field(init=False)  # (1|B, S) int64

    def __post_init__(self) -> None:
        s = self.shape
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(s.batch, s.q_heads, s.seq, s.head_dim, generator=gen)
        k = torch.randn(s.batch, s.kv_heads, s.seq, s.head_dim, generator=gen)
        self.q = q.to(self.device, self.dtype)
        self.k = k.to(self.device, self.dtype)
        self.q_bshd = self.q.transpose(1, 2).contiguous()
        self.k_bshd = self.k.transpose(1, 2).contiguous()
        if s.max_position:
            pos = torch.randint(0, s.max_position, (s.batch, s.seq), generator=gen)
        else:
            pos = torch.arange(s.seq)[None]
        self.positions = pos.to(self.device)

    @property
    def bytes_moved(self) -> int:
        return 2 * self.shape.elements * self.q.element_size()  # read q, k once + write them once


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> tuple[float, float]:
    """(median, min) milliseconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times), min(times)


# ---------------------------------------------------------------------- the contenders
# Each builder takes a Case and returns (fn, check) where fn() runs the contender and check() returns its
# (q, k) output in heads-first layout plus the ropekit layout it follows, or raises ImportError / RuntimeError
# with the reason it cannot run.

def _cfg(case: Case, layout: str = "neox") -> RopeConfig:
    return RopeConfig(head_dim=case.shape.head_dim, base=10000.0, layout=layout)


def _ropekit(backend: str, inplace: bool = False, cold: bool = False):
    def build(case: Case):
        f = frequencies(_cfg(case)).to(case.device)
        pos = case.positions
        if backend == "cpu" and case.device.type != "cpu":
            raise RuntimeError("CPU backend; inputs are on an accelerator")
        if backend == "triton" and case.device.type != "cuda":
            raise RuntimeError("needs a CUDA device")
        if inplace:
            qb, kb = case.q.clone(), case.k.clone()

            def fn():  # rotates the same buffers again and again: values drift, cost does not
                return dispatch.apply_rotary_fast(qb, kb, f, pos, backend=backend, inplace=True)

            def check():
                qc, kc = case.q.clone(), case.k.clone()
                return dispatch.apply_rotary_fast(qc, kc, f, pos, backend=backend, inplace=True), "neox"
            return fn, check

        def fn():
            if cold:
                cpu_path.clear_cache()
            return dispatch.apply_rotary_fast(case.q, case.k, f, pos, backend=backend)
        return fn, lambda: (fn(), "neox")
    return build


def _hf_cos_sin(case: Case):
    """transformers' Llama rotary module for the case's shape, and the (batch, seq) positions it takes."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    s = case.shape
    hc = LlamaConfig(hidden_size=s.q_heads * s.head_dim, num_attention_heads=s.q_heads,
                     num_key_value_heads=s.kv_heads, head_dim=s.head_dim, rope_theta=10000.0,
                     max_position_embeddings=max(s.max_position, s.seq))
    return LlamaRotaryEmbedding(hc).to(case.device), case.positions.expand(s.batch, s.seq)


def _transformers(case: Case):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    emb, pos = _hf_cos_sin(case)

    def fn():  # cos/sin construction included, as a model's forward does it
        cos, sin = emb(case.q, pos)
        return apply_rotary_pos_emb(case.q, case.k, cos, sin)
    return fn, lambda: (fn(), "neox")


def _rotary_embedding_torch(case: Case):
    from rotary_embedding_torch import RotaryEmbedding, apply_rotary_emb

    s = case.shape
    rope = RotaryEmbedding(dim=s.head_dim, theta=10000).to(case.device)
    if s.max_position:  # per-row positions: freqs from the positions, as its forward allows
        pos = case.positions.to(torch.float32)

        def fn():
            freqs = rope(pos)[:, None]  # (B, 1, S, D)
            return apply_rotary_emb(freqs, case.q), apply_rotary_emb(freqs, case.k)
    else:
        def fn():
            return rope.rotate_queries_or_keys(case.q), rope.rotate_queries_or_keys(case.k)
    return fn, lambda: (fn(), "gptj")


def _torchtune(case: Case):
    try:
        from torchtune.modules import RotaryPositionalEmbeddings
    except Exception as err:  # torchtune pulls torchao; say why it is missing
        raise ImportError(f"torchtune: {type(err).__name__}: {str(err).strip().splitlines()[0][:120]}") from None
    s = case.shape
    rope = RotaryPositionalEmbeddings(s.head_dim, max_seq_len=max(s.max_position, s.seq), base=10000).to(case.device)
    pos = case.positions.expand(s.batch, s.seq) if s.max_position else None

    def fn():  # heads-last (B, S, H, D), its native layout
        return rope(case.q_bshd, input_pos=pos), rope(case.k_bshd, input_pos=pos)

    def check():
        q, k = fn()
        return (q.transpose(1, 2), k.transpose(1, 2)), "gptj"
    return fn, check


def _liger(case: Case):
    if case.device.type != "cuda":
        raise RuntimeError("GPU only")
    from liger_kernel.ops.rope import LigerRopeFunction

    emb, pos = _hf_cos_sin(case)

    def fn():  # cos/sin construction included (Liger takes transformers' tables)
        cos, sin = emb(case.q, pos)
        return LigerRopeFunction.apply(case.q, case.k, cos, sin)
    return fn, lambda: (fn(), "neox")


FLASH_ATTN_ROTARY_ENV = "ROPEKIT_FLASH_ATTN_ROTARY"


def _flash_attn_rotary():
    """flash-attention's Triton ``apply_rotary``: from the installed package, else from the file named by
    $ROPEKIT_FLASH_ATTN_ROTARY (its ``flash_attn/ops/triton/rotary.py`` alone needs only torch and triton,
    while importing the package needs its compiled CUDA extension)."""
    try:
        from flash_attn.ops.triton.rotary import apply_rotary

        return apply_rotary
    except ImportError as err:
        path = os.environ.get(FLASH_ATTN_ROTARY_ENV)
        if not path:
            raise ImportError(f"{err}; or set ${FLASH_ATTN_ROTARY_ENV} to flash_attn/ops/triton/rotary.py") from None
        spec = importlib.util.spec_from_file_location("flash_attn_triton_rotary", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.apply_rotary


def _flash_attn(case: Case):
    if case.device.type != "cuda":
        raise RuntimeError("GPU only")
    fa_rotary = _flash_attn_rotary()

    s = case.shape
    n = max(s.max_position, s.seq)
    inv = 1.0 / (10000.0 ** (torch.arange(0, s.head_dim, 2, dtype=torch.float32, device=case.device) / s.head_dim))
    ang = torch.arange(n, dtype=torch.float32, device=case.device)[:, None] * inv
    cos, sin = ang.cos().to(case.dtype), ang.sin().to(case.dtype)  # prebuilt table (not timed)
    offsets = case.positions[:, 0].contiguous() if s.max_position else 0

    def fn():  # heads-last (B, S, H, D)
        return (fa_rotary(case.q_bshd, cos, sin, seqlen_offsets=offsets),
                fa_rotary(case.k_bshd, cos, sin, seqlen_offsets=offsets))

    def check():
        q, k = fn()
        return (q.transpose(1, 2), k.transpose(1, 2)), "neox"
    return fn, check


def _copy_clone(case: Case):
    def fn():
        return case.q.clone(), case.k.clone()
    return fn, None


def _copy_prealloc(case: Case):
    qo, ko = torch.empty_like(case.q), torch.empty_like(case.k)

    def fn():
        return qo.copy_(case.q), ko.copy_(case.k)
    return fn, None


CONTENDERS: list[tuple[str, Callable]] = [
    ("copy bound: q.clone()+k.clone()", _copy_clone),
    ("copy bound: copy_ into preallocated", _copy_prealloc),
    ("ropekit reference", _ropekit("reference")),
    ("ropekit cpu (table cached)", _ropekit("cpu")),
    ("ropekit cpu (table rebuilt each call)", _ropekit("cpu", cold=True)),
    ("ropekit cpu in-place", _ropekit("cpu", inplace=True)),
    ("ropekit triton", _ropekit("triton")),
    ("ropekit triton in-place", _ropekit("triton", inplace=True)),
    ("transformers (cos/sin + apply_rotary_pos_emb)", _transformers),
    ("rotary-embedding-torch", _rotary_embedding_torch),
    ("torchtune RotaryPositionalEmbeddings", _torchtune),
    ("liger-kernel (cos/sin + LigerRopeFunction)", _liger),
    ("flash-attn triton rotary (table prebuilt)", _flash_attn),
]
NAMES = [name for name, _ in CONTENDERS]


def _max_err(case: Case, out, layout: str) -> float:
    f = frequencies(_cfg(case, layout)).to(case.device)
    rq, rk = apply_rotary(case.q, case.k, f, case.positions, backend="reference")
    (oq, ok) = out
    return max(float((oq.float() - rq.float()).abs().max()), float((ok.float() - rk.float()).abs().max()))


def table_memory(device: torch.device, position: int = 1_000_000) -> dict:
    """Extra device memory beyond inputs and outputs for one triton call at ``position`` (CUDA only)."""
    if device.type != "cuda" or not triton_rope.HAVE_TRITON:
        return {"skipped": "needs CUDA and triton"}
    f = frequencies(RopeConfig(head_dim=128)).to(device)
    q = torch.randn(1, 32, 1024, 128, device=device, dtype=torch.bfloat16)
    k = torch.randn(1, 8, 1024, 128, device=device, dtype=torch.bfloat16)
    pos = (position + torch.arange(1024, device=device))[None]
    dispatch.apply_rotary_fast(q, k, f, pos, backend="triton")  # warm caches (turns)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = dispatch.apply_rotary_fast(q, k, f, pos, backend="triton")
    torch.cuda.synchronize(device)
    outputs = sum(t.numel() * t.element_size() for t in out)
    return {"position": position, "extra_bytes_beyond_outputs": torch.cuda.max_memory_allocated(device) - base - outputs}


def run(
    *,
    quick: bool = False,
    device: str = "auto",
    dtypes: tuple[str, ...] = ("float32", "bfloat16"),
    repeats: int | None = None,
    warmup: int | None = None,
    log: Callable[[str], None] = print,
    shape_names: tuple[str, ...] | None = None,
) -> dict:
    """Run the comparison; return a JSON-ready dict {"env": ..., "rows": [...], "skipped": {...}}."""
    dev = torch.device("cuda" if device == "auto" and torch.cuda.is_available() else ("cpu" if device == "auto" else device))
    shapes = QUICK_SHAPES if quick else FULL_SHAPES
    if shape_names:
        known = {sh.name: sh for sh in FULL_SHAPES + QUICK_SHAPES}
        for n in shape_names:
            if n not in known:
                raise ValueError(f"shape: {n!r} not accepted; accepted: {', '.join(known)}")
        shapes = tuple(known[n] for n in shape_names)
    repeats = repeats or (3 if quick else 15)
    warmup = warmup or (1 if quick else 3)
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"dtype: {d!r} not accepted; accepted: {', '.join(DTYPES)}")
    rows: list[Row] = []
    skipped: dict[str, str] = {}
    for shape in shapes:
        for dname in dtypes:
            case = Case(shape, DTYPES[dname], dev)
            timed: dict[str, float] = {}
            for name, build in CONTENDERS:
                row = Row(shape.name, dname, name)
                try:
                    fn, check = build(case)
                    if check is not None:
                        out, layout = check()
                        row.max_err = _max_err(case, out, layout)
                        del out  # not held while timing: a model drops its rotated q/k after attention
                    row.median_ms, row.min_ms = time_fn(fn, dev, repeats, warmup)
                    row.gbps = case.bytes_moved / (row.median_ms * 1e-3) / 1e9
                    timed[name] = row.median_ms
                except Exception as err:  # noqa: BLE001 - a peer that fails is reported with its reason
                    if name.startswith("ropekit") and not isinstance(err, RuntimeError):
                        raise  # our own rows must work: a failure here is a bug, not a skip
                    row.note = f"skipped: {type(err).__name__}: {str(err).strip().splitlines()[0][:160]}"
                    skipped.setdefault(name, row.note)
                rows.append(row)
                log(f"  {shape.name:12s} {dname:8s} {name:48s} "
                    + (f"{row.median_ms:10.3f} ms" if row.median_ms is not None else row.note))
            hf = timed.get("transformers (cos/sin + apply_rotary_pos_emb)")
            clone = timed.get("copy bound: q.clone()+k.clone()")
            pre = timed.get("copy bound: copy_ into preallocated")
            for row in rows[-len(CONTENDERS):]:
                if row.median_ms is None:
                    continue
                row.speedup_vs_transformers = hf / row.median_ms if hf else None
                row.x_copy_clone = row.median_ms / clone if clone else None
                row.x_copy_prealloc = row.median_ms / pre if pre else None
    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or platform.machine(),
        "device_type": dev.type,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "repeats": repeats,
        "warmup": warmup,
        "quick": quick,
        "shapes": [asdict(s) for s in shapes],
    }
    return {"env": env, "rows": [asdict(r) for r in rows], "skipped": skipped,
            "table_memory": table_memory(dev)}


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: dict) -> str:
    """A plain-text table of the rows (markdown-compatible)."""
    lines = ["| shape | dtype | contender | median ms | GB/s | x faster than transformers | x copy (clone) "
             "| x copy (prealloc) | max err |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        if r["median_ms"] is None:
            continue
        lines.append(f"| {r['shape']} | {r['dtype']} | {r['name']} | {_fmt(r['median_ms'], '.3f')} | "
                     f"{_fmt(r['gbps'], '.1f')} | {_fmt(r['speedup_vs_transformers'], '.2f')} | "
                     f"{_fmt(r['x_copy_clone'], '.2f')} | {_fmt(r['x_copy_prealloc'], '.2f')} | "
                     f"{_fmt(r['max_err'], '.1e')} |")
    for name, why in result["skipped"].items():
        lines.append(f"\n{name}: {why}")
    tm = result.get("table_memory")
    if tm:
        lines.append(f"\ntable memory at 1M positions (triton): {tm}")
    return "\n".join(lines)
