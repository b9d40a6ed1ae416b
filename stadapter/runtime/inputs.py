"""Clips -> each task's test views, decoding every clip once.

Each task samples its own frames (its TaskSpec: dense windows or segment centres, temporal views) and crops its
own spatial views; the frames all tasks need are decoded in one pass (the union of their indices), then every
task's views are cut from that one decode.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch import Tensor

from stadapter.config import TaskSpec
from stadapter.video.decode import decode_frames, probe
from stadapter.video.sampling import sample_indices
from stadapter.video.transforms import test_views


def frame_plan(length: int, specs: Sequence[TaskSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted unique frame indices to decode, per spec the (V_t, T) positions into that array)."""
    per_task = [sample_indices(length, spec, train=False) for spec in specs]  # each (V_t, T)
    union = np.unique(np.concatenate([idx.reshape(-1) for idx in per_task]))
    return union, [np.searchsorted(union, idx) for idx in per_task]


def clip_views(path: str | Path, specs: Sequence[TaskSpec], size: int, mean: Sequence[float],
               std: Sequence[float]) -> list[Tensor]:
    """Every spec's test views of one clip, (V_t * V_s, T, 3, size, size) float each, from one decode.

    Raises DecodeError (naming the file) when the clip cannot be opened or decoded."""
    length = probe(path).num_frames
    union, positions = frame_plan(length, specs)
    frames = decode_frames(path, union)  # (U, H, W, 3) uint8
    return [test_views(frames[pos], spec, size, mean, std) for pos, spec in zip(positions, specs, strict=True)]


__all__ = ["frame_plan", "clip_views"]
