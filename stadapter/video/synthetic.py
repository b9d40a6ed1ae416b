"""A built-in motion-centric video set, written as real H.264 MP4 files with PyAV.

Each clip shows one to three textured objects on a textured background, all moving the same way. The class
is that motion: left, right, up or down, rotating clockwise or anticlockwise, growing or shrinking. Every clip
draws its own background, number of objects, shapes, textures, colours, positions, sizes and speeds. A clip
of a negative class is a clip of its positive partner played backwards (trajectories are drawn for right /
down / clockwise / grow and reversed for the partner), so the two classes hold the same frames in distribution
and only their order tells them apart: averaging over time cannot separate left from right, clockwise from
anticlockwise, grow from shrink. An object's mean area over a clip has the same distribution in every class.

Layout under ``out``: ``labels.json`` (class names in index order), ``train.txt`` and ``val.txt``
(``class/class_0007.mp4 label_index`` lines, paths relative to ``out``), ``synth.json`` (the settings), and
one folder of clips per class. Deterministic for a seed: clip k of class c depends only on (seed, c, k).
"""

from __future__ import annotations

import dataclasses
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


@dataclass(frozen=True)
class MotionRanges:
    """The ranges clips are drawn from (sizes and distances as fractions of the frame size)."""

    objects: tuple[int, int] = (1, 3)  # objects per clip, all moving the same way
    radius: tuple[float, float] = (0.2, 0.27)  # an object's root-mean-square radius over the clip
    distance: tuple[float, float] = (0.35, 0.45)  # a translation over the whole clip
    turn_degrees: tuple[float, float] = (140.0, 200.0)  # a rotation over the whole clip
    zoom: tuple[float, float] = (2.2, 2.8)  # end / start radius of a growing object

    def __post_init__(self) -> None:
        for name in ("objects", "radius", "distance", "turn_degrees", "zoom"):
            lo, hi = getattr(self, name)
            if not 0 < lo <= hi:
                raise ConfigError(f"motion range {name} must satisfy 0 < low <= high, got {(lo, hi)}")
        if self.zoom[0] <= 1:
            raise ConfigError(f"zoom must be > 1 (end / start radius of a growing object), got {self.zoom}")


DEFAULT_MOTION = MotionRanges()
# the off-centre marker that shows an object's orientation: centre (u, v) and radius, in object units
MARKER = (0.45, 0.3, 0.28)
STRIPE_CYCLES = (1.2, 2.5)  # stripe / checker cycles across an object
X264_OPTIONS = {"crf": "18", "preset": "medium", "threads": "1", "bframes": "0"}  # all-intra via gop_size 1


def _one_trajectory(forward: str, rng: np.random.Generator, t: np.ndarray, size: int,
                    m: MotionRanges) -> np.ndarray:
    """(T, 4) states of one object moving the ``forward`` way."""
    frames = len(t)
    r = size * rng.uniform(*m.radius)  # the object's root-mean-square radius over the clip
    angle0 = rng.uniform(0, 2 * math.pi)
    if forward in ("move_right", "move_down"):
        dist = size * rng.uniform(*m.distance)
        a = rng.uniform(r, max(r, size - r - dist))
        along, across = a + dist * t, np.full(frames, rng.uniform(r, size - r))
        x, y = (along, across) if forward == "move_right" else (across, along)
        return np.stack([x, y, np.full(frames, angle0), np.full(frames, r)], axis=1)
    if forward == "rotate_clockwise":
        cx, cy = rng.uniform(1.2 * r, size - 1.2 * r, size=2)
        turn = math.radians(rng.uniform(*m.turn_degrees))
        return np.stack([np.full(frames, cx), np.full(frames, cy), angle0 + turn * t, np.full(frames, r)], axis=1)
    k = rng.uniform(*m.zoom)  # grow: radius ~ r / sqrt(k) -> r * sqrt(k), geometric (a steady zoom)
    radius = k ** (t - 0.5)
    radius = r * radius / math.sqrt(float(np.mean(radius ** 2)))  # mean area r^2, as the other classes
    margin = min(1.1 * radius[-1], size / 2)
    cx, cy = rng.uniform(margin, size - margin, size=2)
    return np.stack([np.full(frames, cx), np.full(frames, cy), np.full(frames, angle0), radius], axis=1)


def sample_states(name: str, rng: np.random.Generator, frames: int = 16, size: int = 64,
                  objects: int = 1, motion: MotionRanges = DEFAULT_MOTION) -> np.ndarray:
    """(T, K, 4) states of K objects that all move as class ``name``: centre x, centre y (pixels, y down),
    angle (radians; increasing turns clockwise on screen), radius (pixels). Each object has its own place,
    size and speed."""
    if name not in _FORWARD:
        raise ConfigError(f"unknown synthetic class {name!r}; choose one of {', '.join(CLASSES)}")
    forward, backwards = _FORWARD[name]
    t = np.linspace(0.0, 1.0, frames)  # (T,)
    states = np.stack([_one_trajectory(forward, rng, t, size, motion) for _ in range(objects)], 1)  # (T, K, 4)
    return states[::-1].copy() if backwards else states


def motion_of(states: np.ndarray) -> str:
    """The class a (T, 4) or (T, K, 4) trajectory shows: the one quantity that changes and the sign of its
    change (every object must agree)."""
    per_object = states[:, None] if states.ndim == 2 else states
    names = set()
    for k in range(per_object.shape[1]):
        first, last = per_object[0, k], per_object[-1, k]
        d = last - first
        changes = {"x": d[0], "y": d[1], "angle": d[2], "scale": math.log(last[3] / first[3])}
        key = max(changes, key=lambda c: abs(changes[c]))
        names.add({"x": ("move_right", "move_left"), "y": ("move_down", "move_up"),
                   "angle": ("rotate_clockwise", "rotate_anticlockwise"),
                   "scale": ("grow", "shrink")}[key][0 if changes[key] > 0 else 1])
    if len(names) != 1:
        raise ValueError(f"objects disagree about the motion: {sorted(names)}")
    return names.pop()


@dataclass(frozen=True)
class Sprite:
    """One object's look."""

    shape: str
    colors: np.ndarray  # (4, 3) in 0..1: stripe a, stripe b, marker, outline
    stripe_freq: float  # cycles across the object
    stripe_angle: float
    checker: bool


@dataclass(frozen=True)
class Scene:
    """Everything about a clip except the motion: the background and the objects' looks."""

    background: np.ndarray  # (S, S, 3) float32 in 0..1
    sprites: tuple[Sprite, ...]


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """(S, S) smooth noise in about -1..1: a random (cells+1)^2 grid, bilinearly interpolated."""
    grid = rng.uniform(-1, 1, size=(cells + 1, cells + 1))
    pos = (np.arange(size) + 0.5) / size * cells
    i = np.minimum(pos.astype(int), cells - 1)
    f = pos - i
    rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]  # (S, cells+1)
    return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]  # (S, S)


def _sample_sprite(rng: np.random.Generator) -> Sprite:
    colors = rng.uniform(0, 1, size=(4, 3))
    colors[0] = np.where(rng.random(3) < 0.5, rng.uniform(0.8, 1.0, 3), rng.uniform(0.0, 0.2, 3))
    colors[1] = 1.0 - colors[0] * rng.uniform(0.6, 1.0)  # contrasts with stripe a
    colors[3] = rng.uniform(0.0, 0.12, 3) if rng.random() < 0.5 else rng.uniform(0.88, 1.0, 3)
    return Sprite(shape=SHAPES[int(rng.integers(len(SHAPES)))], colors=colors.astype(np.float32),
                  stripe_freq=float(rng.uniform(*STRIPE_CYCLES)), stripe_angle=float(rng.uniform(0, math.pi)),
                  checker=bool(rng.random() < 0.4))


def sample_scene(rng: np.random.Generator, size: int = 64, objects: int = 1) -> Scene:
    """A random textured background (smooth noise + a grating, muted) and ``objects`` random sprites."""
    base = rng.uniform(0.25, 0.75, size=3)
    tint = rng.uniform(-1, 1, size=(2, 3))
    yy, xx = np.mgrid[0:size, 0:size] / size
    phi, freq = rng.uniform(0, math.pi), rng.uniform(2, 6)
    grating = np.sin(2 * math.pi * freq * (xx * math.cos(phi) + yy * math.sin(phi)) + rng.uniform(0, 7))
    noise = _smooth_noise(rng, size, int(rng.integers(3, 9)))
    bg = base + 0.12 * noise[..., None] * tint[0] + 0.06 * grating[..., None] * tint[1]
    sprites = tuple(_sample_sprite(rng) for _ in range(objects))
    return Scene(background=np.clip(bg, 0, 1).astype(np.float32), sprites=sprites)


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


def _draw(canvas: np.ndarray, sprite: Sprite, state: np.ndarray, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Composite one sprite at ``state`` (x, y, angle, radius) over ``canvas`` (S, S, 3)."""
    cx, cy, angle, radius = state
    dx, dy = xx - cx, yy - cy
    c, s = math.cos(angle), math.sin(angle)
    u, v = (c * dx + s * dy) / radius, (-s * dx + c * dy) / radius  # object coordinates
    dist = _shape_distance(sprite.shape, u, v) * radius  # ~pixels
    alpha = np.clip(0.5 - dist, 0, 1)[..., None]  # 1-pixel antialiased edge
    ring = np.clip(1.5 - abs(dist + 1.5), 0, 1)[..., None]  # outline just inside the edge
    a, b, marker, outline = sprite.colors
    if sprite.checker:
        phase = np.floor(sprite.stripe_freq * u) + np.floor(sprite.stripe_freq * v)
        pick = (np.mod(phase, 2) < 1)[..., None]
    else:
        ca, sa = math.cos(sprite.stripe_angle), math.sin(sprite.stripe_angle)
        pick = (np.mod(sprite.stripe_freq * (u * ca + v * sa), 1) < 0.5)[..., None]
    tex = np.where(pick, a, b)
    mu, mv, mr = MARKER
    tex = np.where((np.hypot(u - mu, v - mv) < mr)[..., None], marker, tex)  # off-centre: shows orientation
    tex = tex * (1 - ring) + outline * ring
    return canvas * (1 - alpha) + tex * alpha


def render_frames(scene: Scene, states: np.ndarray) -> np.ndarray:
    """(T, K, 4) states (or (T, 4) for one object) -> (T, S, S, 3) uint8 frames; a pure function of
    (scene, state) per frame."""
    states = states[:, None] if states.ndim == 2 else states
    if states.shape[1] != len(scene.sprites):
        raise ConfigError(f"{states.shape[1]} object trajectories for {len(scene.sprites)} sprites")
    size = scene.background.shape[0]
    yy, xx = np.mgrid[0:size, 0:size] + 0.5  # pixel centres
    out = np.empty((len(states), size, size, 3), dtype=np.uint8)
    for i, frame_states in enumerate(states):
        frame = scene.background
        for sprite, state in zip(scene.sprites, frame_states, strict=True):
            frame = _draw(frame, sprite, state, xx, yy)
        out[i] = np.clip(frame * 255 + 0.5, 0, 255).astype(np.uint8)
    return out


def render_clip(name: str, rng: np.random.Generator, frames: int = 16, size: int = 64,
                motion: MotionRanges = DEFAULT_MOTION) -> np.ndarray:
    """One clip of class ``name``: (T, S, S, 3) uint8."""
    objects = int(rng.integers(motion.objects[0], motion.objects[1] + 1))
    scene = sample_scene(rng, size, objects)
    return render_frames(scene, sample_states(name, rng, frames, size, objects, motion))


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
             val_fraction: float = 0.25, fps: int = FPS, motion: MotionRanges = DEFAULT_MOTION,
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
            write_mp4(root / rel, render_clip(name, clip_rng(seed, c, k), frames, size, motion), fps)
            lines["train" if k < num_train else "val"].append(f"{rel} {c}")
            done += 1
            if progress is not None:
                progress(done, total)
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("".join(r + "\n" for r in rows))
    (root / "labels.json").write_text(json.dumps(list(CLASSES), indent=1) + "\n")
    settings = {"seed": seed, "clips_per_class": clips_per_class, "frames": frames, "size": size, "fps": fps,
                "val_fraction": val_fraction, "classes": list(CLASSES), "num_train": len(lines["train"]),
                "num_val": len(lines["val"]), "motion": dataclasses.asdict(motion),
                "codec": "libx264 yuv420p all-intra", "x264": X264_OPTIONS, "stadapter_version": __version__}
    (root / "synth.json").write_text(json.dumps(settings, indent=2, sort_keys=True) + "\n")
    return SynthSet(root, root / "train.txt", root / "val.txt", root / "labels.json", CLASSES,
                    len(lines["train"]), len(lines["val"]))


__all__ = ["CLASSES", "OPPOSITE", "SHAPES", "MotionRanges", "DEFAULT_MOTION", "Sprite", "Scene", "SynthSet",
           "sample_states", "motion_of", "sample_scene", "render_frames", "render_clip", "write_mp4", "generate",
           "clip_rng"]
