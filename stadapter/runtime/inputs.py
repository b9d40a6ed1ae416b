"""Clips -> each task's test views, decoding every clip once, within its decode limits.

Each task samples its own frames (its TaskSpec: dense windows or segment centres, temporal views) and crops its
own spatial views; the frames all tasks need are decoded in one pass (the union of their indices), each frame
resized to the views' short side as soon as it is decoded (the same pixels as resizing the stack afterwards),
then every task's views are cut from that one decode. :class:`DecodePool` runs such decodes for the server with
bounded concurrency: a full pool refuses at once, before any decoding.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
from torch import Tensor

from stadapter.config import TaskSpec
from stadapter.errors import InputError
from stadapter.video.decode import DEFAULT_LIMITS, DecodeLimits, decode_frames, probe
from stadapter.video.sampling import sample_indices
from stadapter.video.transforms import short_side_reducer, test_views

if TYPE_CHECKING:
    from stadapter.runtime.engine import Engine
    from stadapter.runtime.types import TaskHandle

T = TypeVar("T")


def frame_plan(length: int, specs: Sequence[TaskSpec]) -> tuple[np.ndarray, list[np.ndarray]]:
    """(sorted unique frame indices to decode, per spec the (V_t, T) positions into that array)."""
    per_task = [sample_indices(length, spec, train=False) for spec in specs]  # each (V_t, T)
    union = np.unique(np.concatenate([idx.reshape(-1) for idx in per_task]))
    return union, [np.searchsorted(union, idx) for idx in per_task]


def clip_views(path: str | Path, specs: Sequence[TaskSpec], size: int, mean: Sequence[float],
               std: Sequence[float], limits: DecodeLimits = DEFAULT_LIMITS) -> list[Tensor]:
    """Every spec's test views of one clip, (V_t * V_s, T, 3, size, size) float each, from one decode.

    Raises DecodeError (naming the file) when the clip cannot be opened or decoded or is over ``limits``."""
    length = probe(path, limits=limits).num_frames
    union, positions = frame_plan(length, specs)
    frames = decode_frames(path, union, limits=limits, reduce=short_side_reducer(size))  # (U, H', W', 3) uint8
    return [test_views(frames[pos], spec, size, mean, std) for pos, spec in zip(positions, specs, strict=True)]


def task_views(engine: Engine, path: str | Path, handles: Sequence[TaskHandle],
               limits: DecodeLimits = DEFAULT_LIMITS) -> list[Tensor]:
    """Each task's test views of one clip for ``engine``'s backbone (its input size, mean and std)."""
    b = engine.backbone
    return clip_views(path, [h.spec for h in handles], b.image_size[0], b.mean, b.std, limits)


class DecodeBusy(Exception):
    """Every decode slot and every place in the decode queue is taken."""


class DecodePool:
    """Decodes off the event loop with bounded concurrency: ``workers`` at once and ``queue`` more waiting for
    a slot. :meth:`submit` beyond that raises DecodeBusy at once (the server's 429), so a burst of clips never
    queues unbounded decoding work or memory."""

    def __init__(self, workers: int, queue: int) -> None:
        if workers < 1 or queue < 0:
            raise InputError(f"the decode pool needs workers >= 1 and queue >= 0, got {workers} and {queue}")
        self.workers, self.queue = workers, queue
        self._executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stadapter-decode")
        self._lock = threading.Lock()
        self._admitted = 0  # running + waiting

    @property
    def admitted(self) -> int:
        return self._admitted

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise DecodeBusy(f"all {self.workers} decode slots and {self.queue} queue places are taken; "
                                 f"retry later")
            self._admitted += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1

    def close(self) -> None:
        """Drop queued decodes and wait for the running ones."""
        self._executor.shutdown(wait=True, cancel_futures=True)


__all__ = ["frame_plan", "clip_views", "task_views", "DecodePool", "DecodeBusy"]
