"""Bundles that follow their registry rows (stadapter/registry/remote.py): two STADAPTER_HOMEs ("machines")
share one PostgreSQL database; a version registered on the first is predicted on the second with no manual
pull, its files fetched from the Hub commit it was pushed to (the local Hub test server) or from a shared
``file://`` store, each verified against the row's sha256; tampered remote bytes are refused."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest

from hub_fixtures import TOKEN, hub, hub_factory, make_bundle, online  # noqa: F401 - fixtures
from stadapter.errors import BundleError, RegistryError
from stadapter.hub import push_version
from stadapter.registry import db as dbm
from stadapter.registry import open_registry
from stadapter.registry.remote import ENV, SharedStore, publish_version
from stadapter.runtime.predict import predict_files
from test_registry_support import pg_database  # noqa: F401 - fixture
from test_runtime_support import write_clip

pytestmark = pytest.mark.postgres
REPO = "team/demo-adapter"


@pytest.fixture
def pg(pg_database):  # noqa: F811 - the imported fixture
    engine = dbm.make_engine(pg_database)
    try:
        dbm.upgrade(engine, "head")
    finally:
        engine.dispose()
    return pg_database


@pytest.fixture
def machines(pg, tmp_path, monkeypatch):
    """Two registries over one PostgreSQL database, each with its own home (blob store, caches)."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    homes = [tmp_path / "machine-a", tmp_path / "machine-b"]
    regs = [open_registry(pg, h) for h in homes]
    yield regs
    for r in regs:
        r.close()


def _elsewhere(reg) -> None:
    """Make the first machine's files unreachable: on one file system a version's recorded blob store would
    otherwise be read directly (Registry._store_with)."""
    shutil.rmtree(reg.home)


@contextlib.contextmanager
def _away(reg):
    """The first machine's blob store out of reach for a while (it stays in use between)."""
    hidden = reg.blobs.root.with_name("blobs-away")
    reg.blobs.root.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(reg.blobs.root)


def _predict(reg, clip: Path, monkeypatch) -> list:
    monkeypatch.setenv("STADAPTER_HOME", str(reg.home))  # the Hub cache and work folders of this machine
    out = predict_files(reg, [clip], ["demo"], k=3, device="cpu")
    assert not out.errors
    return out.results[0]["tasks"]


def test_pushed_version_is_predicted_on_another_machine_without_a_pull(machines, hub, tiny_backbone,  # noqa: F811
                                                                       tmp_path, monkeypatch):
    a, b = machines
    info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone, seed=3))
    push_version(a, info.ref, REPO, endpoint=hub.url, token=TOKEN, timeout=10)
    clip = write_clip(tmp_path / "clip.mp4")
    expected = _predict(a, clip, monkeypatch)
    _elsewhere(a)

    assert not any(b.blobs.path(e["sha256"]).exists() for e in info.files.values())
    with pytest.raises(BundleError, match=r"missing from the blob store .* not reachable elsewhere; also looked "
                                          r"in: no shared store .*the Hub .*cannot reach"):
        monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: every place fails, named
        b.materialize(info.ref)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert _predict(b, clip, monkeypatch) == expected  # fetched from the Hub commit, verified, no pull
    assert all(b.blobs.check(b.blobs.path(e["sha256"]), e["sha256"], e["size"]) for e in info.files.values())
    assert [v.ref for v in b.list_versions("demo")] == ["demo:1"]  # nothing registered by the fetch


def test_tampered_hub_file_is_refused_and_not_stored(machines, hub, tiny_backbone, tmp_path,  # noqa: F811
                                                     monkeypatch):
    a, b = machines
    info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone, seed=4))
    push_version(a, info.ref, REPO, endpoint=hub.url, token=TOKEN, timeout=10)
    data = bytearray((a.materialize(info) / "adapter.safetensors").read_bytes())
    data[-1] ^= 0x01  # one bit in the last tensor value
    hub.tamper(REPO, "adapter.safetensors", bytes(data))
    _elsewhere(a)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("STADAPTER_HOME", str(b.home))
    with pytest.raises(BundleError, match=r"demo:1: adapter.safetensors from the Hub .* does not match the sha256 "
                                          r"the registry recorded .*tampered or corrupt, refused"):
        b.materialize(info.ref)
    sha = info.files["adapter.safetensors"]["sha256"]
    assert not b.blobs.path(sha).exists()
    assert not list(b.blobs.path(sha).parent.glob(".tmp-*"))  # no staging file left behind


def test_never_pushed_version_names_every_place_looked(machines, tiny_backbone, tmp_path):
    a, b = machines
    info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone))
    _elsewhere(a)
    with pytest.raises(BundleError) as e:
        b.materialize(info.ref)
    msg = str(e.value)
    assert msg.startswith("demo:1: README.md, adapter.safetensors, config.json")
    assert f"are missing from the blob store {b.blobs.root} and not reachable elsewhere" in msg
    assert f"no shared store ({ENV} is not set)" in msg and "never pushed" in msg


def test_file_store_publishes_at_registration_and_refuses_tampered_blobs(machines, tiny_backbone, tmp_path,
                                                                         monkeypatch):
    a, b = machines
    early = a.register(make_bundle(tmp_path / "early", tiny_backbone, seed=1))  # before the store was set
    shared = tmp_path / "team-store"
    monkeypatch.setenv(ENV, shared.as_uri())
    info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone, seed=2))  # published before its row
    store = SharedStore(shared.as_uri())
    assert all(store.has(e["sha256"], e["size"]) for e in info.files.values())
    clip = write_clip(tmp_path / "clip.mp4")
    expected = _predict(a, clip, monkeypatch)
    with _away(a):
        assert _predict(b, clip, monkeypatch) == expected  # demo -> demo:2, fetched from the shared store
        with pytest.raises(BundleError, match=r"demo:1: .*not reachable elsewhere; .*the shared store file://.*"
                                              r"\(lacks "):
            b.materialize(early.ref)
    shared_before = {e["sha256"] for e in info.files.values()}  # blobs the two versions share are there
    assert publish_version(a, early.ref) == len({e["sha256"] for e in early.files.values()} - shared_before) > 0
    assert publish_version(a, early.ref) == 0  # already there
    with _away(a):
        assert b.materialize(early.ref).is_dir()

    third = a.register(make_bundle(tmp_path / "third", tiny_backbone, seed=5))
    sha = third.files["adapter.safetensors"]["sha256"]
    blob = Path(store.path(sha))
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    with _away(a), pytest.raises(BundleError, match=r"demo:3: adapter.safetensors from the shared store "
                                                    r"file://.* does not match the sha256 the registry recorded"):
        b.materialize(third.ref)
    assert not b.blobs.path(sha).exists()


def test_unusable_store_urls_are_one_line_errors(tmp_path):
    with pytest.raises(RegistryError, match="is not a URL"):
        SharedStore(str(tmp_path))
    with pytest.raises(RegistryError, match=r"nosuchproto"):
        SharedStore("nosuchproto://bucket/x")


def test_publish_command_and_push_publish_flag(machines, hub, tiny_backbone, tmp_path, monkeypatch):  # noqa: F811
    from typer.testing import CliRunner

    from stadapter.cli.main import app

    a, b = machines
    info = a.register(make_bundle(tmp_path / "bundle", tiny_backbone, seed=6))
    monkeypatch.setenv("STADAPTER_HOME", str(a.home))
    runner = CliRunner()
    shared = tmp_path / "cli-store"
    out = runner.invoke(app, ["publish", "demo:1", "--db", a.url, "--store", shared.as_uri()])
    assert out.exit_code == 0, out.output
    assert f"published demo:1: {len(info.files)} new file(s) in {shared.as_uri()}" in out.output
    refused = runner.invoke(app, ["push", "demo:1", "--repo", REPO, "--db", a.url, "--publish",
                                  "--endpoint", hub.url, "--token", TOKEN])
    assert refused.exit_code == 1 and "--publish needs a shared store" in refused.output
    monkeypatch.setenv(ENV, (tmp_path / "push-store").as_uri())
    pushed = runner.invoke(app, ["push", "demo:1", "--repo", REPO, "--db", a.url, "--publish",
                                 "--endpoint", hub.url, "--token", TOKEN])
    assert pushed.exit_code == 0, pushed.output
    store = SharedStore((tmp_path / "push-store").as_uri())
    assert all(store.has(e["sha256"], e["size"]) for e in info.files.values())
    with _away(a):
        assert b.materialize(info.ref).is_dir()  # from the store the push published to
