"""The inference kernel: one adapter hook for a backbone pass over a batch whose clips belong to many tasks.

Each task's adapters see only its own rows of the batch. The maths is the model's own
(:func:`stadapter.model.adapter.adapter_delta`, equal to training's :func:`~stadapter.model.adapter.st_adapter`
within float rounding; checked in the tests) in its delta form, which makes few passes over memory: fc1 runs
on every token of the contiguous rows (no copy of the non-contiguous patch slice), a temporal kernel's taps
are written with ``addcmul`` into one buffer (clear of the cuDNN fp16/bf16 Conv3d bugs), and the delta is zero
on the prefix rows, so a batch of one task adds it in one pass and a mixed batch adds each task's delta into
its own rows of one output buffer, with no concatenation.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from stadapter.model.adapter import adapter_delta
from stadapter.model.backbone import AdapterHook
from stadapter.runtime.types import Segment


def segment_hook(segments: Sequence[Segment], num_frames: int, grid: tuple[int, int],
                 num_prefix: int) -> AdapterHook | None:
    """The adapter hook of one backbone pass over ``segments``' clips (None when no task has an adapter).

    The hook takes a block's input tokens (N*T, P + HW, C), each segment's rows contiguous, and returns them
    with each task's adapter applied to its rows; ``x`` itself is never written."""
    T = num_frames
    rows = [(seg.rows(T), seg.resident.slots, seg.handle.adapter.act) for seg in segments]
    if not any(slots for _, slots, _ in rows):
        return None

    if len(rows) == 1:
        _, slots, act = rows[0]

        def single(i: int, pos: str, x: Tensor) -> Tensor:
            w = slots.get((i, pos))
            return x if w is None else x + adapter_delta(x, w, T, num_prefix, act, grid)

        return single

    def mixed(i: int, pos: str, x: Tensor) -> Tensor:  # x: (N*T, L, C)
        y = None
        for where, slots, act in rows:
            w = slots.get((i, pos))
            if w is None:
                continue
            if y is None:
                y = x.clone()
            y[where] += adapter_delta(x[where], w, T, num_prefix, act, grid)
        return x if y is None else y

    return mixed


__all__ = ["segment_hook"]
