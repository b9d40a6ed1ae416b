"""The hostile-input corpus, shared by the tests and ``benchmarks/hostile.py``: crafted bundles (from one good
tiny bundle, :func:`craft_hostile_bundles`, with the error each must give in :data:`CASES`) and crafted clips
(:func:`write_hostile_clips`, :func:`write_huge_clip`), written with PyAV the way
``stadapter.video.synthetic.write_mp4`` writes its clips."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from stadapter.bundle import CONFIG, LABELS, MANIFEST, TENSORS, Bundle, write_manifest
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.fsio import sha256_file

DIM, WIDTH, BLOCKS = 16, 4, 2
LABEL_NAMES = ["pan left", "pan right", "zoom in"]
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 24
DEEP = "[" * 100_000 + "]" * 100_000


def good_bundle(directory: Path) -> Path:
    """A tiny valid st-adapter bundle (2 blocks, width 4, D 16, 3 classes) with random tensors."""
    g = torch.Generator().manual_seed(0)
    shapes = {"fc1.weight": (WIDTH, DIM), "fc1.bias": (WIDTH,), "conv.weight": (WIDTH, 1, 3, 1, 1),
              "conv.bias": (WIDTH,), "fc2.weight": (DIM, WIDTH), "fc2.bias": (DIM,)}
    tensors = {f"adapters.{b}.attn.{n}": torch.randn(s, generator=g) * 0.1
               for b in range(BLOCKS) for n, s in shapes.items()}
    tensors |= {"head.weight": torch.randn(3, DIM, generator=g), "head.bias": torch.zeros(3)}
    Bundle(task="hostile", adapter=AdapterConfig(num_classes=3, width=WIDTH), spec=TaskSpec(num_frames=4),
           backbone={"spec": "tiny", "weights": "none", "fingerprint": "fp-tiny"}, labels=list(LABEL_NAMES),
           tensors=tensors).save(directory)
    return directory


# -- the corpus -----------------------------------------------------------------------------------------------
# Each mutation edits a copy of the good bundle; unless it crafts the manifest itself, the manifest is then
# rewritten so that only the mutation is wrong.

def _edit_json(name: str, edit: Callable[[object], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        (d / name).write_text(json.dumps(edit(json.loads((d / name).read_text()))))
    return mutate


def _edit_config(edit: Callable[[dict], None]) -> Callable[[Path], None]:
    def apply(config: object) -> object:
        assert isinstance(config, dict)
        edit(config)
        return config
    return _edit_json(CONFIG, apply)


def _raw(name: str, data: bytes) -> Callable[[Path], object]:
    return lambda d: (d / name).write_bytes(data)


def _edit_tensors(edit: Callable[[dict[str, torch.Tensor]], object]) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        tensors = load_file(str(d / TENSORS))
        edit(tensors)
        save_file(tensors, str(d / TENSORS))
    return mutate


def _set(key: str, value: object) -> Callable[[Path], None]:
    """Set ``section.field`` (or a top-level key) of config.json."""
    section, _, field = key.partition(".")

    def edit(config: dict) -> None:
        if field:
            config[section][field] = value
        else:
            config[section] = value
    return _edit_config(edit)


def _nan(t: dict[str, torch.Tensor]) -> None:
    t["head.weight"][1, 2] = float("nan")


def _inf_half(t: dict[str, torch.Tensor]) -> None:
    t["adapters.1.attn.fc2.weight"] = t["adapters.1.attn.fc2.weight"].half()
    t["adapters.1.attn.fc2.weight"][0, 0] = float("inf")


def _symlink_listed(d: Path) -> None:
    outside = d.parent / f"{d.name}-secret.json"
    outside.write_bytes((d / CONFIG).read_bytes())
    (d / CONFIG).unlink()
    (d / CONFIG).symlink_to(outside)


def _symlink_extra(d: Path) -> None:
    outside = d.parent / f"{d.name}-figure.png"
    outside.write_bytes(PNG)
    (d / "figure.png").symlink_to(outside)


def _listed_outside(name: str) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        outside = d.parent / f"{d.name}-e.png"
        outside.write_bytes(PNG)
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["files"][name.replace("ABS", str(outside))] = {"sha256": sha256_file(outside), "size": len(PNG)}
        (d / MANIFEST).write_text(json.dumps(manifest))
    return mutate


def _claim_size(name: str, size: int) -> Callable[[Path], None]:
    def mutate(d: Path) -> None:
        manifest = json.loads((d / MANIFEST).read_text())
        manifest["files"][name]["size"] = size
        (d / MANIFEST).write_text(json.dumps(manifest))
    return mutate


# name: (mutation, whether the manifest is rewritten afterwards, the error it must give)
CASES: dict[str, tuple[Callable[[Path], object], bool, str]] = {
    "label-count": (_raw(LABELS, b'["a", "b", "c", "d"]'), True, r"4 labels for a head of 3 classes"),
    "label-repeated": (_raw(LABELS, b'["a", "b", "a"]'), True, r"class names repeat: a"),
    "label-not-string": (_raw(LABELS, b'["a", 1, "b"]'), True, r"labels\.json must be a list of class names"),
    "label-empty": (_raw(LABELS, b'["a", "", "b"]'), True, r"class names must be 1 to \d+ characters"),
    "labels-200000": (_raw(LABELS, json.dumps([f"c{i}" for i in range(200_000)]).encode()), True,
                      r"200000 class names; a bundle has at most 100000"),
    "labels-object": (_raw(LABELS, b'{"a": 1}'), True, r"must be a list of class names"),
    "format-version": (_set("format_version", 7), True, r"config\.json has format version 7"),
    "no-adapter": (_edit_config(lambda c: c.pop("adapter")), True, r"has no 'adapter' section"),
    "num-classes-string": (_set("adapter.num_classes", "3"), True,
                           r"'adapter': num_classes must be a positive integer, got '3'"),
    "kernel-string": (_set("adapter.kernel", "x"), True, r"'adapter': kernel must be a list of 3 integers"),
    "width-float": (_set("adapter.width", 4.5), True, r"'adapter': width must be an integer, got 4\.5"),
    "frames-null": (_set("spec.num_frames", None), True, r"'spec': num_frames must be an integer, got None"),
    "backbone-string": (_set("backbone", "x"), True, r"'backbone' must be a JSON object"),
    "backbone-spec-number": (_set("backbone.spec", 5), True, r"'backbone': spec must be a string, got 5"),
    "task-list": (_set("task", ["a"]), True, r"names no task"),
    "config-list": (_raw(CONFIG, b"[1, 2]"), True, r"config\.json is not a JSON object"),
    "config-deep": (_raw(CONFIG, DEEP.encode()), True, r"config\.json is nested more than \d+ levels deep"),
    "config-deep-field": (_set("extra", json.loads("[" * 60 + "]" * 60)), True, r"config\.json is nested more"),
    "labels-deep": (_raw(LABELS, DEEP.encode()), True, r"labels\.json is nested more than"),
    "manifest-deep": (_raw(MANIFEST, DEEP.encode()), False, r"manifest\.json is nested more than"),
    "metrics-deep": (_raw("metrics.json", DEEP.encode()), True, r"metrics\.json is nested more than"),
    "config-not-json": (_raw(CONFIG, b"{nope"), True, r"config\.json is not valid JSON"),
    "pickle-tensors": (_raw(TENSORS, pickle.dumps({"head.weight": [1.0]}, protocol=4)), True,
                       r"refusing adapter\.safetensors: a pickle"),
    "header-2^40": (_raw(TENSORS, struct.pack("<Q", 1 << 40) + b"{}" * 8), True, r"header of \d+ bytes is implausible"),
    "header-deep": (_raw(TENSORS, struct.pack("<Q", len(DEEP)) + DEEP.encode()), True, r"nested too deeply"),
    "tensor-missing": (_edit_tensors(lambda t: t.pop("adapters.1.attn.fc2.bias")), True,
                       r"1 missing \(adapters\.1\.attn\.fc2\.bias\)"),
    "tensor-extra": (_edit_tensors(lambda t: t.update(extra=torch.zeros(2))), True, r"1 unexpected \(extra\)"),
    "block-gap": (_edit_tensors(lambda t: t.update({k.replace(".1.", ".5."): t.pop(k) for k in list(t)
                                                    if k.startswith("adapters.1.")})), True,
                  r"adapter blocks are not consecutive"),
    "tensor-shape": (_edit_tensors(lambda t: t.update({"adapters.0.attn.fc1.weight": torch.zeros(WIDTH, DIM + 1)})),
                     True, r"adapters\.0\.attn\.fc1\.weight has shape \[4, 17\], expected \[4, 16\]"),
    "head-rows": (_edit_tensors(lambda t: t.update({"head.weight": torch.zeros(4, DIM)})), True,
                  r"head\.weight has shape \[4, 16\], expected \[3, 16\]"),
    "tensor-int": (_edit_tensors(lambda t: t.update({"head.bias": torch.zeros(3, dtype=torch.int64)})), True,
                   r"head\.bias is I64, not floating point"),
    "tensor-nan": (_edit_tensors(_nan), True, r"NaN or infinite values in head\.weight"),
    "tensor-inf-f16": (_edit_tensors(_inf_half), True, r"NaN or infinite values in adapters\.1\.attn\.fc2\.weight"),
    "symlink-listed": (_symlink_listed, True, r"refusing config\.json: a bundle holds regular files only"),
    "symlink-extra": (_symlink_extra, True, r"refusing figure\.png: a bundle holds regular files only"),
    "directory-inside": (lambda d: (d / "sub.png").mkdir(), True, r"refusing sub\.png: a bundle holds regular"),
    "name-dotdot": (_listed_outside("../e.png"), False, r"unsafe file name\(s\) \.\./e\.png"),
    "name-absolute": (_listed_outside("ABS"), False, r"unsafe file name\(s\) /"),
    "name-newline": (_listed_outside("a\nb.png"), False, r"unsafe file name\(s\) 'a\\nb\.png'"),
    "size-claim": (_claim_size(TENSORS, 3 << 30), False, r"larger than the bundle format allows: adapter\.safetensors"),
}
PULLED = ["label-count", "labels-200000", "num-classes-string", "backbone-string", "config-deep", "manifest-deep",
          "pickle-tensors", "tensor-shape", "tensor-nan"]


def craft_hostile_bundles(good: Path, out: Path) -> dict[str, Path]:
    """The corpus: one directory under ``out`` per case of CASES, crafted from the bundle ``good``."""
    crafted = {}
    for name, (mutate, remanifest, _) in CASES.items():
        d = out / name
        shutil.copytree(good, d)
        mutate(d)
        if remanifest:
            write_manifest(d)
        crafted[name] = d
    _list_links(crafted)
    return crafted


def _list_links(corpus: dict[str, Path]) -> None:
    """write_manifest skips links: list them (with their target's true digest and size) so that only their
    being a link is wrong."""
    for name, entry_name in (("symlink-listed", CONFIG), ("symlink-extra", "figure.png")):
        d = corpus[name]
        manifest = json.loads((d / MANIFEST).read_text())
        target = (d / entry_name).resolve()
        manifest["files"][entry_name] = {"sha256": sha256_file(target), "size": target.stat().st_size}
        (d / MANIFEST).write_text(json.dumps(manifest))




# -- crafted clips ----------------------------------------------------------------------------------------------
# Every clip is H.264 written with PyAV (x264 ultrafast, one thread) unless the case is about not being a video.

X264_FAST = {"preset": "ultrafast", "threads": "1", "bframes": "0"}


def encode_h264(path: Path, frames: list[np.ndarray], container: str = "mp4",
                time_base: Fraction = Fraction(1, 10), pts_step: int = 1) -> Path:
    """(H, W, 3) uint8 frames -> an H.264 stream in ``container``, frame i stamped at ``i * pts_step``."""
    import av

    with av.open(str(path), "w", format=container) as out:
        stream = out.add_stream("libx264", rate=int(round(1 / time_base)) or 1, options=X264_FAST)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.time_base = time_base
        for i, array in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(array, format="rgb24")
            frame.pts, frame.time_base = i * pts_step, time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def moving_noise(frames: int, height: int = 48, width: int = 64, seed: int = 0) -> list[np.ndarray]:
    """A strip of noise sliding one pixel per frame: a small clip that is clearly a video."""
    strip = np.random.default_rng(seed).integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    return [np.ascontiguousarray(strip[:, i % width: i % width + width]) for i in range(frames)]


def _still(path: Path, image_format: str) -> Path:
    from PIL import Image

    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(path, format=image_format)
    return path


def _grows(folder: Path) -> Path:
    """An Annex B stream whose header says 32x32 and whose last 6 of 16 frames are 4200x4200 (over the default
    16.7 M pixels): refused only while decoding."""
    small = encode_h264(folder / "part-small.h264", moving_noise(10, 32, 32), container="h264").read_bytes()
    black = np.zeros((4200, 4200, 3), np.uint8)
    big = encode_h264(folder / "part-big.h264", [black] * 6, container="h264").read_bytes()
    path = folder / "grows.h264"
    path.write_bytes(small + big)
    return path


def write_hostile_clips(folder: Path) -> dict[str, Path]:
    """Every crafted clip by case name (the 16000x16000 one aside: :func:`write_huge_clip`); ``good`` is a small
    real clip that every entry point must accept."""
    folder.mkdir(parents=True, exist_ok=True)
    good = encode_h264(folder / "good.mp4", moving_noise(12))
    clips = {"good": good}
    text = "these are notes, not a video\n" * 60
    for name, file_name in (("text", "notes.txt"), ("text-as-mp4", "notes.mp4")):
        clips[name] = folder / file_name
        clips[name].write_text(text)
    clips["png-as-mp4"] = _still(folder / "picture.mp4", "PNG")
    clips["jpeg-as-mp4"] = _still(folder / "photo.mp4", "JPEG")
    clips["empty"] = folder / "empty.mp4"
    clips["empty"].write_bytes(b"")
    clips["random-bytes"] = folder / "random.mp4"
    clips["random-bytes"].write_bytes(np.random.default_rng(1).integers(0, 256, 40_000, dtype=np.uint8).tobytes())
    clips["truncated"] = folder / "truncated.mp4"
    clips["truncated"].write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    # two frames 4000 s apart: longer than the default max_seconds (3600)
    clips["4000-seconds"] = encode_h264(folder / "long.mp4", moving_noise(2, 16, 16), time_base=Fraction(1, 1),
                                        pts_step=4000)
    clips["grows-mid-stream"] = _grows(folder)
    return clips


# One frame of 16000 x 16000 (a ~750 KB file; x264 needs ~1.5 GB to encode it: run in a child process).
_HUGE = """
import sys
import numpy as np
sys.path.insert(0, sys.argv[2])
from hostile_corpus import encode_h264
encode_h264(__import__("pathlib").Path(sys.argv[1]), [np.zeros((16000, 16000, 3), np.uint8)])
"""


def write_huge_clip(path: Path) -> Path:
    """The one-frame 16000x16000 H.264 MP4 that took 7.9 GB to decode before the limits."""
    subprocess.run([sys.executable, "-c", _HUGE, str(path), str(Path(__file__).parent)], check=True, timeout=600)
    return path


# -- uploads -----------------------------------------------------------------------------------------------

BOUNDARY = b"hostile-boundary-42"


def multipart(filename: bytes, data: bytes, tasks: str = "walk") -> tuple[bytes, dict[str, str]]:
    """A form with the file part 'clip' named ``filename`` (raw bytes, any byte allowed) and 'tasks'."""
    body = (b"--%s\r\nContent-Disposition: form-data; name=\"tasks\"\r\n\r\n%s\r\n"
            b"--%s\r\nContent-Disposition: form-data; name=\"clip\"; filename=\"%s\"\r\n"
            b"Content-Type: video/mp4\r\n\r\n%s\r\n--%s--\r\n"
            % (BOUNDARY, tasks.encode(), BOUNDARY, filename, data, BOUNDARY))
    return body, {"content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}"}


def tree_bytes(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for name in files:
            with suppress(FileNotFoundError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


@contextmanager
def peak_bytes(root: Path, every_s: float = 0.005) -> Iterator[list[int]]:
    """Samples the bytes under ``root`` while the block runs; yields a one-item list holding the peak."""
    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], tree_bytes(root))
            time.sleep(every_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        stop.set()
        sampler.join()
