"""Clip transforms: shapes, normalisation, crops, flips, RandAugment per clip, multi-view scores."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from stadapter.config import TaskSpec
from stadapter.errors import ConfigError, InputError
from stadapter.video import transforms as T

MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP


def random_frames(t=4, h=48, w=64, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(t, h, w, 3), dtype=np.uint8)


def column_frames(t=2, h=32, w=96) -> np.ndarray:
    """Pixel value = column index (so a crop shows where it was taken)."""
    cols = np.broadcast_to(np.arange(w, dtype=np.uint8)[None, None, :, None], (t, h, w, 3))
    return np.ascontiguousarray(cols)


def halves(t=3, size=32) -> np.ndarray:
    """Dark left half, bright right half."""
    f = np.zeros((t, size, size, 3), dtype=np.uint8)
    f[:, :, size // 2:] = 255
    return f


def unnormalize(x: torch.Tensor) -> torch.Tensor:
    return x * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)


@pytest.mark.parametrize("spec", [
    TaskSpec(num_frames=4),
    TaskSpec(num_frames=4, train_crop="random-resized", flip=False, direction_sensitive=True,
             rand_augment="rand-m7-n4-mstd0.5-inc1"),
])
def test_train_clip_shape_and_determinism(spec):
    frames = random_frames()
    a = T.train_clip(frames, spec, 32, MEAN, STD, np.random.default_rng(1))
    b = T.train_clip(frames, spec, 32, MEAN, STD, np.random.default_rng(1))
    assert a.shape == (4, 3, 32, 32) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    seeds = [T.train_clip(frames, spec, 32, MEAN, STD, np.random.default_rng(s)) for s in range(4)]
    assert any(not torch.equal(seeds[0], s) for s in seeds[1:])


def test_normalisation_exact():
    frames = np.full((2, 40, 40, 3), (10, 128, 250), dtype=np.uint8)
    views = T.test_views([frames], TaskSpec(num_frames=2), 32, MEAN, STD)
    assert views.shape == (1, 2, 3, 32, 32)
    for c, v in enumerate((10, 128, 250)):
        expect = (v / 255 - MEAN[c]) / STD[c]
        assert torch.allclose(views[0, :, c], torch.full((2, 32, 32), expect), atol=1e-5)


def test_scale_jitter_within_range():
    spec = TaskSpec(num_frames=2, scale_range=(1.0, 1.15), flip=False)
    frames = column_frames(w=96)  # short side 32 -> resized to 32..37, so 32 columns span 31 / scale values
    spans = []
    for s in range(20):
        x = unnormalize(T.train_clip(frames, spec, 32, MEAN, STD, np.random.default_rng(s)))
        assert x.shape == (2, 3, 32, 32)
        spans.append(float(x[0, 0, 0, -1] - x[0, 0, 0, 0]) * 255)
    assert all(31 / 1.15 - 1.5 <= v <= 31.5 for v in spans)
    assert min(spans) < 29.5 and max(spans) > 30.5  # the scale is jittered


def test_three_crops_along_long_side():
    spec = TaskSpec(num_frames=2, spatial_views=3)
    views = T.test_views([column_frames(w=96)], spec, 32, MEAN, STD)  # short side is already 32: no resize
    assert views.shape == (3, 2, 3, 32, 32)
    first_cols = [round(float(unnormalize(v[0])[0, 0, 0]) * 255) for v in views]
    assert first_cols == [0, 32, 64]  # left, centre, right
    assert T.three_crop_offsets(96, 32, 32) == [(0, 0), (32, 0), (64, 0)]  # portrait: top, middle, bottom
    assert T.three_crop_offsets(32, 96, 32) == [(0, 0), (0, 32), (0, 64)]


def test_centre_crop_position():
    views = T.test_views([column_frames(w=96)], TaskSpec(num_frames=2), 32, MEAN, STD)
    assert round(float(unnormalize(views[0, 0])[0, 0, 0]) * 255) == 32


def test_views_are_temporal_major():
    spec = TaskSpec(num_frames=2, temporal_views=2, spatial_views=3)
    a = np.full((2, 32, 64, 3), 0, dtype=np.uint8)
    b = np.full((2, 32, 64, 3), 255, dtype=np.uint8)
    views = T.test_views(np.stack([a, b]), spec, 32, MEAN, STD)  # (V_t, T, H, W, 3) in
    assert views.shape == (6, 2, 3, 32, 32)
    means = unnormalize(views).mean(dim=(1, 2, 3, 4))
    assert torch.allclose(means[:3], torch.zeros(3), atol=1e-5)
    assert torch.allclose(means[3:], torch.ones(3), atol=1e-5)


def test_flip_happens_when_allowed():
    spec = TaskSpec(num_frames=3, scale_range=(1.0, 1.0), flip=True)
    flipped = 0
    for s in range(40):
        x = unnormalize(T.train_clip(halves(), spec, 32, MEAN, STD, np.random.default_rng(s)))
        left, right = x[..., :16].mean(), x[..., 16:].mean()
        flipped += bool(left > right)
        assert torch.allclose(x[0], x[1]) and torch.allclose(x[1], x[2])  # same flip for every frame
    assert 5 < flipped < 35


def test_direction_sensitive_never_flips():
    with pytest.raises(ConfigError, match="flip"):
        TaskSpec(flip=True, direction_sensitive=True)
    for crop in ("random", "random-resized"):
        spec = TaskSpec(num_frames=3, scale_range=(1.0, 1.0), flip=False, direction_sensitive=True,
                        train_crop=crop)
        for s in range(40):
            x = unnormalize(T.train_clip(halves(), spec, 32, MEAN, STD, np.random.default_rng(s)))
            assert x[..., :4].mean() <= x[..., -4:].mean()
    # a spec smuggled past validation is still refused by the transform
    bad = dataclasses.replace(TaskSpec(flip=False, direction_sensitive=True))
    object.__setattr__(bad, "flip", True)
    with pytest.raises(ConfigError):
        T.train_clip(halves(), bad, 32, MEAN, STD, np.random.default_rng(0))


def test_random_resized_crop_same_box_for_all_frames():
    base = random_frames(t=1, h=48, w=64)[0].astype(np.int16)
    frames = np.stack([np.clip(base + 0, 0, 200), np.clip(base + 0, 0, 200) + 50]).astype(np.uint8)  # +50
    for s in range(10):
        x = T.random_resized_crop(T.to_tensor(frames), 32, np.random.default_rng(s)).to(torch.int16)
        assert x.shape == (2, 3, 32, 32)
        assert (x[1] - x[0]).abs().sub(50).abs().max() <= 1  # the same box: only the offset differs


def test_rand_augment_same_ops_for_every_frame():
    ra = T.ClipRandAugment("rand-m7-n4-mstd0.5-inc1", 32, MEAN)
    frame = random_frames(t=1, h=32, w=32, seed=5)
    clip = T.to_tensor(np.repeat(frame, 4, axis=0))  # four identical frames
    changed = 0
    for s in range(20):
        plan = ra.sample(np.random.default_rng(s))
        assert [op.name for op in plan] == [op.name for op in ra.sample(np.random.default_rng(s))]
        out = ra(clip, np.random.default_rng(s))
        assert out.shape == clip.shape and out.dtype == torch.uint8
        for t in range(1, 4):
            assert torch.equal(out[0], out[t])  # same op, magnitude, sign and interpolation on each frame
        torch.testing.assert_close(out, ra(clip, np.random.default_rng(s)), rtol=0, atol=0)
        changed += not torch.equal(out, clip)
    assert changed >= 10


def test_rand_augment_does_not_touch_global_random():
    import random
    random.seed(123)
    expect = random.random()
    random.seed(123)
    T.ClipRandAugment("rand-m9-n2", 32, MEAN)(T.to_tensor(random_frames(h=32, w=32)), np.random.default_rng(0))
    assert random.random() == expect


def test_bad_rand_augment_string():
    with pytest.raises(ConfigError, match="RandAugment"):
        T.ClipRandAugment("augmix-m3", 32, MEAN)


def test_bad_frames():
    with pytest.raises(InputError):
        T.to_tensor(np.zeros((4, 32, 32), dtype=np.uint8))
    with pytest.raises(InputError):
        T.to_tensor(np.zeros((4, 32, 32, 3), dtype=np.float32))


def test_average_view_scores():
    logits = torch.randn(5, 10)
    probs = T.average_view_scores(logits)
    assert probs.shape == (10,)
    torch.testing.assert_close(probs, logits.softmax(-1).mean(0))
    assert abs(float(probs.sum()) - 1) < 1e-5
    batch = torch.randn(3, 5, 10)
    out = T.average_view_scores(batch)
    assert out.shape == (3, 10)
    torch.testing.assert_close(out[1], T.average_view_scores(batch[1]))
    with pytest.raises(InputError):
        T.average_view_scores(torch.randn(10))
