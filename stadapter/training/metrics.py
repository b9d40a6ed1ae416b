"""Classification metrics over a whole evaluation set: top-1/top-5, per-class accuracy, confusion matrix."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def average_views(logits: Tensor) -> Tensor:
    """Multi-view testing: (B, V, C) logits -> (B, C) probabilities, the mean of each view's softmax."""
    return logits.float().softmax(dim=-1).mean(dim=1)


def classification_metrics(probs: Tensor, labels: Tensor, class_names: list[str]) -> dict[str, Any]:
    """probs (N, C) and labels (N,) -> a JSON-ready dict."""
    n, c = probs.shape
    if n == 0:
        return {"num_clips": 0, "top1": None, "top5": None, "per_class": {}, "confusion": []}
    k = min(5, c)
    topk = probs.topk(k, dim=1).indices  # (N, k)
    correct1 = topk[:, 0] == labels
    correct5 = (topk == labels[:, None]).any(dim=1)
    confusion = torch.zeros(c, c, dtype=torch.long)
    confusion.index_put_((labels, topk[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True)
    per_class = {}
    for i, name in enumerate(class_names):
        total = int(confusion[i].sum())
        per_class[name] = None if total == 0 else int(confusion[i, i]) / total
    seen = [v for v in per_class.values() if v is not None]
    return {
        "num_clips": n,
        "top1": float(correct1.float().mean()),
        "top5": float(correct5.float().mean()),
        "mean_class_accuracy": sum(seen) / len(seen) if seen else None,
        "per_class": per_class,
        "confusion": confusion.tolist(),
    }
