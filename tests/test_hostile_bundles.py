"""Hostile bundles: a corpus crafted from one good tiny bundle, each case refused with one clear BundleError by
``Registry.register`` (what ``stadapter import`` does), by the ``stadapter import`` command (exit 1, one
``error:`` line, no traceback) and, for a representative subset, by ``pull`` from the local Hub server; nothing
is registered, no blob written, nothing written outside the folder, and refused content does not stay in the
Hub cache."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hostile_corpus import CASES, LABEL_NAMES, PULLED, craft_hostile_bundles, good_bundle
from hub_fixtures import hub, hub_factory, online  # noqa: F401 - fixtures: the local Hub server
from stadapter.bundle import LABELS
from stadapter.cli.main import app
from stadapter.errors import BundleError
from stadapter.registry import open_registry


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hostile")
    good = good_bundle(root / "good")
    return craft_hostile_bundles(good, root / "cases")


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    home = tmp_path_factory.mktemp("home")
    with open_registry(str(home / "registry.db"), home, upgrade=True) as reg:
        yield reg


def _snapshot(directory: Path) -> dict[str, tuple[int, float]]:
    """Every path under ``directory`` with its size and modification time (links not followed)."""
    out = {}
    for p in directory.rglob("*"):
        st = p.lstat()
        out[str(p.relative_to(directory))] = (st.st_size, st.st_mtime)
    return out


def _assert_untouched(registry, case_root: Path, before: dict[str, tuple[int, float]]) -> None:  # type: ignore[no-untyped-def]
    assert registry.list_tasks() == []
    assert list(registry.blobs.blobs()) == []
    assert not [p for p in registry.blobs.root.rglob("*") if p.is_file() and p.name != ".lock"]
    assert _snapshot(case_root) == before  # nothing written next to the bundles, nothing changed in them


def test_good_bundle_is_accepted(tmp_path):
    good = good_bundle(tmp_path / "good")
    with open_registry(str(tmp_path / "r.db"), tmp_path / "home", upgrade=True) as reg:
        info = reg.register(good)
        assert info.ref == "hostile:1" and info.labels == LABEL_NAMES
        assert sorted(p.name for p in reg.materialize(info).iterdir()) == sorted(info.files)


@pytest.mark.parametrize("case", list(CASES))
def test_register_refuses(corpus, registry, case):
    before = _snapshot(corpus[case].parent)
    with pytest.raises(BundleError, match=CASES[case][2]) as refused:
        registry.register(corpus[case])
    assert "\n" not in str(refused.value)
    _assert_untouched(registry, corpus[case].parent, before)


@pytest.mark.parametrize("case", list(CASES))
def test_import_command_refuses(corpus, registry, case, monkeypatch):
    monkeypatch.setenv("STADAPTER_HOME", str(registry.home))
    before = _snapshot(corpus[case].parent)
    result = CliRunner().invoke(app, ["import", str(corpus[case]), "--db", registry.url])
    assert result.exit_code == 1, (result.output, result.exception)
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    assert re.search(CASES[case][2], lines[0])
    _assert_untouched(registry, corpus[case].parent, before)


def test_materialize_rechecks_names_from_the_database(tmp_path):
    from sqlalchemy import update
    from sqlalchemy.orm import Session

    from stadapter.registry.models import AdapterVersion

    with open_registry(str(tmp_path / "r.db"), tmp_path / "home", upgrade=True) as reg:
        info = reg.register(good_bundle(tmp_path / "good"))
        files = {**info.files, "../e.png": info.files[LABELS]}
        with Session(reg.engine) as s, s.begin():
            s.execute(update(AdapterVersion).where(AdapterVersion.id == info.id).values(files=files))
        with pytest.raises(BundleError, match=r"unsafe file name\(s\) \.\./e\.png"):
            reg.materialize(info.ref, dest=tmp_path / "out" / "bundle")
        assert not (tmp_path / "out" / "e.png").exists() and not (tmp_path / "e.png").exists()


def test_pull_refuses_and_leaves_nothing_in_the_hub_cache(corpus, hub, tmp_path, monkeypatch):  # noqa: F811
    from huggingface_hub import CommitOperationAdd, HfApi

    from stadapter.hub import pull_version

    monkeypatch.setenv("STADAPTER_HOME", str(tmp_path / "home"))

    api = HfApi(endpoint=hub.url, token=hub.token)
    with open_registry(str(tmp_path / "r.db"), tmp_path / "home", upgrade=True) as reg:
        for case in PULLED:
            repo = f"org/{case.replace('^', '')}"
            api.create_repo(repo)
            d = corpus[case]
            api.create_commit(repo, [CommitOperationAdd(p.name, p.read_bytes()) for p in sorted(d.iterdir())],
                              commit_message="crafted")
            with pytest.raises(BundleError, match=CASES[case][2]):
                pull_version(reg, repo, "main", endpoint=hub.url, token=hub.token)
            assert reg.list_tasks() == [] and list(reg.blobs.blobs()) == []
            storage = tmp_path / "home" / "hub" / "cache" / f"models--{repo.replace('/', '--')}"
            left = [p for p in storage.rglob("*") if p.is_file() and p.parent.name != "refs"]
            assert left == [], f"{case}: refused content left in the Hub cache: {left}"
        # The same steps with the good bundle register it, and its files do stay in the cache.
        good = corpus[PULLED[0]].parent.parent / "good"
        api.create_repo("org/good")
        api.create_commit("org/good", [CommitOperationAdd(p.name, p.read_bytes()) for p in sorted(good.iterdir())],
                          commit_message="good")
        assert pull_version(reg, "org/good", "main", endpoint=hub.url, token=hub.token).info.ref == "hostile:1"
        storage = tmp_path / "home" / "hub" / "cache" / "models--org--good"
        assert len([p for p in storage.rglob("*") if p.is_file() and p.parent.name == "blobs"]) == 5


def test_push_refuses_a_bundle_holding_a_symlink(corpus):
    from stadapter.hub import push

    with pytest.raises(BundleError, match=r"refusing config\.json: a bundle holds regular files only"):
        push(corpus["symlink-listed"], "org/linked", endpoint="http://127.0.0.1:9", token="unused")
