"""Training: optimisation recipe, overfitting real clips, kill + resume, DDP equivalence, broken clips."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import VIDEOS, need_shared
from stadapter.config import TrainConfig
from stadapter.errors import ConfigError, StadapterError
from stadapter.training.api import resolve_recipe, train_task
from stadapter.training.metrics import average_views, classification_metrics
from stadapter.training.optim import lr_at, param_groups, scaled_lr
from stadapter.video.datasets import load_annotations

TINY = ["-b", "tiny", "--weights", "none", "--frames", "4", "--width", "16", "--num-workers", "0"]


def cli(*args: str, env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stadapter", *args], capture_output=True, text=True,
                          env=full_env, check=check, **kw)


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    cli("data", "synth", "--out", str(out), "--clips-per-class", "4", "--frames", "8", "--size", "32")
    return out


# -- recipe pieces ----------------------------------------------------------------------------------
def test_lr_scaling_warmup_and_cosine():
    cfg = TrainConfig(batch_size=64, lr_per_256=1e-3)
    assert scaled_lr(cfg) == pytest.approx(2.5e-4)
    peak, total, warm = 1.0, 100, 10
    assert lr_at(0, total, warm, peak) == pytest.approx(0.1)
    assert lr_at(9, total, warm, peak) == pytest.approx(1.0)
    assert lr_at(55, total, warm, peak) == pytest.approx(0.5)
    assert lr_at(99, total, warm, peak) < 0.01
    values = [lr_at(s, total, warm, peak) for s in range(warm, total)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_weight_decay_only_on_weights_and_conv_multiplier():
    t = {"adapters.0.attn.fc1.weight": torch.zeros(4, 8, requires_grad=True),
         "adapters.0.attn.fc1.bias": torch.zeros(4, requires_grad=True),
         "adapters.0.attn.conv.weight": torch.zeros(4, 1, 3, 1, 1, requires_grad=True),
         "backbone.visual.ln_post.weight": torch.zeros(8, requires_grad=True),
         "head.weight": torch.zeros(3, 8, requires_grad=True),
         "head.bias": torch.zeros(3, requires_grad=True)}
    groups = param_groups(t, TrainConfig(weight_decay=0.01, conv_lr_mult=10, head_lr_mult=0.1), lr=1.0)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == len(t)  # every trainable tensor in exactly one group
    assert by_id[id(t["adapters.0.attn.fc1.bias"])]["weight_decay"] == 0
    assert by_id[id(t["backbone.visual.ln_post.weight"])]["weight_decay"] == 0
    assert by_id[id(t["head.weight"])]["weight_decay"] == 0.01
    assert by_id[id(t["head.bias"])]["weight_decay"] == 0
    assert by_id[id(t["adapters.0.attn.conv.weight"])]["lr"] == 10.0
    assert by_id[id(t["head.weight"])]["lr"] == by_id[id(t["head.bias"])]["lr"] == pytest.approx(0.1)
    assert by_id[id(t["adapters.0.attn.fc1.weight"])]["lr"] == 1.0
    with pytest.raises(ConfigError, match="head_lr_mult"):
        TrainConfig(head_lr_mult=0)


def test_metrics_and_view_averaging():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6], [0.5, 0.4, 0.1], [0.2, 0.5, 0.3]])
    m = classification_metrics(probs, torch.tensor([0, 2, 1, 1]), ["a", "b", "c"])
    assert m["top1"] == pytest.approx(0.75) and m["top5"] == 1.0
    assert m["per_class"] == {"a": 1.0, "b": 0.5, "c": 1.0}
    assert m["confusion"] == [[1, 0, 0], [1, 1, 0], [0, 0, 1]]
    logits = torch.tensor([[[10.0, 0.0], [0.0, 1.0]]])  # one clip, two views
    assert torch.allclose(average_views(logits), (logits.softmax(-1)).mean(1))


# -- real training ----------------------------------------------------------------------------------
def test_tiny_run_overfits_real_clips(tmp_path, home):
    videos = need_shared(VIDEOS) / "labelled"
    picks = {"wave": "TrumanShow_wave_f_nm_np1_fr_med_26.avi", "juggle": "v_SoccerJuggling_g23_c01.avi",
             "segway": "R6llTwEh07w.mp4", "cartwheel": "hmdb51_Turnk_r_Pippi_Michel_cartwheel_f_cm_np2_le_med_6.avi"}
    listing = tmp_path / "train.txt"
    listing.write_text("".join(f"{videos / f} {label}\n" for label, f in picks.items()))
    ann = load_annotations(listing)
    recipe = resolve_recipe("real", None, adapter={"width": 16},
                            spec={"num_frames": 4, "scale_range": (1.0, 1.0)},
                            train={"epochs": 30, "batch_size": 4, "lr_per_256": 0.25, "warmup_epochs": 2,
                                   "num_workers": 0})
    out = train_task("real", recipe, ann.samples, ann.classes, ann.samples, "tiny", "none", tmp_path / "run",
                     log=lambda m: None, progress=False)
    assert out.metrics["top1"] == 1.0, out.metrics
    assert out.metrics["num_clips"] == 4 and out.skipped == 0
    cfg = json.loads((out.bundle_dir / "config.json").read_text())
    assert cfg["backbone"]["spec"].startswith("open_clip:ViT-B-16") and cfg["adapter"]["num_classes"] == 4
    assert json.loads((out.bundle_dir / "labels.json").read_text()) == ann.classes
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert log[0]["step"] == 1 and {"loss", "lr", "clips_per_s"} <= set(log[0])
    assert (tmp_path / "run" / "curves.png").stat().st_size > 1000

    # the trained bundle, registered, predicts each real clip's own label through `stadapter predict`
    from stadapter.registry import open_registry

    with open_registry() as reg:
        assert reg.register(out.bundle_dir, task="real").ref == "real:1"
    r = cli("predict", "--task", "real", *(str(videos / f) for f in picks.values()), "--top-k", "1", "--json",
            env={"STADAPTER_HOME": str(home)})
    got = json.loads(r.stdout)["results"]
    assert [res["tasks"][0]["top"][0]["label"] for res in got] == list(picks), got


def _tensors(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "bundle" / "adapter.safetensors"))


def test_kill_and_resume_reaches_the_same_weights(synth, tmp_path):
    args = ["train", "--task", "motion", "--train", str(synth / "train.txt"), *TINY, "--epochs", "8",
            "--batch-size", "4", "--lr", "0.125", "--checkpoint-every", "3", "--no-register", "--seed", "3"]
    cli(*args, "--out", str(tmp_path / "whole"))
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "stadapter", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        log = killed / "metrics.jsonl"
        if (killed / "checkpoint.pt").exists() and log.exists() and len(log.read_text().splitlines()) >= 7:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed / "bundle").exists()
    done = cli(*args, "--out", str(killed), "--resume")
    assert "resuming from step" in done.stderr
    a, b = _tensors(tmp_path / "whole"), _tensors(killed)
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-6, f"resumed weights differ by {worst}"
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)), "the metrics log has no duplicated steps after resuming"


def test_resume_refuses_a_checkpoint_of_another_run(synth, tmp_path):
    args = ["train", "--task", "motion", "--train", str(synth / "train.txt"), *TINY, "--epochs", "1",
            "--batch-size", "4", "--no-register", "--out", str(tmp_path / "run")]
    cli(*args)
    r = cli(*args[:-2], "--out", str(tmp_path / "run"), "--resume", "--seed", "9", check=False)
    assert r.returncode == 1 and "different run" in r.stderr and "Traceback" not in r.stderr


def test_ddp_two_processes_match_one(synth, tmp_path):
    args = ["train", "--task", "motion", "--train", str(synth / "train.txt"), *TINY, "--epochs", "2",
            "--batch-size", "8", "--lr", "0.25", "--no-register"]
    cli(*args, "--out", str(tmp_path / "one"))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        "-m", "stadapter", *args, "--out", str(tmp_path / "two")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = _tensors(tmp_path / "one"), _tensors(tmp_path / "two")
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    moved = max(float((a[k] - b[k]).abs().max()) for k in a if k.startswith("head"))
    assert worst < 1e-4, f"DDP differs from one process by {worst}"
    assert float(a["head.weight"].abs().max()) > 0 and moved < 1e-4


def test_broken_clips_are_skipped_and_counted(synth, tmp_path):
    train = (synth / "train.txt").read_text().splitlines()
    first = synth / train[0].split()[0]
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes(first.read_bytes()[: first.stat().st_size // 3])
    listing = tmp_path / "train.txt"
    listing.write_text("\n".join([f"{synth / line.split()[0]} {line.split()[1]}" for line in train]
                                 + [f"{tmp_path / 'empty.mp4'} 0", f"{tmp_path / 'truncated.mp4'} 1"]) + "\n")
    ann = load_annotations(listing)
    recipe = resolve_recipe("motion", None, adapter={"width": 8}, spec={"num_frames": 4},
                            train={"epochs": 2, "batch_size": 4, "num_workers": 0})
    messages: list[str] = []
    out = train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "run",
                     log=messages.append, progress=False)
    assert out.skipped >= 2
    assert any("empty.mp4" in m for m in messages) and any("truncated.mp4" in m for m in messages)
    # most clips broken: a clear error naming examples, not a long run of skips
    listing.write_text("".join(f"{tmp_path / 'empty.mp4'} {i % 2}\n" for i in range(12)) + f"{first} 0\n")
    ann = load_annotations(listing)
    with pytest.raises(StadapterError, match="could not be decoded.*empty.mp4"):
        train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "run2",
                   log=lambda m: None, progress=False)


def test_train_registers_and_eval_reports(synth, tmp_path):
    env = {"STADAPTER_HOME": str(tmp_path / "home")}
    r = cli("train", "--task", "motion", "--train", str(synth / "train.txt"), "--val", str(synth / "val.txt"),
            *TINY, "--epochs", "1", "--batch-size", "4", "--out", str(tmp_path / "run"), env=env)
    assert "registered as motion:1" in r.stdout
    r = cli("eval", "--task", "motion", "--val", str(synth / "val.txt"), "--json", env=env)
    m = json.loads(r.stdout)
    assert m["num_clips"] == len((synth / "val.txt").read_text().splitlines())
    assert 0 <= m["top1"] <= 1 and len(m["confusion"]) == 8
    bad = cli("eval", "--task", "nosuchtask", "--val", str(synth / "val.txt"), env=env, check=False)
    assert bad.returncode == 1 and "nosuchtask" in bad.stderr and "Traceback" not in bad.stderr


def test_train_task_registers_when_asked_and_evaluate_task_reads_ref_or_bundle(synth, tmp_path, home):
    from stadapter.registry import open_registry
    from stadapter.training.api import evaluate_task

    ann = load_annotations(synth / "train.txt")
    recipe = resolve_recipe("motion", None, adapter={"width": 8}, spec={"num_frames": 4},
                            train={"epochs": 1, "batch_size": 4, "num_workers": 0})
    db = str(tmp_path / "registry.db")  # a database URL, opened and closed by train_task
    open_registry(db, upgrade=True).close()
    quiet = {"log": lambda m: None, "progress": False, "max_steps": 2, "device": "auto"}
    out = train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "run", **quiet,
                     register=True, registry=db, data=str(synth / "train.txt"))
    assert out.registered == "motion:1" and out.bundle_dir == tmp_path / "run" / "bundle"
    unregistered = train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none",
                              tmp_path / "run2", **quiet)
    assert unregistered.registered is None and unregistered.bundle_dir is not None
    with open_registry(db) as reg:
        info = reg.resolve("motion")
        assert (info.ref, info.data) == ("motion:1", str(synth / "train.txt"))
        assert info.source == {"kind": "train", "run": str(tmp_path / "run")}
        # an open registry, and a lineage of the caller's own (as the demo records)
        again = train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "run3",
                           **quiet, register=True, registry=reg, source={"kind": "demo"})
        assert again.registered == "motion:2" and reg.resolve("motion:2").source == {"kind": "demo"}
        assert [v.version for v in reg.list_versions("motion")] == [1, 2]

    val = synth / "val.txt"
    by_ref = evaluate_task(val, ref="motion:1", registry=db, log=lambda m: None)
    by_dir = evaluate_task(val, bundle_dir=out.bundle_dir, device="cpu", log=lambda m: None)
    assert by_ref.task == by_dir.task == "motion" and by_ref.clips == len(val.read_text().splitlines())
    assert by_ref.metrics == by_dir.metrics  # the registered bundle is the trained one, evaluated alike
    assert by_ref.metrics["num_clips"] + by_ref.metrics["skipped_clips"] == by_ref.clips
    assert 0 <= by_ref.metrics["top1"] <= 1 and len(by_ref.metrics["confusion"]) == len(ann.classes)
    for wrong in ({}, {"ref": "motion:1", "bundle_dir": out.bundle_dir}):
        with pytest.raises(ConfigError, match="a registry ref or a bundle directory"):
            evaluate_task(val, registry=db, **wrong)


def test_cpu_bf16_autocast_trains_close_to_fp32_and_keeps_fp32_weights(synth, tmp_path):
    ann = load_annotations(synth / "train.txt")
    runs = {}
    for bf16 in (False, True):
        recipe = resolve_recipe("motion", None, adapter={"width": 8}, spec={"num_frames": 4},
                                train={"epochs": 2, "batch_size": 4, "num_workers": 0, "lr_per_256": 0.00625,
                                       "cpu_bf16": bf16})
        out = train_task("motion", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / str(bf16),
                         log=lambda m: None, progress=False, device="cpu")
        runs[bf16] = load_file(str(out.bundle_dir / "adapter.safetensors"))
    fp32, bf16 = runs[False], runs[True]
    assert all(t.dtype == torch.float32 for t in bf16.values()), "bf16 autocast keeps the trained tensors fp32"
    diff = max(float((fp32[k] - bf16[k]).abs().max() / fp32[k].abs().max().clamp_min(1e-8)) for k in fp32)
    assert 0 < diff < 0.1, f"bf16 steps should be close to fp32 but not bit-equal (relative diff {diff})"
