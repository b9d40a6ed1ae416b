"""A built-in motion-centric video set, written as real H.264 MP4 files with PyAV.

Each clip shows one textured object on a textured background. The class is the object's motion: it moves
left, right, up or down, rotates clockwise or anticlockwise, grows or shrinks. Every clip draws its own
background, object shape, texture, colours, position, size and speed. A clip of a negative class is a clip of
its positive partner played backwards (trajectories are drawn for right / down / clockwise / grow and reversed
for the partner), so the two classes hold the same frames in distribution and only their order tells them
apart: averaging over time cannot separate left from right, clockwise from anticlockwise, grow from shrink.
The object's mean size over a clip is drawn from the same distribution for every class.

Layout under ``out``: ``labels.json`` (class names in index order), ``train.txt`` and ``val.txt``
(``class/class_0007.mp4 label_index`` lines, paths relative to ``out``), ``synth.json`` (the settings), and
one folder of clips per class. Deterministic for a seed: clip k of class c depends only on (seed, c, k).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np

from stadapter import __version__
from stadapter.errors import ConfigError

CLASSES = ("move_left", "move_right", "move_up", "move_down",
           "rotate_clockwise", "rotate_anticlockwise", "grow", "shrink")
OPPOSITE = {"move_left": "move_right", "move_right": "move_left", "move_up": "move_down",
            "move_down": "move_up", "rotate_clockwise": "rotate_anticlockwise",
            "rotate_anticlockwise": "rotate_clockwise", "grow": "shrink", "shrink": "grow"}
# the class whose trajectory is drawn forward, and whether the class plays it backwards
_FORWARD = {"move_left": ("move_right", True), "move_right": ("move_right", False),
            "move_up": ("move_down", True), "move_down": ("move_down", False),
            "rotate_clockwise": ("rotate_clockwise", False), "rotate_anticlockwise": ("rotate_clockwise", True),
            "grow": ("grow", False), "shrink": ("grow", True)}
SHAPES = ("square", "disc", "triangle", "diamond", "cross")
FPS = 15
X264_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "bframes": "0"}  # all-intra via gop_size 1


def sample_states(name: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """(T, 4) object states per frame: centre x, centre y (pixels, y down), angle (radians; increasing is
    clockwise on screen), radius (pixels)."""
    if name not in _FORWARD:
        raise ConfigError(f"unknown synthetic class {name!r}; choose one of {', '.join(CLASSES)}")
    forward, backwards = _FORWARD[name]
    t = np.linspace(0.0, 1.0, frames)  # (T,)
    r = size * rng.uniform(0.14, 0.19)  # the object's (geometric) mean radius
    angle0 = rng.uniform(0, 2 * math.pi)
    states = np.empty((frames, 4))
    if forward in ("move_right", "move_down"):
        dist = size * rng.uniform(0.38, 0.52)
        a = rng.uniform(r, max(r, size - r - dist))
        along, across = a + dist * t, np.full(frames, rng.uniform(r, size - r))
        x, y = (along, across) if forward == "move_right" else (across, along)
        states[:] = np.stack([x, y, np.full(frames, angle0), np.full(frames, r)], axis=1)
    elif forward == "rotate_clockwise":
        cx, cy = rng.uniform(1.3 * r, size - 1.3 * r, size=2)
        turn = math.radians(rng.uniform(130, 190))
        states[:] = np.stack([np.full(frames, cx), np.full(frames, cy), angle0 + turn * t, np.full(frames, r)], 1)
    else:  # grow: radius ~ r / sqrt(k) -> r * sqrt(k), geometric (a steady zoom), mean area r^2
        k = rng.uniform(2.2, 2.8)
        radius = k ** (t - 0.5)
        radius = r * radius / math.sqrt(float(np.mean(radius ** 2)))
        margin = 1.1 * radius[-1]
        cx, cy = rng.uniform(min(margin, size / 2), max(size - margin, size / 2), size=2)
        states[:] = np.stack([np.full(frames, cx), np.full(frames, cy), np.full(frames, angle0), radius], 1)
    return states[::-1].copy() if backwards else states


def motion_of(states: np.ndarray) -> str:
    """The class a (T, 4) trajectory shows: the one quantity that changes, and the sign of its change."""
    d = states[-1] - states[0]
    changes = {"x": d[0], "y": d[1], "angle": d[2], "scale": math.log(states[-1, 3] / states[0, 3])}
    key = max(changes, key=lambda k: abs(changes[k]))
    positive = changes[key] > 0
    return {"x": ("move_right", "move_left"), "y": ("move_down", "move_up"),
            "angle": ("rotate_clockwise", "rotate_anticlockwise"),
            "scale": ("grow", "shrink")}[key][0 if positive else 1]


@dataclass(frozen=True)
class Scene:
    """Everything about a clip except the object's motion."""

    background: np.ndarray  # (S, S, 3) float32 in 0..1
    shape: str
    colors: np.ndarray  # (4, 3): stripe a, stripe b, marker, outline
    stripe_freq: float  # cycles across the object
    stripe_angle: float
    checker: bool


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(S, S) smooth noise in about -1..1: a random (cells+1)^2 grid, bilinearly interpolated."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (S, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]  # (S, S)


def sample_scene(rng: np.random.Generator, size: int = 64) -> Scene:
    base = rng.uniform(0.25, 0.75, size=3)
    tint = rng.uniform(-1, 1, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    phi, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
    grating = np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)) + rng.uniform(0, 7))
    noise = _smooth_noise(rng, size, int(rng.integers(3, 9)))
    bg = base + 0.12 * noise[..., None] * tint[0] + 0.06 * grating[..., None] * tint[1]
    colors = rng.uniform(0, 1, size=(4, 3))
    colors[0] = np.where(rng.random(3) < 0.5, rng.uniform(0.8, 1.0, 3), rng.uniform(0.0, 0.2, 3))
    colors[1] = 1.0 - colors[0] * rng.uniform(0.6, 1.0)  # contrasts with stripe a
    colors[3] = rng.uniform(0.0, 0.12, 3) if rng.random() < 0.5 else rng.uniform(0.88, 1.0, 3)
    return Scene(background=np.clip(bg, 0, 1).astype(np.float32), shape=SHAPES[int(rng.integers(len(SHAPES)))],
                 colors=colors.astype(np.float32), stripe_freq=float(rng.uniform(1.2, 2.5)),
                 stripe_angle=float(rng.uniform(0, math.pi)), checker=bool(rng.random() < 0.4))


def _shape_distance(shape: str, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Signed distance-like field in object units: < 0 inside, 0 on the outline (radius 1)."""
    if shape == "square":
        return np.maximum(abs(u), abs(v)) / 0.85 - 1
    if shape == "disc":
        return np.hypot(u, v) - 1
    if shape == "diamond":
        return (abs(u) + abs(v)) - 1
    if shape == "cross":
        arm = np.minimum(np.maximum(abs(u), abs(v) / 0.4), np.maximum(abs(u) / 0.4, abs(v)))
        return arm - 1
    # triangle pointing along +u, centred
    edges = [(u * math.cos(a) + v * math.sin(a)) for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)]
    return np.maximum.reduce(edges) / 0.6 - 1


def render_frames(scene: Scene, states: np.ndarray) -> np.ndarray:
    """(T, 4) states -> (T, S, S, 3) uint8 frames. A pure function of (scene, state) per frame."""
    size = scene.background.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    a, b, marker, outline = scene.colors
    out = np.empty((len(states), size, size, 3), dtype=np.uint8)
    ca, sa = math.cos(scene.stripe_angle), math.sin(scene.stripe_angle)
    for i, (cx, cy, angle, radius) in enumerate(states):
        dx, dy = xx - cx, yy - cy
        c, s = math.cos(angle), math.sin(angle)
        u, v = (c * dx + s * dy) / radius, (-s * dx + c * dy) / radius  # object coordinates
        dist = _shape_distance(scene.shape, u, v) * radius  # ~pixels
        alpha = np.clip(0.5 - dist, 0, 1)[..., None]  # 1-pixel antialiased edge
        ring = np.clip(1.5 - abs(dist + 1.5), 0, 1)[..., None]  # outline just inside the edge
        phase = scene.stripe_freq * (u * ca + v * sa)
        if scene.checker:
            phase = np.floor(scene.stripe_freq * u) + np.floor(scene.stripe_freq * v)
            pick = (np.mod(phase, 2) < 1)[..., None]
        else:
            pick = (np.mod(phase, 1) < 0.5)[..., None]
        tex = np.where(pick, a, b)
        spot = (np.hypot(u - 0.45, v - 0.3) < 0.28)[..., None]  # an off-centre marker shows orientation
        tex = np.where(spot, marker, tex)
        tex = tex * (1 - ring) + outline * ring
        frame = scene.background * (1 - alpha) + tex * alpha
        out[i] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def render_clip(name: str, rng: np.random.Generator, frames: int = 16, size: int = 64) -> np.ndarray:
    """One clip of class ``name``: (T, S, S, 3) uint8."""
    scene = sample_scene(rng, size)
    return render_frames(scene, sample_states(name, rng, frames, size))


def write_mp4(path: Path, frames: np.ndarray, fps: int = FPS) -> None:
    """(T, H, W, 3) uint8 -> an all-intra H.264 (libx264, yuv420p) MP4, the same settings for every clip."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps, options=X264_OPTIONS)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.gop_size = 1
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@dataclass(frozen=True)
class SynthSet:
    root: Path
    train: Path  # train.txt
    val: Path  # val.txt
    labels: Path  # labels.json
    classes: tuple[str, ...]
    num_train: int
    num_val: int


def clip_rng(seed: int, class_index: int, clip_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, class_index, clip_index])


def generate(out: str | Path, seed: int = 0, clips_per_class: int = 40, frames: int = 16, size: int = 64,
             val_fraction: float = 0.25, fps: int = FPS,
             progress: Callable[[int, int], None] | None = None) -> SynthSet:
    """Write the synthetic set under ``out``; ``progress(done, total)`` is called after every clip."""
    if clips_per_class < 1:
        raise ConfigError(f"clips per class must be >= 1, got {clips_per_class}")
    if frames < 2:
        raise ConfigError(f"a motion needs at least 2 frames, got {frames}")
    if size < 16 or size % 2:
        raise ConfigError(f"size must be an even number >= 16 (H.264 yuv420p), got {size}")
    if not 0 <= val_fraction < 1:
        raise ConfigError(f"val fraction must be in [0, 1), got {val_fraction}")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    num_val = round(clips_per_class * val_fraction)
    num_train = clips_per_class - num_val
    if num_train < 1:
        raise ConfigError(f"val fraction {val_fraction} leaves no training clips of {clips_per_class}")
    lines: dict[str, list[str]] = {"train": [], "val": []}
    total, done = len(CLASSES) * clips_per_class, 0
    for c, name in enumerate(CLASSES):
        for k in range(clips_per_class):
            rel = f"{name}/{name}_{k:04d}.mp4"
            write_mp4(root / rel, render_clip(name, clip_rng(seed, c, k), frames, size), fps)
            lines["train" if k < num_train else "val"].append(f"{rel} {c}")
            done += 1
            if progress is not None:
                progress(done, total)
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("".join(r + "\n" for r in rows))
    (root / "labels.json").write_text(json.dumps(list(CLASSES), indent=1) + "\n")
    settings = {"seed": seed, "clips_per_class": clips_per_class, "frames": frames, "size": size, "fps": fps,
                "val_fraction": val_fraction, "classes": list(CLASSES), "num_train": len(lines["train"]),
                "num_val": len(lines["val"]), "codec": "libx264 yuv420p all-intra", "x264": X264_OPTIONS,
                "stadapter_version": __version__}
    (root / "synth.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return SynthSet(root, root / "train.txt", root / "val.txt", root / "labels.json", CLASSES,
                    len(lines["train"]), len(lines["val"]))


__all__ = ["CLASSES", "OPPOSITE", "SHAPES", "Scene", "SynthSet", "sample_states", "motion_of", "sample_scene",
           "render_frames", "render_clip", "write_mp4", "generate", "clip_rng"]
