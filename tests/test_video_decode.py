"""PyAV decoding against a plain full sequential decode of the real clips in ../shared/data/videos."""

from __future__ import annotations

import logging
import shutil

import av
import numpy as np
import pytest

from conftest import VIDEOS, need_shared
from stadapter.errors import DecodeError, InputError, StadapterError
from stadapter.video.decode import decode_frames, probe

CLIPS = [
    "labelled/RATRACE_wave_f_nm_np1_fr_goo_37.avi",
    "labelled/SchoolRulesHowTheyHelpUs_wave_f_nm_np1_ba_med_0.avi",
    "labelled/TrumanShow_wave_f_nm_np1_fr_med_26.avi",
    "labelled/hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi",
    "labelled/v_SoccerJuggling_g23_c01.avi",
    "labelled/v_SoccerJuggling_g24_c01.avi",
    "labelled/R6llTwEh07w.mp4",
    "labelled/SOX5yA1l24A.mp4",
    "labelled/WUzgd7C1pWA.mp4",
    "labelled/basketball.mp4",
    "footage/vtest.avi",
    "footage/box.mp4",
    "footage/cup.mp4",
    "footage/tree.avi",
    "footage/bikes.mp4",
    "footage/carphone_pristine.mp4",
    "footage/carphone_distorted.mp4",
]
NON_UTF8 = "labelled/hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"
SEEK_FALLBACK = "decoding sequentially"


def reference(path, keep) -> tuple[int, dict[int, np.ndarray]]:
    """A full plain sequential decode (no threads, no early stop): frame count and the frames at ``keep``."""
    keep, out, n = set(keep), {}, 0
    with av.open(str(path), metadata_errors="ignore") as c:
        for frame in c.decode(c.streams.video[0]):
            if n in keep:
                out[n] = frame.to_ndarray(format="rgb24")
            n += 1
    return n, out


def clip(name):
    return need_shared(VIDEOS / name)


def test_all_clips_listed():
    folder = need_shared(VIDEOS)
    on_disk = {f"{p.parent.name}/{p.name}" for p in folder.glob("*/*") if p.suffix in (".avi", ".mp4")}
    assert on_disk == set(CLIPS)


@pytest.mark.parametrize("name", CLIPS)
def test_sampled_frames_equal_full_decode(name):
    path = clip(name)
    n, _ = reference(path, [])
    info = probe(path)
    assert n <= info.num_frames <= n + 1  # header / packet counts may be one too high
    assert info.fps > 0 and info.duration > 0
    wanted = sorted({0, 1, n // 3, n // 2, (2 * n) // 3, n - 2, n - 1})
    asked = wanted + [n, n + 7]  # past the end: clamped to the last decoded frame
    _, ref = reference(path, wanted)
    got = decode_frames(path, asked)
    assert got.dtype == np.uint8 and got.shape == (len(asked), info.height, info.width, 3)
    for k, i in enumerate(asked):
        np.testing.assert_array_equal(got[k], ref[min(i, n - 1)])


def test_order_and_repeats_kept():
    path = clip("labelled/TrumanShow_wave_f_nm_np1_fr_med_26.avi")
    _, ref = reference(path, [3, 10, 20])
    got = decode_frames(path, [20, 3, 20, 10])
    for k, i in enumerate([20, 3, 20, 10]):
        np.testing.assert_array_equal(got[k], ref[i])


def test_long_clip_seeks_and_stays_exact(caplog):
    path = clip("footage/vtest.avi")  # 795 frames
    asked = [400, 640, 700, 794, 800]
    n, ref = reference(path, asked)
    assert n == 795
    with caplog.at_level(logging.DEBUG, logger="stadapter.video.decode"):
        got = decode_frames(path, asked)
    assert SEEK_FALLBACK not in caplog.text  # the seek path was taken
    for k, i in enumerate(asked):
        np.testing.assert_array_equal(got[k], ref[min(i, n - 1)])


@pytest.mark.parametrize("name", ["footage/bikes.mp4", "labelled/basketball.mp4", "labelled/R6llTwEh07w.mp4",
                                  "footage/cup.mp4"])
def test_forced_seek_on_h264_is_exact(name, caplog):
    path = clip(name)
    n, _ = reference(path, [])
    asked = [n // 2, n // 2 + 1, n - 30, n - 1]
    _, ref = reference(path, asked)
    with caplog.at_level(logging.DEBUG, logger="stadapter.video.decode"):
        got = decode_frames(path, asked, seek_threshold=0)
    assert SEEK_FALLBACK not in caplog.text
    for k, i in enumerate(asked):
        np.testing.assert_array_equal(got[k], ref[i])


@pytest.mark.parametrize("name", ["labelled/RATRACE_wave_f_nm_np1_fr_goo_37.avi", "footage/tree.avi",
                                  "footage/box.mp4"])
def test_irregular_timestamps_fall_back_to_sequential(name, caplog):
    path = clip(name)
    n, _ = reference(path, [])
    asked = [n // 2, n - 1]
    _, ref = reference(path, asked)
    with caplog.at_level(logging.DEBUG, logger="stadapter.video.decode"):
        got = decode_frames(path, asked, seek_threshold=0)
    for k, i in enumerate(asked):
        np.testing.assert_array_equal(got[k], ref[i])


def test_non_utf8_metadata_opens():
    path = clip(NON_UTF8)
    info = probe(path)
    assert (info.width, info.height) == (320, 240)
    assert decode_frames(path, [0, 40]).shape == (2, 240, 320, 3)


def test_zero_byte_file(tmp_path):
    bad = tmp_path / "empty_clip.mp4"
    bad.write_bytes(b"")
    for fn in (lambda: probe(bad), lambda: decode_frames(bad, [0])):
        with pytest.raises(DecodeError, match="empty_clip.mp4"):
            fn()


def test_truncated_files(tmp_path):
    # moov atom first: opens, then fails inside the stream
    src = clip("labelled/basketball.mp4")
    cut = tmp_path / "cut_basketball.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    assert decode_frames(cut, [0, 5]).shape[0] == 2  # the frames before the cut are fine
    with pytest.raises(DecodeError, match="cut_basketball.mp4.*truncated"):
        decode_frames(cut, [0, 300])
    with pytest.raises(DecodeError, match="cut_basketball.mp4"):
        decode_frames(cut, [200, 300], seek_threshold=0)
    # moov atom last: cannot even be opened
    src = clip("labelled/R6llTwEh07w.mp4")
    cut = tmp_path / "cut_segway.mp4"
    cut.write_bytes(src.read_bytes()[: src.stat().st_size // 2])
    with pytest.raises(DecodeError, match="cut_segway.mp4"):
        probe(cut)
    with pytest.raises(DecodeError, match="cut_segway.mp4"):
        decode_frames(cut, [0])


def test_missing_and_not_a_video(tmp_path):
    with pytest.raises(DecodeError, match="nowhere.mp4"):
        decode_frames(tmp_path / "nowhere.mp4", [0])
    text = tmp_path / "notes.mp4"
    text.write_text("this is not a video\n" * 50)
    with pytest.raises(DecodeError, match="notes.mp4"):
        decode_frames(text, [0])
    assert issubclass(DecodeError, StadapterError)


def test_bad_indices(tmp_path):
    path = clip("footage/carphone_distorted.mp4")
    with pytest.raises(InputError):
        decode_frames(path, [])
    with pytest.raises(InputError):
        decode_frames(path, [-1, 2])


def test_copy_in_tmp_decodes(tmp_path):
    src = clip("footage/carphone_distorted.mp4")
    dst = tmp_path / "copy.mp4"
    shutil.copy(src, dst)
    np.testing.assert_array_equal(decode_frames(dst, [0, 119]), decode_frames(src, [0, 119]))
