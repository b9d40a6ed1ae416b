"""What training tells a newcomer and what it refuses (issue 19): the learning-rate rule and its warning, list
files with spaces in labels, `--out` reuse, plain log lines, an 80-column progress line, TensorBoard, figures in
the bundle and its model card (no local paths), threads per decode worker, the adapter width default."""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import VIDEOS, need_shared
from hub_fixtures import TOKEN, hub, hub_factory, online  # noqa: F401 - fixtures: the local Hub server
from stadapter.bundle import Bundle, check_bundle
from stadapter.config import AdapterConfig, TaskSpec, TrainConfig
from stadapter.errors import BundleError, ConfigError
from stadapter.model_card import render_card
from stadapter.recipes import preset
from stadapter.training.api import resolve_recipe, train_task
from stadapter.training.optim import scaled_lr
from stadapter.video.datasets import AnnotationError, load_annotations

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200), "grey": (128, 128, 128)}
TINY = ["-b", "tiny", "--weights", "none", "--frames", "4", "--num-workers", "0", "--cache-clips"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def cli(*args: str, env: dict | None = None, check: bool = True, cwd: Path | None = None):
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "stadapter", *args], capture_output=True, text=True,
                          env=full_env, check=check, cwd=cwd)


@pytest.fixture(scope="module")
def colours(tmp_path_factory) -> Path:
    """An easy set: 4 classes of flat noisy colour, 4 clips each (32x32, 8 frames), train.txt = val.txt."""
    from stadapter.video.synthetic import write_mp4

    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    lines = []
    for name, rgb in COLOURS.items():
        for i in range(4):
            frames = (np.array(rgb)[None, None, None] + rng.normal(0, 20, (8, 32, 32, 3))).clip(0, 255)
            write_mp4(root / f"{name}{i}.mp4", frames.astype(np.uint8))
            lines.append(f"{name}{i}.mp4 {name}\n")
    (root / "train.txt").write_text("".join(lines))
    (root / "val.txt").write_text("".join(lines))
    return root


def epoch_losses(run: Path, per_epoch: int) -> list[float]:
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    return [sum(losses[i:i + per_epoch]) / per_epoch for i in range(0, len(losses), per_epoch)]


@pytest.fixture(scope="module")
def trained(colours, tmp_path_factory):
    """`stadapter train` at batch 4 (the custom recipe's is 32) on the colour set, output not a terminal."""
    run = tmp_path_factory.mktemp("trained") / "run"
    r = cli("train", "--task", "colours", "--train", str(colours / "train.txt"), "--val", str(colours / "val.txt"),
            *TINY, "--batch-size", "4", "--epochs", "10", "--lr", "0.1", "--out", str(run), "--no-register")
    return run, r


# -- 1. the learning rate ----------------------------------------------------------------------------
def test_recipes_keep_the_papers_rate_at_their_own_batch():
    k400 = preset("k400").train
    assert k400.lr_ref_batch == 64 and scaled_lr(k400) == pytest.approx(1e-3 * 64 / 256)  # the paper's 2.5e-4
    assert scaled_lr(TrainConfig(**{**k400.to_dict(), "batch_size": 256})) == pytest.approx(1e-3)  # linear above
    assert scaled_lr(TrainConfig(**{**k400.to_dict(), "batch_size": 4})) == pytest.approx(2.5e-4)  # the floor
    assert scaled_lr(TrainConfig(batch_size=4, lr_per_256=1e-3)) == pytest.approx(1e-3 * 4 / 256)  # no recipe


@pytest.mark.slow
def test_small_batch_warns_and_learns_where_linear_scaling_does_not(trained, colours, tmp_path):
    run, r = trained
    assert "warning: batch 4 is far below the recipe's 32" in r.stderr
    assert "--lr is the learning rate per 256 clips" in r.stderr
    assert "batch 4 (the recipe's: 32), 4 step(s) per epoch x 10 epoch(s) = 40 steps" in r.stderr
    assert "peak learning rate 0.0125 (--lr 0.1 per 256 clips)" in r.stderr
    chance = math.log(len(COLOURS))
    ours = epoch_losses(run, 4)
    assert ours[-1] < 0.5 * chance, ours
    # today's rule before this change: linear at every batch (0.1 x 4 / 256), the same run otherwise
    ann = load_annotations(colours / "train.txt")
    recipe = resolve_recipe("colours", None, spec={"num_frames": 4},
                            train={"epochs": 10, "batch_size": 4, "lr_per_256": 0.1, "num_workers": 0,
                                   "cache_clips": True, "lr_ref_batch": None})
    messages: list[str] = []
    train_task("colours", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "linear",
               log=messages.append, progress=False)
    linear = epoch_losses(tmp_path / "linear", 4)
    assert linear[-1] > 0.6 * chance, linear
    assert not any("warning: batch" in m for m in messages)  # no recipe batch to fall short of


# -- 4. logs -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_plain_log_lines_when_output_is_not_a_terminal(trained):
    _, r = trained
    steps = re.findall(r"^step (\d+)/40  epoch \d+  loss [\d.]+  lr [\d.e+-]+  [\d.]+ clips/s  eta \d+:\d\d:\d\d$",
                       r.stderr, re.M)
    assert [int(s) for s in steps] == list(range(2, 41, 2))  # every 40 // 20 steps
    assert re.findall(r"^step (\d+)/40  validation top-1 [\d.]+  top-5 [\d.]+$", r.stderr, re.M) == ["20", "40"]
    assert "━" not in r.stderr  # no progress bar drawn into a log


def test_progress_line_fits_80_columns():
    from rich.console import Console

    from stadapter.training.monitor import Monitor

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    monitor = Monitor(12345, 1233, "a-task-with-a-long-name", print, console=console)
    assert monitor.bar is not None
    monitor.step(1234, 3, loss=12.3456, lr=1.234e-4, rate=1234.5)
    monitor.evaluation(1234, 0.75, 1.0)
    monitor.close()
    lines = [ANSI.sub("", line) for line in buf.getvalue().replace("\r", "\n").splitlines()]
    drawn = [line for line in lines if "loss 12.3456" in line]
    assert drawn and all(len(line) <= 80 for line in lines)
    assert all("…" not in line for line in lines), drawn
    assert "1234/12345" in drawn[-1] and "lr 1.2e-04" in drawn[-1] and "val 0.750" in drawn[-1]


@pytest.mark.slow
def test_tensorboard_event_files(colours, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ann = load_annotations(colours / "train.txt")
    recipe = resolve_recipe("colours", None, spec={"num_frames": 4},
                            train={"epochs": 1, "batch_size": 4, "num_workers": 0, "eval_every": 1})
    train_task("colours", recipe, ann.samples, ann.classes, ann.samples, "tiny", "none", tmp_path / "run",
               log=lambda m: None, progress=False, max_steps=3, log_to=("tensorboard",))
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3]
    assert [e.step for e in events.Scalars("val/top1")] == [3]
    with pytest.raises(ConfigError, match="unknown --log-to wandb"):
        train_task("colours", recipe, ann.samples, ann.classes, None, "tiny", "none", tmp_path / "run2",
                   log_to=("wandb",))


# -- 5. figures in the bundle, its card, the Hub --------------------------------------------------------
@pytest.mark.slow
def test_bundle_holds_curves_and_confusion_shown_in_its_card(trained):
    run, _ = trained
    checked = check_bundle(run / "bundle")  # the trust boundary accepts (and checks) the figures
    assert {"curves.png", "confusion.png"} <= set(checked.files)
    bundle = Bundle.load(run / "bundle")
    assert all(data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5000 for data in bundle.figures.values())
    card = render_card(bundle, repo="org/colours", version=1)
    assert "](curves.png)" in card and "](confusion.png)" in card
    assert str(run) not in card and str(run.parent) not in card
    assert bundle.adapter.width == 32  # the custom recipe's default: half the tiny backbone's width 64


def test_model_card_never_publishes_a_local_path(tiny_backbone, hub, tmp_path):  # noqa: F811 - the fixture
    from stadapter.hub import pull, push_version
    from stadapter.registry import open_registry

    config = AdapterConfig(num_classes=2, width=8)
    from stadapter.model.video_vit import VideoViT

    tensors = VideoViT(tiny_backbone, config, 4).init_adapter_set(torch.Generator().manual_seed(0))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    fig.savefig(tmp_path / "fig.png")
    plt.close(fig)
    secret = "/home/alice/private/models/dinov2_vits14.safetensors"
    bundle = Bundle(task="walk", adapter=config, spec=TaskSpec(num_frames=4), labels=["a", "b"], tensors=tensors,
                    backbone={**tiny_backbone.describe(), "weights": secret,
                              "fingerprint": tiny_backbone.fingerprint()},
                    extra={"recipe": "custom", "data": {"train": "/home/alice/private/data/train.txt"}},
                    figures={"curves.png": (tmp_path / "fig.png").read_bytes()})
    card = render_card(bundle, repo="org/walk", version=1)
    assert "/home/alice" not in card and "private" not in card
    assert "local file dinov2_vits14.safetensors" in card and tiny_backbone.fingerprint() in card
    assert '"train": "train.txt"' in card and "](curves.png)" in card
    from stadapter.model_card import public_weights

    assert public_weights("file:dinov2.safetensors") == "local file dinov2.safetensors"
    assert public_weights(r"C:\models\vit.pth") == "local file vit.pth" and public_weights("openai") == "openai"
    with open_registry(home=tmp_path / "home") as reg:
        info = reg.register(bundle.save(tmp_path / "bundle"))
        push_version(reg, info, "org/walk", endpoint=hub.url, token=TOKEN)
    got = pull("org/walk", "v1", endpoint=hub.url, token=TOKEN, dest=tmp_path / "pulled",
               cache_dir=tmp_path / "cache")
    assert (got.path / "curves.png").read_bytes() == (tmp_path / "fig.png").read_bytes()
    pushed = (got.path / "README.md").read_text()
    assert "](curves.png)" in pushed and "/home/alice" not in pushed


def test_png_figures_are_checked(tiny_backbone, tmp_path):
    config = AdapterConfig(num_classes=2, width=8)
    from stadapter.model.video_vit import VideoViT

    tensors = VideoViT(tiny_backbone, config, 4).init_adapter_set(torch.Generator().manual_seed(0))
    kw = dict(task="walk", adapter=config, spec=TaskSpec(num_frames=4), labels=["a", "b"], tensors=tensors,
              backbone={**tiny_backbone.describe(), "weights": "none", "fingerprint": tiny_backbone.fingerprint()})
    for name, data in (("x.png", b"not a png"), ("x.jpg", b"\x89PNG\r\n\x1a\n" + b"\0" * 8), ("../x.png", b"")):
        with pytest.raises(BundleError, match="is not a PNG file"):
            Bundle(**kw, figures={name: data})
    saved = Bundle(**kw).save(tmp_path / "b")
    (saved / "fake.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 24)  # the signature, then no IHDR chunk
    from stadapter.bundle import write_manifest

    write_manifest(saved)
    with pytest.raises(BundleError, match="refusing fake.png: not a PNG image"):
        check_bundle(saved)


# -- 3. --out reuse and --resume of a finished run ----------------------------------------------------
@pytest.mark.slow
def test_out_reuse_needs_resume_or_overwrite(colours, tmp_path):
    from stadapter.registry import open_registry

    home = tmp_path / "home"
    env = {"STADAPTER_HOME": str(home)}
    run = tmp_path / "run"
    args = ["train", "--task", "colours", "--train", str(colours / "train.txt"), *TINY, "--batch-size", "4",
            "--max-steps", "2", "--out", str(run)]
    assert "registered as colours:1" in cli(*args, env=env).stdout
    again = cli(*args, env=env, check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1
    assert "already holds a training run" in again.stderr and "--resume" in again.stderr
    assert "--overwrite" in again.stderr
    done = cli(*args, "--resume", env=env)
    assert "holds a finished run" in done.stderr and "not registered again" in done.stderr
    assert "nothing trained" in done.stdout and "registered as" not in done.stdout
    with open_registry(home=home) as reg:
        assert [v.version for v in reg.list_versions("colours")] == [1]
    # the same through the library, in-process (faster than three more commands)
    ann = load_annotations(colours / "train.txt")
    recipe = resolve_recipe("colours", None, spec={"num_frames": 4},
                            train={"batch_size": 4, "num_workers": 0, "cache_clips": True})
    same = dict(max_steps=2, log=lambda m: None, progress=False)
    with open_registry(home=home) as reg:
        again = train_task("colours", recipe, ann.samples, ann.classes, None, "tiny", "none", run, resume=True,
                           register=True, registry=reg, **same)
        assert again.finished_before and again.registered == "colours:2"
        (run / "metrics.jsonl").write_text((run / "metrics.jsonl").read_text() + '{"step": 99, "loss": 0}\n')
        fresh = train_task("colours", recipe, ann.samples, ann.classes, None, "tiny", "none", run,
                           overwrite=True, register=None, registry=reg, **same)
        assert not fresh.finished_before and fresh.registered == "colours:3"
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # started again: the old run's lines are gone
    with pytest.raises(ConfigError, match="pass one of them"):
        train_task("colours", recipe, ann.samples, ann.classes, None, "tiny", "none", run, resume=True,
                   overwrite=True, **same)


# -- 2. list files: labels with spaces ----------------------------------------------------------------
def test_list_labels_with_spaces_on_real_clips(tmp_path):
    videos = need_shared(VIDEOS) / "labelled"
    spaced = tmp_path / "clips" / "my wave clip.avi"
    spaced.parent.mkdir()
    shutil.copy(videos / "TrumanShow_wave_f_nm_np1_fr_med_26.avi", spaced)
    listing = tmp_path / "train.txt"
    listing.write_text(f"{videos / 'R6llTwEh07w.mp4'} riding a segway\n"
                       f"{videos / 'SOX5yA1l24A.mp4'}   riding   a segway  \n"
                       f"clips/my wave clip.avi\twave\n"
                       f"clips/my wave clip.avi waving a hand\n"
                       f"# a comment\n")
    ann = load_annotations(listing)
    assert ann.classes == ["riding a segway", "wave", "waving a hand"]
    assert [(s.path.name, s.label) for s in ann.samples] == [("R6llTwEh07w.mp4", 0), ("SOX5yA1l24A.mp4", 0),
                                                             ("my wave clip.avi", 1), ("my wave clip.avi", 2)]
    assert all(s.path.is_file() for s in ann.samples)
    from stadapter.training.data import ClipSource

    clips = ClipSource(ann.samples, TaskSpec(num_frames=2), (32, 32), (0.5,) * 3, (0.5,) * 3).dataset(train=False)
    assert all(clips[i][0].shape[-1] == 32 for i in range(len(ann.samples)))  # every clip decodes
    for line, problem in ((f"{videos / 'R6llTwEh07w.mp4'}", "expected 'path label'"),
                          ("clips/a.mp4\tb\tc", "with one tab"),
                          ("clips/my clip 3", "separate them with a tab"),  # ambiguous: no video extension
                          ("clips/my clip.mp4", "ends with a video file name, not a label"),  # no label
                          ("clips/a.mts riding a segway", "cannot tell the path from the label")):
        listing.write_text(f"{videos / 'R6llTwEh07w.mp4'} riding a segway\n\n{line}\n")
        with pytest.raises(AnnotationError, match=re.escape(f"{listing}:3: ") + ".*" + re.escape(problem)):
            load_annotations(listing)
    r = cli("train", "--task", "x", "--train", str(listing), "-b", "tiny", "--weights", "none", check=False)
    assert r.returncode == 1 and "Traceback" not in r.stderr and f"{listing}:3" in r.stderr


# -- 6. threads ---------------------------------------------------------------------------------------
class _Threads(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        return torch.get_num_threads()


@pytest.mark.slow
def test_one_torch_thread_per_decode_worker_and_the_rest_for_training(colours):
    from stadapter.training.data import ClipSource, decode_worker_init, main_threads, make_loader

    loader = torch.utils.data.DataLoader(_Threads(), batch_size=None, num_workers=2,
                                         worker_init_fn=decode_worker_init)
    assert list(loader) == [1, 1, 1, 1]
    ann = load_annotations(colours / "train.txt")
    source = ClipSource(ann.samples, TaskSpec(num_frames=2), (32, 32), (0.5,) * 3, (0.5,) * 3)
    assert make_loader(source, [[0]], 0, train=True, seed=0, workers=2).worker_init_fn is decode_worker_init
    assert (main_threads(2, cores=8), main_threads(0, 2, cores=16), main_threads(4, cores=2)) == (6, 8, 1)
    code = ("import torch; from stadapter.training.data import available_cores, set_main_threads; "
            "print(set_main_threads(1), torch.get_num_threads(), available_cores())")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    got, now, cores = map(int, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                              env=env, check=True).stdout.split())
    assert got == now == max(1, cores - 1)
    pinned = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**env, "OMP_NUM_THREADS": "1"}, check=True).stdout.split()
    assert pinned[:2] == ["1", "1"]  # OMP_NUM_THREADS keeps its say


# -- 7. adapter width ---------------------------------------------------------------------------------
def test_adapter_width_defaults_to_half_the_backbone(tiny_backbone):
    from stadapter.model.loading import load_backbone

    assert resolve_recipe("mine", None).for_backbone(tiny_backbone.dim).adapter.width == 32
    vit_s = load_backbone("timm:vit_small_patch14_dinov2?img_size=28", "none")
    assert vit_s.dim == 384 and resolve_recipe("mine", None).for_backbone(vit_s.dim).adapter.width == 192
    assert resolve_recipe("k400", None).for_backbone(vit_s.dim).adapter.width == 384  # the paper preset: r=384
    assert resolve_recipe("k400", None).for_backbone(768).adapter.width == 384
    assert resolve_recipe("mine", None, adapter={"width": 16}).for_backbone(384).adapter.width == 16


def test_overwrite_deletes_only_what_the_run_wrote(tmp_path):
    from stadapter.training.rundir import prepare_run_dir

    out = tmp_path / "out"
    (out / "tensorboard").mkdir(parents=True)
    (out / "checkpoint.pt").write_bytes(b"ckpt")
    (out / "tensorboard" / "events.out.tfevents.1.host").write_bytes(b"ev")
    (out / "tensorboard" / "notes.txt").write_text("mine")  # the user's, beside our event files
    (out / "bundle").mkdir()
    (out / "bundle" / "holiday.mp4").write_bytes(b"not a bundle")  # a folder that merely has the name
    (out / "data.txt").write_text("mine")
    with pytest.raises(ConfigError, match="bundle is not a bundle"):
        prepare_run_dir(out, resume=False, overwrite=True)
    assert (out / "checkpoint.pt").is_file()  # refused before anything was deleted
    (out / "bundle" / "holiday.mp4").rename(out / "holiday.mp4")
    (out / "bundle" / "manifest.json").write_text("{}")
    prepare_run_dir(out, resume=False, overwrite=True)
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == [
        "data.txt", "holiday.mp4", "tensorboard", "tensorboard/notes.txt"]
    (out / "checkpoint.pt").mkdir()
    with pytest.raises(ConfigError, match="is a folder, not the run's file"):
        prepare_run_dir(out, resume=False, overwrite=True)
