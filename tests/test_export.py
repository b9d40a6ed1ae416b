"""`stadapter export REF PATH --format onnx|torchscript`: one task as a standard model whose logits are the
engine's on real clips (fp32, CPU), with a JSON sidecar that says how to feed it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import VIDEOS, need_shared
from stadapter.cli.main import app
from stadapter.export import load_torchscript
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.inputs import task_views
from test_official import SMALL, clip_weights, official_state, training_checkpoint
from test_runtime_support import register

runner = CliRunner()
CLIPS = ["labelled/v_SoccerJuggling_g23_c01.avi", "labelled/basketball.mp4", "footage/carphone_distorted.mp4"]


def engine_logits(ref: str, clips) -> list[torch.Tensor]:
    """Each clip's test views and the engine's logits for them (V, C)."""
    with open_registry() as reg:
        engine = Engine.open(reg, tasks=[ref], device="cpu")
        try:
            h = engine.resolve(ref)
            out = []
            for clip in clips:
                (views,) = task_views(engine, clip, [h])
                out.append((views, torch.stack(engine.forward(list(views), [h] * len(views)))))
            return out
        finally:
            engine.close()


def run_export(ref, path, fmt):
    r = runner.invoke(app, ["export", ref, str(path), "--format", fmt])
    assert r.exit_code == 0, r.output
    assert f"exported {ref} as {fmt} to {path}" in r.output
    return json.loads(path.with_name(path.name + ".json").read_text())


def check_formats(ref, tmp_path, clips):
    import onnxruntime as ort

    expected = engine_logits(ref, clips)
    onnx_side = run_export(ref, tmp_path / "task.onnx", "onnx")
    ts_side = run_export(ref, tmp_path / "task.pt", "torchscript")
    session = ort.InferenceSession(str(tmp_path / "task.onnx"), providers=["CPUExecutionProvider"])
    scripted = load_torchscript(tmp_path / "task.pt")
    for views, logits in expected:
        x = views.transpose(1, 2).contiguous()  # (V, 3, T, H, W)
        (onnx_out,) = session.run(["logits"], {"clips": x.numpy()})
        with torch.no_grad():
            ts_out = scripted(x)
        assert np.abs(onnx_out - logits.numpy()).max() < 1e-4
        assert float((ts_out - logits).abs().max()) < 1e-4
        assert float(logits.std()) > 1e-2  # the logits differ between classes: the comparison can fail
    return onnx_side, ts_side


@pytest.mark.parametrize("layout", [
    pytest.param(dict(num_classes=5, width=8, positions=("attn", "mlp")), id="temporal-kernel", marks=pytest.mark.slow),
    pytest.param(dict(num_classes=4, width=12, kernel=(3, 3, 3), last_k=1), id="spatial-kernel-last-block"),
])
def test_st_adapter_task_exports_match_the_engine(home, tmp_path, tiny_backbone, layout):
    from stadapter.config import TaskSpec

    clips = [need_shared(VIDEOS / c) for c in CLIPS]
    spec = TaskSpec(num_frames=4, sampling="dense", frame_stride=4, temporal_views=2, spatial_views=3)
    with open_registry() as reg:
        info, _, _ = register(reg, tmp_path, tiny_backbone, "actions", seed=3, spec=spec, **layout)
    side, ts_side = check_formats("actions", tmp_path, clips)
    assert side["version"] == "actions:1" and side["format"] == "onnx" and ts_side["format"] == "torchscript"
    assert side["labels"] == info.labels and side["frames"] == 4
    assert side["input"]["shape"] == ["batch", 3, 4, 32, 32]
    assert side["views"] == {"temporal": 2, "spatial": 3}
    assert side["sampling"] == {"kind": "dense", "frame_stride": 4}
    assert side["mean"] == list(tiny_backbone.mean) and side["std"] == list(tiny_backbone.std)
    assert side["backbone"]["fingerprint"] == info.backbone_fingerprint


@pytest.mark.slow
def test_imported_official_task_exports_match_the_engine(home, tmp_path):
    clips = [need_shared(VIDEOS / c) for c in CLIPS[:2]]
    weights = tmp_path / "clip.pt"
    clip_weights(SMALL, weights)
    training_checkpoint(official_state(range(2, 6), ("attn", "mlp"), 174, seed=5), tmp_path / "checkpoint-1.pth")
    r = runner.invoke(app, ["import-official", str(tmp_path / "checkpoint-1.pth"), "--task", "ssv2", "--preset",
                            "ssv2", "--backbone", SMALL, "--weights", str(weights)])
    assert r.exit_code == 0, r.output
    side, _ = check_formats("ssv2", tmp_path, clips)
    assert len(side["labels"]) == 174 and side["labels"][0] == "Approaching something with your camera"
    assert side["views"] == {"temporal": 1, "spatial": 3} and side["sampling"]["kind"] == "segments"
    assert side["mean"] == pytest.approx([0.48145466, 0.4578275, 0.40821073])


def test_export_refusals_are_one_line(home, tmp_path, tiny_backbone):
    with open_registry() as reg:
        register(reg, tmp_path, tiny_backbone, "actions")
    r = runner.invoke(app, ["export", "actions", str(tmp_path / "m.bin"), "--format", "tflite"])
    assert r.exit_code == 1
    assert r.output.strip().splitlines() == [
        "error: unknown --format 'tflite'; choose one of bundle, onnx, torchscript"]
    (tmp_path / "m.pt").write_bytes(b"keep me")
    r = runner.invoke(app, ["export", "actions", str(tmp_path / "m.pt"), "--format", "torchscript"])
    assert r.exit_code == 1 and "already exists" in r.output
    assert (tmp_path / "m.pt").read_bytes() == b"keep me"
    r = runner.invoke(app, ["export", "actions", str(tmp_path / "dir")])  # the default: the bundle directory
    assert r.exit_code == 0, r.output
    assert (tmp_path / "dir" / "config.json").is_file()
