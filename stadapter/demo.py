"""The offline main job: the built-in synthetic motion set, an ST-Adapter trained on a small built-in backbone,
and the temporal-average linear probe on the same frozen backbone beside it.

Nothing downloads. The synthetic classes differ only in the order of their frames (a clip of ``move_left``
is a ``move_right`` clip played backwards), so averaging frame features over time, which is all a linear probe
sees, stays near chance, while the adapters' depth-wise temporal convolution learns the motion.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stadapter.errors import ConfigError

if TYPE_CHECKING:
    from stadapter.registry import Registry
    from stadapter.video.synthetic import SynthSet

# A small random-init CLIP-style ViT: 48 px frames in 6 px patches (an 8 x 8 grid), width 64, 3 blocks.
DEMO_BACKBONE = "open_clip:ViT-B-16?image_size=48&patch_size=6&width=64&layers=3&head_width=32"


@dataclass(frozen=True)
class DemoSettings:
    """What the main job trains; the defaults fit in minutes on a 2-core CPU.

    The ST-Adapter follows the paper's SSv2 layout (two adapters per block, before MHSA and before the MLP,
    kernel (3,1,1), no activation); on a random-init backbone it needs many distinct clips more than many
    epochs, so the set is large and the clips small.
    """

    clips_per_class: int = 320  # 240 train + 80 val per class, 8 classes
    size: int = 48  # frame width and height of the synthetic clips
    seed: int = 0
    backbone: str = DEMO_BACKBONE
    frames: int = 8
    sampling: str = "segments"  # or "dense" (stride 2 over the 16 written frames)
    width: int = 64  # the bottleneck width r
    positions: tuple[str, ...] = ("attn", "mlp")
    epochs: float = 12
    batch_size: int = 8
    lr_per_256: float = 0.032  # 1e-3 at batch 8
    conv_lr_mult: float = 10.0
    dropout: float = 0.0
    probe_epochs: float = 5
    probe_lr_per_256: float = 0.1

    def __post_init__(self) -> None:
        if self.clips_per_class < 4:
            raise ConfigError(f"the demo needs at least 4 clips per class, got {self.clips_per_class}")


@dataclass
class MethodResult:
    method: str
    top1: float
    trainable_params: int
    seconds: float
    bundle_dir: Path | None
    registered: str | None = None


def _train_one(method: str, task: str, s: DemoSettings, ds: SynthSet, out: Path, log: Callable[[str], None],
               progress: bool, registry: Registry | str | None = None, register: bool = False) -> MethodResult:
    from stadapter.training.api import resolve_recipe, train_task
    from stadapter.video.datasets import load_annotations

    probe = method == "linear-probe"
    adapter: dict[str, Any] = dict(method=method, width=s.width, positions=s.positions, dropout=s.dropout)
    train = dict(epochs=s.probe_epochs if probe else s.epochs, batch_size=s.batch_size,
                 lr_per_256=s.probe_lr_per_256 if probe else s.lr_per_256, conv_lr_mult=s.conv_lr_mult,
                 warmup_epochs=0.25, eval_every=0, seed=s.seed, num_workers=0, checkpoint_every=10_000,
                 cache_clips=True, lr_ref_batch=None)  # the rates above are tuned as absolute rates
    spec = dict(num_frames=s.frames, sampling=s.sampling, frame_stride=2, train_crop="random", scale_range=(1.0, 1.1),
                flip=False, temporal_views=1, spatial_views=1)
    recipe = resolve_recipe(task, "custom", adapter, spec, train)
    tr = load_annotations(ds.train, split="train")
    va = load_annotations(ds.val, split="val", classes=tr.classes)
    outcome = train_task(task, recipe, tr.samples, tr.classes, va.samples, s.backbone, "none", out / method,
                         device="cpu", log=log, progress=progress,
                         extra={"data": {"train": str(ds.train), "val": str(ds.val), "num_train": len(tr.samples),
                                         "kind": "stadapter data synth", "seed": s.seed}},
                         register=register, registry=registry, source={"kind": "demo"}, data="stadapter data synth",
                         overwrite=True)
    top1 = float((outcome.metrics or {}).get("top1", float("nan")))
    return MethodResult(method, top1, outcome.trainable_params, outcome.seconds, outcome.bundle_dir,
                        outcome.registered)


def run_demo(out: Path, settings: DemoSettings | None = None, register: bool = False,
             registry: Registry | str | None = None, log: Callable[[str], None] = print,
             progress: bool = True) -> dict[str, Any]:
    """Generate the synthetic set under ``out/data`` (reused when it is already there with the same settings),
    train both methods under ``out/runs``, and return their figures. With ``register``, the ST-Adapter bundle
    is registered as task ``demo-motion`` in ``registry`` (an open registry or a database URL; None: the
    default database) and its reference (``demo-motion:1``) is in the figures."""
    import json
    import time

    from stadapter.video.synthetic import CLASSES, DEFAULT_MOTION, SynthSet, generate

    if register and (registry is None or isinstance(registry, str)):
        from stadapter.registry import open_registry

        with open_registry(registry) as reg:  # a bad database fails here, before minutes of training
            return run_demo(out, settings, register, reg, log, progress)
    s = settings or DemoSettings()
    start = time.monotonic()
    data = out / "data"
    marker = data / "synth.json"
    want = {"seed": s.seed, "clips_per_class": s.clips_per_class, "size": s.size,
            "motion": json.loads(json.dumps(dataclasses.asdict(DEFAULT_MOTION)))}
    if marker.exists() and all(json.loads(marker.read_text()).get(k) == v for k, v in want.items()):
        meta = json.loads(marker.read_text())
        ds = SynthSet(data, data / "train.txt", data / "val.txt", data / "labels.json", CLASSES,
                      meta["num_train"], meta["num_val"])
        log(f"reusing the synthetic set in {data}")
    else:
        log(f"writing the synthetic motion set ({s.clips_per_class} clips x {len(CLASSES)} classes) to {data}")
        ds = generate(data, seed=s.seed, clips_per_class=s.clips_per_class, size=s.size)
    results = []
    for method in ("st-adapter", "linear-probe"):
        log(f"training {method} on the frozen '{s.backbone}' backbone")
        adapters = method == "st-adapter"
        result = _train_one(method, "demo-motion" if adapters else "demo-motion-probe", s, ds, out / "runs", log,
                            progress, registry, register and adapters)
        results.append(result)
    return {"settings": dataclasses.asdict(s), "num_train": ds.num_train, "num_val": ds.num_val,
            "chance": 1 / len(CLASSES), "seconds": time.monotonic() - start,
            "methods": {r.method: {"top1": r.top1, "trainable_params": r.trainable_params,
                                   "train_seconds": r.seconds, "bundle": str(r.bundle_dir) if r.bundle_dir else None,
                                   "registered": r.registered} for r in results}}
