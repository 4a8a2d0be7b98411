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

The module holds no parameters and persists no buffers: frequencies are derived from the config, in
float64 on the CPU, and moved to the input's device on use (so ``model.to(bfloat16)`` cannot touch them).
"""

from __future__ import annotations

import torch
from torch import nn

from ropekit.config import RopeConfig
from ropekit.methods import Frequencies, frequencies
from ropekit.rotation import apply_rotary, cos_sin, reapply_frequencies, rerotate, resolve_positions

DYNAMIC_POLICIES = ("freeze", "recompute")


class RotaryEmbedding(nn.Module):
    """RoPE for q and k, with any scaling method.

    Args:
        cfg: the ``RopeConfig``.
        heads_first: inputs are (batch, heads, seq, head_dim) if True, (batch, seq, heads, head_dim) if False.
        dynamic_policy: "freeze" or "recompute", see the module docstring.

    Call as ``rope(q, k, positions)`` -> ``(q_rotated, k_rotated)``.
    """

    def __init__(self, cfg: RopeConfig, *, heads_first: bool = True, dynamic_policy: str = "freeze") -> None:
        super().__init__()
        if not isinstance(cfg, RopeConfig):
            raise ValueError(f"cfg: expected a RopeConfig, got {type(cfg).__name__}")
        if dynamic_policy not in DYNAMIC_POLICIES:
            raise ValueError(f"dynamic_policy: {dynamic_policy!r} not accepted; accepted: {', '.join(DYNAMIC_POLICIES)}")
        self.cfg = cfg
        self.heads_first = heads_first
        self.dynamic_policy = dynamic_policy
        self._frozen_seq_len: int | None = None
        self._cache: dict[tuple, Frequencies] = {}

    # ------------------------------------------------------------------ frequencies
    @property
    def length_dependent(self) -> bool:
        return self.cfg.length_dependent

    def frequencies(self, seq_len: int | None = None, device: torch.device | str = "cpu") -> Frequencies:
        """Frequencies for a sequence of ``seq_len`` tokens (ignored unless the method is length-dependent)."""
        key_len = seq_len if self.length_dependent else None
        key = (key_len, str(device))
        if key not in self._cache:
            base = self._cache.get((key_len, "cpu"))
            if base is None:
                base = frequencies(self.cfg, key_len)
                self._cache[(key_len, "cpu")] = base
            self._cache[key] = base.to(device)
        return self._cache[key]

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
        freqs = self.frequencies(self.resolve_seq_len(pos, seq_len), ref.device)
        return apply_rotary(q, k, freqs, pos, heads_first=self.heads_first)

    def cos_sin(
        self, positions: torch.Tensor, *, seq_len: int | None = None, dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Half-size (cos, sin) tables for ``positions``, attention scale included, shape positions.shape + (rotary_dim/2,)."""
        pos = resolve_positions(positions, positions.shape[0] if positions.dim() == 2 else 1,
                                positions.shape[-1], positions.device)
        freqs = self.frequencies(self.resolve_seq_len(pos, seq_len), positions.device)
        return cos_sin(freqs, pos, dtype=dtype)

    def _positions(self, ref: torch.Tensor, positions) -> torch.Tensor:
        seq_axis = -2 if self.heads_first else -3
        batch = ref.shape[0] if ref.dim() == 4 else 1
        return resolve_positions(positions, batch, ref.shape[seq_axis], ref.device)

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

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"method={c.method}, head_dim={c.head_dim}, rotary_dim={c.rotary_dim}, base={c.base:g}, "
                f"layout={c.layout}, factor={c.factor}, dynamic_policy={self.dynamic_policy}")
