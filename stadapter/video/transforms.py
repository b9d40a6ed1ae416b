"""Clip transforms on uint8 frame stacks: every random choice is drawn once per clip, so all frames of a clip
get the same crop, flip and RandAugment ops (what keeps motion intact).

Frames come in as numpy (T, H, W, 3) uint8 RGB from the decoder and leave as float tensors (T, 3, S, S)
normalised with the backbone's mean/std (given on the 0..1 scale).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from stadapter.config import TaskSpec
from stadapter.errors import ConfigError, InputError

Rng = random.Random | np.random.Generator | int | None


def as_generator(rng: Rng) -> np.random.Generator:
    """A numpy Generator from a Generator, a ``random.Random`` (one draw from it), a seed or None."""
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, random.Random):
        return np.random.default_rng(rng.getrandbits(64))
    return np.random.default_rng(rng)


def to_tensor(frames: np.ndarray) -> torch.Tensor:
    """(T, H, W, 3) uint8 -> (T, 3, H, W) uint8."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise InputError(f"frames must be (T, H, W, 3) uint8, got {frames.shape} {frames.dtype}")
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)


def resize_short_side(x: torch.Tensor, short: int) -> torch.Tensor:
    """(T, 3, H, W) -> (T, 3, H', W') with min(H', W') = short, aspect kept (antialiased bilinear)."""
    h, w = x.shape[-2:]
    if min(h, w) == short:
        return x
    if h <= w:
        size = [short, max(short, round(w * short / h))]
    else:
        size = [max(short, round(h * short / w)), short]
    return TF.resize(x, size, antialias=True)


def crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[..., top:top + size, left:left + size]  # (T, 3, size, size)


def random_crop(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    h, w = x.shape[-2:]
    return crop(x, int(rng.integers(h - size + 1)), int(rng.integers(w - size + 1)), size)


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    h, w = x.shape[-2:]
    return crop(x, (h - size) // 2, (w - size) // 2, size)


def three_crop_offsets(h: int, w: int, size: int) -> list[tuple[int, int]]:
    """(top, left) of three crops along the long side: start, centre, end."""
    if w >= h:
        return [((h - size) // 2, left) for left in (0, (w - size) // 2, w - size)]
    return [(top, (w - size) // 2) for top in (0, (h - size) // 2, h - size)]


def random_resized_crop(x: torch.Tensor, size: int, rng: np.random.Generator,
                        scale: tuple[float, float] = (0.08, 1.0),
                        ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> torch.Tensor:
    """One box (area fraction in ``scale``, log-uniform aspect in ``ratio``) for the whole clip, resized to
    size x size; after 10 misses, the largest centred box within the ratio bounds (as torchvision)."""
    h, w = x.shape[-2:]
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top, left = int(rng.integers(h - ch + 1)), int(rng.integers(w - cw + 1))
            return TF.resized_crop(x, top, left, ch, cw, [size, size], antialias=True)
    in_ratio = w / h
    if in_ratio < ratio[0]:
        cw, ch = w, round(w / ratio[0])
    elif in_ratio > ratio[1]:
        cw, ch = round(h * ratio[1]), h
    else:
        cw, ch = w, h
    return TF.resized_crop(x, (h - ch) // 2, (w - cw) // 2, ch, cw, [size, size], antialias=True)


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(..., 3, H, W) uint8 -> float32, (x / 255 - mean) / std per channel."""
    m = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (x.float() / 255.0 - m) / s


@contextmanager
def _python_random(seed: int) -> Iterator[None]:
    """timm's ops draw from the global ``random``: seed it for a moment, then put its state back."""
    state = random.getstate()
    random.seed(seed)
    try:
        yield
    finally:
        random.setstate(state)


@dataclass(frozen=True)
class AugOp:
    name: str
    fn: Callable[..., Image.Image]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    seed: int


class ClipRandAugment:
    """timm's RandAugment (``rand-m7-n4-mstd0.5-inc1`` strings) with the ops, magnitudes, signs and
    interpolation drawn once per clip and applied to every frame."""

    def __init__(self, config: str, size: int, mean: Sequence[float]) -> None:
        from timm.data.auto_augment import rand_augment_transform

        hparams = {"translate_const": int(size * 0.45), "img_mean": tuple(round(255 * m) for m in mean)}
        try:
            self.ra = rand_augment_transform(config, hparams)
        except (AssertionError, ValueError, KeyError) as e:
            raise ConfigError(f"bad RandAugment string {config!r} (expected e.g. 'rand-m7-n4-mstd0.5-inc1')") from e

    def sample(self, rng: np.random.Generator) -> list[AugOp]:
        ra, plan = self.ra, []
        picks = rng.choice(len(ra.ops), ra.num_layers, replace=ra.choice_weights is None, p=ra.choice_weights)
        for k in picks:
            op = ra.ops[int(k)]
            if op.prob < 1.0 and rng.random() > op.prob:
                continue
            m = op.magnitude
            if op.magnitude_std == float("inf"):
                m = rng.uniform(0, m)
            elif op.magnitude_std > 0:
                m = rng.normal(m, op.magnitude_std)
            m = max(0.0, min(m, op.magnitude_max or 10.0))
            seed = int(rng.integers(2**63))
            with _python_random(seed):
                args = tuple(op.level_fn(m, op.hparams)) if op.level_fn is not None else ()
            kwargs = dict(op.kwargs)
            if isinstance(kwargs.get("resample"), (tuple, list)):
                kwargs["resample"] = kwargs["resample"][int(rng.integers(len(kwargs["resample"])))]
            plan.append(AugOp(op.name, op.aug_fn, args, kwargs, seed))
        return plan

    @staticmethod
    def apply(x: torch.Tensor, plan: list[AugOp]) -> torch.Tensor:
        """(T, 3, H, W) uint8 -> same, every frame through the same ops."""
        if not plan:
            return x
        out = []
        for frame in x.permute(0, 2, 3, 1).numpy():
            img = Image.fromarray(frame)
            for op in plan:
                with _python_random(op.seed):  # ops that draw inside draw the same for every frame
                    img = op.fn(img, *op.args, **dict(op.kwargs))
            out.append(np.asarray(img.convert("RGB")))
        return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        return self.apply(x, self.sample(rng))


@lru_cache(maxsize=8)
def clip_rand_augment(config: str, size: int, mean: tuple[float, ...]) -> ClipRandAugment:
    return ClipRandAugment(config, size, mean)


def train_clip(frames: np.ndarray, spec: TaskSpec, size: int, mean: Sequence[float], std: Sequence[float],
               rng: Rng) -> torch.Tensor:
    """One training clip: (T, H, W, 3) uint8 -> (T, 3, size, size) float, normalised."""
    if spec.flip and spec.direction_sensitive:
        raise ConfigError("horizontal flip is refused for a direction-sensitive task")
    g = as_generator(rng)
    x = to_tensor(frames)  # (T, 3, H, W) uint8
    if spec.train_crop == "random":
        lo, hi = spec.scale_range
        x = resize_short_side(x, max(size, round(size * g.uniform(lo, hi))))
        x = random_crop(x, size, g)
    else:
        x = random_resized_crop(x, size, g)
    if spec.flip and g.random() < 0.5:
        x = x.flip(-1)
    if spec.rand_augment:
        x = clip_rand_augment(spec.rand_augment, size, tuple(mean))(x, g)
    return normalize(x, mean, std)  # (T, 3, S, S)


def spatial_views(frames: np.ndarray, views: int, size: int) -> list[torch.Tensor]:
    """Short side to ``size``, then a centre crop (views=1) or three crops along the long side (views=3)."""
    x = resize_short_side(to_tensor(frames), size)  # (T, 3, H', W')
    if views == 1:
        return [center_crop(x, size)]
    h, w = x.shape[-2:]
    return [crop(x, top, left, size) for top, left in three_crop_offsets(h, w, size)]


def test_views(frames_per_temporal_view: Sequence[np.ndarray] | np.ndarray, spec: TaskSpec, size: int,
               mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """All test views of a clip: V_t stacks of (T, H, W, 3) uint8 -> (V_t * V_s, T, 3, S, S) float, temporal-major
    (view v is temporal v // V_s, spatial v % V_s)."""
    views = [v for frames in frames_per_temporal_view for v in spatial_views(frames, spec.spatial_views, size)]
    return normalize(torch.stack(views), mean, std)


test_views.__test__ = False  # type: ignore[attr-defined]  # not a pytest test, despite the name


def average_view_scores(logits: torch.Tensor) -> torch.Tensor:
    """Multi-view testing: softmax over classes, averaged over views. (V, C) -> (C,), (B, V, C) -> (B, C)."""
    if logits.ndim not in (2, 3):
        raise InputError(f"logits must be (V, C) or (B, V, C), got shape {tuple(logits.shape)}")
    return logits.float().softmax(dim=-1).mean(dim=-2)


__all__ = ["as_generator", "to_tensor", "resize_short_side", "short_side_reducer", "crop", "random_crop", "center_crop",
           "three_crop_offsets", "random_resized_crop", "normalize", "ClipRandAugment", "AugOp",
           "clip_rand_augment", "train_clip", "spatial_views", "test_views", "average_view_scores"]


def short_side_reducer(size: int) -> Callable[[np.ndarray], np.ndarray]:
    """A decode ``reduce`` for test views: one (H, W, 3) frame -> short side ``size`` (what ``test_views`` does
    to the whole stack first, pixel for pixel), so a read never holds many full-size frames."""

    def reduce(frame: np.ndarray) -> np.ndarray:
        return resize_short_side(to_tensor(frame[None]), size)[0].permute(1, 2, 0).numpy()  # (H', W', 3)

    return reduce
