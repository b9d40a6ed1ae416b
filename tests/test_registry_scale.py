"""A registry that stays fast as it grows: listings and resolves of a fixed number of SQL statements whatever the
number of tasks, every lookup on an index (query plans read on SQLite and PostgreSQL), pagination and filters,
and files hashed once when they enter the store (not on every process's first load unless asked)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import sqlalchemy as sa

from stadapter.errors import BundleError, RegistryError
from stadapter.registry import open_registry, queries
from stadapter.registry import store as store_module
from test_registry_support import make_bundle

pytest_plugins = ["test_registry_support"]  # fixtures: db_url, reg, pg_database


@contextmanager
def statements(engine: sa.Engine) -> Iterator[list[str]]:
    """The SQL statements the engine sends while the block runs."""
    seen: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # type: ignore[no-untyped-def]
        seen.append(statement)

    sa.event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "before_cursor_execute", record)


def populate(reg, tmp_path, n: int, start: int = 0) -> list[str]:  # type: ignore[no-untyped-def]
    """``n`` tasks t0000.. (one bundle's content under many names: its blobs are stored once); every third has
    two versions and a production alias on the first, every fifth a tag on its latest version."""
    src = tmp_path / "src"
    if not src.exists():
        make_bundle(src, task="seed")
    names = []
    for i in range(start, start + n):
        name = f"t{i:04d}"
        first = reg.register(src, task=name)
        if i % 3 == 0:
            latest = reg.register(src, task=name)
            reg.set_alias(name, "production", first.version)
            reg.set_alias(name, "staging", latest.version)
        else:
            latest = first
        if i % 5 == 0:
            reg.set_tag(latest, "owner", "vision" if i % 2 else "audio")
        names.append(name)
    return names


def test_listing_and_resolve_emit_the_same_statements_for_10_and_200_tasks(reg, tmp_path):
    counts = {}
    populate(reg, tmp_path, 10)
    for n in (10, 200):
        if n == 200:
            populate(reg, tmp_path, 190, start=10)
        with statements(reg.engine) as everything:
            tasks = reg.list_tasks()
        with statements(reg.engine) as page:
            first = reg.list_page(limit=50)
        with statements(reg.engine) as filtered:
            reg.list_page(limit=50, prefix="t00", alias="production", tag="owner=audio")
        with statements(reg.engine) as resolving:
            for ref in ("t0003", "t0003:2", "t0003@staging", "t0003:latest"):
                reg.resolve(ref)
        assert len(tasks) == n and len(first.tasks) == min(n, 50)
        counts[n] = (len(everything), len(page), len(filtered), len(resolving))
    assert counts[10] == counts[200] == (1, 1, 1, 4), counts  # one statement per listing and per resolve


def test_listing_pages_filters_and_current_version(reg, tmp_path):
    names = populate(reg, tmp_path, 23)
    reg.register(make_bundle(tmp_path / "other", task="zz-other", fingerprint="fp-b"))
    walked, after, pages = [], None, 0
    while True:
        page = reg.list_page(limit=5, after=after)
        walked += [t.name for t in page.tasks]
        pages += 1
        if page.next_after is None:
            break
        assert page.next_after == page.tasks[-1].name
        after = page.next_after
    assert walked == names + ["zz-other"] and pages == 5
    by_name = {t.name: t for t in reg.list_tasks()}
    t3, t4 = by_name["t0003"], by_name["t0004"]
    # production wins for the bare name; otherwise the latest; both match what resolve() says
    assert (t3.versions, t3.latest, t3.current, t3.aliases) == (2, 2, 1, {"production": 1, "staging": 2})
    assert (t4.versions, t4.latest, t4.current, t4.aliases) == (1, 1, 1, {})
    for name in ("t0003", "t0004", "zz-other"):
        info = reg.resolve(name)
        assert (by_name[name].current, by_name[name].current_id, by_name[name].current_fingerprint) == \
               (info.version, info.id, info.backbone_fingerprint)
        assert by_name[name].current_config == info.config and by_name[name].current_labels == info.labels
    assert t3.latest_metrics == {"top1": 0.5, "top5": 1.0}
    assert t3.to_dict()["current"] == 1 and "current_config" not in t3.to_dict()
    # filters: prefix (case-sensitive on both backends), alias, tag key, tag key=value, combined
    assert [t.name for t in reg.list_tasks(prefix="t001")] == [f"t001{i}" for i in range(10)]
    assert reg.list_tasks(prefix="T001") == [] and reg.list_tasks(prefix="t0_") == []
    assert [t.name for t in reg.list_tasks(alias="production")] == [n for i, n in enumerate(names) if i % 3 == 0]
    assert [t.name for t in reg.list_tasks(tag="owner")] == [n for i, n in enumerate(names) if i % 5 == 0]
    assert [t.name for t in reg.list_tasks(tag="owner=audio")] == [n for i, n in enumerate(names) if i % 10 == 0]
    assert [t.name for t in reg.list_tasks(alias="staging", tag="owner", prefix="t001", limit=1)] == ["t0015"]
    for bad in ({"limit": 0}, {"limit": 1001}, {"after": "../x"}, {"prefix": "a%"}, {"alias": ""}, {"tag": "=x"}):
        with pytest.raises(RegistryError, match="invalid"):
            reg.list_page(**bad)


def test_resolve_matches_the_long_path_and_keeps_its_errors(reg, tmp_path):
    a = reg.register(make_bundle(tmp_path / "a", task="k400"), source={"kind": "hub", "repo": "org/k", "commit": "c1"})
    b = reg.register(make_bundle(tmp_path / "b", task="k400", seed=1), parent=a)
    reg.set_alias("k400", "production", 1)
    reg.set_tag(b, "owner", "me")
    reg.set_tag(b, "stage", "beta")
    reg.set_alias("k400", "staging", 2)
    reg.set_alias("k400", "canary", 2)
    long_path = {v.version: v for v in reg.list_versions("k400")}  # the ORM path, relationship by relationship
    assert reg.resolve("k400") == long_path[1] and reg.resolve("k400@canary") == long_path[2]
    got = reg.resolve("k400:2")
    assert got == long_path[2] and got.aliases == ["canary", "staging"] and got.parent == "k400:1"
    assert got.tags == {"owner": "me", "stage": "beta"}
    assert reg.find_by_source("org/k", "c1") == long_path[1] and reg.find_by_source("org/k", "c2") is None
    assert reg.find_by_source("org/k", "c1", task="other") is None
    for ref, message in (("nope", "no task 'nope'"), ("k400:9", "has no version 9"),
                         ("k400@gone", "has no alias 'gone'")):
        with pytest.raises(RegistryError, match=message):
            reg.resolve(ref)
    with pytest.raises(Exception, match="fp-other"):
        reg.resolve("k400", fingerprint="fp-other")


# -- query plans -----------------------------------------------------------------------------------------

def _lookups(dialect: str) -> dict[str, tuple[sa.Select, dict]]:
    v = queries.VERSIONS
    return {
        **{f"resolve {ref}": queries.resolve("t0003", number, alias)
           for ref, number, alias in (("task", None, None), ("task:2", 2, None), ("task:latest", -1, None),
                                      ("task@staging", None, "staging"))},
        "version by id": (queries.by_id(), {"id": 3}),
        "by source": (queries.by_source("org/x", "c0ffee"), {}),
        "by source, one task": (queries.by_source("org/x", "c0ffee", "t0003"), {}),
        "children of a version": (sa.select(v.c.id).where(v.c.parent_id == 1), {}),
        "aliases of a version": (sa.select(queries.ALIASES.c.name).where(queries.ALIASES.c.version_id == 1), {}),
        "listing page": queries.listing(queries.Filters(after="t0005"), 10, dialect),
        "listing filtered": queries.listing(queries.Filters(prefix="t00", alias="production", tag="owner=audio"),
                                            10, dialect),
    }


def _plan(conn: sa.Connection, stmt: sa.Select, params: dict) -> str:
    compiled = stmt.compile(dialect=conn.dialect)
    values = compiled.construct_params(params)
    if conn.dialect.name == "sqlite":
        args = tuple(values[k] for k in compiled.positiontup or ())
        return "\n".join(row[-1] for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + str(compiled), args))
    return "\n".join(row[0] for row in conn.exec_driver_sql("EXPLAIN " + str(compiled), values))


def test_every_lookup_uses_an_index(reg, tmp_path):
    populate(reg, tmp_path, 30)
    with reg.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("ANALYZE")
            conn.exec_driver_sql("SET enable_seqscan = off")  # a table with no usable index still shows Seq Scan
        plans = {what: _plan(conn, *q) for what, q in _lookups(conn.dialect.name).items()}
    tables = "tasks|adapter_versions|aliases|tags|backbones"
    # SQLite: "SCAN <table>" without an index is a full scan; PostgreSQL: "Seq Scan on <table>"
    full_scan = re.compile(rf"^\s*SCAN ({tables})(?: AS \w+)?\s*$|Seq Scan on ({tables})\b", re.MULTILINE)
    for what, plan in plans.items():
        assert not full_scan.search(plan), f"{what} scans a whole table:\n{plan}"
        assert re.search(r"USING (COVERING )?INDEX|PRIMARY KEY|Index (Only )?Scan|Bitmap Index Scan", plan), plan
    # the check is live: a lookup on a column without an index is caught
    with reg.engine.connect() as conn:
        if conn.dialect.name == "postgresql":
            conn.exec_driver_sql("SET enable_seqscan = off")
        unindexed = _plan(conn, sa.select(queries.VERSIONS.c.id).where(queries.VERSIONS.c.data == "x"), {})
    assert full_scan.search(unindexed), unindexed


# -- files verified once, when they enter the store -----------------------------------------------------

@pytest.fixture
def hashes(monkeypatch) -> list[str]:
    """Every file the blob store hashes (the real sha256_file, counted)."""
    seen: list[str] = []
    real = store_module.sha256_file

    def counted(path):  # type: ignore[no-untyped-def]
        seen.append(str(path))
        return real(path)

    monkeypatch.setattr(store_module, "sha256_file", counted)
    return seen


def test_first_load_trusts_the_store_and_checks_sizes(db_url, tmp_path, hashes):
    home = tmp_path / "home"
    with open_registry(db_url, home) as reg:
        info = reg.register(make_bundle(tmp_path / "a", task="k400"))
        cached = reg.materialize(info)
    for verify, expected in (("store", 0), ("always", len(info.files))):
        with open_registry(db_url, home) as fresh:  # another process: a first load
            fresh.verify = verify
            hashes.clear()
            assert fresh.materialize(fresh.resolve("k400")) == cached
            assert len(hashes) == expected, (verify, hashes)
    with open_registry(db_url, home) as fresh:  # a cache built from scratch hashes nothing either
        from stadapter.registry.store import remove_tree

        remove_tree(cached)
        hashes.clear()
        assert sorted(p.name for p in fresh.materialize(info).iterdir()) == sorted(info.files)
        assert hashes == []
        # the trust is in the blobs' names and sizes: a truncated blob is caught without hashing
        blob = fresh.blobs.path(info.files["adapter.safetensors"]["sha256"])
        blob.chmod(0o644)
        blob.write_bytes(blob.read_bytes()[:-4])
        remove_tree(cached)
        with pytest.raises(BundleError, match="corrupt"):
            fresh.materialize(info)


def test_predict_verify_always_hashes_the_files_again(home, tmp_path, tiny_backbone):
    """`stadapter predict --verify always`: a blob changed in place (same size) after registration is refused
    with a one-line error naming the version and file."""
    from typer.testing import CliRunner

    from stadapter.cli.main import app
    from test_runtime_support import register, write_clip

    with open_registry() as reg:
        info, _, _ = register(reg, tmp_path, tiny_backbone, "walk", num_classes=3, width=8)
        blob = reg.blobs.path(info.files["adapter.safetensors"]["sha256"])
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.chmod(0o644)
    blob.write_bytes(bytes(data))
    clip = write_clip(tmp_path / "c.mp4", frames=12)
    args = ["predict", "--task", "walk", str(clip), "--device", "cpu", "--verify", "always"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 1 and "walk:1" in r.output and "corrupt" in r.output, r.output
    assert "Traceback" not in r.output
    r = CliRunner().invoke(app, [*args[:-1], "sometimes"])
    assert r.exit_code != 0 and "sometimes" in r.output


def test_an_unknown_task_names_a_bounded_number_of_known_tasks(reg, tmp_path):
    populate(reg, tmp_path, 25)
    with pytest.raises(RegistryError) as e:
        reg.resolve("nope")
    message = str(e.value)
    assert "t0000, t0001" in message and "t0019, ... (stadapter ls)" in message and "t0020" not in message


def test_ls_pages_and_filters(reg, db_url, tmp_path):
    import json

    from typer.testing import CliRunner

    from stadapter.cli.main import app

    names = populate(reg, tmp_path, 12)
    runner = CliRunner()
    seen, after = [], None
    while True:
        r = runner.invoke(app, ["ls", "--db", db_url, "--limit", "5", "--json", *(["--after", after] if after else [])])
        assert r.exit_code == 0, r.output
        page = json.loads(r.stdout)
        seen += [t["name"] for t in page["tasks"]]
        after = page["next_after"]
        if after is None:
            break
    assert seen == names
    table = runner.invoke(app, ["ls", "--db", db_url, "--limit", "2", "--alias", "production"], env={"COLUMNS": "200"})
    assert "t0000" in table.stdout and "t0003" in table.stdout and "t0001" not in table.stdout
    assert "more tasks follow: stadapter ls --after t0003" in table.stdout
    bad = runner.invoke(app, ["ls", "--db", db_url, "--prefix", "a%"])
    assert bad.exit_code == 1 and "invalid prefix" in bad.output and "Traceback" not in bad.output
