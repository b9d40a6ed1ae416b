"""A newcomer's first hour (issue 19): commands that need no weights work with the network blocked, bundles
name local weights files without their directory, a moved weights file says what to pass, and the messages a
first run meets say what to do (import of a file, a missing --train, a Hub endpoint without Xet)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import DINOV2, VIDEOS, need_shared
from hub_fixtures import TOKEN, hub, hub_factory, make_bundle, online  # noqa: F401
from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.registry import open_registry

ROOT = Path(__file__).resolve().parent.parent
LABELLED = VIDEOS / "labelled"
WAVE = "TrumanShow_wave_f_nm_np1_fr_med_26.avi"
JUGGLE = "v_SoccerJuggling_g23_c01.avi"

# Runs `python -m stadapter ARGS` with every connection to anything but this machine refused, and each refused
# attempt reported on stderr (so a test sees a download that was tried, not only one that failed).
GUARD = textwrap.dedent("""
    import runpy, socket, sys
    LOCAL = ("127.0.0.1", "::1", "localhost")
    def _refuse(host):
        sys.stderr.write(f"NETWORK BLOCKED: {host}\\n")
        raise OSError(f"network blocked by the test ({host})")
    _connect = socket.socket.connect
    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in LOCAL:
            _refuse(address[0])
        return _connect(self, address)
    socket.socket.connect = connect
    _getaddrinfo = socket.getaddrinfo
    def getaddrinfo(host, *args, **kwargs):
        if host not in LOCAL and host is not None:
            _refuse(host)
        return _getaddrinfo(host, *args, **kwargs)
    socket.getaddrinfo = getaddrinfo
    sys.argv = ["stadapter", *sys.argv[1:]]
    runpy.run_module("stadapter", run_name="__main__", alter_sys=True)
""")


def offline_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("STADAPTER_", "HF_"))}
    return {**env, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "STADAPTER_HOME": str(home),
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "COLUMNS": "400"}


def stadapter(home: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", GUARD, *args], capture_output=True, text=True, timeout=timeout,
                          env=offline_env(home), cwd=home.parent)


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    """The single line a failed command printed: exit 1, no traceback, no stray log line."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def copy_clips(folder: Path, *names: str) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy(need_shared(LABELLED / n), folder / n)) for n in names]


# -- offline-safe commands -------------------------------------------------------------------------------------

@pytest.mark.slow  # subprocesses (torch imports) or a short training run: 10 s idle, up to 120 s on 2 busy cores
def test_serve_without_preload_loads_the_backbone_the_registered_tasks_use_with_the_network_blocked(tmp_path,
                                                                                                      tiny_backbone):
    home = tmp_path / "home"
    with open_registry(home=home) as reg:
        reg.register(make_bundle(tmp_path / "b", tiny_backbone, task="waves"), source={"kind": "train"})
    proc = subprocess.Popen([sys.executable, "-c", GUARD, "serve", "--port", "0", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=offline_env(home),
                            cwd=tmp_path)
    try:
        assert proc.stdout is not None
        banner = ""  # printed once the backbone is loaded (wrapped by the console); "" when serve exited
        while "/docs" not in banner and (line := proc.stdout.readline()):
            banner += " " + line.strip()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert banner.strip().startswith(f"stadapter serve: {tiny_backbone.spec} on CPU"), (banner, err)
    assert "NETWORK BLOCKED" not in err and "Failed to download" not in err


def test_serve_picks_the_backbone_most_registered_tasks_use(tmp_path, tiny_backbone):
    from stadapter.model.loading import load_backbone
    from stadapter.runtime.engine import registered_backbone, tasks_on_other_backbones

    other = load_backbone("open_clip:ViT-B-16?image_size=32&patch_size=8&width=64&layers=2&head_width=16", "none")
    with open_registry(home=tmp_path / "home") as reg:
        assert registered_backbone(reg) is None
        reg.register(make_bundle(tmp_path / "a", other, task="a-other"), source={"kind": "train"})
        assert registered_backbone(reg).backbone_fingerprint == other.fingerprint()
        for name in ("b-tiny", "c-tiny"):
            reg.register(make_bundle(tmp_path / name, tiny_backbone, task=name), source={"kind": "train"})
        chosen = registered_backbone(reg)
        assert chosen.backbone_fingerprint == tiny_backbone.fingerprint() and chosen.task == "b-tiny"
        # what `serve` warns about: the tasks an engine on the chosen backbone answers 409
        assert tasks_on_other_backbones(reg, tiny_backbone.fingerprint()) == ["a-other"]
        assert tasks_on_other_backbones(reg, other.fingerprint()) == ["b-tiny", "c-tiny"]


@pytest.mark.slow  # subprocesses (torch imports) or a short training run: 10 s idle, up to 120 s on 2 busy cores
def test_model_info_counts_without_weights_and_without_a_download_by_default(tmp_path):
    proc = stadapter(tmp_path / "home", "model-info", "--backbone", "tiny", "--preset", "ucf101", "--json")
    assert proc.returncode == 0, proc.stderr
    counts = json.loads(proc.stdout)
    assert counts["trainable_params"] > 0 and counts["gmacs_per_view"] > 0
    assert "NETWORK BLOCKED" not in proc.stderr
    # The same counts as with an explicit random init: the default reads no weights at all.
    from stadapter.model.summary import summarize_preset

    assert summarize_preset("tiny", "none", "ucf101").to_dict() == counts


@pytest.mark.slow  # subprocesses (torch imports) or a short training run: 10 s idle, up to 120 s on 2 busy cores
def test_a_failed_pretrained_download_prints_our_one_line_error_only(tmp_path):
    proc = stadapter(tmp_path / "home", "model-info", "--backbone", "open_clip:ViT-B-16", "--weights", "openai")
    line = one_error_line(proc)  # no "ERROR:root:Failed to download weights for tag 'openai'" before it
    assert "cannot get pretrained weights 'openai'" in line and "--weights" in line
    assert "NETWORK BLOCKED" not in proc.stderr


# -- weights named by file name and fingerprint, found again after a move --------------------------------------

def cli(home: Path, monkeypatch: pytest.MonkeyPatch, *args: str, code: int = 0):  # type: ignore[no-untyped-def]
    """`stadapter ARGS` in process (HF_HUB_OFFLINE=1, STADAPTER_HOME=home); asserts the exit code."""
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    monkeypatch.setenv("STADAPTER_HOME", str(home))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    result = CliRunner().invoke(app, list(args), env={"COLUMNS": "400"})
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def one_line(result) -> str:  # type: ignore[no-untyped-def]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_a_bundle_names_its_weights_file_without_the_directory_and_a_moved_file_says_to_pass_weights(
        tmp_path, tiny_backbone, monkeypatch):
    home, first, second = tmp_path / "home", tmp_path / "models-a", tmp_path / "models-b"
    first.mkdir()
    save_file(dict(tiny_backbone.state_dict()), str(first / "tiny.safetensors"))
    clips = copy_clips(tmp_path / "clips", WAVE, JUGGLE)
    (tmp_path / "train.txt").write_text(f"clips/{WAVE} wave\nclips/{JUGGLE} juggle\n")
    monkeypatch.chdir(tmp_path)
    cli(home, monkeypatch, "train", "--task", "moved", "--train", "train.txt", "--backbone", "tiny",
        "--weights", str(first / "tiny.safetensors"), "--frames", "4", "--epochs", "1", "--batch-size", "2",
        "--max-steps", "1", "--num-workers", "0", "--out", "run", "--device", "cpu")
    config = (tmp_path / "run" / "bundle" / "config.json").read_text()
    assert json.loads(config)["backbone"]["weights"] == "file:tiny.safetensors"
    assert str(tmp_path) not in config and "models-a" not in config  # nothing of this machine's folders

    predict = ("predict", "--task", "moved", "--device", "cpu", "--json", str(clips[0]))
    cli(home, monkeypatch, *predict)  # found where it was loaded from
    second.mkdir()
    shutil.move(first / "tiny.safetensors", second / "tiny.safetensors")
    line = one_line(cli(home, monkeypatch, *predict, code=1))
    assert "tiny.safetensors" in line and "--weights PATH" in line and tiny_backbone.fingerprint() in line
    moved = cli(home, monkeypatch, *predict, "--weights", str(second / "tiny.safetensors"))
    assert json.loads(moved.stdout)["results"][0]["clip"] == str(clips[0])
    cli(home, monkeypatch, *predict)  # the new place is remembered


def test_a_bundle_that_stored_an_absolute_weights_path_still_loads_and_a_move_is_reported(tmp_path,
                                                                                          tiny_backbone,
                                                                                          monkeypatch):
    """Bundles written before weights were named file:NAME hold the file's absolute path: still read."""
    home = tmp_path / "home"
    old = tmp_path / "old" / "tiny.safetensors"
    old.parent.mkdir()
    save_file(dict(tiny_backbone.state_dict()), str(old))
    config = AdapterConfig(num_classes=2, width=8)
    bundle = Bundle(task="legacy", adapter=config, spec=TaskSpec(num_frames=4), labels=["a", "b"],
                    tensors=_adapter_set(tiny_backbone, config),
                    backbone={**tiny_backbone.describe(), "weights": str(old),
                              "fingerprint": tiny_backbone.fingerprint()})
    with open_registry(home=home) as reg:
        reg.register(bundle.save(tmp_path / "bundle"), source={"kind": "import"})
    clip = copy_clips(tmp_path / "clips", WAVE)[0]
    predict = ("predict", "--task", "legacy", "--device", "cpu", "--json", str(clip))
    cli(home, monkeypatch, *predict)
    new = tmp_path / "new" / "renamed.safetensors"
    new.parent.mkdir()
    shutil.move(old, new)
    line = one_line(cli(home, monkeypatch, *predict, code=1))
    assert f"weights file {old} does not exist" in line and "--weights PATH" in line
    assert tiny_backbone.fingerprint() in line
    cli(home, monkeypatch, *predict, "--weights", str(new))


def test_a_pulled_bundle_whose_weights_file_this_machine_never_loaded_asks_for_it(tmp_path, tiny_backbone,
                                                                                   monkeypatch):
    """A bundle from elsewhere (the Hub) names file:NAME that this machine has never loaded: the error names
    the file and the fingerprint; --weights with a file of other weights is refused by the fingerprint."""
    home = tmp_path / "home"
    config = AdapterConfig(num_classes=2, width=8)
    bundle = Bundle(task="pulled", adapter=config, spec=TaskSpec(num_frames=4), labels=["a", "b"],
                    tensors=_adapter_set(tiny_backbone, config),
                    backbone={**tiny_backbone.describe(), "weights": "file:tiny.safetensors",
                              "fingerprint": tiny_backbone.fingerprint()})
    with open_registry(home=home) as reg:
        reg.register(bundle.save(tmp_path / "bundle"), source={"kind": "hub", "repo": "org/x"})
    clip = copy_clips(tmp_path / "clips", WAVE)[0]
    predict = ("predict", "--task", "pulled", "--device", "cpu", "--json", str(clip))
    line = one_line(cli(home, monkeypatch, *predict, code=1))
    assert "no local weights file 'tiny.safetensors' is known on this machine" in line and "--weights PATH" in line
    assert tiny_backbone.fingerprint() in line
    other = tmp_path / "other.safetensors"
    save_file({k: v + 1 for k, v in tiny_backbone.state_dict().items()}, str(other))
    assert "fingerprint" in one_line(cli(home, monkeypatch, *predict, "--weights", str(other), code=1))
    right = tmp_path / "tiny.safetensors"
    save_file(dict(tiny_backbone.state_dict()), str(right))
    cli(home, monkeypatch, *predict, "--weights", str(right))
    cli(home, monkeypatch, *predict)  # remembered


def _adapter_set(backbone, config: AdapterConfig) -> dict[str, torch.Tensor]:  # type: ignore[no-untyped-def]
    from stadapter.model.video_vit import VideoViT

    return VideoViT(backbone, config, 4).init_adapter_set(torch.Generator().manual_seed(0))


# -- messages --------------------------------------------------------------------------------------------------

def test_show_labels_the_paths_it_recorded_relative_to_an_unknown_folder(tmp_path, tiny_backbone):
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    home = tmp_path / "home"
    with open_registry(home=home) as reg:
        reg.register(make_bundle(tmp_path / "b", tiny_backbone, task="rel"),
                     source={"kind": "train", "run": "runs/rel"}, data="lists/train.txt")
    out = CliRunner().invoke(app, ["show", "rel", "--db", f"sqlite:///{home / 'registry.db'}"]).stdout
    assert "runs/rel (relative to the folder the command ran in)" in out
    assert "lists/train.txt (relative to the folder the command ran in)" in out


def test_import_of_a_checkpoint_file_says_it_wants_a_bundle_directory(tmp_path):
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    checkpoint = tmp_path / "stadapter_vitb16_k400.pth"
    torch.save({"model": {"w": torch.zeros(1)}}, checkpoint)
    result = CliRunner().invoke(app, ["import", str(checkpoint), "--db", f"sqlite:///{tmp_path / 'r.db'}"])
    assert result.exit_code == 1
    message = " ".join(result.stderr.split())
    assert f"{checkpoint} is a file" in message and "bundle directory" in message and "manifest.json" in message
    assert "does not exist" not in message
    if "import-official" in CliRunner().invoke(app, ["--help"]).stdout:
        assert "stadapter import-official" in message


def test_a_missing_train_option_says_what_it_expects_and_where_to_start():
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    result = CliRunner().invoke(app, ["train", "--task", "ssv2"])
    assert result.exit_code == 2
    message = " ".join(result.stderr.replace("│", " ").split())
    assert "Missing option '--train'" in message
    assert "path label" in message and "stadapter demo" in message and "Quick start" in message


def test_train_help_shows_the_torchrun_module_form():
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    text = " ".join(CliRunner().invoke(app, ["train", "--help"]).stdout.split())
    assert "torchrun --nproc-per-node 2 -m stadapter train" in text
    readme = (ROOT / "README.md").read_text()
    assert "torchrun --nproc-per-node 2 -m stadapter train" in readme


# -- the Hub at another endpoint -------------------------------------------------------------------------------

def test_a_push_to_an_endpoint_without_xet_goes_through_lfs_and_says_why(tmp_path, hub, online, tiny_backbone,  # noqa: F811
                                                                         caplog):
    """hf_xet installed and Xet not disabled: the server (which speaks only Git LFS) was reached, so the push
    must not say "cannot reach the Hub"; it falls back to LFS and says so."""
    pytest.importorskip("hf_xet")
    import huggingface_hub.constants as constants

    from stadapter.hub import push

    online.setattr(constants, "HF_HUB_DISABLE_XET", False)
    online.delenv("HF_HUB_DISABLE_XET")
    bundle_dir = make_bundle(tmp_path / "b", tiny_backbone)
    with caplog.at_level("WARNING", logger="stadapter.hub"):
        result = push(bundle_dir, "org/no-xet", endpoint=hub.url, token=TOKEN, timeout=10)
    assert result.created and hub.store.resolve("org/no-xet", "main") == result.commit
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "does not offer Xet storage" in said and "Git LFS" in said and "cannot reach" not in said


# -- the README's Python API -----------------------------------------------------------------------------------

def readme_python_api() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.mark.slow  # subprocesses (torch imports) or a short training run: 10 s idle, up to 120 s on 2 busy cores
def test_the_readme_python_api_runs(tmp_path, tiny_backbone):
    """The README's Python block, run as written in a folder with its train.txt, val.txt and clips, with the
    tiny backbone (its weights in a local file) standing in for DINOv2 and a short schedule."""
    code = readme_python_api()
    backbone, weights = 'BACKBONE = "timm:vit_small_patch14_dinov2?img_size=224"', "WEIGHTS = "
    assert backbone in code and weights in code and '"epochs": 10' in code
    save_file(dict(tiny_backbone.state_dict()), str(tmp_path / "tiny.safetensors"))
    code = code.replace(backbone, 'BACKBONE = "tiny"').replace('"epochs": 10', '"epochs": 1, "num_workers": 0')
    code = "\n".join('WEIGHTS = "tiny.safetensors"' if line.startswith(weights) else line
                     for line in code.splitlines())
    copy_clips(tmp_path / "clips", WAVE, JUGGLE, "RATRACE_wave_f_nm_np1_fr_goo_37.avi")
    shutil.copy(tmp_path / "clips" / WAVE, tmp_path / "clips" / "new.avi")
    (tmp_path / "train.txt").write_text(f"clips/{WAVE} wave\nclips/{JUGGLE} juggle\n")
    (tmp_path / "val.txt").write_text(f"clips/RATRACE_wave_f_nm_np1_fr_goo_37.avi wave\nclips/{JUGGLE} juggle\n")
    (tmp_path / "api.py").write_text(code)
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "api.py"], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**offline_env(tmp_path / "home"), "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "registered my-actions:1" in proc.stdout and "['juggle', 'wave']" in proc.stdout
    assert "clips/new.avi:" in proc.stdout, proc.stdout
    assert time.monotonic() - start < 300


def test_the_dinov2_weights_file_of_the_quick_start_is_named_by_file_name(home):
    """The README's quick start trains on this file: bundles name it file:NAME."""
    from stadapter.model.loading import load_backbone

    bb = load_backbone("timm:vit_small_patch14_dinov2?img_size=224", str(need_shared(DINOV2)))
    assert bb.weights == f"file:{DINOV2.name}"


# -- --cpu-bf16 on a CPU without native bf16 -------------------------------------------------------------------

def test_cpu_bf16_detection_reads_the_flags_it_is_given(tmp_path):
    from stadapter.training.loop import cpu_has_fast_bf16

    plain, amx = tmp_path / "plain", tmp_path / "amx"
    plain.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f\n")
    amx.write_text("processor : 0\nflags : fpu sse2 avx2 avx512f amx_bf16 amx_tile\n")
    assert not cpu_has_fast_bf16(plain) and cpu_has_fast_bf16(amx)
    assert not cpu_has_fast_bf16(tmp_path / "absent")


@pytest.mark.slow  # subprocesses (torch imports) or a short training run: 10 s idle, up to 120 s on 2 busy cores
def test_cpu_bf16_without_native_bf16_warns_on_the_console(tmp_path):
    """`train --cpu-bf16` with the CPU flags faked (the cpuinfo file the detection reads, through its parameter):
    the hidden cost is a warning on the console (stderr), not only a line in the run's log."""
    need_shared(LABELLED)
    fake = tmp_path / "cpuinfo"
    fake.write_text("processor : 0\nflags : fpu sse2 avx2\n")
    copy_clips(tmp_path / "clips", WAVE, JUGGLE)
    (tmp_path / "train.txt").write_text(f"clips/{WAVE} wave\nclips/{JUGGLE} juggle\n")
    launcher = ("from pathlib import Path; import stadapter.training.loop as loop; "
                f"loop.cpu_has_fast_bf16.__defaults__ = (Path({str(fake)!r}),)\n" + GUARD)
    proc = subprocess.run([sys.executable, "-c", launcher, "train", "--task", "bf16", "--train", "train.txt",
                           "--backbone", "tiny", "--weights", "none", "--frames", "4", "--epochs", "1",
                           "--batch-size", "2", "--max-steps", "1", "--num-workers", "0", "--cpu-bf16",
                           "--no-register", "--out", "run", "--device", "cpu"],
                          capture_output=True, text=True, timeout=300, env=offline_env(tmp_path / "home"),
                          cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    said = " ".join(proc.stderr.split())
    assert "warning: --cpu-bf16: this CPU reports neither AVX512-BF16 nor AMX" in said


def test_the_weights_index_is_rewritten_only_when_it_changes(tmp_path, monkeypatch):
    from stadapter.model import weights_index

    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    weights_index.remember("sha256:aa", a)
    index = weights_index.index_path()
    os.utime(index, ns=(0, 0))  # a rewrite (a new file renamed over it) would carry the current time
    weights_index.remember("sha256:aa", a)  # every process that loads the weights says so: no rewrite
    assert index.stat().st_mtime_ns == 0
    weights_index.remember("sha256:bb", b)
    os.utime(index, ns=(0, 0))
    weights_index.remember("sha256:aa", a)  # a changes place in the order (the latest last): rewritten
    assert index.stat().st_mtime_ns > 0 and list(json.loads(index.read_text())) == ["sha256:bb", "sha256:aa"]
    assert weights_index.lookup("sha256:bb") == b and weights_index.lookup(None, "a.safetensors") == a
    index.write_text("[not an index")  # unreadable: ignored, then rewritten
    assert weights_index.lookup("sha256:aa") is None
    weights_index.remember("sha256:aa", a)
    assert weights_index.lookup("sha256:aa") == a
