"""`stadapter predict` on the real clips in ../shared/data/videos, with registered bundles."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from stadapter.cli.main import app
from stadapter.config import TaskSpec
from stadapter.model.loading import load_backbone
from stadapter.registry import open_registry
from stadapter.video.datasets import Sample, VideoClipDataset

from conftest import ROOT, VIDEOS, need_shared
from test_runtime_support import make_bundle, register

runner = CliRunner()
LABELS = {  # the real classes of the labelled clips; the weights are random (a trained bundle is separate)
    "actions": ["wave", "cartwheel", "SoccerJuggling", "riding a segway", "basketball"],
}
SPECS = {
    "actions": TaskSpec(num_frames=4, sampling="dense", frame_stride=4, temporal_views=3, spatial_views=1),
    "motion": TaskSpec(num_frames=4, sampling="segments", spatial_views=3, flip=False, direction_sensitive=True),
}


@pytest.fixture
def world(home, tmp_path, tiny_backbone):
    with open_registry() as reg:
        a = register(reg, tmp_path, tiny_backbone, "actions", seed=1, spec=SPECS["actions"],
                     labels=LABELS["actions"], num_classes=5, width=8)
        m = register(reg, tmp_path, tiny_backbone, "motion", seed=2, spec=SPECS["motion"], num_classes=3,
                     width=16, positions=("attn", "mlp"))
    return {"actions": a, "motion": m}


def reference_probs(world, name, clip, backbone) -> torch.Tensor:
    """The task alone: views through the training code's evaluation dataset, then the reference model."""
    _, tensors, model = world[name]
    ds = VideoClipDataset([Sample(clip, 0)], SPECS[name], backbone.image_size[0], backbone.mean, backbone.std,
                          train=False)
    views, _ = ds.load(0)
    with torch.no_grad():
        return model(views, tensors).softmax(-1).mean(0)


def test_predict_real_clips_with_two_tasks_json(world, tiny_backbone):
    clips = [need_shared(VIDEOS / "labelled" / "TrumanShow_wave_f_nm_np1_fr_med_26.avi"),
             VIDEOS / "labelled" / "basketball.mp4", VIDEOS / "footage" / "carphone_distorted.mp4"]
    r = runner.invoke(app, ["predict", "--task", "actions,motion", *map(str, clips), "--top-k", "10", "--json",
                            "--device", "cpu"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["backbone"].startswith("open_clip:ViT-B-16") and out["device"].startswith("CPU")
    assert [res["clip"] for res in out["results"]] == [str(c) for c in clips]
    for res, clip in zip(out["results"], clips):
        assert [t["task"] for t in res["tasks"]] == ["actions", "motion"]
        assert [t["views"] for t in res["tasks"]] == [3, 3]
        for t in res["tasks"]:
            labels = list(world[t["task"]][0].labels)
            got = torch.zeros(len(labels))
            for item in t["top"]:
                got[labels.index(item["label"])] = item["prob"]
            assert torch.allclose(got, reference_probs(world, t["task"], clip, tiny_backbone), atol=1e-5)
            probs = [item["prob"] for item in t["top"]]
            assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 1) < 1e-4


def test_predict_prints_a_table_of_top_k(world):
    clip = need_shared(VIDEOS / "labelled" / "v_SoccerJuggling_g23_c01.avi")
    r = runner.invoke(app, ["predict", "-t", "actions:1", str(clip), "-k", "2", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "actions:1" in r.stdout and "probability" in r.stdout
    rows = [line for line in r.stdout.splitlines() if "│" in line]
    assert sum(label in line for line in rows for label in LABELS["actions"]) == 2


def test_predict_errors_are_one_clear_line(world, tmp_path, tiny_backbone):
    clip = need_shared(VIDEOS / "labelled" / "basketball.mp4")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"definitely not a video" * 100)
    other = load_backbone("open_clip:ViT-B-16?image_size=32&patch_size=8&width=64&layers=2&head_width=16", "none")
    with open_registry() as reg:
        reg.register(make_bundle(tmp_path / "foreign", other, "foreign", seed=3)[0])
    cases = [
        (["predict", "--task", "actions,nosuchtask", str(clip)], "no task 'nosuchtask'"),
        (["predict", "--task", "actions", str(bad)], "cannot open as a video"),
        (["predict", "--task", "actions", str(tmp_path / "missing.mp4")], "no such video file"),
        (["predict", "--task", "actions,foreign", str(clip)], other.fingerprint()),
    ]
    for args, needle in cases:
        r = runner.invoke(app, [*args, "--device", "cpu"])
        assert r.exit_code == 1, (args, r.output)
        assert needle in r.output and "Traceback" not in r.output, r.output
        assert r.output.strip().startswith("error:")
    # the other backbone's message names both fingerprints
    r = runner.invoke(app, ["predict", "--task", "actions,foreign", str(clip), "--device", "cpu"])
    assert tiny_backbone.fingerprint() in r.output


def test_predict_command_in_a_fresh_process(world, home):
    clip = need_shared(VIDEOS / "footage" / "carphone_pristine.mp4")
    r = subprocess.run([sys.executable, "-m", "stadapter", "predict", "--task", "motion", str(clip), "--json",
                        "--device", "cpu"], capture_output=True, text=True, cwd=ROOT,
                       env={**__import__("os").environ, "STADAPTER_HOME": str(home)})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["results"][0]["tasks"][0]["version"] == "motion:1"
