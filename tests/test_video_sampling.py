"""Dense and segment samplers: shapes, ranges, randomness, test-time views and short clips."""

from __future__ import annotations

import random

import numpy as np
import pytest

from stadapter.config import TaskSpec
from stadapter.errors import InputError
from stadapter.recipes import preset
from stadapter.video.sampling import dense_test, dense_train, sample_indices, segment_test, segment_train


def in_range(idx: np.ndarray, length: int) -> bool:
    return bool((idx >= 0).all() and (idx < length).all() and (np.diff(idx, axis=-1) >= 0).all())


def test_dense_train_window():
    rng = np.random.default_rng(0)
    offsets = set()
    for _ in range(300):
        idx = dense_train(300, 8, 16, rng)
        assert idx.shape == (1, 8) and in_range(idx, 300)
        assert (np.diff(idx[0]) == 16).all()
        offsets.add(int(idx[0, 0]))
    span = 7 * 16 + 1
    assert min(offsets) <= 5 and max(offsets) >= 300 - span - 5  # covers the whole range of offsets
    assert len(offsets) > 50


def test_dense_train_deterministic_and_python_random():
    a = dense_train(300, 8, 16, np.random.default_rng(3))
    b = dense_train(300, 8, 16, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)
    c = dense_train(300, 8, 16, random.Random(3))
    d = dense_train(300, 8, 16, random.Random(3))
    np.testing.assert_array_equal(c, d)
    assert (np.diff(c[0]) == 16).all()


def test_dense_test_views_even():
    idx = dense_test(300, 8, 16, views=3)
    assert idx.shape == (3, 8) and in_range(idx, 300)
    assert (np.diff(idx, axis=1) == 16).all()
    room = 300 - (7 * 16 + 1) + 1
    starts = idx[:, 0]
    np.testing.assert_array_equal(starts, [int(room / 6), int(room / 2), int(5 * room / 6)])
    assert abs(starts[0] - (room - 1 - starts[2])) <= 1  # symmetric about the clip's middle
    one = dense_test(300, 8, 16, views=1)
    assert one[0, 0] == room // 2  # a single view is the centre window


def test_dense_short_clip_shrinks_stride():
    idx = dense_train(50, 8, 16, np.random.default_rng(0))
    assert in_range(idx, 50) and (np.diff(idx[0]) == 7).all()  # (50 - 1) // 7 = 7
    idx = dense_test(50, 8, 16, views=3)
    assert in_range(idx, 50) and (np.diff(idx, axis=1) == 7).all()


@pytest.mark.parametrize("length", [1, 3, 5, 7])
def test_dense_shorter_than_frames_stretches_in_order(length):
    idx = dense_train(length, 8, 16, np.random.default_rng(0))
    assert idx.shape == (1, 8) and in_range(idx, length)
    assert set(idx[0].tolist()) == set(range(length))  # every frame, in order, some repeated: no loop back
    views = dense_test(length, 8, 16, views=2)
    assert views.shape == (2, 8) and in_range(views, length)


def test_segments_train_one_random_frame_per_segment():
    rng = np.random.default_rng(0)
    seen = [set() for _ in range(8)]
    for _ in range(200):
        idx = segment_train(80, 8, rng)
        assert idx.shape == (1, 8) and in_range(idx, 80)
        for t, i in enumerate(idx[0]):
            assert 10 * t <= i < 10 * (t + 1)
            seen[t].add(int(i))
    assert all(s == set(range(10 * t, 10 * t + 10)) for t, s in enumerate(seen))  # every frame of a segment


def test_segments_test_centre():
    np.testing.assert_array_equal(segment_test(80, 8), [[5, 15, 25, 35, 45, 55, 65, 75]])
    two = segment_test(80, 8, views=2)
    np.testing.assert_array_equal(two[:, 0], [2, 7])
    assert segment_test(81, 8).shape == (1, 8)


@pytest.mark.parametrize("length", [1, 3, 8, 10, 13])
def test_segments_short_clips(length):
    for seed in range(20):
        idx = segment_train(length, 8, np.random.default_rng(seed))
        assert in_range(idx, length)
    idx = segment_test(length, 8)
    assert in_range(idx, length)
    if length >= 8:
        assert len(set(idx[0].tolist())) == 8  # distinct frames when there are enough


def test_sample_indices_follows_spec():
    k400, ssv2 = preset("k400").task, preset("ssv2").task
    rng = np.random.default_rng(0)
    assert sample_indices(300, k400, True, rng).shape == (1, 8)
    assert sample_indices(300, k400, False).shape == (3, 8)
    test = sample_indices(300, ssv2, False)
    np.testing.assert_array_equal(test, segment_test(300, 8))
    spec = TaskSpec(num_frames=4, sampling="segments", temporal_views=2, flip=False)
    assert sample_indices(40, spec, False).shape == (2, 4)


def test_bad_lengths():
    with pytest.raises(InputError):
        dense_train(0, 8, 16, np.random.default_rng(0))
    with pytest.raises(InputError):
        segment_test(0, 8)
