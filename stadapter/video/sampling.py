"""Which frames of a clip a model sees: the paper's two samplers as pure functions of the clip length.

Every sampler returns an int64 array of shape (V, T): V views (1 in training) of T frame indices, each row
non-decreasing and inside [0, length). ``rng`` is a ``random.Random`` or a ``numpy.random.Generator``.

- dense (K400): T frames ``stride`` apart. Training: a random window; test: ``temporal_views`` windows spread
  evenly over the clip (each centred in its share, as mmaction2). A clip shorter than the window gets the
  largest stride that fits; shorter than T frames, its frames are stretched in order (some repeat), never
  looped (a loop would add a jump backwards in time, which is a motion).
- segments (SSv2): the clip is cut into T equal segments. Training: a random frame of each; test: the centre
  of each (with ``temporal_views`` > 1, view v takes the point (v + 0.5) / V of each segment).
"""

from __future__ import annotations

import random

import numpy as np

from stadapter.config import TaskSpec
from stadapter.errors import InputError

Rng = random.Random | np.random.Generator


def _randint(rng: Rng, high: int) -> int:
    """A uniform integer in [0, high)."""
    if isinstance(rng, np.random.Generator):
        return int(rng.integers(high))
    return rng.randrange(high)


def _check(length: int, num_frames: int) -> None:
    if length < 1:
        raise InputError(f"a clip needs at least one frame, got length {length}")
    if num_frames < 1:
        raise InputError(f"num_frames must be >= 1, got {num_frames}")


def _fit_stride(length: int, num_frames: int, stride: int) -> int:
    """The stride itself when the window fits, else the largest that does (0: not even stride 1 fits)."""
    if (num_frames - 1) * stride + 1 <= length or num_frames == 1:
        return stride
    return (length - 1) // (num_frames - 1)


def _stretch(length: int, num_frames: int) -> np.ndarray:
    return (np.arange(num_frames) * length) // num_frames  # (T,) non-decreasing, repeats some frames


def dense_train(length: int, num_frames: int, stride: int, rng: Rng) -> np.ndarray:
    """(1, T): one window of T frames ``stride`` apart at a random offset."""
    _check(length, num_frames)
    s = _fit_stride(length, num_frames, stride)
    if s == 0:
        return _stretch(length, num_frames)[None]
    span = (num_frames - 1) * s + 1
    offset = _randint(rng, length - span + 1)
    return (offset + s * np.arange(num_frames, dtype=np.int64))[None]


def dense_test(length: int, num_frames: int, stride: int, views: int = 1) -> np.ndarray:
    """(V, T): ``views`` windows spread evenly over the clip, each centred in its share of the offsets."""
    _check(length, num_frames)
    s = _fit_stride(length, num_frames, stride)
    if s == 0:
        return np.repeat(_stretch(length, num_frames)[None], views, axis=0)
    span = (num_frames - 1) * s + 1
    room = length - span + 1  # possible offsets
    offsets = ((np.arange(views) + 0.5) * room / views).astype(np.int64)  # (V,)
    return offsets[:, None] + s * np.arange(num_frames, dtype=np.int64)[None, :]


def _segments(length: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    edges = np.arange(num_frames + 1) * length / num_frames  # (T+1,) float segment edges
    return edges[:-1], edges[1:]


def segment_train(length: int, num_frames: int, rng: Rng) -> np.ndarray:
    """(1, T): a random frame inside each of T equal segments."""
    _check(length, num_frames)
    lo, hi = _segments(length, num_frames)
    start = np.floor(lo).astype(np.int64)
    width = np.maximum(np.floor(hi).astype(np.int64) - start, 1)  # segments shorter than a frame: one frame
    picks = np.array([start[t] + _randint(rng, int(width[t])) for t in range(num_frames)], dtype=np.int64)
    return np.minimum(picks, length - 1)[None]


def segment_test(length: int, num_frames: int, views: int = 1) -> np.ndarray:
    """(V, T): the point (v + 0.5) / V of each segment (the centre for one view)."""
    _check(length, num_frames)
    lo, hi = _segments(length, num_frames)
    frac = (np.arange(views) + 0.5) / views  # (V,)
    pos = lo[None, :] + frac[:, None] * (hi - lo)[None, :]  # (V, T)
    return np.minimum(pos.astype(np.int64), length - 1)


def sample_indices(length: int, spec: TaskSpec, train: bool, rng: Rng | None = None) -> np.ndarray:
    """The frame indices for one clip of ``length`` frames under ``spec``: (1, T) in training, (V_t, T) at
    test with V_t = spec.temporal_views."""
    if spec.sampling == "dense":
        if train:
            return dense_train(length, spec.num_frames, spec.frame_stride, rng or np.random.default_rng())
        return dense_test(length, spec.num_frames, spec.frame_stride, spec.temporal_views)
    if train:
        return segment_train(length, spec.num_frames, rng or np.random.default_rng())
    return segment_test(length, spec.num_frames, spec.temporal_views)


__all__ = ["dense_train", "dense_test", "segment_train", "segment_test", "sample_indices"]
