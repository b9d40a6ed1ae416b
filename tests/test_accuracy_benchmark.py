"""benchmarks/accuracy.py builds its motion-centric tasks honestly: split by source video, and each class's
partner holds exactly the same frames in reverse order (so temporal averaging is capped at 50%)."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest

from conftest import ROOT, VIDEOS, need_shared
from stadapter.video.decode import decode_frames


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def rows(task, split):
    return [line.split() for line in (task / f"{split}.txt").read_text().splitlines()]


def test_camera_motion_task_is_split_by_source_and_partners_are_reversals(accuracy, tmp_path):
    need_shared(VIDEOS)
    task = accuracy.build_task("camera_motion", tmp_path, num_train=12, num_val=6)
    groups = {split: {rel.rsplit("/", 1)[1].rsplit("_", 1)[0] for rel, _ in rows(task, split)}
              for split in ("train", "val")}
    assert groups["val"] <= set(accuracy.VAL_GROUPS) and groups["val"]
    assert not groups["train"] & groups["val"]  # no footage in both splits
    partner = {a: b for a, b in accuracy.CAMERA_PAIRS} | {b: a for a, b in accuracy.CAMERA_PAIRS}
    for split in ("train", "val"):
        listed = rows(task, split)
        assert len(listed) == {"train": 12, "val": 6}[split]
        for (fwd, a), (bwd, b) in zip(listed[0::2], listed[1::2]):
            assert partner[a] == b
            f = decode_frames(task / fwd, list(range(accuracy.CLIP_LEN))).astype(np.float32)
            r = decode_frames(task / bwd, list(range(accuracy.CLIP_LEN))).astype(np.float32)
            assert np.abs(f[::-1] - r).mean() < 2.0, (fwd, bwd)  # the same frames, reversed (all-intra)
            assert np.abs(f[0] - f[-1]).mean() > 2.0  # and the camera moved
    # reused when built again with the same settings
    before = (task / "train.txt").stat().st_mtime_ns
    assert accuracy.build_task("camera_motion", tmp_path, num_train=12, num_val=6) == task
    assert (task / "train.txt").stat().st_mtime_ns == before


def test_the_footage_plays_forward_or_backward_independent_of_the_label(accuracy):
    # a textured source whose brightness rises frame by frame, so a clip's own arrow of time can be read off
    rng = np.random.default_rng(0)
    texture = rng.integers(20, 120, size=(1, 176, 176, 3))
    frames = (texture + 3 * np.arange(40)[:, None, None, None]).astype(np.uint8)
    rising = {name: [] for pair in accuracy.CAMERA_PAIRS for name in pair}
    for seed in range(60):
        made = accuracy.camera_clips(frames, 10.0, seed, np.random.default_rng(seed))
        assert made is not None
        for clip, label in made:
            rising[label].append(float(clip[-1].mean()) > float(clip[0].mean()))
    for label, seen in rising.items():
        assert len(seen) == 20 and 4 <= sum(seen) <= 16, (label, sum(seen))  # both ways, for every label


def panning_source(px_per_frame: float, n: int = 40, seed: int = 0) -> np.ndarray:
    """A textured scene seen by a camera that pans right by ``px_per_frame`` (n frames, 176 x 176)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 255, size=(11, (176 + int(abs(px_per_frame) * n)) // 16 + 2, 3))
    scene = np.kron(blocks, np.ones((16, 16, 1))).astype(np.uint8)  # 16 px blocks: no "scene cut" at 3 px a frame
    return np.stack([scene[:, int(round(px_per_frame * t)):int(round(px_per_frame * t)) + 176] for t in range(n)])


def test_source_drift_reads_the_footages_own_pan_and_ignores_shake(accuracy):
    assert accuracy.source_drift(panning_source(0.0)[:16]) == 0.0
    assert accuracy.source_drift(panning_source(2.0)[:16]) == pytest.approx(30.0, abs=1.0)  # 15 frames x 2 px
    shake = panning_source(4.0)[[0, 1] * 8]  # back and forth by 4 px: no drift
    assert accuracy.source_drift(shake) < 5.0


def test_camera_clips_come_only_from_footage_that_stays_put(accuracy):
    rng = np.random.default_rng(0)
    for seed in range(5):  # a camera that pans by itself: every window is refused
        assert accuracy.window(panning_source(3.0), 10.0, rng) is not None  # (not for a scene cut)
        assert accuracy.camera_clips(panning_source(3.0), 10.0, seed, rng) is None
    made = [accuracy.camera_clips(panning_source(0.3), 10.0, seed, rng) for seed in range(5)]
    assert all(m is not None for m in made)  # a steady camera (drift 4.5 px over the window) is kept
