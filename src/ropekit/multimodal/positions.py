"""Multi-axis position builders: M-RoPE (t, h, w) positions of text and image/video grids, as Qwen2-VL's
``get_rope_index`` (one sequence, or batched from token types), decode positions, and a ViT's patch positions."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ropekit.multimodal.layout import _int_list

Tensor = torch.Tensor

NEXT_TEXT_RULES = ("spatial", "max")


@dataclass(frozen=True)
class VisionGrid:
    """An image or video in an M-RoPE sequence: (t, h, w) patches before the spatial merge.

    ``time_interval``: temporal position step per frame group (1 for Qwen2-VL and for images; Qwen2.5-VL videos:
    ``tokens_per_second * second_per_grid_t``).
    """

    t: int
    h: int
    w: int
    time_interval: float = 1.0


def _vision_ids(grid: VisionGrid, start: int, merge: int) -> Tensor:
    """(3, t*h'*w') positions of one grid, as transformers' get_vision_position_ids (row-major over t, h, w)."""
    gt, gh, gw = grid.t, grid.h // merge, grid.w // merge
    # The temporal step is taken in float32 and truncated, as the Qwen2.5-VL processor and transformers do.
    t_ids = (torch.arange(gt, dtype=torch.float32) * float(grid.time_interval)).long() + start
    h_ids = torch.arange(gh) + start
    w_ids = torch.arange(gw) + start
    tt, hh, ww = torch.meshgrid(t_ids, h_ids, w_ids, indexing="ij")
    return torch.stack([tt, hh, ww]).reshape(3, -1)


def mrope_positions(segments: Sequence[int | VisionGrid | Sequence[int]], *, spatial_merge_size: int = 1,
                    start: int = 0, next_text: str = "spatial") -> tuple[Tensor, int]:
    """(t, h, w) positions of one sequence of text runs and image/video grids, as Qwen2-VL's ``get_rope_index``.

    Args:
        segments: in order, an int n (n text tokens) or a ``VisionGrid`` / (t, h, w) tuple (one image or video
            of t x h x w patches, t*(h/m)*(w/m) tokens after the spatial merge m). Text tokens advance all three
            axes together; a grid's tokens take t/h/w grid indices offset by the position reached so far.
            For Qwen3-VL, pass each video frame as its own grid (t=1), as its processor separates frames by
            timestamp text.
        spatial_merge_size: m, patches merged per side before the language model (2 for Qwen2-VL).
        start: position of the first token.
        next_text: where text after a grid continues: "spatial" (start + max(h, w)/m, transformers 5) or "max"
            (one past the largest position the grid used, temporal included: the original Qwen2-VL code, vLLM
            and transformers 4). They differ only for videos whose temporal positions outrun h and w.
    Returns:
        (positions (3, seq) int64, the next free position).
    """
    if next_text not in NEXT_TEXT_RULES:
        raise ValueError(f"next_text: {next_text!r} not accepted; accepted: {', '.join(NEXT_TEXT_RULES)}")
    merge = _int_list("spatial_merge_size", [spatial_merge_size], minimum=1)[0]
    current = _int_list("start", [start], minimum=0)[0]
    parts = []
    for seg in segments:
        if isinstance(seg, int) and not isinstance(seg, bool):
            if seg < 0:
                raise ValueError(f"segments: a text run must have >= 0 tokens, got {seg}")
            parts.append((current + torch.arange(seg)).expand(3, seg))
            current += seg
            continue
        grid = seg if isinstance(seg, VisionGrid) else VisionGrid(*_int_list("segments", seg, minimum=1))
        if min(grid.t, grid.h, grid.w) < 1 or grid.h % merge or grid.w % merge:
            raise ValueError(f"segments: grid {grid} must have t, h, w >= 1 and h, w divisible by "
                             f"spatial_merge_size {merge}")
        ids = _vision_ids(grid, current, merge)
        parts.append(ids)
        if next_text == "spatial":
            current += max(grid.h, grid.w) // merge
        else:
            current = int(ids.max()) + 1
    positions = torch.cat(parts, dim=1) if parts else torch.zeros(3, 0, dtype=torch.long)
    return positions, current


def mrope_positions_from_token_types(token_types: Tensor, image_grids: Tensor | Sequence | None = None,
                                     video_grids: Tensor | Sequence | None = None, *,
                                     attention_mask: Tensor | None = None, spatial_merge_size: int = 1,
                                     video_time_intervals: Sequence[float] | Tensor | None = None,
                                     split_video_frames: bool = False,
                                     next_text: str = "spatial") -> tuple[Tensor, Tensor]:
    """Batched M-RoPE positions from token types, as transformers' ``get_rope_index``.

    Args:
        token_types: (batch, seq) ints: 0 text, 1 image, 2 video (transformers' ``mm_token_type_ids``).
        image_grids, video_grids: (n, 3) (t, h, w) patch grids, consumed in order across the batch.
        attention_mask: (batch, seq); masked tokens are skipped (their positions are 0).
        spatial_merge_size: patches merged per side.
        video_time_intervals: per video, the temporal step (default 1, Qwen2-VL's). Qwen2.5-VL: pass
            tokens_per_second * second_per_grid_t per video (transformers takes second_per_grid_t = 1 when the
            processor gives none, so its default step there is tokens_per_second, not 1).
        split_video_frames: Qwen3-VL: each video frame is a grid of its own (t=1).
        next_text: see ``mrope_positions``.
    Returns:
        (positions (3, batch, seq) int64, deltas (batch, 1): max position + 1 - tokens, the offset that
        continues text positions when decoding, see ``mrope_decode_positions``).
    """
    if not isinstance(token_types, Tensor) or token_types.dim() != 2:
        raise ValueError("token_types: expected a (batch, seq) integer tensor (0 text, 1 image, 2 video)")
    images = [VisionGrid(*g) for g in _grid_rows("image_grids", image_grids)]
    videos = [VisionGrid(*g) for g in _grid_rows("video_grids", video_grids)]
    if video_time_intervals is not None:
        intervals = [float(x) for x in torch.as_tensor(video_time_intervals).flatten().tolist()]
        if len(intervals) != len(videos):
            raise ValueError(f"video_time_intervals: one per video ({len(videos)}), got {len(intervals)}")
        videos = [dataclasses.replace(v, time_interval=x) for v, x in zip(videos, intervals)]
    if split_video_frames:
        videos = [dataclasses.replace(v, t=1) for v in videos for _ in range(v.t)]
    grids = {1: iter(images), 2: iter(videos)}
    batch, seq = token_types.shape
    out = torch.zeros(3, batch, seq, dtype=torch.long)
    deltas = []
    for b in range(batch):
        types = token_types[b].cpu()
        keep = None if attention_mask is None else attention_mask[b].cpu().bool()
        if keep is not None:
            types = types[keep]
        segments = []
        for kind, run in itertools.groupby(types.tolist()):
            n = len(list(run))
            if kind == 0:
                segments.append(n)
                continue
            if kind not in grids:
                raise ValueError(f"token_types: unknown type {kind} (0 text, 1 image, 2 video)")
            try:
                grid = next(grids[kind])
            except StopIteration:
                raise ValueError(f"{'image' if kind == 1 else 'video'}_grids: fewer grids than runs of "
                                 f"{'image' if kind == 1 else 'video'} tokens") from None
            tokens = grid.t * (grid.h // spatial_merge_size) * (grid.w // spatial_merge_size)
            if tokens != n:
                raise ValueError(f"token_types: a run of {n} {'image' if kind == 1 else 'video'} tokens in row {b}, "
                                 f"but its grid {grid} gives {tokens} tokens")
            segments.append(grid)
        pos, _ = mrope_positions(segments, spatial_merge_size=spatial_merge_size, next_text=next_text)
        if keep is None:
            out[:, b] = pos
        else:
            out[:, b, keep] = pos
        deltas.append((int(pos.max()) + 1 if pos.numel() else 0) - pos.shape[1])
    return out.to(token_types.device), torch.tensor(deltas, device=token_types.device).unsqueeze(1)


def mrope_decode_positions(past_lengths: int | Tensor, new_tokens: int, deltas: Tensor) -> Tensor:
    """(3, batch, new_tokens) positions of text tokens decoded after a prompt.

    ``past_lengths``: tokens each row has seen so far, padding not counted (an int, or (batch,)); ``deltas``:
    (batch, 1) from ``mrope_positions_from_token_types``. Row b's i-th new token sits at
    past_lengths[b] + i + deltas[b] on every axis (the first one past the prompt's largest position).
    """
    past = torch.as_tensor(past_lengths, device=deltas.device).to(torch.long).reshape(-1, 1)
    steps = torch.arange(new_tokens, device=deltas.device).view(1, -1)
    return (past + steps + deltas.reshape(-1, 1).to(torch.long)).unsqueeze(0).expand(3, -1, -1)


def patch_positions(grids: Tensor | Sequence, spatial_merge_size: int = 1) -> Tensor:
    """(2, tokens) (row, col) positions of a ViT's patch grids, as transformers' vision position ids.

    ``grids``: (n, 3) (t, h, w) per image/video; each grid's patches come in order of m x m merge blocks
    (row-major over blocks, row-major inside a block), the (row, col) grid repeated for each of the t frames.
    With m = 1 that is plain row-major order (Pixtral's meshgrid).
    """
    merge = _int_list("spatial_merge_size", [spatial_merge_size], minimum=1)[0]
    parts = []
    for t, h, w in _grid_rows("grids", grids):
        if h % merge or w % merge:
            raise ValueError(f"grids: h {h} and w {w} must be divisible by spatial_merge_size {merge}")
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        block = (h // merge, merge, w // merge, merge)
        rows = rows.reshape(block).transpose(1, 2).flatten()
        cols = cols.reshape(block).transpose(1, 2).flatten()
        parts.append(torch.stack([rows, cols]).repeat(1, t))
    return torch.cat(parts, dim=1) if parts else torch.zeros(2, 0, dtype=torch.long)


# ---------------------------------------------------------------------- small helpers
def _grid_rows(name: str, grids: Tensor | Sequence | None) -> list[tuple[int, int, int]]:
    if grids is None:
        return []
    rows = grids.tolist() if isinstance(grids, Tensor) else list(grids)
    out = []
    for row in rows:
        vals = _int_list(name, row, minimum=1)
        if len(vals) != 3:
            raise ValueError(f"{name}: expected (t, h, w) rows, got {row!r}")
        out.append(tuple(vals))
    return out
