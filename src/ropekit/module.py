"""`RotaryEmbedding`: the drop-in module, with a written KV-cache policy for length-dependent methods.

KV-cache policy (dynamic NTK, dynamic YaRN, LongRoPE short/long):

* ``"freeze"`` (default): the scale is chosen once per sequence and kept for the sequence's life. It is
  the ``seq_len`` given to ``forward`` / ``begin_sequence``, else the length seen on the first call
  (max position + 1, which reads one number from the device once). Keys already in the cache stay valid,
  and decoding token by token gives exactly what one full forward pass at that length gives.
  ``reset()`` (or ``begin_sequence``) starts a new sequence.
* ``"recompute"``: every call uses its own current length (max position + 1), as transformers does.
  Keys cached under an older scale are then stale; re-rotate them with ``rescale_keys`` before use.
  Decoding token by token then equals a full forward pass over each prefix.

Multi-axis positions (M-RoPE's (t, h, w), a ViT's (row, col)) are ``ropekit.MultiAxisRotaryEmbedding``'s
(``ropekit.multimodal``); this module refuses them with a pointer there.

Positions: ``max_position`` is the longest sequence the config is meant for (``cfg.target_length``: the
extended length L', or the trained one without scaling; None when the config names neither). The rotation is
computed from integer positions, not a table, so positions past it are still rotated exactly; pass
``check_positions=True`` to make any position >= ``max_position`` an error instead.

The module holds no parameters and persists no buffers: frequencies are derived from the config, in
float64 on the CPU, and moved to the input's device on use (so ``model.to(bfloat16)`` cannot touch them).
It owns its caches: the resolved frequencies, and the cpu backend's cos/sin tables (``table_cache``, a
``ropekit.kernels.cpu.TableCache``); both take a lock, since threads may share a module. A copy of the module
starts with an empty table cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch
from torch import nn

from ropekit.config import RopeConfig
from ropekit.kernels.cpu import TableCache
from ropekit.kernels.dispatch import apply_rotary, check_backend
from ropekit.methods import Frequencies, frequencies
from ropekit.multimodal.layout import MultiAxisRope
from ropekit.rotation import cos_sin, reapply_frequencies, rerotate, resolve_positions

DYNAMIC_POLICIES = ("freeze", "recompute")
FREQUENCY_CACHE_SIZE = 16  # resolved (seq_len, device) entries kept per module


class RotaryEmbedding(nn.Module):
    """RoPE for q and k, with any scaling method.

    Args:
        cfg: the ``RopeConfig``.
        heads_first: inputs are (batch, heads, seq, head_dim) if True, (batch, seq, heads, head_dim) if False.
        dynamic_policy: "freeze" or "recompute", see the module docstring.
        backend: "auto" (default), "reference", "cpu" or "triton": which rotation runs (``ropekit.kernels``).
        check_positions: raise ValueError for positions >= ``max_position`` (needs a known target length).

    Call as ``rope(q, k, positions)`` -> ``(q_rotated, k_rotated)``.
    """

    def __init__(self, cfg: RopeConfig, *, heads_first: bool = True, dynamic_policy: str = "freeze",
                 check_positions: bool = False, backend: str = "auto") -> None:
        super().__init__()
        check_backend(backend)
        self.backend = backend
        if isinstance(cfg, MultiAxisRope):
            raise ValueError(f"cfg: a MultiAxisRope ({cfg.kind}) rotates by several position axes; use "
                             f"ropekit.MultiAxisRotaryEmbedding(cfg)")
        if not isinstance(cfg, RopeConfig):
            raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
        if dynamic_policy not in DYNAMIC_POLICIES:
            raise ValueError(f"dynamic_policy: {dynamic_policy!r} not accepted; accepted: {', '.join(DYNAMIC_POLICIES)}")
        if check_positions and cfg.target_length is None:
            raise ValueError("check_positions: the config has no target length (set max_position or "
                             "original_max_position) to check positions against")
        self.cfg = cfg
        self.check_positions = bool(check_positions)
        self.heads_first = heads_first
        self.dynamic_policy = dynamic_policy
        self._frozen_seq_len: int | None = None
        # (seq_len, device) -> Frequencies; bounded, since "recompute" decoding meets a new length every token.
        self._cache: OrderedDict[tuple, Frequencies] = OrderedDict()
        self._lock = threading.RLock()  # guards _cache: threads may share a module
        self.table_cache = TableCache()  # the cpu backend's cos/sin tables for this module's calls
        if not cfg.length_dependent:
            self.frequencies()  # resolved now, so that a compiled forward finds it cached on the CPU

    # ------------------------------------------------------------------ frequencies
    @property
    def length_dependent(self) -> bool:
        return self.cfg.length_dependent

    @property
    def max_position(self) -> int | None:
        """The longest sequence this config is for (``cfg.target_length``); positions run 0..max_position-1."""
        return self.cfg.target_length

    def frequencies(self, seq_len: int | None = None, device: torch.device | str = "cpu") -> Frequencies:
        """Frequencies for a sequence of ``seq_len`` tokens (ignored unless the method is length-dependent)."""
        key_len = seq_len if self.length_dependent else None
        key = (key_len, str(device))
        if torch.compiler.is_compiling():
            # Read the cache, never write it, inside a graph: filling it there would change what the graph
            # was guarded on and so compile it a second time. A miss is computed in the graph (a few ops).
            hit = self._cache.get(key)
            if hit is not None:
                return hit
            base = self._cache.get((key_len, "cpu"))
            return (frequencies(self.cfg, key_len) if base is None else base).to(device)
        with self._lock:
            if key not in self._cache:
                # Normal tensors also under torch.inference_mode(): the cache serves every later mode (autograd
                # cannot save an inference tensor for backward).
                with torch.inference_mode(False):
                    base = self._cache.get((key_len, "cpu"))
                    if base is None:
                        base = frequencies(self.cfg, key_len)
                        self._cache[(key_len, "cpu")] = base
                    self._cache[key] = base.to(device)
            self._cache.move_to_end(key)
            found = self._cache[key]
            while len(self._cache) > FREQUENCY_CACHE_SIZE:
                self._cache.popitem(last=False)
            return found

    def begin_sequence(self, seq_len: int | None = None) -> None:
        """Start a new sequence; with ``seq_len`` the frozen scale is fixed now (no device read later)."""
        self._frozen_seq_len = None if seq_len is None else int(seq_len)

    def reset(self) -> None:
        """Forget the frozen length: the next call starts a new sequence."""
        self._frozen_seq_len = None

    @property
    def frozen_seq_len(self) -> int | None:
        return self._frozen_seq_len

    def resolve_seq_len(self, positions: torch.Tensor, seq_len: int | None = None) -> int | None:
        """The length the scale is taken at for this call under the policy (None if not length-dependent)."""
        if not self.length_dependent:
            return None
        if seq_len is not None:
            if self.dynamic_policy == "freeze" and self._frozen_seq_len is None:
                self._frozen_seq_len = int(seq_len)
            return int(seq_len)
        if self.dynamic_policy == "freeze" and self._frozen_seq_len is not None:
            return self._frozen_seq_len
        current = int(positions.max()) + 1  # one device read per sequence under "freeze"
        if self.dynamic_policy == "freeze":
            self._frozen_seq_len = current
        return current

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        q: torch.Tensor | None,
        k: torch.Tensor | None,
        positions: int | torch.Tensor | None = None,
        *,
        seq_len: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Rotate q and k (see ``ropekit.apply_rotary`` for shapes and positions)."""
        ref = q if q is not None else k
        if ref is None:
            raise ValueError("q, k: at least one tensor is needed")
        pos = self._positions(ref, positions)
        if self.length_dependent and torch.compiler.is_compiling():
            # The scale follows the (data-dependent) length: resolved outside the graph, so the compiled
            # rotation takes the frequencies as inputs instead of being recompiled for every length.
            freqs = _frequencies_outside_graph(self, pos, seq_len, ref.device)
        else:
            freqs = self.frequencies(self.resolve_seq_len(pos, seq_len), ref.device)
        return apply_rotary(q, k, freqs, pos, heads_first=self.heads_first, backend=self.backend,
                            cache=self.table_cache)

    def cos_sin(
        self, positions: torch.Tensor, *, seq_len: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-size (cos, sin) tables for ``positions``, attention scale included, shape positions.shape + (rotary_dim/2,)."""
        pos = self._check_bound(resolve_positions(positions, positions.shape[0] if positions.dim() == 2 else 1,
                                                  positions.shape[-1], positions.device))
        freqs = self.frequencies(self.resolve_seq_len(pos, seq_len), positions.device)
        return cos_sin(freqs, pos, dtype=dtype)

    def _positions(self, ref: torch.Tensor, positions) -> torch.Tensor:
        if isinstance(positions, torch.Tensor) and positions.dim() == 3:
            raise ValueError(f"positions: shape {tuple(positions.shape)} looks like multi-axis positions (axes, batch, "
                             f"seq), e.g. M-RoPE's (t, h, w); RotaryEmbedding takes (seq,) or (batch, seq): use "
                             f"ropekit.MultiAxisRotaryEmbedding(ropekit.mrope(cfg, mrope_section))")
        seq_axis = -2 if self.heads_first else -3
        batch = ref.shape[0] if ref.dim() == 4 else 1
        return self._check_bound(resolve_positions(positions, batch, ref.shape[seq_axis], ref.device))

    def _check_bound(self, pos: torch.Tensor) -> torch.Tensor:
        if self.check_positions and pos.numel():
            limit = self.max_position
            if torch.compiler.is_compiling():  # no host read inside a compiled graph
                torch._assert_async(pos.max() < limit, f"positions: beyond max_position {limit}")
            elif pos.device.type == "cpu":
                if int(pos.max()) >= limit:
                    raise ValueError(f"positions: {int(pos.max())} is beyond max_position {limit} "
                                     f"(positions must be < {limit}; check_positions=True)")
            else:
                torch._assert_async(pos.max() < limit, f"positions: beyond max_position {limit}")
        return pos

    # ------------------------------------------------------------------ KV cache helpers
    def rerotate(self, k: torch.Tensor, delta: int | torch.Tensor, positions=None) -> torch.Tensor:
        """Shift cached (rotated) keys by ``delta`` positions; see ``ropekit.rerotate``."""
        seq = self._frozen_seq_len if self.length_dependent else None
        return rerotate(k, delta, self.frequencies(seq, k.device), positions=positions, heads_first=self.heads_first)

    def rescale_keys(self, k: torch.Tensor, positions, old_seq_len: int, new_seq_len: int) -> torch.Tensor:
        """Re-rotate keys cached at ``old_seq_len``'s scale to ``new_seq_len``'s ("recompute" policy)."""
        old = self.frequencies(old_seq_len, k.device)
        new = self.frequencies(new_seq_len, k.device)
        return reapply_frequencies(k, old, new, positions, heads_first=self.heads_first)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state.pop("_lock", None)  # a lock cannot be copied or pickled; the copy gets its own
        return state

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._lock = threading.RLock()

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"method={c.method}, head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, base={c.base:g}, "
                f"layout={c.layout}, factor={c.factor}, dynamic_policy={self.dynamic_policy}")


@torch.compiler.disable
def _frequencies_outside_graph(rope: RotaryEmbedding, pos: torch.Tensor, seq_len, device) -> Frequencies:
    """``rope.frequencies`` at the length its policy picks, run eagerly when called from compiled code."""
    return rope.frequencies(rope.resolve_seq_len(pos, seq_len), device)
