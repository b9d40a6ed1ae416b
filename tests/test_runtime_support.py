"""Helpers shared by the runtime and server tests (no tests here): bundles with random, non-zero adapter
weights on the tiny random-init backbone, registered in a real registry under tmp_path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.model.video_vit import VideoViT

# Tasks of different class counts and adapter layouts (width, positions, blocks, activation, kernel, pool).
LAYOUTS = {
    "alpha": dict(num_classes=5, width=8),
    "beta": dict(num_classes=3, width=16, positions=("attn", "mlp")),
    "gamma": dict(num_classes=7, width=8, last_k=1, activation="gelu", pool="patch-mean"),
    "delta": dict(num_classes=4, width=12, kernel=(3, 3, 3)),
    "eps": dict(num_classes=6, method="adapter", width=8),
}


def random_set(model: VideoViT, seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * scale for k, v in model.init_adapter_set(g).items()}


def make_bundle(directory: Path, backbone, task: str, seed: int = 0, spec: TaskSpec | None = None,
                labels: list[str] | None = None, **adapter) -> tuple[Path, dict[str, torch.Tensor], VideoViT]:
    """A bundle with random adapter + head tensors; returns (dir, tensors, a VideoViT for reference runs)."""
    cfg = AdapterConfig(**{"num_classes": 5, "width": 8, **adapter})
    spec = spec or TaskSpec(num_frames=4, sampling="segments", flip=False)
    model = VideoViT(backbone, cfg, num_frames=spec.num_frames).eval()
    tensors = random_set(model, seed)
    labels = labels or [f"{task}-class-{i}" for i in range(cfg.num_classes)]
    Bundle(task=task, adapter=cfg, spec=spec,
           backbone={**backbone.describe(), "weights": getattr(backbone, "weights", "none"),
                     "fingerprint": backbone.fingerprint()},
           labels=labels, tensors=tensors).save(directory)
    return directory, tensors, model


def register(reg, tmp: Path, backbone, task: str, seed: int = 0, **kw):
    """Make a bundle and register it; returns (VersionInfo, tensors, reference model)."""
    d, tensors, model = make_bundle(tmp / f"bundle-{task}-{seed}", backbone, task, seed, **kw)
    return reg.register(d), tensors, model


def clips(n: int, t: int = 4, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def reference(model: VideoViT, tensors, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x, tensors)


def write_clip(path: Path, frames: int = 24, size: tuple[int, int] = (48, 64), seed: int = 0) -> Path:
    """A small real H.264 clip (moving noise) written with PyAV."""
    import av

    rng = np.random.default_rng(seed)
    h, w = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        base = rng.integers(0, 255, (h, w * 2, 3), dtype=np.uint8)
        for i in range(frames):
            img = np.ascontiguousarray(base[:, i % w: i % w + w])
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
