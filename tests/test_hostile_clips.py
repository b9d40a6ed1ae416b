"""Crafted clips against the decode limits: refused from their headers before decoding (huge frames, too many
frames, too long, text read as video, images renamed .mp4), stopped while decoding (a stream that grows past its
header), and unreadable files; through decode, predict (several clips, one bad), a train list and HTTP uploads.

:func:`write_hostile_clips` is the corpus generator: it writes every crafted clip (but the huge one, see
:func:`write_huge_clip`) into a folder with PyAV.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from stadapter.cli.main import app
from stadapter.config import TaskSpec
from stadapter.errors import DecodeError, InputError
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.inputs import DecodeBusy, DecodePool, clip_views
from stadapter.runtime.server import ServerConfig, create_app
from stadapter.video.datasets import Sample, Skipped, VideoClipDataset
from stadapter.video.decode import DecodeLimits, decode_frames, probe
from stadapter.video.transforms import short_side_reducer
from test_runtime_support import register, write_clip
from test_server import ServerThread

ROOT = Path(__file__).resolve().parent.parent
FAST_X264 = {"preset": "ultrafast", "threads": "1", "bframes": "0"}
SPEC = TaskSpec(num_frames=4, sampling="segments", flip=False)

# Writes a one-frame 16000 x 16000 H.264 MP4 (752 KB; x264 needs ~1.5 GB to encode it, so it runs in a child
# process and the test process stays small).
HUGE_WRITER = """
import sys, av
with av.open(sys.argv[1], "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=25, options={"preset": "ultrafast", "threads": "1", "bframes": "0"})
    s.width = s.height = 16000
    s.pix_fmt = "yuv420p"
    frame = av.VideoFrame(16000, 16000, "yuv420p")
    for plane in frame.planes:
        plane.update(bytes(plane.buffer_size))
    for packet in [*s.encode(frame), *s.encode()]:
        c.mux(packet)
"""

# Reads a clip every way the project does (probe, decode_frames, the views predict and serve cut) and prints
# the errors and the peak RSS growth over the reads, in a fresh process.
RSS_PROBE = """
import json, resource, sys
import torch
from stadapter.errors import DecodeError
from stadapter.runtime.inputs import clip_views
from stadapter.config import TaskSpec
from stadapter.video.decode import decode_frames, probe
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
errors = []
for read in (lambda: probe(sys.argv[1]), lambda: decode_frames(sys.argv[1], [0]),
             lambda: clip_views(sys.argv[1], [TaskSpec(num_frames=4)], 32, (0.5,) * 3, (0.5,) * 3)):
    try:
        read()
    except DecodeError as e:
        errors.append(str(e))
growth_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
print(json.dumps({"errors": errors, "growth_mb": growth_mb}))
"""


def write_h264(path: Path, size: int, frames: int, fps: int = 25, container: str = "mp4") -> Path:
    """A black ``size`` x ``size`` H.264 clip (``container`` mp4, or raw h264 for an Annex B stream)."""
    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=fps, options=FAST_X264)
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        black = av.VideoFrame.from_ndarray(np.zeros((size, size, 3), np.uint8), format="rgb24")
        for _ in range(frames):
            for packet in stream.encode(black):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_cover_picture(path: Path) -> Path:
    """An MP4 whose only video stream is a JPEG cover picture (disposition attached_pic)."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream("mjpeg", rate=1)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuvj420p"
        stream.disposition = av.stream.Disposition.attached_pic
        frame = av.VideoFrame.from_ndarray(np.zeros((64, 64, 3), np.uint8), format="rgb24")
        for packet in [*stream.encode(frame), *stream.encode()]:
            out.mux(packet)
    return path


def write_huge_clip(path: Path) -> Path:
    subprocess.run([sys.executable, "-c", HUGE_WRITER, str(path)], check=True, timeout=300)
    return path


def write_hostile_clips(folder: Path) -> dict[str, Path]:
    """The crafted clips by name (the huge one aside); ``good`` is a real clip for contrast."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    clips = {"good": write_clip(folder / "good.mp4", frames=12)}
    clips["text"] = folder / "notes.txt"
    clips["text"].write_text("this is not a video\n" * 50)
    clips["text_as_mp4"] = folder / "notes.mp4"
    clips["text_as_mp4"].write_text("just some words, no frames at all\n" * 40)
    clips["png_as_mp4"] = folder / "picture.mp4"
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(clips["png_as_mp4"], format="PNG")
    clips["jpeg_as_mp4"] = folder / "photo.mp4"
    Image.fromarray(np.full((64, 64, 3), 90, np.uint8)).save(clips["jpeg_as_mp4"], format="JPEG")
    clips["cover_only"] = write_cover_picture(folder / "cover.mp4")
    clips["many_frames"] = write_h264(folder / "many_frames.mp4", 16, 60)
    clips["long"] = write_h264(folder / "long.mp4", 16, 8, fps=1)
    clips["zero"] = folder / "zero.mp4"
    clips["zero"].write_bytes(b"")
    clips["random"] = folder / "random.mp4"
    clips["random"].write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    clips["truncated"] = folder / "truncated.mp4"  # the moov atom is at the end: cut off
    clips["truncated"].write_bytes(clips["good"].read_bytes()[: clips["good"].stat().st_size // 2])
    # an Annex B stream whose resolution grows after 300 frames (its header says 32 x 32)
    small = write_h264(folder / "small.h264", 32, 300, container="h264").read_bytes()
    big = write_h264(folder / "big.h264", 256, 2, container="h264").read_bytes()
    clips["grows"] = folder / "grows.h264"
    clips["grows"].write_bytes(small + big)
    return clips


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    clips = write_hostile_clips(folder)
    clips["huge"] = write_huge_clip(folder / "huge.mp4")
    return clips


# -- decode ------------------------------------------------------------------------------------------------

def test_huge_frames_are_refused_from_the_header_without_decoding(corpus):
    assert corpus["huge"].stat().st_size < 1 << 20
    for read in (lambda: probe(corpus["huge"]), lambda: decode_frames(corpus["huge"], [0])):
        with pytest.raises(DecodeError, match=r"huge\.mp4: frames of 16000x16000 exceed the decode limit of "
                                              r"16777216 pixels per frame \(max_pixels\)"):
            read()
    r = subprocess.run([sys.executable, "-c", RSS_PROBE, str(corpus["huge"])], capture_output=True, text=True,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stderr
    found = json.loads(r.stdout)
    assert len(found["errors"]) == 3 and all("max_pixels" in e for e in found["errors"]), found
    assert found["growth_mb"] < 200, found  # one decoded RGB frame alone would be 768 MB


@pytest.mark.parametrize("name, needle", [
    ("text", r"notes\.txt: not a video \(FFmpeg reads it as text art"),
    ("png_as_mp4", r"picture\.mp4: not a video but a still image .*png"),
    ("jpeg_as_mp4", r"photo\.mp4: not a video but a still image"),
    ("cover_only", r"cover\.mp4: not a video but a still image .*mjpeg"),
    ("zero", r"zero\.mp4: empty file"),
    ("random", r"random\.mp4: cannot open as a video"),
    ("truncated", r"truncated\.mp4: cannot open as a video"),
])
def test_files_that_are_not_videos_are_refused(corpus, name, needle):
    for read in (lambda: probe(corpus[name]), lambda: decode_frames(corpus[name], [0, 1])):
        with pytest.raises(DecodeError, match=needle):
            read()


def test_text_with_a_video_extension_is_refused(corpus):
    with pytest.raises(DecodeError, match=r"notes\.mp4: (not a video|cannot open as a video)"):
        decode_frames(corpus["text_as_mp4"], [0])


def test_images_are_accepted_only_when_asked_for(corpus):
    frames = decode_frames(corpus["png_as_mp4"], [0, 3], limits=DecodeLimits(allow_images=True))
    assert frames.shape == (2, 64, 64, 3) and (frames == 200).all()
    with pytest.raises(DecodeError, match="text art"):  # text is never a video
        decode_frames(corpus["text"], [0], limits=DecodeLimits(allow_images=True))


def test_frame_count_and_duration_limits_are_read_from_the_header(corpus):
    assert probe(corpus["many_frames"]).num_frames == 60  # fine by default
    with pytest.raises(DecodeError, match=r"many_frames\.mp4: 60 frames exceed the decode limit of 20 frames "
                                          r"\(max_frames\)"):
        decode_frames(corpus["many_frames"], [0], limits=DecodeLimits(max_frames=20))
    with pytest.raises(DecodeError, match=r"long\.mp4: 8 s exceed the decode limit of 5 s \(max_seconds\)"):
        probe(corpus["long"], limits=DecodeLimits(max_seconds=5))


def test_a_stream_without_a_frame_count_is_counted_up_to_the_limit(corpus):
    limits = DecodeLimits(max_frames=100)  # the raw stream has no header count: packets are counted
    with pytest.raises(DecodeError, match=r"grows\.h264: more than 100 frames.*\(max_frames\)"):
        probe(corpus["grows"], limits=limits)
    with pytest.raises(DecodeError, match=r"grows\.h264: more than 100 frames"):
        decode_frames(corpus["grows"], [250], limits=limits)


def test_a_stream_that_grows_past_its_header_is_stopped_while_decoding(corpus):
    limits = DecodeLimits(max_pixels=100 * 100)
    info = probe(corpus["grows"], limits=limits)
    assert (info.width, info.height, info.num_frames) == (32, 32, 302)  # the header check passes
    assert decode_frames(corpus["grows"], [0, 299], limits=limits).shape == (2, 32, 32, 3)
    with pytest.raises(DecodeError, match=r"grows\.h264: .*after 300 frames|grows\.h264: frame 300 is 256x256"):
        decode_frames(corpus["grows"], [0, 301], limits=limits)
    # without a tight limit, frames of the new size are scaled to the first one's: one shape per read
    assert decode_frames(corpus["grows"], [0, 301]).shape == (2, 32, 32, 3)


def test_decoded_bytes_budget(corpus):
    good = corpus["good"]  # 12 frames of 48 x 64
    frame_bytes = 48 * 64 * 3
    tight = DecodeLimits(max_decoded_bytes=4 * frame_bytes)
    assert decode_frames(good, range(4), limits=tight).shape == (4, 48, 64, 3)
    with pytest.raises(DecodeError, match=r"good\.mp4: 5 frames of 64x48 exceed .*\(max_decoded_bytes\)"):
        decode_frames(good, range(5), limits=tight)  # from the header, before decoding
    # reduced frames count at their kept size, checked while decoding
    halve = short_side_reducer(24)
    assert decode_frames(good, range(12), limits=tight, reduce=halve).shape == (12, 24, 32, 3)
    with pytest.raises(DecodeError, match=r"good\.mp4: the frames asked for exceed .*\(max_decoded_bytes\)"):
        decode_frames(good, range(12), limits=DecodeLimits(max_decoded_bytes=2 * frame_bytes), reduce=halve)


def test_limits_are_validated():
    with pytest.raises(InputError, match="max_pixels"):
        DecodeLimits(max_pixels=0)
    with pytest.raises(InputError, match="max_seconds"):
        DecodeLimits(max_seconds=float("nan"))


def test_webm_is_a_video(tmp_path):
    path = tmp_path / "clip.webm"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9", rate=25)
        stream.width = stream.height = 32
        stream.pix_fmt = "yuv420p"
        for i in range(5):
            frame = np.full((32, 32, 3), 40 * i, np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    assert probe(path).num_frames == 5
    assert decode_frames(path, [0, 4]).shape == (2, 32, 32, 3)


def test_views_are_cut_from_early_reduced_frames_the_same_as_from_full_frames(corpus):
    from stadapter.video.transforms import test_views

    spec = TaskSpec(num_frames=4, sampling="dense", frame_stride=2, temporal_views=2, spatial_views=3)
    (views,) = clip_views(corpus["good"], [spec], 32, (0.4,) * 3, (0.2,) * 3)
    from stadapter.runtime.inputs import frame_plan

    union, (pos,) = frame_plan(probe(corpus["good"]).num_frames, [spec])
    full = decode_frames(corpus["good"], union)  # (U, 48, 64, 3): no early reduction
    assert views.equal(test_views(full[pos], spec, 32, (0.4,) * 3, (0.2,) * 3))


# -- train lists -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("train", [True, False])
def test_crafted_clips_in_a_train_or_eval_list_are_skipped_not_fatal(corpus, tiny_backbone, train):
    names = ["good", "text", "huge", "png_as_mp4", "random"]
    b = tiny_backbone
    ds = VideoClipDataset([Sample(corpus[n], 0) for n in names], SPEC, b.image_size[0], b.mean, b.std, train=train)
    items = [ds[i] for i in range(len(names))]
    assert not isinstance(items[0], Skipped) and items[0][0].shape[-3:] == (3, 32, 32)
    for item, name in zip(items[1:], names[1:], strict=True):
        assert isinstance(item, Skipped) and corpus[name].name in item.reason


# -- predict -----------------------------------------------------------------------------------------------

runner = CliRunner()


@pytest.fixture
def registered(home, tmp_path, tiny_backbone) -> str:
    with open_registry() as reg:
        register(reg, tmp_path, tiny_backbone, "motion", seed=2, spec=SPEC, num_classes=3, width=8)
    return "motion"


def test_predict_reports_each_bad_clip_and_still_answers_the_good_ones(registered, corpus):
    other = write_clip(corpus["good"].parent / "other.mp4", frames=10, seed=3)  # a short path: one title line
    clips = [corpus["good"], corpus["text"], other, corpus["huge"]]
    r = runner.invoke(app, ["predict", "-t", registered, *map(str, clips), "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert str(corpus["good"]) in r.stdout and str(other) in r.stdout and r.stdout.count("motion:1") == 2
    errors = [line for line in r.stderr.splitlines() if line.strip()]
    assert errors == [f"error: {corpus['text']}: not a video (FFmpeg reads it as text art: format tty, codec ansi)",
                      f"error: {corpus['huge']}: frames of 16000x16000 exceed the decode limit of 16777216 pixels "
                      f"per frame (max_pixels)"], r.stderr
    assert "Traceback" not in r.output

    r = runner.invoke(app, ["predict", "-t", registered, *map(str, clips), "--device", "cpu", "--json"])
    assert r.exit_code == 1
    results = json.loads(r.stdout)["results"]
    assert [res["clip"] for res in results] == [str(c) for c in clips]
    assert ["error" in res for res in results] == [False, True, False, True]
    assert "tasks" in results[0] and "tasks" not in results[1] and "not a video" in results[1]["error"]


def test_predict_limits_are_options(registered, corpus):
    args = ["predict", "-t", registered, str(corpus["many_frames"]), "--device", "cpu"]
    assert runner.invoke(app, args).exit_code == 0
    r = runner.invoke(app, [*args, "--max-frames", "20"])
    assert r.exit_code == 1 and "60 frames exceed the decode limit of 20 frames" in r.stderr
    r = runner.invoke(app, [*args, "--max-pixels", "100"])
    assert r.exit_code == 1 and "frames of 16x16 exceed the decode limit of 100 pixels" in r.stderr
    help_text = runner.invoke(app, ["predict", "--help"]).output
    assert "--max-pixels" in help_text and "--max-decoded-mb" in help_text


# -- HTTP --------------------------------------------------------------------------------------------------

def test_uploads_of_crafted_clips_get_422_and_serving_goes_on(registered, corpus, tiny_backbone):
    with open_registry() as reg, ServerThread(create_app(Engine(tiny_backbone, reg, device="cpu"))) as server, \
            httpx.Client(base_url=server.url, timeout=60) as client:
        def upload(name: str) -> httpx.Response:
            path = corpus[name]
            return client.post("/v1/predict", files={"clip": (path.name, path.read_bytes(), "video/mp4")},
                               data={"tasks": registered})

        for name, needle in [("text", "not a video"), ("huge", "max_pixels"), ("png_as_mp4", "still image"),
                             ("random", "cannot open as a video")]:
            r = upload(name)
            assert r.status_code == 422, (name, r.text)
            assert needle in r.json()["detail"]
        assert upload("good").status_code == 200
        doc = client.get("/openapi.json").json()["paths"]["/v1/predict"]["post"]["description"]
        assert "422" in doc and "decode limits" in doc


def test_server_decode_limits_come_from_its_config(registered, corpus, tiny_backbone):
    config = ServerConfig(decode_limits=DecodeLimits(max_frames=5))
    with open_registry() as reg, ServerThread(create_app(Engine(tiny_backbone, reg, device="cpu"), config)) as server:
        path = corpus["good"]
        r = httpx.post(f"{server.url}/v1/predict", files={"clip": (path.name, path.read_bytes(), "video/mp4")},
                       data={"tasks": registered}, timeout=60)
    assert r.status_code == 422 and "12 frames exceed the decode limit of 5 frames" in r.json()["detail"]


def test_decode_pool_refuses_beyond_its_slots_and_queue():
    pool = DecodePool(workers=1, queue=1)
    gate = threading.Event()
    try:
        running = pool.submit(gate.wait, 30)
        waiting = pool.submit(os.getpid)
        with pytest.raises(DecodeBusy, match="1 decode slots and 1 queue places"):
            pool.submit(os.getpid)
        assert pool.admitted == 2
        gate.set()
        assert running.result(10) is True and waiting.result(10) == os.getpid()
        assert pool.submit(os.getpid).result(10) == os.getpid()  # slots are given back
    finally:
        gate.set()
        pool.close()
    with pytest.raises(InputError):
        DecodePool(workers=0, queue=1)
    with pytest.raises(InputError, match="decode_workers"):
        ServerConfig(decode_workers=0)
