"""Several processes registering at once, and processes killed (SIGKILL) while publishing, on SQLite and on
PostgreSQL."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import tempfile
import time
from pathlib import Path

import pytest
from sqlalchemy import event
from sqlalchemy.orm import Session

from stadapter.registry import open_registry, store
from stadapter.registry.models import AdapterVersion
from test_registry_support import assert_all_rows_intact, make_bundle

pytest_plugins = ["test_registry_support"]  # fixtures: db_url, empty_db, pg_database

pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals")

WORKERS, PER_WORKER = 8, 25
# fork: the workers inherit the imported modules (eight interpreters importing torch at once on two cores
# take longer than the whole test); spawn where fork is missing.
MP = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")


def _register_many(db: str, home: str, bundle: str, n: int, go, conn) -> None:  # type: ignore[no-untyped-def]
    with open_registry(db, Path(home)) as reg:
        conn.send("ready")
        go.wait(60)
        conn.send([reg.register(Path(bundle), task="busy").version for _ in range(n)])


def _first_use(home: str, bundle: str, go, conn) -> None:  # type: ignore[no-untyped-def]
    go.wait(60)
    with open_registry(home=Path(home)) as reg:
        conn.send(reg.register(Path(bundle)).version)


def _stall(where: str, conn) -> None:  # type: ignore[no-untyped-def]
    conn.send(f"stalled {where}")
    time.sleep(300)


def _register_and_stall(db: str, home: str, mode: str, bundles: list[str], conn) -> None:  # type: ignore
    """Register ``bundles`` one by one, stalling at the point ``mode`` names (the parent SIGKILLs it there);
    mode "none" never stalls and never stops (the parent kills it at a random moment)."""
    if mode == "after-some-blobs":  # three blobs published, no row yet
        put, done = store.BlobStore.put, []

        def put_then_stall(self, *a, **k):  # type: ignore[no-untyped-def]
            out = put(self, *a, **k)
            done.append(out)
            if len(done) == 3:
                _stall(mode, conn)
            return out

        store.BlobStore.put = put_then_stall
    elif mode == "in-temp-file":  # a blob's bytes in its temporary file, neither fsynced nor renamed
        fsync, mkstemp, temp_fds = os.fsync, tempfile.mkstemp, set()

        def note_temp(*args, **kwargs):  # type: ignore[no-untyped-def]
            fd, name = mkstemp(*args, **kwargs)
            if Path(name).name.startswith(store.TMP_PREFIX):  # a blob's temporary file (fsio.publish_file)
                temp_fds.add(fd)
            return fd, name

        def stall_on_blob_fsync(fd: int) -> None:
            if fd in temp_fds:
                _stall(mode, conn)
            fsync(fd)

        tempfile.mkstemp = note_temp  # type: ignore[assignment]  # in this worker process only
        os.fsync = stall_on_blob_fsync
    elif mode == "before-commit":  # the version number taken and the row flushed, not committed
        @event.listens_for(Session, "before_commit")
        def stall_before_commit(session: Session) -> None:
            if any(isinstance(o, AdapterVersion) for o in session.identity_map.values()):
                _stall(mode, conn)

    with open_registry(db, Path(home)) as reg:
        conn.send("started")
        while True:  # mode "none": register again and again, so the parent's SIGKILL lands mid-registration
            for b in bundles:
                reg.register(Path(b), task="killed")
            if mode != "none":
                break
    conn.send("finished")


def _collect(pipes, procs, timeout: float) -> list:  # type: ignore[no-untyped-def]
    """One message from each worker; fails fast when a worker dies without sending one."""
    got: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    while len(got) < len(pipes):
        for i, ((r, _), p) in enumerate(zip(pipes, procs)):
            if i in got:
                continue
            if r.poll(0.05):
                got[i] = r.recv()
            elif not p.is_alive() and not r.poll(0):
                pytest.fail(f"worker {i} exited with code {p.exitcode} before answering (see its stderr)")
        assert time.monotonic() < deadline, f"workers {sorted(set(range(len(pipes))) - set(got))} hang"
    return [got[i] for i in range(len(pipes))]


@pytest.mark.slow
def test_concurrent_registrations_get_consecutive_versions(db_url, tmp_path):
    home = tmp_path / "home"
    bundles = [make_bundle(tmp_path / f"b{i}", task="busy", seed=i) for i in range(WORKERS)]
    go = MP.Event()
    pipes = [MP.Pipe(duplex=False) for _ in bundles]
    procs = [MP.Process(target=_register_many, args=(db_url, str(home), str(b), PER_WORKER, go, w))
             for b, (_, w) in zip(bundles, pipes)]
    for p in procs:
        p.start()
    try:
        assert _collect(pipes, procs, 120) == ["ready"] * WORKERS
        go.set()  # all workers register at once
        results = _collect(pipes, procs, 180)
        for p in procs:
            p.join(30)
            assert p.exitcode == 0
    finally:
        for p in procs:
            p.kill()
            p.join()
    got = sorted(v for r in results for v in r)
    assert got == list(range(1, WORKERS * PER_WORKER + 1))  # distinct, consecutive, none lost
    assert all(r == sorted(r) for r in results)  # each worker's numbers increase
    with open_registry(db_url, home) as reg:
        versions = reg.list_versions("busy")
        assert [v.version for v in versions] == got
        by_number = {v.version: v for v in versions}
        for i, r in enumerate(results):  # each number belongs to the bundle of the worker that got it
            want = json.loads((bundles[i] / "manifest.json").read_text())["files"]["adapter.safetensors"]
            assert {by_number[n].files["adapter.safetensors"]["sha256"] for n in r} == {want["sha256"]}
        assert set(reg.blobs.blobs()) == {e["sha256"] for v in versions for e in v.files.values()}
        assert reg.gc() == (0, 0)


def test_concurrent_first_use_of_the_default_database(tmp_path, monkeypatch):
    """Processes that all open a fresh default SQLite registry at once: one creates the schema, none fails."""
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    bundle = make_bundle(tmp_path / "b", task="first")
    go = MP.Event()
    pipes = [MP.Pipe(duplex=False) for _ in range(4)]
    procs = [MP.Process(target=_first_use, args=(str(tmp_path / "home"), str(bundle), go, w)) for _, w in pipes]
    for p in procs:
        p.start()
    go.set()
    try:
        assert sorted(_collect(pipes, procs, 120)) == [1, 2, 3, 4]
    finally:
        for p in procs:
            p.kill()
            p.join()


def _start(db_url: str, home: Path, mode: str, bundles: list[Path]):  # type: ignore[no-untyped-def]
    r, w = MP.Pipe(duplex=False)
    p = MP.Process(target=_register_and_stall, args=(db_url, str(home), mode, [str(b) for b in bundles], w))
    p.start()
    assert r.poll(60) and r.recv() == "started"
    return p, r


def _kill(p) -> None:  # type: ignore[no-untyped-def]
    os.kill(p.pid, signal.SIGKILL)
    p.join(60)
    assert p.exitcode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_while_publishing_leaves_no_broken_row(db_url, tmp_path):
    home = tmp_path / "home"
    first = make_bundle(tmp_path / "first", task="killed", seed=100)
    with open_registry(db_url, home) as reg:
        assert reg.register(first).version == 1

    # Killed at three fixed points of a registration, each with a bundle of new files.
    for i, mode in enumerate(("after-some-blobs", "in-temp-file", "before-commit")):
        p, r = _start(db_url, home, mode, [make_bundle(tmp_path / f"stall{i}", task="killed", seed=200 + i)])
        try:
            assert r.poll(60) and r.recv() == f"stalled {mode}"
        finally:
            _kill(p)
        with open_registry(db_url, home) as reg:
            assert [v.version for v in reg.list_versions("killed")] == list(range(1, i + 2))
            assert_all_rows_intact(reg, tmp_path / f"check{i}")
            # The next publish succeeds at once (the dead process's locks are gone) and takes the next number.
            t0 = time.monotonic()
            assert reg.register(first).version == i + 2
            assert time.monotonic() - t0 < 20
    with open_registry(db_url, home) as reg:
        blob_root = reg.blobs.root
    temps = list(blob_root.glob("*/.tmp-*"))
    assert temps, "the in-temp-file kill should have left a temporary file for gc"

    # Killed at random moments while registering larger bundles one after another.
    rng = random.Random(4)
    pool = [make_bundle(tmp_path / f"r{i}", task="killed", seed=300 + i, numel=20000) for i in range(18)]
    for k in range(3):
        p, r = _start(db_url, home, "none", pool[k * 6:(k + 1) * 6])
        time.sleep(rng.uniform(0.0, 0.2))
        _kill(p)

    with open_registry(db_url, home) as reg:
        numbers = assert_all_rows_intact(reg, tmp_path / "final")["killed"]
        assert numbers == list(range(1, len(numbers) + 1))  # consecutive: killed transactions took no number
        removed, _ = reg.gc()
        assert removed >= len(temps)
        assert not list(blob_root.glob("*/.tmp-*"))
        versions = reg.list_versions("killed")
        assert set(reg.blobs.blobs()) == {e["sha256"] for v in versions for e in v.files.values()}
        assert reg.register(pool[-1]).version == len(numbers) + 1
        assert_all_rows_intact(reg, tmp_path / "after-gc")
