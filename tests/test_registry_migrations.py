"""Alembic migrations: one head, a clean walk down and up again with data in the tables, models and
migrations that agree (a test that fails on drift), and schema checks on opening a database."""

from __future__ import annotations

import setuptools
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

import pytest

from stadapter.errors import RegistryError
from stadapter.registry import db as dbm
from stadapter.registry import open_registry
from stadapter.registry.models import Base
from test_registry_support import make_bundle

pytest_plugins = ["test_registry_support"]  # fixtures: db_url, empty_db, pg_database


def _diffs(engine: sa.Engine, metadata: sa.MetaData) -> list:
    with engine.connect() as conn:
        ctx = MigrationContext.configure(conn, opts={"compare_type": True})
        return compare_metadata(ctx, metadata)


def test_single_head_and_linear_history():
    script = dbm.script_directory()
    assert len(script.get_heads()) == 1, f"migrations have several heads: {script.get_heads()}"
    assert len(script.get_bases()) == 1
    revisions = list(script.walk_revisions())
    assert all(isinstance(r.down_revision, (str, type(None))) for r in revisions)  # no merge points
    assert [r for r, _, _ in dbm.history()][-1] == dbm.head_revision()
    assert script.get_heads() == [dbm.head_revision()]  # read from the files without Alembic, as Alembic reads it


def test_migrations_ship_in_the_package():
    packages = setuptools.find_packages(str(dbm.MIGRATIONS.parents[2]), include=["stadapter*"])
    assert {"stadapter.registry.migrations", "stadapter.registry.migrations.versions"} <= set(packages)
    assert (dbm.MIGRATIONS / "script.py.mako").is_file()  # shipped by package-data "*.mako"


def test_models_match_migrations(db_url):
    """Fails when a model changes without a migration (or the other way round)."""
    engine = dbm.make_engine(db_url)
    try:
        assert _diffs(engine, Base.metadata) == []
        # The check is live: a column the migrations do not have is reported.
        drifted = sa.MetaData(naming_convention=Base.metadata.naming_convention)
        for table in Base.metadata.sorted_tables:
            table.to_metadata(drifted)
        drifted.tables["tasks"].append_column(sa.Column("owner", sa.String(50)))
        diffs = _diffs(engine, drifted)
        assert [d[0] for d in diffs] == ["add_column"] and diffs[0][3].name == "owner"
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade_with_data(empty_db, tmp_path):
    engine = dbm.make_engine(empty_db)
    try:
        assert dbm.current_revision(engine) is None
        dbm.upgrade(engine, "head")
        with open_registry(empty_db, tmp_path / "home") as reg:
            a = reg.register(make_bundle(tmp_path / "a", task="k400"), source={"kind": "train"})
            b = reg.register(make_bundle(tmp_path / "b", task="k400", seed=1), parent=a)
            reg.set_alias("k400", "production", b.version)
            reg.set_tag(b, "owner", "me")
            reg.set_hub(a, "team/k400", "c0ffee", "v1")
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM adapter_versions")).scalar() == 2
        # Walk down one revision at a time, with the data still in the tables, to an empty database.
        steps = len(dbm.history())
        for _ in range(steps):
            dbm.downgrade(engine, "-1")
        assert dbm.current_revision(engine) is None
        assert set(sa.inspect(engine).get_table_names()) <= {"alembic_version"}
        dbm.upgrade(engine, "head")
        assert dbm.current_revision(engine) == dbm.head_revision()
        assert _diffs(engine, Base.metadata) == []
        with open_registry(empty_db, tmp_path / "home") as reg:
            assert reg.list_tasks() == []
            assert reg.register(tmp_path / "a").ref == "k400:1"
    finally:
        engine.dispose()


def test_unmigrated_database_names_the_command(empty_db, tmp_path):
    with pytest.raises(RegistryError, match="no stadapter registry schema.*`stadapter db upgrade --db "):
        open_registry(empty_db, tmp_path / "home")
    engine = dbm.make_engine(empty_db)
    try:
        dbm.upgrade(engine, "head")
        with engine.begin() as conn:  # pretend an older stadapter left the database one revision behind
            conn.execute(sa.text("UPDATE alembic_version SET version_num = 'ffffffff'"))
        with pytest.raises(RegistryError, match="does not know"):
            open_registry(empty_db, tmp_path / "home")
    finally:
        engine.dispose()


def test_older_schema_raises_and_upgrade_fixes(tmp_path):
    """A database behind the packaged head: opening it explicitly says to run `stadapter db upgrade`, and
    that command makes it usable. "Behind" is the base (empty) schema, then the first revision (0001)."""
    url = f"sqlite:///{tmp_path / 'old.db'}"
    engine = dbm.make_engine(url)
    try:
        dbm.upgrade(engine, "head")
        dbm.downgrade(engine, "base")
        with pytest.raises(RegistryError, match=r"has no stadapter registry schema; create it with `stadapter db "
                                                r"upgrade --db sqlite:///"):
            open_registry(url, tmp_path / "home")
        dbm.upgrade(engine, "0001")
        head = dbm.head_revision()
        assert head != "0001"
        with pytest.raises(RegistryError, match=rf"at schema revision 0001, older than this stadapter's {head}; "
                                                r"run `stadapter db upgrade"):
            open_registry(url, tmp_path / "home")
        dbm.upgrade(engine, "head")
        with open_registry(url, tmp_path / "home") as reg:
            assert reg.list_tasks() == []
    finally:
        engine.dispose()


def test_0002_backfills_source_columns_and_adds_indexes(empty_db, tmp_path):
    """Versions registered at revision 0001 (source only as JSON) are found by repo + commit after the upgrade
    to 0002, which fills the new indexed columns from that JSON."""
    engine = dbm.make_engine(empty_db)
    try:
        dbm.upgrade(engine, "0001")
        assert "source_repo" not in {c["name"] for c in sa.inspect(engine).get_columns("adapter_versions")}
        with engine.begin() as conn:  # a row as revision 0001 wrote it
            conn.execute(sa.text("INSERT INTO backbones (id, spec, fingerprint, created_at) "
                                 "VALUES (1, 'tiny', 'fp', CURRENT_TIMESTAMP)"))
            conn.execute(sa.text("INSERT INTO tasks (id, name, last_version, created_at) "
                                 "VALUES (1, 'k400', 2, CURRENT_TIMESTAMP)"))
            for vid, source in ((1, '{"kind": "hub", "repo": "org/k400", "commit": "c0ffee"}'),
                                (2, '{"kind": "hub", "repo": ["not", "a", "string"], "commit": 7}')):
                conn.execute(sa.text(
                    "INSERT INTO adapter_versions (id, task_id, version, backbone_id, config, labels, files, "
                    "storage, source, status, created_at) VALUES (:id, 1, :id, 1, '{}', '[]', '{}', '', :src, "
                    "'ready', CURRENT_TIMESTAMP)"), {"id": vid, "src": source})
        dbm.upgrade(engine, "head")
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, source_repo, source_commit FROM adapter_versions "
                                        "ORDER BY id")).all()
        assert [tuple(r) for r in rows] == [(1, "org/k400", "c0ffee"), (2, None, None)]
        indexes = {i["name"] for t in ("adapter_versions", "tags") for i in sa.inspect(engine).get_indexes(t)}
        assert {"ix_adapter_versions_source", "ix_adapter_versions_parent_id", "ix_tags_key"} <= indexes
        dbm.downgrade(engine, "0001")
        assert "source_repo" not in {c["name"] for c in sa.inspect(engine).get_columns("adapter_versions")}
    finally:
        engine.dispose()


def test_bad_url_and_unreachable_server(tmp_path):
    with pytest.raises(RegistryError, match="not a database URL"):
        open_registry("nonsense://", tmp_path)
    with pytest.raises(RegistryError, match="not a database URL"):
        open_registry("nonsense://x/y", tmp_path)
    with pytest.raises(RegistryError, match="cannot open the registry database"):
        open_registry("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2", tmp_path)

