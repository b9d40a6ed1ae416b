"""Recipe presets as data: each names the adapter layout, the task's sampling and views, and the training
settings of the official ST-Adapter scripts (linziyi96/st-adapter/scripts) or the closest fit.

``preset(name)`` returns the three validated configs; callers override single fields with
``dataclasses.replace``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from stadapter.config import AdapterConfig, TaskSpec, TrainConfig
from stadapter.errors import ConfigError

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
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
        "adapter": {"num_classes": 1, "width": 384, "kernel": (3, 1, 1), "positions": ("attn", "mlp")},
        "task": {"num_frames": 8, "sampling": "segments", "temporal_views": 1, "spatial_views": 1,
                 "train_crop": "random", "scale_range": (1.0, 1.15), "flip": False},
        "train": {"epochs": 30, "warmup_epochs": 2, "batch_size": 32},
    },
}


@dataclass(frozen=True)
class Recipe:
    name: str
    adapter: AdapterConfig
    task: TaskSpec
    train: TrainConfig


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> Recipe:
    """The named recipe. Raises ConfigError naming the known presets."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(preset_names())}")
    data = PRESETS[name]
    return Recipe(name, AdapterConfig(**data["adapter"]), TaskSpec(**data["task"]), TrainConfig(**data["train"]))
