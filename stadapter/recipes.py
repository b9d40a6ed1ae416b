"""Recipe presets as data: each names the adapter layout, the task's sampling and views, and the training
settings of the official ST-Adapter scripts (linziyi96/st-adapter/scripts) or the closest fit.

``preset(name)`` returns the three validated configs; callers override single fields with
``dataclasses.replace``. Each preset's training config carries its own batch as ``lr_ref_batch``: the learning
rate at that batch is the paper's figure, and a smaller batch trains at that rate, not below it
(:func:`stadapter.training.optim.scaled_lr`).

Adapter width: the paper presets keep the paper's r = 384 (on ViT-B/16, half its width 768). The ``custom``
preset, for a user's own labels on any backbone, sizes the adapters to the backbone instead: r is
:data:`DEFAULT_WIDTH_FRACTION` of the backbone's width (:meth:`Recipe.for_backbone`; ViT-S/14: 192, the tiny
test backbone: 32), unless ``--width`` names one.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from stadapter.config import AdapterConfig, TaskSpec, TrainConfig
from stadapter.errors import ConfigError

DEFAULT_WIDTH_FRACTION = 0.5  # the paper's r = 384 of ViT-B/16's 768

PRESETS: dict[str, dict[str, Any]] = {
    # K400: one adapter per block before the MLP, 8 x 16 dense frames, 3 temporal x 1 spatial views at test.
    "k400": {
        "adapter": {"num_classes": 400, "width": 384, "kernel": (3, 1, 1), "positions": ("mlp",)},
        "task": {"num_frames": 8, "sampling": "dense", "frame_stride": 16, "temporal_views": 3,
                 "spatial_views": 1, "train_crop": "random", "scale_range": (1.0, 1.15), "flip": True},
        "train": {"epochs": 12, "warmup_epochs": 2, "batch_size": 64},
    },
    # SSv2: two adapters per block, uniform segments, RandAugment, no flip (left/right is the label), 1 x 3.
    "ssv2": {
        "adapter": {"num_classes": 174, "width": 384, "kernel": (3, 1, 1), "positions": ("attn", "mlp")},
        "task": {"num_frames": 8, "sampling": "segments", "temporal_views": 1, "spatial_views": 3,
                 "train_crop": "random-resized", "flip": False, "direction_sensitive": True,
                 "rand_augment": "rand-m7-n4-mstd0.5-inc1"},
        "train": {"epochs": 50, "warmup_epochs": 2, "batch_size": 64},
    },
    # Diving48: the dive is in the motion; segments as SSv2, flips are harmless.
    "diving48": {
        "adapter": {"num_classes": 48, "width": 384, "kernel": (3, 1, 1), "positions": ("attn", "mlp")},
        "task": {"num_frames": 8, "sampling": "segments", "temporal_views": 1, "spatial_views": 3,
                 "train_crop": "random-resized", "flip": True, "rand_augment": "rand-m7-n4-mstd0.5-inc1"},
        "train": {"epochs": 50, "warmup_epochs": 2, "batch_size": 64},
    },
    # UCF101 / HMDB51: short clips, so a shorter stride; the K400 layout otherwise.
    "ucf101": {
        "adapter": {"num_classes": 101, "width": 384, "kernel": (3, 1, 1), "positions": ("mlp",)},
        "task": {"num_frames": 8, "sampling": "dense", "frame_stride": 8, "temporal_views": 3,
                 "spatial_views": 1, "train_crop": "random", "scale_range": (1.0, 1.15), "flip": True},
        "train": {"epochs": 30, "warmup_epochs": 2, "batch_size": 64},
    },
    "hmdb51": {
        "adapter": {"num_classes": 51, "width": 384, "kernel": (3, 1, 1), "positions": ("mlp",)},
        "task": {"num_frames": 8, "sampling": "dense", "frame_stride": 4, "temporal_views": 3,
                 "spatial_views": 1, "train_crop": "random", "scale_range": (1.0, 1.15), "flip": True},
        "train": {"epochs": 30, "warmup_epochs": 2, "batch_size": 64},
    },
    # Your own labels: the class count comes from the annotations; segments work for clips of any length;
    # no flip by default, since left/right may be the label (pass --flip to allow it).
    "custom": {
        "adapter": {"num_classes": 1, "kernel": (3, 1, 1), "positions": ("attn", "mlp")},
        "width_fraction": DEFAULT_WIDTH_FRACTION,
        "task": {"num_frames": 8, "sampling": "segments", "temporal_views": 1, "spatial_views": 1,
                 "train_crop": "random", "scale_range": (1.0, 1.15), "flip": False},
        "train": {"epochs": 30, "warmup_epochs": 2, "batch_size": 32},
    },
}


def width_for(dim: int, fraction: float = DEFAULT_WIDTH_FRACTION) -> int:
    """The adapter width r for a backbone of width ``dim``: ``fraction`` of it, at least 1."""
    return max(1, round(dim * fraction))


@dataclass(frozen=True)
class Recipe:
    """width_fraction: when set, the adapter width is that fraction of the backbone's width, fixed by
    :meth:`for_backbone` once the backbone is known (``adapter.width`` is a placeholder until then)."""

    name: str
    adapter: AdapterConfig
    task: TaskSpec
    train: TrainConfig
    width_fraction: float | None = None

    def for_backbone(self, dim: int) -> Recipe:
        """This recipe with its adapter width fixed for a backbone of width ``dim``."""
        if self.width_fraction is None:
            return self
        adapter = dataclasses.replace(self.adapter, width=width_for(dim, self.width_fraction))
        return dataclasses.replace(self, adapter=adapter, width_fraction=None)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> Recipe:
    """The named recipe. Raises ConfigError naming the known presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    data = PRESETS[name]
    train = TrainConfig(**{"lr_ref_batch": data["train"]["batch_size"], **data["train"]})
    fraction = data.get("width_fraction")
    return Recipe(name, AdapterConfig(**data["adapter"]), TaskSpec(**data["task"]), train, fraction)
