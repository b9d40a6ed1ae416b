"""Hostile names and killed processes at the command line: every name is checked before any work is done, and
`stadapter gc` removes what a SIGKILLed pull left behind (and nothing else)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hub_fixtures import TOKEN, hub, hub_factory, make_bundle, online  # noqa: F401 - fixtures used by name
from stadapter.cli.main import app
from stadapter.errors import RegistryError
from stadapter.registry import open_registry
from stadapter.registry.leftovers import remove_stale, work_dir
from stadapter.training.api import resolve_recipe, train_task

runner = CliRunner()
NAME_RULE = "use 1-100 letters, digits, '.', '_' or '-', starting with a letter or digit"
BAD_TASKS = ["../../escaped", "/abs/path", ".hidden", "a/b", "x" * 101, "spa ce"]
HOUR = 3600.0


def tree(root: Path) -> set[Path]:
    return {p.relative_to(root) for p in root.rglob("*")}


def refused(args: list[str]) -> str:
    """Run the command; assert it failed with exactly one `error:` line and no traceback; return that line."""
    result = runner.invoke(app, args)
    assert result.exit_code == 1, (result.stdout, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in result.output, result.stderr
    return " ".join(result.stderr.split())


@pytest.fixture
def cwd_and_home(tmp_path, monkeypatch):
    """A working directory two levels down (so ../../escaped would still land in tmp_path), a STADAPTER_HOME
    that does not exist yet, and a valid training listing."""
    cwd = tmp_path / "work" / "deep"
    cwd.mkdir(parents=True)
    monkeypatch.chdir(cwd)
    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    (tmp_path / "train.txt").write_text("a.mp4 walk\nb.mp4 run\n")
    return tmp_path


@pytest.mark.parametrize("task", BAD_TASKS)
def test_train_refuses_a_bad_task_name_before_any_work(cwd_and_home, task):
    before = tree(cwd_and_home)
    err = refused(["train", "--task", task, "--train", str(cwd_and_home / "train.txt"), "-b", "tiny",
                   "--weights", "none"])
    assert "invalid task name" in err and NAME_RULE in err
    assert tree(cwd_and_home) == before  # no run folder (runs/TASK or outside), no registry home


def test_train_task_checks_the_name_first(tmp_path):
    """The library is the trust boundary: the name is refused before the (here empty) data is even looked at."""
    with pytest.raises(RegistryError, match="invalid task name '../escaped'"):
        train_task("../escaped", resolve_recipe("x", None), [], ["a"], None, "tiny", "none", tmp_path / "run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args, expected", [
    (["show", "../x"], "not a registry reference"),
    (["show", "demo@../../x"], "not a registry reference"),
    (["ls", "../x"], "invalid task name"),
    (["alias", "set", "../x", "production", "1"], "invalid task name"),
    (["alias", "set", "demo", "a/b", "1"], "invalid alias name"),
    (["alias", "rm", "demo", "../b"], "invalid alias name"),
    (["alias", "rm", "/etc", "production"], "invalid task name"),
    (["rm", "../x:1"], "not a registry reference"),
    (["export", "demo:../1", "out"], "not a registry reference"),
    (["import", "bundle", "--task", "../../escaped"], "invalid task name"),
    (["push", "../x", "--repo", "org/demo"], "not a registry reference"),
    (["push", "demo:1", "--repo", "../../evil"], "not a Hub repository id"),
    (["pull", "org/../x"], "not a Hub repository id"),
    (["pull", "org/demo", "--task", "../../escaped"], "invalid task name"),
    (["eval", "--task", "../x", "--val", "val.txt"], "not a registry reference"),
])
def test_commands_refuse_bad_names_before_opening_the_registry(cwd_and_home, args, expected):
    before = tree(cwd_and_home)
    assert expected in refused(args)
    assert tree(cwd_and_home) == before  # no registry database, no export folder, no download


@pytest.mark.parametrize("args", [
    ["serve", "--preload", "../x", "--backbone", "timm:no_such_model", "--weights", "none"],
    ["predict", "clip.mp4", "--task", "../x", "--backbone", "timm:no_such_model", "--weights", "none"],
])
def test_serve_and_predict_check_task_names_before_building_the_backbone(cwd_and_home, args):
    """The named backbone does not exist: an error about it would mean it was built before the names were read."""
    err = refused(args)
    assert "not a registry reference" in err and "no_such_model" not in err


# -- gc and leftovers --------------------------------------------------------------------------------------

def age(path: Path, seconds: float) -> None:
    """Set the modification time of ``path`` and everything in it ``seconds`` into the past."""
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then), follow_symlinks=False)


def leftovers(home: Path) -> dict[str, Path]:
    """One of each kind of leftover a killed pull or push leaves, plus look-alikes gc must keep."""
    paths = {
        "pull": home / "tmp" / "pull-abcd_123",
        "push": home / "tmp" / "push-zz99zz99",
        "staging": home / "hub" / "bundles" / "org--demo" / (".0123abcd" * 5 + ".k2j4h5g6"),
        "incomplete": home / "hub" / "cache" / "models--org--demo" / "blobs" / ("ab" * 32 + ".incomplete"),
        "own file": home / "tmp" / "notes",  # not one of our names
        "other dir": home / "tmp" / "pull-keep",  # not mkdtemp's shape
        "pulled bundle": home / "hub" / "bundles" / "org--demo" / ("c" * 40),
        "cached blob": home / "hub" / "cache" / "models--org--demo" / "blobs" / ("cd" * 32),
    }
    for name, p in paths.items():
        if "incomplete" in name or "blob" in name or name == "own file":
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(b"x" * 1000)
        else:
            (p / "bundle").mkdir(parents=True)
            (p / "bundle" / "adapter.safetensors").write_bytes(b"y" * 500)
    return paths


def test_remove_stale_takes_only_our_old_leftovers(tmp_path):
    home = tmp_path / "home"
    paths = leftovers(home)
    fresh = home / "tmp" / "pull-fresh___"
    (fresh / "bundle").mkdir(parents=True)
    for p in paths.values():
        age(p, 2 * HOUR)
    old_dir_new_file = home / "tmp" / "push-busy1234"
    (old_dir_new_file / "x").mkdir(parents=True)
    age(old_dir_new_file, 2 * HOUR)
    (old_dir_new_file / "x" / "part").write_bytes(b"z")  # still being written: not stale

    removed = {x.path: x.size for x in remove_stale(home, stale_after=HOUR)}
    stale = {k: paths[k] for k in ("pull", "push", "staging", "incomplete")}
    assert removed == {stale["pull"]: 500, stale["push"]: 500, stale["staging"]: 500, stale["incomplete"]: 1000}
    assert not any(p.exists() for p in stale.values())
    assert all(p.exists() for k, p in paths.items() if k not in stale)
    assert fresh.is_dir() and old_dir_new_file.is_dir()
    assert remove_stale(home, stale_after=HOUR) == []


def test_gc_reports_and_removes_stale_leftovers(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("STADAPTER_HOME", str(home))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    with work_dir(home, "pull") as tmp:
        (tmp / "f").write_bytes(b"1234")
        out = runner.invoke(app, ["gc"]).stdout
        assert "removed 0 file(s)" in out and tmp.is_dir()  # a running pull is never touched
        age(tmp, 2 * HOUR)
        out = runner.invoke(app, ["gc"]).stdout
        assert f"removed stale {tmp} (4 bytes)" in out
        assert "removed 1 file(s), freed 4 bytes" in out and not tmp.exists()
    with open_registry(home=home) as reg:
        assert reg.gc(stale_after=0) == (0, 0)


def downloading(work: Path) -> bool:
    """Whether a pull is filling its staging folder under ``work`` ($STADAPTER_HOME/tmp)."""
    return any(work.glob("pull-*/.bundle.*"))


def test_gc_removes_what_a_sigkilled_pull_left(hub, tmp_path, tiny_backbone):  # noqa: F811 - the fixture
    """A real `stadapter pull` in its own process, killed with SIGKILL while it downloads into its staging
    folder (``$STADAPTER_HOME/tmp/pull-*/.bundle.*``)."""
    with open_registry(home=tmp_path / "pusher") as reg:
        from stadapter.hub import push_version

        info = reg.register(make_bundle(tmp_path / "b", tiny_backbone, seed=1))
        push_version(reg, info, "org/demo", endpoint=hub.url, token=TOKEN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "STADAPTER_"))}
    env |= {"HF_ENDPOINT": hub.url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_DISABLE_PROGRESS_BARS": "1", "HF_HOME": str(tmp_path / "hf"), "OMP_NUM_THREADS": "1"}
    for attempt in range(3):  # staging lives ~0.2 s here; should the pull finish between two looks, again
        home = tmp_path / f"home{attempt}"
        work = home / "tmp"

        proc = subprocess.Popen([sys.executable, "-m", "stadapter", "pull", "org/demo@v1"],
                                env=env | {"STADAPTER_HOME": str(home)},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while proc.poll() is None and not downloading(work):
                time.sleep(0.001)
            killed = proc.poll() is None
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        if killed and downloading(work):
            break
    else:
        pytest.fail("three pulls ran without their staging folder ever being seen under $STADAPTER_HOME/tmp")
    (left,) = list(work.iterdir())
    assert left.name.startswith("pull-")
    out = " ".join(runner.invoke(app, ["gc"], env={"STADAPTER_HOME": str(home)}).stdout.split())
    assert "removed 0 file(s)" in out and left.exists()  # younger than the default hour
    out = " ".join(runner.invoke(app, ["gc", "--stale-after", "0"], env={"STADAPTER_HOME": str(home)}).stdout.split())
    assert f"removed stale {left}" in out and not left.exists()
