"""`train_task`: everything `stadapter train` does, from annotations to a registered bundle."""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from stadapter.bundle import Bundle
from stadapter.errors import ConfigError
from stadapter.model.loading import load_backbone
from stadapter.model.video_vit import VideoViT, count_parameters
from stadapter.recipes import PRESETS, Recipe, preset
from stadapter.training import dist as D
from stadapter.training.data import ClipSource
from stadapter.training.loop import TrainJob, run_training
from stadapter.training.report import plot_curves


@dataclass
class TrainOutcome:
    bundle_dir: Path | None
    metrics: dict[str, Any] | None
    trainable_params: int
    seconds: float
    skipped: int
    registered: str | None = None


def resolve_recipe(task: str, recipe: str | None, adapter: dict | None = None, spec: dict | None = None,
                   train: dict | None = None) -> Recipe:
    """The preset named by --recipe, else the task's name if it is a preset, else ``custom``; then overrides."""
    r = preset(recipe or (task if task in PRESETS else "custom"))
    return Recipe(r.name,
                  dataclasses.replace(r.adapter, **(adapter or {})),
                  dataclasses.replace(r.task, **(spec or {})),
                  dataclasses.replace(r.train, **(train or {})))


def backbone_info(bb) -> dict[str, Any]:
    return {**bb.describe(), "weights": getattr(bb, "weights", None), "fingerprint": bb.fingerprint()}


def prepare_backbone(spec: str, weights: str | None, device: torch.device, amp: bool):
    bb = load_backbone(spec, weights).to(device)
    if device.type == "cuda" and amp:
        bb = bb.half()  # frozen backbone in half precision; adapters and head stay fp32
    return bb


def train_task(task: str, recipe: Recipe, samples_train: list, labels: list[str], samples_val: list | None,
               backbone: str, weights: str | None, out: Path, resume: bool = False, max_steps: int | None = None,
               device: str | None = None, log: Callable[[str], None] = print, progress: bool = True,
               extra: dict[str, Any] | None = None) -> TrainOutcome:
    if not samples_train:
        raise ConfigError("the training set is empty")
    adapter = dataclasses.replace(recipe.adapter, num_classes=len(labels))
    dev = D.device_for(device, 0)
    info = D.init_distributed(dev)
    if dev.type == "cuda" and device is None:
        dev = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(dev)
    try:
        bb = prepare_backbone(backbone, weights, dev, recipe.train.amp)
        model = VideoViT(bb, adapter, recipe.task.num_frames)
        src = dict(spec=recipe.task, size=bb.image_size, mean=bb.mean, std=bb.std, seed=recipe.train.seed)
        cache = recipe.train.cache_clips
        train_src = ClipSource(samples_train, **src, cache={} if cache else None)
        val_src = ClipSource(samples_val, **src, cache={} if cache else None) if samples_val else None
        job = TrainJob(task, adapter, recipe.task, recipe.train, labels, train_src, val_src, out, max_steps,
                       device, log, progress, extra or {})
        result = run_training(job, model, info, resume=resume)
        if not info.is_main:
            return TrainOutcome(None, result.metrics, count_parameters(result.tensors), result.seconds,
                                result.skipped)
        metrics = None
        if result.metrics is not None:
            metrics = {**result.metrics, "skipped_train_clips": result.skipped, "train_seconds": result.seconds,
                       "steps": result.steps}
        bundle = Bundle(task=task, adapter=adapter, spec=recipe.task, backbone=backbone_info(bb), labels=labels,
                        tensors=result.tensors, metrics=metrics,
                        extra={"recipe": recipe.name, "train": recipe.train.to_dict(),
                               "trainable_params": count_parameters(result.tensors), **(extra or {})})
        bundle_dir = out / "bundle"
        if bundle_dir.exists():
            shutil.rmtree(bundle_dir)
        bundle.save(bundle_dir)
        plot_curves(out / "metrics.jsonl", out / "curves.png", title=f"{task} ({adapter.method})")
        return TrainOutcome(bundle_dir, metrics, count_parameters(result.tensors), result.seconds, result.skipped)
    finally:
        D.shutdown(info)
