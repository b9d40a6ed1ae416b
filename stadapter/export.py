"""One registered task as a standard model: ONNX or TorchScript, with a JSON sidecar.

The exported model is the backbone, that task's adapters and its head in one graph (the adapter set is baked
in as constants): a normalised clip tensor (B, 3, T, H, W) float32 in, logits (B, num_classes) out, B dynamic.
The sidecar (``PATH.json``) says how to make that input and read that output: labels, frames, sampling, test
views, image size, mean/std, the backbone and its fingerprint. Softmax over the classes, averaged over a clip's
views, gives what ``stadapter predict`` prints.

Every export is checked before it is kept: the written file is loaded back (onnxruntime for ONNX,
``torch.jit.load`` for TorchScript) and run on a random clip batch of another batch size than the one traced;
its logits must match the eager model's within :data:`TOLERANCE`.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from stadapter import __version__
from stadapter.bundle import Bundle
from stadapter.errors import InputError
from stadapter.model.backbone import Backbone
from stadapter.model.video_vit import VideoViT

FORMATS = ("bundle", "onnx", "torchscript")
TOLERANCE = 1e-4  # max |logit difference| between the exported model and the eager one (fp32, CPU)
ONNX_OPSET = 18


class TaskModel(nn.Module):
    """(B, 3, T, H, W) normalised clips -> logits (B, num_classes): the eager forward of one task, with its
    adapter set held as buffers so that tracing bakes it in."""

    def __init__(self, backbone: Backbone, bundle: Bundle) -> None:
        super().__init__()
        self.model = VideoViT(backbone, bundle.adapter, bundle.spec.num_frames).eval()
        self.model.bind(bundle.tensors)  # checks every key and shape
        self.keys = sorted(bundle.tensors)
        for i, key in enumerate(self.keys):
            self.register_buffer(f"t{i}", bundle.tensors[key].detach().to(torch.float32).contiguous())

    def tensors(self) -> Mapping[str, Tensor]:
        return {key: getattr(self, f"t{i}") for i, key in enumerate(self.keys)}

    def forward(self, clips: Tensor) -> Tensor:
        return self.model(clips.transpose(1, 2), self.tensors())


@dataclass(frozen=True)
class ExportResult:
    path: Path
    sidecar: Path
    format: str
    seconds: float  # tracing and writing the file
    check_seconds: float  # the eager run and the exported file's run on the check batch
    max_abs_diff: float  # exported vs eager logits on the check batch


def sidecar(bundle: Bundle, backbone: Backbone, fmt: str, ref: str | None) -> dict[str, Any]:
    s, (h, w) = bundle.spec, backbone.image_size
    return {
        "format": fmt, "task": bundle.task, "version": ref, "stadapter_version": __version__,
        "input": {"name": "clips", "shape": ["batch", 3, s.num_frames, h, w], "dtype": "float32",
                  "layout": "B, C=3 (RGB), T, H, W; pixels scaled to [0, 1], minus mean, over std"},
        "output": {"name": "logits", "shape": ["batch", len(bundle.labels)], "dtype": "float32",
                   "postprocess": "softmax over classes, averaged over a clip's views"},
        "labels": list(bundle.labels), "frames": s.num_frames,
        "sampling": {"kind": s.sampling, "frame_stride": s.frame_stride if s.sampling == "dense" else None},
        "views": {"temporal": s.temporal_views, "spatial": s.spatial_views},
        "image_size": [h, w], "mean": list(backbone.mean), "std": list(backbone.std),
        "backbone": {"spec": str(backbone.spec), "weights": getattr(backbone, "weights", None),
                     "fingerprint": backbone.fingerprint()},
        "adapter": bundle.adapter.to_dict(),
    }


def export_task(bundle: Bundle, backbone: Backbone, path: Path, fmt: str, ref: str | None = None,
                batch: int = 2) -> ExportResult:
    """Write ``bundle`` on ``backbone`` as ``fmt`` (onnx, torchscript) to ``path`` and its sidecar to
    ``path.json``; both are published only after the exported model matched the eager one."""
    if fmt not in ("onnx", "torchscript"):
        raise InputError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    path = Path(path)
    side = path.with_name(path.name + ".json")
    for p in (path, side):
        if os.path.lexists(p):  # a symlink too, even one pointing nowhere
            raise InputError(f"{p} already exists; remove it or pick another path")
    if not path.parent.is_dir():
        raise InputError(f"directory {path.parent} does not exist")
    bundle.check_backbone(backbone.fingerprint(), str(backbone.spec))
    model = TaskModel(backbone.float().to("cpu"), bundle).eval()
    T, (h, w) = bundle.spec.num_frames, backbone.image_size
    gen = torch.Generator().manual_seed(0)
    example = torch.randn(batch, 3, T, h, w, generator=gen)
    check = torch.randn(batch + 1, 3, T, h, w, generator=gen)
    start = time.perf_counter()
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    side_tmp = tmp.with_name(tmp.name + ".json")
    try:
        with torch.no_grad():
            if fmt == "onnx":
                _export_onnx(model, example, tmp)
            else:
                _export_torchscript(model, example, tmp)
            seconds = time.perf_counter() - start
            expected = model(check)
            got = _run_onnx(tmp, check) if fmt == "onnx" else load_torchscript(tmp)(check)
        diff = float((got - expected).abs().max())
        if not diff <= TOLERANCE:
            raise InputError(f"the exported {fmt} model differs from the eager one by {diff:.2e} in its logits "
                             f"(tolerance {TOLERANCE:g}); nothing was written")
        side_tmp.write_text(json.dumps(sidecar(bundle, backbone, fmt, ref), indent=1, ensure_ascii=False) + "\n")
        os.replace(side_tmp, side)
        try:
            os.replace(tmp, path)
        except OSError:
            side.unlink(missing_ok=True)  # no sidecar without its model
            raise
    finally:
        tmp.unlink(missing_ok=True)
        side_tmp.unlink(missing_ok=True)
    return ExportResult(path, side, fmt, seconds, time.perf_counter() - start - seconds, diff)


def _export_torchscript(model: TaskModel, example: Tensor, dest: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about Python-side shape checks (constant here)
        traced = torch.jit.trace(model, example, check_trace=False)
    traced.save(str(dest))


def load_torchscript(path: Path) -> Any:
    """A TorchScript export loaded back on the CPU (torch.jit.load, its deprecation warning silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return torch.jit.load(str(path), map_location="cpu")


def _export_onnx(model: TaskModel, example: Tensor, dest: Path) -> None:
    try:
        import onnx  # noqa: F401 - the exporter needs it
    except ImportError as e:
        raise InputError("ONNX export needs the onnx packages: pip install 'stadapter[export]'") from e
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = torch.export.Dim("batch", min=1, max=1024)
        program = torch.onnx.export(model, (example,), input_names=["clips"], output_names=["logits"],
                                    dynamic_shapes=({0: batch},), opset_version=ONNX_OPSET, dynamo=True,
                                    external_data=False, verbose=False)
        assert program is not None
        program.save(str(dest), external_data=False)


def _run_onnx(path: Path, clips: Tensor) -> Tensor:
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise InputError("checking an ONNX export needs onnxruntime: pip install 'stadapter[export]'") from e
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(["logits"], {"clips": clips.numpy()})
    return torch.from_numpy(out)


def export_ref(ref: str, path: Path, fmt: str, *, registry: Any = None, weights: str | None = None) -> ExportResult:
    """Export the registry version ``ref`` (see :func:`export_task`); its backbone is built from the bundle's
    spec and weights (``weights`` overrides them, e.g. a local copy of a pretrained file)."""
    from stadapter.model.loading import load_backbone
    from stadapter.registry import opened
    from stadapter.registry.api import parse_ref

    parse_ref(ref)
    with opened(registry) as reg:
        info = reg.resolve(ref)
        bundle = reg.load_bundle(info)  # the version just resolved (an alias moved meanwhile changes nothing)
    bb = load_backbone(bundle.backbone["spec"], weights if weights is not None else bundle.backbone.get("weights"),
                       fingerprint=bundle.backbone.get("fingerprint"))
    return export_task(bundle, bb, path, fmt, ref=info.ref)


__all__ = ["FORMATS", "TOLERANCE", "ExportResult", "TaskModel", "export_ref", "export_task", "load_torchscript",
           "sidecar"]
