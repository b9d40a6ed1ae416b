"""The workflows the CLI calls, used as a library: registry versions through the Hub (push_version /
pull_version against our Hub-compatible server), and the layering rule that keeps them out of the CLI."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from hub_fixtures import TOKEN, files_of, hub, hub_factory, make_bundle, online  # noqa: F401
from stadapter.errors import BundleError, HubError, RegistryError
from stadapter.hub import pull_version, push_version
from stadapter.model_card import parse_card
from stadapter.registry import open_registry

REPO = "org/demo"
PACKAGE = Path(__file__).resolve().parent.parent / "stadapter"


@pytest.fixture
def registries(tmp_path, hub, online, tiny_backbone):
    """reg1 holding demo:1 and demo:2 (told apart by their weights and metrics), an empty reg2 in another
    home; the default Hub cache under a third home."""
    online.setenv("STADAPTER_HOME", str(tmp_path / "home"))
    reg1 = open_registry(home=tmp_path / "home1")
    reg2 = open_registry(home=tmp_path / "home2")
    for seed in (1, 2):
        reg1.register(make_bundle(tmp_path / f"b{seed}", tiny_backbone, seed=seed, metrics={"top1": seed / 4}),
                      source={"kind": "train"})
    yield reg1, reg2
    reg1.close()
    reg2.close()


def test_push_version_records_the_hub_location_and_pull_version_registers_with_lineage(registries, hub):
    reg1, reg2 = registries
    hub_args = {"endpoint": hub.url, "token": TOKEN, "timeout": 10}
    pushed = push_version(reg1, "demo:1", REPO, **hub_args)
    c1 = hub.store.resolve(REPO, "v1")
    assert pushed.result.created and pushed.result.repo_created and pushed.result.commit == c1
    assert (pushed.info.ref, pushed.info.hub_repo, pushed.info.hub_commit, pushed.info.hub_tag) == (
        "demo:1", REPO, c1, "v1")
    assert reg1.resolve("demo:1").hub_commit == c1  # recorded in the database, not only in the answer
    meta, _ = parse_card(hub.store.read_object(hub.store.tree(REPO, c1)["README.md"]["oid"]).decode())
    assert meta["stadapter"]["version"] == 1 and meta["model-index"][0]["results"][0]["metrics"][0]["value"] == 25.0
    # Unchanged: the same commit, no new one. A VersionInfo works as the reference too.
    commits = hub.commit_count(REPO)
    again = push_version(reg1, reg1.resolve("demo:1"), REPO, **hub_args)
    assert not again.result.created and again.result.commit == c1 and hub.commit_count(REPO) == commits
    c2 = push_version(reg1, "demo:2", REPO, **hub_args).result.commit
    assert c2 != c1 and hub.store.resolve(REPO, "v2") == c2

    pulled = pull_version(reg2, f"{REPO}@v1", **hub_args)
    assert pulled.registered and (pulled.repo, pulled.revision, pulled.commit) == (REPO, "v1", c1)
    assert pulled.info.ref == "demo:1"
    assert pulled.info.source == {"kind": "hub", "repo": REPO, "commit": c1, "revision": "v1", "tag": "v1"}
    assert files_of(reg2.materialize(pulled.info)) == {
        n: hub.store.read_object(e["oid"]) for n, e in hub.store.tree(REPO, c1).items() if n != ".gitattributes"}
    # The same commit by sha (revision given apart from the repo): nothing new.
    same = pull_version(reg2, REPO, c1, **hub_args)
    assert not same.registered and same.info.id == pulled.info.id and same.revision == c1
    # The default revision is main (v2 now); under another task name it is a new version, without a tag.
    copy = pull_version(reg2, REPO, task="demo-copy", **hub_args)
    assert copy.registered and copy.info.ref == "demo-copy:1" and copy.commit == c2
    assert copy.info.source == {"kind": "hub", "repo": REPO, "commit": c2, "revision": "main"}
    assert [v.version for v in reg2.list_versions("demo")] == [1]


def test_workflow_errors_leave_the_registries_as_they_were(registries, hub):
    reg1, reg2 = registries
    hub_args = {"endpoint": hub.url, "token": TOKEN, "timeout": 10}
    with pytest.raises(RegistryError, match="no task 'nope'"):
        push_version(reg1, "nope:1", REPO, **hub_args)
    with pytest.raises(HubError, match="not a Hub repository id"):
        push_version(reg1, "demo:1", "not-a-repo", **hub_args)
    assert reg1.resolve("demo:1").hub_repo is None
    push_version(reg1, "demo:1", REPO, **hub_args)
    with pytest.raises(HubError, match="revision 'v7' not found in org/demo"):
        pull_version(reg2, REPO, "v7", **hub_args)
    with pytest.raises(HubError, match="not a Hub repository id"):  # a revision given twice
        pull_version(reg2, f"{REPO}@v1", "v1", **hub_args)
    hub.tamper(REPO, "labels.json", b'["pan left", "pan right", "zoom out"]\n')
    with pytest.raises(BundleError, match="labels.json does not match its sha256"):
        pull_version(reg2, REPO, **hub_args)
    assert reg2.list_tasks() == []


def _imported_modules(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def test_nothing_outside_the_cli_imports_from_it():
    """Workflows live in the library; the CLI only parses, calls and prints. ``python -m stadapter`` is the
    one entry point into it."""
    offenders = {str(p.relative_to(PACKAGE)): sorted(m for m in _imported_modules(p) if m.startswith("stadapter.cli"))
                 for p in PACKAGE.rglob("*.py")
                 if "cli" not in p.relative_to(PACKAGE).parts[:1] and p.name != "__main__.py"}
    assert {k: v for k, v in offenders.items() if v} == {}
