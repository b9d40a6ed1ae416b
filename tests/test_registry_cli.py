"""The registry commands, through typer's CliRunner (in process) and once through a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

from typer.testing import CliRunner

from stadapter.bundle import verify_bundle
from stadapter.cli.main import app
from test_registry_support import ROOT, make_bundle

pytest_plugins = ["test_registry_support"]  # fixtures: db_url, empty_db, pg_database

runner = CliRunner()


def run(*args: str, code: int = 0):  # type: ignore[no-untyped-def]
    result = runner.invoke(app, list(args))
    assert result.exit_code == code, (result.stdout, result.stderr, result.exception)
    return result


def test_registry_commands(db_url, tmp_path, monkeypatch):
    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    db = ("--db", db_url)
    a = make_bundle(tmp_path / "a", task="k400", seed=1, metrics={"top1": 0.75, "top5": 0.9})
    b = make_bundle(tmp_path / "b", task="k400", seed=2)
    assert "registered k400:1" in run("import", str(a), *db).stdout
    assert "registered k400:2" in run("import", str(b), *db).stdout
    imported = json.loads(run("import", str(a), "--task", "ucf101", "--json", *db).stdout)
    assert imported["ref"] == "ucf101:1" and imported["source"]["kind"] == "import"

    listing = json.loads(run("ls", "--json", *db).stdout)
    assert [(t["name"], t["versions"], t["latest"]) for t in listing["tasks"]] == [("k400", 2, 2), ("ucf101", 1, 1)]
    table = run("ls", *db).stdout
    assert "k400" in table and "ucf101" in table and "top1 0.75" in table
    versions = json.loads(run("ls", "k400", "--json", *db).stdout)["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    assert "versions of k400" in run("ls", "k400", *db).stdout

    err = run("show", "k400@production", *db, code=1).stderr
    assert "no alias 'production'" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "k400@production -> k400:1" in run("alias", "set", "k400", "production", "1", *db).stdout
    shown = json.loads(run("show", "k400", "--json", *db).stdout)
    assert shown["ref"] == "k400:1" and shown["aliases"] == ["production"] and shown["metrics"]["top1"] == 0.75
    assert json.loads(run("show", "k400:2", "--json", *db).stdout)["version"] == 2
    human = run("show", "k400@production", *db).stdout
    assert "k400:1" in human and "fp-a" in human and "adapter.safetensors" in human

    assert "production" in run("rm", "k400:1", *db, code=1).stderr
    assert "name the version" in run("rm", "k400", *db, code=1).stderr
    run("export", "k400:2", str(tmp_path / "out"), *db)
    verify_bundle(tmp_path / "out")
    assert "not an empty directory" in run("export", "k400:2", str(tmp_path / "out"), *db, code=1).stderr
    assert "removed k400:1 and alias(es) production" in run("rm", "k400:1", "--force", *db).stdout
    run("alias", "set", "k400", "staging", "2", *db)
    assert "removed k400@staging" in run("alias", "rm", "k400", "staging", *db).stdout
    run("rm", "ucf101:1", *db)
    out = run("gc", *db).stdout
    assert "removed 3 file(s)" in out  # bundle a's tensors, metrics and manifest; the rest is shared with b
    assert "removed 0 file(s)" in run("gc", *db).stdout
    # STADAPTER_DB instead of --db.
    monkeypatch.setenv("STADAPTER_DB", db_url)
    assert [t["name"] for t in json.loads(run("ls", "--json").stdout)["tasks"]] == ["k400", "ucf101"]


def test_db_commands(empty_db, tmp_path, monkeypatch):
    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    db = ("--db", empty_db)
    head = "0002"  # the newest migration (0002_lookup_indexes)
    assert f"revision - (head {head}), no registry tables yet" in run("db", "current", *db).stdout
    err = run("ls", *db, code=1).stderr
    assert "stadapter db upgrade" in err and "Traceback" not in err
    assert f"upgraded from an empty database to {head}" in run("db", "upgrade", *db).stdout
    assert f"already at revision {head}" in run("db", "upgrade", *db).stdout
    assert "up to date" in run("db", "current", *db).stdout
    assert f"{head} (head)" in run("db", "history").stdout
    assert "no tasks registered yet" in run("ls", *db).stdout
    assert "base" in run("db", "downgrade", "base", *db).stdout
    assert "no registry tables yet" in run("db", "current", *db).stdout


def test_default_database_upgrades_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    assert "no tasks registered yet" in run("ls").stdout
    assert (tmp_path / "home" / "registry.db").is_file()
    assert "up to date" in run("db", "current").stdout


def test_user_error_is_one_line_and_exit_1(tmp_path):
    """The real entry point: a user mistake prints one line on stderr, no traceback, exit code 1."""
    env = {"STADAPTER_HOME": str(tmp_path / "home"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-c", "from stadapter.cli.main import app; app()", "show", "nope:1"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: no task 'nope' in the registry sqlite:///{tmp_path / 'home' / 'registry.db'} "
                           "(tasks: none yet); get one with `stadapter import-official")
    assert "`stadapter pull ORG/NAME` or `stadapter train`" in line
