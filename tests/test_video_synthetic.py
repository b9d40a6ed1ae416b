"""The built-in synthetic motion set: determinism, layout, reversal symmetry, visible motion, and the CLI."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from stadapter.video import synthetic as S
from stadapter.video.datasets import load_annotations, load_labels
from stadapter.video.decode import decode_frames, probe


@pytest.fixture(scope="module")
def small_set(tmp_path_factory):
    return S.generate(tmp_path_factory.mktemp("synth") / "a", seed=7, clips_per_class=3, frames=8, size=32,
                      val_fraction=0.34)


def decoded(root, lines_file):
    return [decode_frames(root / line.split()[0], range(8)) for line in lines_file.read_text().splitlines()]


def test_layout_and_lists_consistent(small_set):
    root = small_set.root
    assert load_labels(root / "labels.json") == list(S.CLASSES)
    train, classes = load_annotations(small_set.train)
    val, _ = load_annotations(small_set.val)
    assert classes == list(S.CLASSES)
    assert len(train) == small_set.num_train == 16 and len(val) == small_set.num_val == 8
    assert not {s.path for s in train} & {s.path for s in val}
    for s in train + val:
        assert s.path.is_file() and s.path.parent.name == S.CLASSES[s.label]
        assert s.path.relative_to(root).as_posix() == f"{S.CLASSES[s.label]}/{s.path.name}"
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*.mp4")) == \
        sorted(s.path.relative_to(root).as_posix() for s in train + val)
    settings = json.loads((root / "synth.json").read_text())
    assert settings["seed"] == 7 and settings["frames"] == 8 and settings["classes"] == list(S.CLASSES)
    info = probe(train[0].path)
    assert (info.num_frames, info.width, info.height) == (8, 32, 32)


def test_clips_are_all_intra_h264(small_set):
    import av

    with av.open(str(small_set.root / "grow" / "grow_0000.mp4")) as c:
        stream = c.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        keys = [p.is_keyframe for p in c.demux(stream) if p.size]
    assert keys == [True] * 8


def test_same_seed_same_frames_other_seed_differs(small_set, tmp_path):
    again = S.generate(tmp_path / "b", seed=7, clips_per_class=3, frames=8, size=32, val_fraction=0.34)
    for a, b in zip(decoded(small_set.root, small_set.train), decoded(again.root, again.train)):
        np.testing.assert_array_equal(a, b)
    assert (small_set.root / "move_up/move_up_0001.mp4").read_bytes() == \
        (again.root / "move_up/move_up_0001.mp4").read_bytes()
    other = S.generate(tmp_path / "c", seed=8, clips_per_class=3, frames=8, size=32, val_fraction=0.34)
    diffs = [not np.array_equal(a, b) for a, b in zip(decoded(small_set.root, small_set.train),
                                                       decoded(other.root, other.train))]
    assert all(diffs)


def test_clips_differ_within_a_class():
    a = S.render_clip("move_left", S.clip_rng(0, 0, 0))
    b = S.render_clip("move_left", S.clip_rng(0, 0, 1))
    assert np.abs(a.astype(int) - b).mean() > 10


@pytest.mark.parametrize("name", S.CLASSES)
def test_reversal_gives_the_opposite_class(name):
    rng = S.clip_rng(1, S.CLASSES.index(name), 0)
    scene, states = S.sample_scene(rng, objects=2), S.sample_states(name, rng, objects=2)
    assert states.shape == (16, 2, 4)
    assert S.motion_of(states) == name and S.motion_of(states[:, 1]) == name
    assert S.motion_of(states[::-1]) == S.OPPOSITE[name] != name
    frames = S.render_frames(scene, states)
    backwards = S.render_frames(scene, states[::-1].copy())
    np.testing.assert_array_equal(backwards, frames[::-1])  # the reversed clip is a clip of the opposite class
    np.testing.assert_array_equal(frames.mean(0), backwards.mean(0))  # so the temporal mean cannot tell them


def test_reversed_partner_has_the_same_state_distribution():
    for name in S.CLASSES:
        partner = S.OPPOSITE[name]
        a = np.stack([S.sample_states(name, np.random.default_rng(s)) for s in range(50)])
        b = np.stack([S.sample_states(partner, np.random.default_rng(s))[::-1] for s in range(50)])
        np.testing.assert_allclose(a, b)  # same draws, played the other way


def test_mean_object_size_is_the_same_for_every_class():
    areas = {}
    for name in S.CLASSES:
        st = np.stack([S.sample_states(name, np.random.default_rng(s)) for s in range(400)])
        areas[name] = float((st[..., 3] ** 2).mean())
    mean = np.mean(list(areas.values()))
    assert all(abs(a / mean - 1) < 0.05 for a in areas.values()), areas


def object_only(name, seed=0, size=64, objects=2):
    """Frames of one clip on a black background, for measuring the motion: (T, S, S) and (T, K, 4)."""
    rng = S.clip_rng(seed, S.CLASSES.index(name), 0)
    scene = S.sample_scene(rng, size, objects)
    sprites = tuple(dataclasses.replace(sp, colors=np.clip(sp.colors, 0.3, 1.0)) for sp in scene.sprites)
    scene = S.Scene(background=np.zeros_like(scene.background), sprites=sprites)
    states = S.sample_states(name, rng, 16, size, objects)
    return S.render_frames(scene, states).astype(float).sum(-1), states


@pytest.mark.parametrize("seed", range(3))
def test_motion_is_large_and_visible(seed):
    yy, xx = np.mgrid[0:64, 0:64]
    for name, axis, sign in [("move_left", xx, -1), ("move_right", xx, 1), ("move_up", yy, -1),
                             ("move_down", yy, 1)]:
        f, _ = object_only(name, seed)
        centroid = [(axis * m).sum() / m.sum() for m in f > 0]
        assert sign * (centroid[-1] - centroid[0]) > 15  # pixels, of 64
    for name, sign in [("grow", 1), ("shrink", -1)]:
        f, _ = object_only(name, seed)
        area = (f > 0).sum((1, 2))
        assert (area[-1] / area[0]) ** sign > 2.5
    for name, sign in [("rotate_clockwise", 1), ("rotate_anticlockwise", -1)]:
        f, states = object_only(name, seed, objects=1)
        cx, cy = states[0, 0, :2]
        img = Image.fromarray(f[0].astype(np.float32))
        step = np.degrees(states[1, 0, 2] - states[0, 0, 2]) * 4  # 4 frames on
        target = f[4]

        def err(angle):  # PIL rotates anticlockwise for a positive angle
            return np.abs(np.asarray(img.rotate(angle, center=(cx, cy), resample=Image.BILINEAR)) - target).mean()

        assert abs(step) > 25
        assert err(-sign * abs(step)) < 0.5 * err(sign * abs(step))  # the frames turn the labelled way


def test_decoded_clip_is_close_to_rendered(small_set):
    rendered = S.render_clip("rotate_clockwise", S.clip_rng(7, 4, 0), frames=8, size=32)
    dec = decode_frames(small_set.root / "rotate_clockwise/rotate_clockwise_0000.mp4", range(8))
    err = np.abs(dec.astype(int) - rendered).mean()
    # H.264 at crf 18 with 4:2:0 chroma loses some of the small colourful textures at 32 px
    assert err < 10
    other = S.render_clip("rotate_clockwise", S.clip_rng(7, 4, 1), frames=8, size=32)
    assert np.abs(dec.astype(int) - other).mean() > 3 * err  # and it is this clip, not another one


def test_bad_settings(tmp_path):
    from stadapter.errors import ConfigError

    for kwargs in ({"size": 33}, {"frames": 1}, {"clips_per_class": 0}, {"val_fraction": 1.0}):
        with pytest.raises(ConfigError):
            S.generate(tmp_path / "x", **kwargs)
    with pytest.raises(ConfigError, match="unknown synthetic class"):
        S.sample_states("jump", np.random.default_rng(0))
    with pytest.raises(ConfigError, match="zoom"):
        S.MotionRanges(zoom=(0.5, 2.0))
    with pytest.raises(ConfigError, match="radius"):
        S.MotionRanges(radius=(0.3, 0.2))


def test_motion_ranges_are_used_and_recorded(tmp_path):
    big = S.MotionRanges(objects=(4, 4), radius=(0.25, 0.25), distance=(0.6, 0.6))
    states = S.sample_states("move_up", np.random.default_rng(0), 16, 64, 4, big)
    assert states.shape == (16, 4, 4)
    np.testing.assert_allclose(states[0, :, 1] - states[-1, :, 1], 0.6 * 64)
    np.testing.assert_allclose(states[..., 3], 16.0)
    out = S.generate(tmp_path / "big", clips_per_class=1, frames=4, size=32, val_fraction=0, motion=big)
    assert json.loads((out.root / "synth.json").read_text())["motion"]["objects"] == [4, 4]


def test_cli_synth(tmp_path):
    from stadapter.cli.main import app

    out = tmp_path / "synth"
    runner = CliRunner()
    args = ["data", "synth", "--out", str(out), "--seed", "3", "--clips-per-class", "2", "--frames", "6",
            "--size", "32", "--val-fraction", "0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "wrote 8 training and 8 validation clips of 8 classes" in result.output
    assert len((out / "train.txt").read_text().splitlines()) == 8
    assert probe(out / "shrink" / "shrink_0001.mp4").num_frames == 6
    again = runner.invoke(app, args)
    assert again.exit_code == 1 and "not empty" in again.output and "Traceback" not in again.output
    assert runner.invoke(app, args + ["--force"]).exit_code == 0
    bad = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "odd"), "--size", "33"])
    assert bad.exit_code == 1 and "even" in bad.output
