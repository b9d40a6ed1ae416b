"""Predictions as users read them: each task's top-k labels for a clip, and :func:`predict_files`, what
``stadapter predict`` does (one engine, every clip decoded once within its decode limits, each task's own test
views; a clip that cannot be decoded gets an error entry and the others are still answered).

The JSON shape of one clip's answer is the same here and in the HTTP API (``runtime/server.py``):

    {"task": "k400", "version": "k400:3", "views": 3, "top": [{"label": "...", "prob": 0.91}, ...]}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from stadapter.errors import DecodeError
from stadapter.runtime.types import Registry, TaskHandle
from stadapter.video.decode import DEFAULT_LIMITS, DecodeLimits


def top_k(probs: Tensor, labels: Sequence[str], k: int) -> list[tuple[str, float]]:
    """The ``k`` most probable (label, probability) pairs, most probable first (k clipped to the classes)."""
    k = max(1, min(k, probs.numel()))
    values, indices = probs.topk(k)
    return [(labels[int(i)], float(v)) for v, i in zip(values, indices, strict=True)]


def task_results(handles: Sequence[TaskHandle], views: Sequence[Tensor], probs: Sequence[Tensor],
                 k: int) -> list[dict[str, Any]]:
    """One clip's answer per task: the reference asked for, the version it resolved to, the number of views
    averaged, and the top-k labels."""
    return [{"task": h.ref, "version": h.name, "views": int(v.shape[0]),
             "top": [{"label": label, "prob": p} for label, p in top_k(pr, h.labels, k)]}
            for h, v, pr in zip(handles, views, probs, strict=True)]


@dataclass(frozen=True)
class FilePredictions:
    """What :func:`predict_files` found: the device and backbone it ran on, and per clip, in the order given,
    ``{"clip": path, "tasks": task_results(...)}`` or, for a clip that could not be decoded,
    ``{"clip": path, "error": "<one line naming the clip>"}``."""

    device: str
    backbone: str
    results: list[dict[str, Any]]

    @property
    def errors(self) -> list[str]:
        return [r["error"] for r in self.results if "error" in r]

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "backbone": self.backbone, "results": self.results}


def predict_files(registry: Registry, clips: Sequence[Path], refs: Sequence[str], *, k: int = 5,
                  device: str | None = "auto", backbone: str | None = None, weights: str | None = None,
                  limits: DecodeLimits = DEFAULT_LIMITS) -> FilePredictions:
    """Top-k labels of each clip for each task in ``refs``, on one backbone (by default the one the first task
    was trained on). Every clip is decoded once, within ``limits``; every task applies its own frame sampler
    and test views, softmax averaged over the views. A clip that cannot be decoded (DecodeError) gets an
    ``error`` entry instead of ``tasks``; the other clips are still answered."""
    from stadapter.runtime.engine import Engine
    from stadapter.runtime.inputs import task_views

    engine = Engine.open(registry, backbone=backbone, weights=weights, tasks=refs, device=device,
                         max_resident=max(len(refs), 1))
    try:
        handles = [engine.resolve(r) for r in refs]
        results: list[dict[str, Any]] = []
        for clip in clips:
            try:
                views = task_views(engine, clip, handles, limits)
            except DecodeError as e:
                results.append({"clip": str(clip), "error": str(e)})
                continue
            probs = engine.predict(list(zip(views, handles, strict=True)))
            results.append({"clip": str(clip), "tasks": task_results(handles, views, probs, k)})
        meta = engine.describe()
    finally:
        engine.close()
    return FilePredictions(meta["device_name"], meta["backbone"], results)


__all__ = ["FilePredictions", "predict_files", "task_results", "top_k"]
