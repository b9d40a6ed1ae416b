"""After the last block: pool each clip's tokens, apply the backbone's final norm, then the task's linear head.

One home for this step, shared by :class:`~stadapter.model.video_vit.VideoViT` (training, evaluation) and the
runtime engine (each task's clips of a mixed batch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from stadapter.model.backbone import Backbone, swapped_parameters


def pool_tokens(tokens: Tensor, pool: str, num_prefix: int) -> Tensor:
    """(B, T, P + HW, C) -> (B, C): the CLS token of each frame (``cls``) or every patch token
    (``patch-mean``), averaged over the frames."""
    if pool == "cls":
        return tokens[:, :, 0].mean(dim=1)  # (B, C)
    return tokens[:, :, num_prefix:].mean(dim=(1, 2))  # (B, C)


def clip_features(backbone: Backbone, tokens: Tensor, pool: str,
                  overrides: Mapping[str, Tensor] | None = None) -> Tensor:
    """(B, T, P + HW, C) -> pooled features after the backbone's final norm (CLIP's ln_post), (B, C) float32.

    ``overrides`` replace backbone tensors (the final norm's too, for the baselines that train it)."""
    pooled = pool_tokens(tokens, pool, backbone.num_prefix)
    ctx = swapped_parameters(backbone, overrides) if overrides else contextlib.nullcontext()
    with ctx:
        return backbone.final_norm(pooled).float()


def head_logits(features: Tensor, tensors: Mapping[str, Tensor]) -> Tensor:
    """(B, C) float32 features -> (B, num_classes) float32 logits of the set's ``head.weight``/``head.bias``."""
    return F.linear(features, tensors["head.weight"].float(), tensors["head.bias"].float())


__all__ = ["clip_features", "head_logits", "pool_tokens"]
