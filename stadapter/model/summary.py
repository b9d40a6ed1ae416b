"""What a preset costs on a backbone: trainable and total parameters, and GMACs per view from a real forward.

    summarize_preset("open_clip:ViT-B-16", "none", "k400").trainable_params   # 7,417,744 (the paper's count)

GMACs count one multiply-add once, as fvcore (which the paper used) does; see :mod:`stadapter.model.flops`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from stadapter.config import AdapterConfig
from stadapter.errors import ConfigError
from stadapter.model.backbone import Backbone
from stadapter.model.flops import count_gmacs
from stadapter.model.video_vit import VideoViT, count_parameters


@dataclass(frozen=True)
class ModelSummary:
    """The counts for one adapter configuration on one backbone, for clips of ``frames`` frames.

    total_params: the backbone's parameters plus the trainable ones, less the backbone tensors a method
    retrains (bitfit, partial, full), which are counted once."""

    backbone: str  # the backbone's full spec
    preset: str
    adapter: AdapterConfig
    frames: int
    image_size: tuple[int, int]
    num_adapters: int
    trainable_params: int
    backbone_params: int
    total_params: int
    gmacs_per_view: float
    backbone_gmacs_per_view: float

    def to_dict(self) -> dict[str, Any]:
        """The JSON form `stadapter model-info --json` prints (GMACs rounded to 4 decimals)."""
        return {"backbone": self.backbone, "preset": self.preset, "method": self.adapter.method,
                "frames": self.frames, "image_size": list(self.image_size),
                "trainable_params": self.trainable_params, "total_params": self.total_params,
                "gmacs_per_view": round(self.gmacs_per_view, 4),
                "backbone_gmacs_per_view": round(self.backbone_gmacs_per_view, 4)}


def summarize(backbone: Backbone, adapter: AdapterConfig, frames: int, preset: str = "custom") -> ModelSummary:
    """Count parameters and the GMACs of one view (a zero clip) of ``adapter`` on an already built backbone."""
    if frames < 1:
        raise ConfigError(f"frames per view must be >= 1, got {frames}")
    model = VideoViT(backbone, adapter, frames).eval()
    tensors = model.init_adapter_set()
    model.bind(tensors)
    trainable = count_parameters(tensors)
    backbone_params = sum(p.numel() for p in backbone.parameters())
    retrained = sum(t.numel() for name, t in tensors.items() if name.startswith("backbone."))
    clip = torch.zeros(1, frames, 3, *backbone.image_size)  # (1, T, 3, H, W)
    return ModelSummary(
        backbone=str(backbone.spec), preset=preset, adapter=adapter, frames=frames,
        image_size=(int(backbone.image_size[0]), int(backbone.image_size[1])), num_adapters=len(model.slots()),
        trainable_params=trainable, backbone_params=backbone_params,
        total_params=backbone_params + trainable - retrained,
        gmacs_per_view=count_gmacs(model, clip), backbone_gmacs_per_view=count_gmacs(backbone, clip[0]))


def summarize_preset(backbone: str, weights: str | None = None, preset: str = "k400", *,
                     num_classes: int | None = None, frames: int | None = None,
                     method: str | None = None) -> ModelSummary:
    """:func:`summarize` for a recipe preset (with its classes, frames or method overridden) on the backbone
    ``backbone`` loaded with ``weights`` ('none': seeded random init, no download; the counts do not depend on
    the weights)."""
    from stadapter.model.loading import load_backbone
    from stadapter.recipes import preset as get_preset

    recipe = get_preset(preset)
    num_frames = frames if frames is not None else recipe.task.num_frames
    if num_frames < 1:  # before the backbone loads
        raise ConfigError(f"frames per view must be >= 1, got {num_frames}")
    bb = load_backbone(backbone, weights)
    recipe = recipe.for_backbone(bb.dim)  # "custom" sizes its adapters from the backbone's width
    changes: dict[str, Any] = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if method is not None:
        changes["method"] = method
    adapter = dataclasses.replace(recipe.adapter, **changes) if changes else recipe.adapter
    return summarize(bb, adapter, num_frames, preset)


__all__ = ["ModelSummary", "summarize", "summarize_preset"]
