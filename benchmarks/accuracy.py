"""Transfer quality: a small-scale Table 1 (Pan, Lin et al. 2022) on real footage with a real pretrained ViT.

Tasks, all written as real all-intra H.264 files with ``path label`` lists that the product's loaders read:
  camera_motion  16-frame virtual camera moves over real frames (pan left/right/up/down, zoom in/out). Each
                 forward move (pan right, pan down, zoom in) has a partner that is exactly its frame sequence
                 reversed, so averaging over time is capped at 50% by construction. Only source windows whose
                 own picture stays put (drift <= MAX_SOURCE_DRIFT px, phase correlation) are used, in both
                 splits: over a panning handheld camera the label would not say which way the picture moves.
  arrow_of_time  forward vs reversed playback of real windows (reported only).
  synthetic      the set of ``stadapter data synth`` (stadapter.video.synthetic.generate).
Real footage is split by SOURCE VIDEO: validation clips come from videos no training clip comes from.

Every method trains through ``stadapter.training.api.train_task`` and is evaluated from its saved bundle with
``stadapter.training.evaluate.evaluate`` (what ``stadapter train`` / ``stadapter eval --bundle`` do), each in a
fresh process so that its peak memory can be read: ``peak_rss_mb`` is the growth of the process's peak
resident set size (sampled every 20 ms) over what it held just before training: the backbone weights, trainable
copies, optimizer state and activations, on top of the imported libraries.

    python benchmarks/accuracy.py            # the full run (about 31 min on 2 cores): all six methods on
                                             # camera motion (480 / 48 clips), ST-Adapter and the linear probe
                                             # on the other two; 84 px, 8 frames
    python benchmarks/accuracy.py --quick    # CI (.ci/run): camera motion (240 / 48 clips, 4 frames at stride
                                             # 4), ST-Adapter (260 steps) vs linear probe (100 steps); exits 1
                                             # unless the gap is >= 20 points (about 4 min on 2 cores with bf16)

Training clips get label-preserving content augmentation when the task is built: the source window is mirrored,
flipped upside down and transposed at random BEFORE the camera move (camera motion; arrow of time: mirror only).
Training uses bf16 autocast (``TrainConfig.cpu_bf16``) where the CPU has AVX512-BF16 or AMX, fp32 elsewhere;
evaluation is fp32. Each source window plays forward or backward at random before the camera move, so the
content's own arrow of time says nothing about the label. Timings and results: BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

ROOT = Path(__file__).resolve().parent.parent
VIDEOS = ROOT.parent / "shared" / "data" / "videos"
WEIGHTS = ROOT.parent / "shared" / "models" / "dinov2_vits14_imgfocus_timm.safetensors"
CLIP_LEN = 16  # frames per written clip
WRITE_SIZE = 128  # written clips are WRITE_SIZE^2; the loader resizes and crops to the model's size
SOURCE_SHORT = 176  # source frames are decoded with this short side
# Camera motion draws only windows whose own picture stays put: where the source camera pans by itself, or an
# object that fills the frame crosses it, the picture drifts by as much as the virtual camera moves it (a pan
# moves the crop by 35-72 px of the source), and the label no longer says which way the picture moves.
MAX_SOURCE_DRIFT = 15.0  # px of the source frames (short side SOURCE_SHORT) over the window (source_drift)

# Source videos, grouped so that two files of the same footage never land on both sides of the split.
GROUPS = {
    "vtest": ["footage/vtest.avi"], "box": ["footage/box.mp4"], "tree": ["footage/tree.avi"],
    "carphone": ["footage/carphone_pristine.mp4", "footage/carphone_distorted.mp4"],
    "ratrace": ["labelled/RATRACE_wave_f_nm_np1_fr_goo_37.avi"],
    "schoolrules": ["labelled/SchoolRulesHowTheyHelpUs_wave_f_nm_np1_ba_med_0.avi"],
    "trumanshow": ["labelled/TrumanShow_wave_f_nm_np1_fr_med_26.avi"],
    "cartwheel": ["labelled/hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"],
    "soccer_g23": ["labelled/v_SoccerJuggling_g23_c01.avi"],
    "k400_R6ll": ["labelled/R6llTwEh07w.mp4"], "k400_SOX5": ["labelled/SOX5yA1l24A.mp4"],
    "basketball": ["labelled/basketball.mp4"],
    # held out for validation
    "bikes": ["footage/bikes.mp4"], "cup": ["footage/cup.mp4"], "soccer_g24": ["labelled/v_SoccerJuggling_g24_c01.avi"],
    "k400_WUzg": ["labelled/WUzgd7C1pWA.mp4"],
}
VAL_GROUPS = ("bikes", "cup", "soccer_g24", "k400_WUzg")
CAMERA_CLASSES = ("pan_left", "pan_right", "pan_up", "pan_down", "zoom_in", "zoom_out")
CAMERA_PAIRS = (("pan_right", "pan_left"), ("pan_down", "pan_up"), ("zoom_in", "zoom_out"))  # forward, reversed
ARROW_CLASSES = ("forward", "reversed")
METHOD_LABELS = {"st-adapter": "ST-Adapter", "linear-probe": "Linear probe (temporal avg)",
                 "adapter": "Adapter (no conv)", "bitfit": "BitFit", "partial": "Partial (last block)",
                 "full": "Full fine-tuning"}


@dataclass(frozen=True)
class Run:
    """One method's optimisation budget: optimizer steps of ``batch`` clips at peak learning rate ``lr``."""

    steps: int
    lr: float
    batch: int = 8
    conv_lr_mult: float = 1.0
    head_lr_mult: float = 1.0
    weight_decay: float = 0.01  # AdamW's, on weights only (TrainConfig.weight_decay)


@dataclass(frozen=True)
class Settings:
    size: int = 84  # frame size the backbone sees (6 x 6 patches of 14 px)
    frames: int = 8  # frames per clip the model sees (of CLIP_LEN written, at stride CLIP_LEN // frames)
    width: int = 128  # adapter bottleneck r (adapter / st-adapter), one adapter before MHSA in each block
    pool: str = "cls"  # cls (the paper) or patch-mean, for every method alike
    kernel: tuple = (3, 1, 1)  # ST-Adapter's depth-wise conv kernel (kT, kH, kW); the paper's is 3 x 1 x 1
    dropout: float = 0.5  # head dropout (the paper: 0.5; at 240 clips it held ST-Adapter on the plateau, see BENCHMARKS.md)
    clips: dict = field(default_factory=dict)  # task -> (train clips, val clips)
    runs: dict = field(default_factory=dict)  # task -> {method: Run}
    threads: int = 2
    cpu_bf16: bool | None = None  # bf16 autocast in training (TrainConfig.cpu_bf16); None: where the CPU has
    # AVX512-BF16 or AMX (1.6-1.9x faster steps here). Evaluation runs in fp32 either way.

    @property
    def backbone(self) -> str:
        return f"timm:vit_small_patch14_dinov2?img_size={self.size}"


FULL = Settings(
    dropout=0.0,
    clips={"camera_motion": (480, 48), "arrow_of_time": (64, 32), "synthetic": (64, 32)},
    runs={"camera_motion": {"st-adapter": Run(600, 1e-3, conv_lr_mult=10), "linear-probe": Run(300, 1e-3),
                            # the methods below see each frame alone and average over time, so they are capped at
                            # 50% by construction; shorter runs keep the whole benchmark under 60 min on 2 cores
                            "adapter": Run(300, 1e-3), "bitfit": Run(300, 1e-3), "partial": Run(300, 1e-4),
                            "full": Run(200, 1e-4)},
          "arrow_of_time": {"st-adapter": Run(100, 1e-3, conv_lr_mult=10), "linear-probe": Run(50, 1e-3)},
          "synthetic": {"st-adapter": Run(100, 1e-3, conv_lr_mult=10), "linear-probe": Run(50, 1e-3)}})
QUICK = Settings(
    dropout=0.0,
    frames=4,  # stride 4: larger moves between the frames the model sees; ST-Adapter left the plateau by step ~140
    clips={"camera_motion": (240, 48)},
    runs={"camera_motion": {"linear-probe": Run(100, 1e-3), "st-adapter": Run(260, 1e-3, conv_lr_mult=10)}})


# ------------------------------------------------------------------------------------------------- footage

def read_frames(rel: str, max_frames: int = 480) -> tuple[np.ndarray, float]:
    """Decode a source video, short side SOURCE_SHORT: (N, H, W, 3) uint8 and its frame rate."""
    frames = []
    with av.open(str(VIDEOS / rel), metadata_errors="ignore") as c:
        s = c.streams.video[0]
        fps = float(s.average_rate or 25)
        for f in c.decode(s):
            k = SOURCE_SHORT / min(f.width, f.height)
            w, h = round(f.width * k / 2) * 2, round(f.height * k / 2) * 2
            frames.append(f.reformat(width=w, height=h, format="rgb24").to_ndarray())
            if len(frames) >= max_frames:
                break
    return np.stack(frames), fps


def crop_resize(frames: np.ndarray, boxes: np.ndarray, out: int = WRITE_SIZE) -> np.ndarray:
    """frames (T, H, W, 3) uint8, boxes (T, 3) = centre x, centre y, half side (pixels) -> (T, out, out, 3)."""
    T, H, W, _ = frames.shape
    x = torch.from_numpy(frames).permute(0, 3, 1, 2).float()  # (T, 3, H, W)
    cx, cy, h = (torch.from_numpy(boxes[:, i]).float() for i in range(3))
    theta = torch.zeros(T, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2] = 2 * h / W, 2 * cx / W - 1
    theta[:, 1, 1], theta[:, 1, 2] = 2 * h / H, 2 * cy / H - 1
    grid = F.affine_grid(theta, [T, 3, out, out], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y.round().clamp(0, 255).byte().permute(0, 2, 3, 1).numpy()


def motion_energy(clip: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames (0..255)."""
    return float(np.abs(np.diff(clip.astype(np.int16), axis=0)).mean())


def window(frames: np.ndarray, fps: float, rng: np.random.Generator) -> np.ndarray | None:
    """CLIP_LEN consecutive source frames (every second frame above 20 fps) at a random start; None when the
    window holds a scene cut."""
    step = 2 if fps > 20 else 1
    span = (CLIP_LEN - 1) * step + 1
    step = step if span <= len(frames) else 1
    start = int(rng.integers(0, len(frames) - (CLIP_LEN - 1) * step))
    win = frames[start:start + CLIP_LEN * step:step]
    cut = np.abs(np.diff(win.astype(np.int16), axis=0)).mean(axis=(1, 2, 3)).max() > 30
    return None if cut else win


def frame_shift(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Whole-pixel translation (dx, dy) of grey frame ``b`` against ``a`` by phase correlation (Hann-windowed)."""
    hann = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    cross = np.fft.fft2(b * hann) * np.conj(np.fft.fft2(a * hann))
    corr = np.fft.ifft2(cross / (np.abs(cross) + 1e-9)).real
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    H, W = corr.shape
    return np.array([ix - W if ix > W // 2 else ix, iy - H if iy > H // 2 else iy], dtype=float)


def source_drift(win: np.ndarray, hop: int = 5) -> float:
    """How far the source window's own picture drifts over the window (pixels of the source frames): the length
    of the summed phase-correlation shifts between frames ``hop`` apart. A camera that pans by itself, or an
    object that fills the frame and crosses it, drifts by tens of pixels; a steady camera gives 0-2, and a
    shaking one little, as its shifts cancel."""
    grey = win.astype(np.float32).mean(-1)
    return float(np.hypot(*sum(frame_shift(grey[t], grey[t + hop]) for t in range(0, len(grey) - hop, hop))))


def camera_boxes(forward: str, H: int, W: int, rng: np.random.Generator) -> np.ndarray:
    """(CLIP_LEN, 3) crop boxes of a forward move: pan right / pan down at constant speed, or a steady zoom in."""
    t = np.linspace(0.0, 1.0, CLIP_LEN)
    short = min(H, W)
    if forward == "zoom_in":
        h0 = short * rng.uniform(0.40, 0.5)
        h = h0 * rng.uniform(2.4, 3.0) ** -t  # geometric: a steady zoom (2.4-3.0x: at 1.6-2.2x, zooms lagged pans)
        cx, cy = rng.uniform(h0, W - h0), rng.uniform(h0, H - h0)
        return np.stack([np.full(CLIP_LEN, cx), np.full(CLIP_LEN, cy), h], 1)
    h = short * rng.uniform(0.28, 0.34)
    along, across = (W, H) if forward == "pan_right" else (H, W)
    dist = min(along - 2 * h, 2 * h * rng.uniform(0.35, 0.6))
    a0 = rng.uniform(h, max(h, along - h - dist))
    pos, other = a0 + dist * t, np.full(CLIP_LEN, rng.uniform(h, across - h))
    x, y = (pos, other) if forward == "pan_right" else (other, pos)
    return np.stack([x, y, np.full(CLIP_LEN, h)], 1)


# ------------------------------------------------------------------------------------------------- tasks

def write_split(root: Path, split: str, clips: list[tuple[np.ndarray, str, str]]) -> None:
    """Write (frames, label, source group) clips and the ``path label`` list."""
    from stadapter.video.synthetic import write_mp4

    lines = []
    for k, (frames, label, group) in enumerate(clips):
        rel = f"{split}/{label}/{group}_{k:04d}.mp4"
        write_mp4(root / rel, frames)
        lines.append(f"{rel} {label}")
    (root / f"{split}.txt").write_text("".join(line + "\n" for line in lines))


def real_task(root: Path, make, num_train: int, num_val: int, seed: int, classes: tuple[str, ...]) -> Path:
    """Draw clips with ``make(frames, fps, k, rng, augment) -> [(clip, label), ...] | None`` from the training
    groups (train split, augment=True) and VAL_GROUPS (val split), round-robin over groups; writes lists and labels.json."""
    cache = {}
    for split, n, groups in (("train", num_train, [g for g in GROUPS if g not in VAL_GROUPS]),
                             ("val", num_val, list(VAL_GROUPS))):
        rng = np.random.default_rng([seed, split == "val"])
        out: list[tuple[np.ndarray, str, str]] = []
        k = 0
        while len(out) < n:
            group = groups[(k // 3) % len(groups)]  # three consecutive draws per group: one of each pair
            rel = GROUPS[group][int(rng.integers(len(GROUPS[group])))]
            if rel not in cache:
                cache[rel] = read_frames(rel)
            for _ in range(50):  # redraw near-static windows
                got = make(*cache[rel], k, rng, augment=split == "train")
                if got is not None:
                    out += [(clip, label, group) for clip, label in got]
                    break
            k += 1
        write_split(root, split, out[:n])
    (root / "labels.json").write_text(json.dumps(list(classes)) + "\n")
    return root


def augment_source(win: np.ndarray, rng: np.random.Generator, rotate: bool) -> np.ndarray:
    """Label-preserving content augmentation of a source window, applied BEFORE the camera move (so the move,
    and with it the label, is unchanged): a random left-right mirror and, with ``rotate``, a random upside-down
    flip and a random transpose (the 12 training sources look like 48 to the model)."""
    if rng.random() < 0.5:
        win = win[:, :, ::-1]
    if rotate and rng.random() < 0.5:
        win = win[:, ::-1]
    if rotate and rng.random() < 0.5:
        win = win.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(win)


def camera_clips(frames: np.ndarray, fps: float, k: int, rng: np.random.Generator, augment: bool = False,
                 min_energy: float = 2.0, max_source_drift: float = MAX_SOURCE_DRIFT):
    forward, backward = CAMERA_PAIRS[k % len(CAMERA_PAIRS)]
    win = window(frames, fps, rng)
    if win is None or source_drift(win) > max_source_drift:  # the label must be the virtual camera's move
        return None
    if augment:
        win = augment_source(win, rng, rotate=True)
    if rng.random() < 0.5:  # the footage plays forward or backward, independent of the label: otherwise every
        win = win[::-1].copy()  # forward move would also be forward time and the arrow of time would give it away
    clip = crop_resize(win, camera_boxes(forward, *win.shape[1:3], rng))
    if motion_energy(clip) < min_energy:
        return None
    return [(clip, forward), (clip[::-1].copy(), backward)]  # the partner: exactly the frames reversed


def arrow_clips(frames: np.ndarray, fps: float, k: int, rng: np.random.Generator, augment: bool = False,
                min_energy: float = 3.0):
    win = window(frames, fps, rng)
    if win is None:
        return None
    if augment:  # mirror only: upside down would turn falling into rising, a cue of its own
        win = augment_source(win, rng, rotate=False)
    H, W = win.shape[1:3]
    box = np.tile([W / 2, H / 2, min(H, W) / 2], (CLIP_LEN, 1))
    clip = crop_resize(win, box)
    if motion_energy(clip) < min_energy:
        return None
    return [(clip, "forward"), (clip[::-1].copy(), "reversed")]


def build_task(name: str, work: Path, num_train: int, num_val: int, seed: int = 0) -> Path:
    """The task's folder under ``work`` (reused when it was built with the same settings)."""
    root = work / name
    stamp = {"task": name, "train": num_train, "val": num_val, "seed": seed, "clip_len": CLIP_LEN,
             "write_size": WRITE_SIZE, "val_groups": list(VAL_GROUPS), "version": 5,
             "max_source_drift": MAX_SOURCE_DRIFT}
    if (root / "task.json").is_file() and json.loads((root / "task.json").read_text()) == stamp:
        return root
    root.mkdir(parents=True, exist_ok=True)
    if name == "camera_motion":
        real_task(root, camera_clips, num_train, num_val, seed, CAMERA_CLASSES)
    elif name == "arrow_of_time":
        real_task(root, arrow_clips, num_train, num_val, seed, ARROW_CLASSES)
    else:
        from stadapter.video.synthetic import CLASSES, generate

        per_class = (num_train + num_val) // len(CLASSES)
        generate(root, seed=seed, clips_per_class=per_class, frames=CLIP_LEN, size=64,
                 val_fraction=num_val / (num_train + num_val))
    (root / "task.json").write_text(json.dumps(stamp) + "\n")
    return root


# ------------------------------------------------------------------------------------------------- methods

def rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


class PeakRSS:
    """The peak resident set size of this process while the block runs, sampled every 20 ms by a thread
    (getrusage's ru_maxrss did not move while the linear probe trained: the start-up had set a higher mark)."""

    def __enter__(self) -> "PeakRSS":
        self.start = self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


def run_method(task_dir: str, method: str, run: Run, s: Settings, out: str) -> dict:
    """Train one method on one task through the product's own train/eval code; runs in a fresh process."""
    torch.set_num_threads(s.threads)
    from stadapter.training.api import evaluate_task, resolve_recipe, train_task
    from stadapter.video.datasets import load_annotations

    root = Path(task_dir)
    tr = load_annotations(root / "train.txt", split="train")
    va = load_annotations(root / "val.txt", split="val", classes=tr.classes)
    per_epoch = len(tr.samples) // run.batch
    adapter = {"method": method, "width": s.width, "positions": ("attn",), "activation": None, "pool": s.pool,
               "dropout": s.dropout, "kernel": tuple(s.kernel)}
    # T of 16 frames at stride 16 / T; at test every offset (0 .. stride-1) is a view and the views are averaged,
    # so the frames a clip is judged on map onto themselves under reversal. No flip: left/right is the label.
    stride = CLIP_LEN // s.frames
    spec = {"num_frames": s.frames, "sampling": "dense", "frame_stride": stride,
            "temporal_views": stride, "spatial_views": 1, "train_crop": "random", "flip": False,
            "direction_sensitive": True}
    train = {"epochs": run.steps / per_epoch, "warmup_epochs": 0.1 * run.steps / per_epoch,
             "batch_size": run.batch, "lr_per_256": run.lr * 256 / run.batch, "conv_lr_mult": run.conv_lr_mult,
             "head_lr_mult": run.head_lr_mult, "weight_decay": run.weight_decay, "num_workers": 0, "eval_every": 0, "checkpoint_every": 10 ** 6, "amp": False,
             "cpu_bf16": s.cpu_bf16, "lr_ref_batch": None}  # run.lr is an absolute rate
    recipe = resolve_recipe(root.name, "custom", adapter, spec, train)
    with PeakRSS() as mem:
        outcome = train_task(root.name, recipe, tr.samples, tr.classes, None, s.backbone, str(WEIGHTS), Path(out),
                             max_steps=run.steps, device="cpu", log=lambda m: print(m, file=sys.stderr),
                             progress=False)
    peak = mem.peak - mem.start
    t0 = time.monotonic()  # evaluate the saved bundle, as `stadapter eval --bundle` does
    m = evaluate_task(root / "val.txt", bundle_dir=outcome.bundle_dir, device="cpu", amp=False,
                      log=lambda msg: print(msg, file=sys.stderr)).metrics
    return {"method": method, "top1": m["top1"], "per_class": m["per_class"], "confusion": m["confusion"],
            "trainable_params": outcome.trainable_params, "train_seconds": outcome.seconds,
            "eval_seconds": time.monotonic() - t0, "peak_rss_mb": peak, "steps": run.steps, "batch": run.batch,
            "lr": run.lr, "conv_lr_mult": run.conv_lr_mult, "head_lr_mult": run.head_lr_mult,
            "weight_decay": run.weight_decay, "num_train": len(tr.samples),
            "num_val": len(va.samples), "skipped": outcome.skipped}


def same_setup(old: dict, new: dict, task: str) -> bool:
    """Whether a cached result was measured with this task's clips, this method's run and the same model."""
    o, n = json.loads(json.dumps(old)), json.loads(json.dumps(new))
    keys = ("size", "frames", "width", "pool", "kernel", "dropout", "threads", "cpu_bf16")
    return (o["run"] == n["run"] and o["task"] == n["task"] == task
            and all(o["settings"].get(k) == n["settings"][k] for k in keys)
            and o["settings"]["clips"].get(task) == n["settings"]["clips"][task])


def run_isolated(*args) -> dict:
    with cf.ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(run_method, *args).result()


# ------------------------------------------------------------------------------------------------- report

def table(results: dict) -> str:
    tasks = list(results)
    methods = list(dict.fromkeys(m for t in tasks for m in results[t]))
    head = ["method", "trainable params"] + [f"{t} top-1" for t in tasks] + ["train s (camera)", "peak MB (camera)"]
    rows = []
    for m in methods:
        first = next(results[t][m] for t in tasks if m in results[t])
        cam = results.get("camera_motion", {}).get(m, first)
        rows.append([METHOD_LABELS[m], f"{first['trainable_params']:,}"]
                    + [f"{100 * results[t][m]['top1']:.1f}%" if m in results[t] else "-" for t in tasks]
                    + [f"{cam['train_seconds']:.0f}", f"{cam['peak_rss_mb']:.0f}"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    for t in tasks:
        lines.append(f"\nper-class accuracy, {t}:")
        for m, r in results[t].items():
            pc = ", ".join(f"{k} {100 * v:.0f}%" for k, v in r["per_class"].items() if v is not None)
            lines.append(f"  {METHOD_LABELS[m]}: {pc}")
    return "\n".join(lines)


def plot(results: dict, path: Path, title: str = "DINOv2 ViT-S/14, accuracy vs trainable parameters") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for task, marker in zip(results, "osD"):
        pts = sorted((r["trainable_params"], 100 * r["top1"], m) for m, r in results[task].items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=":", label=task)
        for x, y, m in pts:
            ax.annotate(METHOD_LABELS[m].split(" (")[0], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log)")
    ax.set_ylabel("validation top-1 (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI mode: camera motion, ST-Adapter vs linear probe")
    p.add_argument("--work", type=Path, default=None, help="work dir for clips and runs (default runs/accuracy[-quick])")
    p.add_argument("--plot", type=Path, default=None, help="PNG of accuracy vs trainable parameters")
    p.add_argument("--tasks", default=None, help="comma-separated subset of the tasks")
    p.add_argument("--methods", default=None, help="comma-separated subset of the methods")
    p.add_argument("--reuse", action="store_true", help="reuse a method's result.json from an earlier run with "
                   "the same settings")
    a = p.parse_args(argv)
    s = QUICK if a.quick else FULL
    if s.cpu_bf16 is None:
        from stadapter.training.loop import cpu_has_fast_bf16

        s = dataclasses.replace(s, cpu_bf16=cpu_has_fast_bf16())
    for what, path in (("footage", VIDEOS), ("weights", WEIGHTS)):
        if not path.exists():
            print(f"missing {what}: {path} (../shared beside the checkout)", file=sys.stderr)
            return 2
    work = (a.work or ROOT / "runs" / ("accuracy-quick" if a.quick else "accuracy")).resolve()
    tasks = a.tasks.split(",") if a.tasks else list(s.runs)
    started = time.monotonic()
    results: dict[str, dict] = {}
    build_seconds: dict[str, float] = {}
    for task in tasks:
        t0 = time.monotonic()
        task_dir = build_task(task, work, *s.clips[task])
        build_seconds[task] = time.monotonic() - t0
        print(f"[{task}] clips ready in {build_seconds[task]:.0f} s: {task_dir}", file=sys.stderr, flush=True)
        results[task] = {}
        for method, run in s.runs[task].items():
            if a.methods and method not in a.methods.split(","):
                continue
            out = work / "runs" / task / method
            stamp = {"run": dataclasses.asdict(run), "settings": dataclasses.asdict(s), "task": task}
            cached = out / "result.json"
            if a.reuse and cached.is_file() and same_setup(json.loads(cached.read_text())["stamp"], stamp, task):
                r = json.loads(cached.read_text())["result"]
            else:
                r = run_isolated(str(task_dir), method, run, s, str(out))
                cached.write_text(json.dumps({"stamp": stamp, "result": r}) + "\n")
            results[task][method] = r
            print(f"[{task}] {method}: top-1 {100 * r['top1']:.1f}%, {r['trainable_params']:,} params, "
                  f"train {r['train_seconds']:.0f} s, peak +{r['peak_rss_mb']:.0f} MB", file=sys.stderr, flush=True)
    total = time.monotonic() - started
    print(table(results))
    plot_path = a.plot or (work / "accuracy_vs_params.png" if a.quick else ROOT / "benchmarks" / "accuracy_vs_params.png")
    plot(results, plot_path, f"DINOv2 ViT-S/14 at {s.size} px, {s.frames} frames ({'quick' if a.quick else 'full'} run)")
    settings = {"backbone": s.backbone, "weights": WEIGHTS.name, "size": s.size, "frames": s.frames,
                "cpu_bf16": s.cpu_bf16, "dropout": s.dropout,
                "clip_len": CLIP_LEN, "adapter_width": s.width, "kernel": list(s.kernel), "pool": s.pool, "clips": {t: s.clips[t] for t in tasks},
                "val_groups": list(VAL_GROUPS), "runs": {t: {m: dataclasses.asdict(r) for m, r in s.runs[t].items()}
                                                         for t in tasks}}
    summary = {"mode": "quick" if a.quick else "full", "device": f"{cpu_name()}, {os.cpu_count()} cores",
               "date": datetime.date.today().isoformat(), "total_seconds": total, "build_seconds": build_seconds, "settings": settings,
               "plot": str(plot_path), "results": results}
    (work / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    ok = True
    cam = results.get("camera_motion", {})
    if a.quick and {"st-adapter", "linear-probe"} <= set(cam):
        gap = cam["st-adapter"]["top1"] - cam["linear-probe"]["top1"]
        summary["camera_gap"] = gap
        ok = gap >= 0.20
        if not ok:
            print(f"FAIL: ST-Adapter beats the linear probe by {100 * gap:.1f} points (< 20)", file=sys.stderr)
    summary["passed"] = ok
    print(json.dumps({k: v for k, v in summary.items()}, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
