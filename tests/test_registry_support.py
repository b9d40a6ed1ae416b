"""Fixtures and helpers shared by the registry tests (no tests here).

Every registry test runs against SQLite (a file in tmp_path) and against the real PostgreSQL on
127.0.0.1:5432, in a fresh database with a random name that is dropped afterwards. Without a server the
PostgreSQL cases skip, except under STADAPTER_REQUIRE_POSTGRES=1 (CI), where they fail.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.registry import open_registry
from stadapter.registry import db as dbm

ROOT = Path(__file__).resolve().parent.parent
PG_HOST = os.environ.get("STADAPTER_TEST_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("STADAPTER_TEST_PG_PORT", "5432"))
PG_USER = os.environ.get("STADAPTER_TEST_PG_USER", "postgres")
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def _pg_admin():  # type: ignore[no-untyped-def]
    import psycopg

    return psycopg.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", autocommit=True,
                           connect_timeout=3)


def _require_postgres() -> None:
    try:
        with _pg_admin():
            pass
    except Exception as e:  # noqa: BLE001 - any failure to connect means "no server"
        if os.environ.get("STADAPTER_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL on {PG_HOST}:{PG_PORT} is required (STADAPTER_REQUIRE_POSTGRES=1) but "
                        f"unreachable: {e}")
        pytest.skip(f"PostgreSQL on {PG_HOST}:{PG_PORT} is unreachable: {e}")


@pytest.fixture
def pg_database() -> Iterator[str]:
    """A fresh, empty PostgreSQL database (random name), dropped after the test."""
    _require_postgres()
    name = f"stadapter_test_{secrets.token_hex(6)}"
    with _pg_admin() as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{PG_USER}@{PG_HOST}:{PG_PORT}/{name}"
    finally:
        with _pg_admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=BACKENDS)
def empty_db(request, tmp_path) -> str:  # type: ignore[no-untyped-def]
    """A URL of an empty database (no tables) on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return request.getfixturevalue("pg_database")


@pytest.fixture
def db_url(empty_db) -> str:  # type: ignore[no-untyped-def]
    """A database at the newest schema, on each backend."""
    engine = dbm.make_engine(empty_db)
    try:
        dbm.upgrade(engine, "head")
    finally:
        engine.dispose()
    return empty_db


@pytest.fixture
def reg(db_url, tmp_path, monkeypatch):  # type: ignore[no-untyped-def]
    home = tmp_path / "home"
    monkeypatch.setenv("STADAPTER_HOME", str(home))
    monkeypatch.delenv("STADAPTER_DB", raising=False)
    with open_registry(db_url, home) as r:
        yield r


def make_bundle(directory: Path, task: str = "demo", seed: int = 0, fingerprint: str = "fp-a",
                num_classes: int = 3, metrics: dict | None = None, numel: int = 8, **extra) -> Path:
    """A small, valid bundle directory with random (seeded) tensors: a linear probe (head tensors only)."""
    g = torch.Generator().manual_seed(seed)
    Bundle(task=task, adapter=AdapterConfig(num_classes=num_classes, width=4, method="linear-probe"), spec=TaskSpec(),
           backbone={"spec": "tiny", "weights": "none", "fingerprint": fingerprint},
           labels=[f"class{i}" for i in range(num_classes)],
           tensors={"head.weight": torch.randn(num_classes, numel, generator=g),
                    "head.bias": torch.zeros(num_classes)},
           metrics=metrics if metrics is not None else {"top1": 0.5, "top5": 1.0}, extra=extra).save(directory)
    return directory


def assert_all_rows_intact(reg, scratch: Path) -> dict[str, list[int]]:  # type: ignore[no-untyped-def]
    """Every version of every task materializes with verified files; returns {task: [versions]}."""
    out = {}
    for t in reg.list_tasks():
        versions = reg.list_versions(t.name)
        for v in versions:
            dest = scratch / f"{v.task}-{v.version}"
            reg.materialize(v, dest)  # raises when a file is missing, partial or corrupt
            assert sorted(p.name for p in dest.iterdir()) == sorted(v.files)
        out[t.name] = [v.version for v in versions]
    return out

