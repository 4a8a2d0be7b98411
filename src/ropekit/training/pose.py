"""PoSE: positional skip-wise training (Zhu et al., arXiv 2309.10400).

Fine-tuning for a target length N normally trains on N-token rows, so each step costs an N-token forward and
backward. PoSE trains on windows of W << N tokens whose position ids are spread over [0, N): the window is cut
into ``chunks`` pieces of consecutive text; piece i keeps consecutive position ids shifted by a skip u_i, with
u_0 = 0 and u_i drawn uniformly from [u_(i-1), N - W]. So the ids

* start at 0, rise strictly within the row (every skip is >= the previous one), and stay below N
  (the last id is W - 1 + u_last <= N - 1);
* put every relative distance in [1, N) within reach: two tokens in different pieces are
  (their offset in the window) + (u_j - u_i) apart, and u_j - u_i runs over [0, N - W].

The rows' text is the tokenized documents laid end to end (each followed by EOS) and cut into W-token windows
(``pose_windows``): a window is plain causal text, and attention runs over the whole window whatever its ids
(transformers would otherwise take every skip for the start of a new packed document; ``pose_forward_kwargs``
passes an all-ones 2-D mask to say "one sequence").

Randomness: the chunk cuts and skips of optimizer step s are drawn from a generator seeded by (seed, s) alone,
row slot by row slot over the global batch. Every rank draws the same global batch and keeps its own rows, and
a run resumed at step s draws exactly what the uninterrupted run drew: the generator's state at any step is a
function of (seed, step), so no extra state has to travel in the checkpoint to resume exactly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ropekit.training.data import IGNORE_INDEX, PackedRows

Tensor = torch.Tensor


@dataclass(frozen=True)
class PoseSpec:
    """PoSE for a target length ``target`` (N) with windows of ``window`` (W) tokens cut into ``chunks`` pieces."""

    target: int
    window: int
    chunks: int = 2

    def __post_init__(self) -> None:
        check_pose(self.target, self.window, self.chunks)


def check_pose(target: int, window: int, chunks: int = 2) -> None:
    """ValueError naming the field unless 2 <= window < target and 1 <= chunks <= window."""
    for name, value in (("seq_len", target), ("window", window), ("pose_chunks", chunks)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name}: must be an integer, got {value!r}")
    if window < 2:
        raise ValueError(f"window: must be >= 2, got {window}")
    if window >= target:
        raise ValueError(f"window: must be smaller than seq_len {target} (PoSE trains short windows for a long "
                         f"target), got {window}")
    if not 1 <= chunks <= window:
        raise ValueError(f"pose_chunks: must be in [1, window={window}], got {chunks}")


def pose_position_ids(window: int, target: int, chunks: int = 2,
                      generator: torch.Generator | None = None) -> Tensor:
    """(window,) int64 PoSE position ids of one row: ``chunks`` pieces of consecutive ids, piece i shifted by a
    skip u_i (u_0 = 0, u_i uniform in [u_(i-1), target - window]); strictly increasing, from 0, below target."""
    check_pose(target, window, chunks)
    # Cut points: chunks - 1 distinct places in 1..window-1, so every piece has at least one token.
    cuts = (torch.randperm(window - 1, generator=generator)[:chunks - 1] + 1).sort().values
    starts = torch.cat((torch.zeros(1, dtype=torch.long), cuts))
    room = target - window  # the largest skip that keeps the last id below target
    skips = [0]
    for _ in range(chunks - 1):
        low = skips[-1]
        skips.append(low + int(torch.randint(0, room - low + 1, (1,), generator=generator)))
    piece = torch.zeros(window, dtype=torch.long)
    piece[starts[1:]] = 1
    piece = piece.cumsum(0)  # which piece each token is in
    return torch.arange(window, dtype=torch.long) + torch.tensor(skips, dtype=torch.long)[piece]


def step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of optimizer step ``step``'s PoSE draws: seeded by (seed, step) only."""
    digest = hashlib.sha256(f"ropekit-pose/{seed}/{step}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))


def step_position_ids(spec: PoseSpec, seed: int, step: int, rows: int) -> Tensor:
    """(rows, window) int64 position ids for the ``rows`` row slots of optimizer step ``step`` (the global batch,
    in slot order: rank r's micro-batches take its slice, as for the rows themselves)."""
    gen = step_generator(seed, step)
    return torch.stack([pose_position_ids(spec.window, spec.target, spec.chunks, gen) for _ in range(rows)])


def pose_windows(token_lists: Sequence[Sequence[int]], window: int) -> PackedRows:
    """Tokenized documents laid end to end, cut into rows of ``window`` consecutive tokens.

    Positions are 0..window-1 (the PoSE ids replace them per step); labels are the tokens themselves (the row's
    first token is never a target: the model predicts token t+1 from t). The partial last window is dropped.

    Raises ValueError when the documents hold fewer than ``window`` tokens.
    """
    if isinstance(window, bool) or not isinstance(window, int) or window < 2:
        raise ValueError(f"window: must be an integer >= 2, got {window!r}")
    stream = [t for doc in token_lists for t in doc]
    n_rows = len(stream) // window
    if n_rows == 0:
        raise ValueError(f"data: only {len(stream)} tokens, fewer than one PoSE window of {window}")
    ids = torch.tensor(stream[:n_rows * window], dtype=torch.long).view(n_rows, window)
    positions = torch.arange(window, dtype=torch.long).expand(n_rows, window).clone()
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    return PackedRows(ids, positions, labels)


def pose_forward_kwargs(position_ids: Tensor) -> dict[str, Any]:
    """Keyword arguments for a causal LM forward over PoSE rows: the skipped ids, no cache, and an all-ones 2-D
    attention mask, so transformers applies plain causal attention over the window instead of reading each skip
    as the start of a new packed document."""
    mask = torch.ones(position_ids.shape, dtype=torch.long, device=position_ids.device)
    return {"position_ids": position_ids, "attention_mask": mask, "use_cache": False}


def covered_distances(position_ids: Tensor) -> Tensor:
    """(rows, window) ids -> sorted unique relative distances pos_j - pos_i (i < j) that appear in some row."""
    diffs = position_ids[:, None, :] - position_ids[:, :, None]  # [r, i, j] = pos_j - pos_i
    upper = torch.ones(diffs.shape[-2:], dtype=torch.bool).triu(1)
    return diffs[:, upper].unique()
