"""Evaluation with the task's test views: softmax scores averaged over temporal x spatial views."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from stadapter.model.video_vit import VideoViT
from stadapter.training.data import ClipSource, make_loader
from stadapter.training.metrics import average_views, classification_metrics
from stadapter.video.datasets import SkipCounter


@torch.no_grad()
def predict_views(model: VideoViT, tensors: Mapping[str, Tensor], views: Tensor) -> Tensor:
    """views (B, V, T, 3, H, W) -> probabilities (B, C), the mean softmax over the V views."""
    B, V = views.shape[:2]
    logits = model(views.flatten(0, 1), tensors)  # (B*V, C)
    return average_views(logits.reshape(B, V, -1))


@torch.no_grad()
def evaluate(model: VideoViT, tensors: Mapping[str, Tensor], source: ClipSource, class_names: list[str],
             batch: int = 4, workers: int = 0, log: Callable[[str], None] = print) -> dict[str, Any]:
    model.eval()
    n = len(source)
    plan = [list(range(i, min(n, i + batch))) for i in range(0, n, batch)]
    skips = SkipCounter(warn=log)
    probs, labels = [], []
    for ids, views, y, skipped in make_loader(source, plan, epoch=0, train=False, seed=source.seed, workers=workers):
        skips.update(ok=len(ids), skipped=skipped)
        if len(ids):
            probs.append(predict_views(model, tensors, views).cpu())
            labels.append(y)
    c = len(class_names)
    result = classification_metrics(torch.cat(probs) if probs else torch.zeros(0, c),
                                    torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long), class_names)
    result["skipped_clips"] = skips.skipped
    return result
