"""GET /v1/tasks at scale: pages and filters in one SQL statement per page (whatever the number of tasks), a
cache that lasts the alias TTL and then shows registry changes, servability read from the listing's own row (no
task resolved or loaded), and bad query parameters answered 4xx."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.server import ServerConfig, create_app
from test_registry_scale import statements
from test_registry_support import make_bundle as make_probe_bundle
from test_runtime_support import make_bundle

pytest_plugins = ["test_registry_support"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def served(tmp_path, tiny_backbone):  # type: ignore[no-untyped-def]
    reg = open_registry(home=tmp_path / "home")
    src, _, _ = make_bundle(tmp_path / "src", tiny_backbone, "walk", num_classes=4)
    for i in range(25):
        reg.register(src, task=f"walk{i:02d}")
    reg.register(src, task="walk03")  # a second version
    reg.set_alias("walk03", "production", 1)
    reg.register(make_probe_bundle(tmp_path / "other", task="alien", fingerprint="fp-other"))
    clock = Clock()
    engine = Engine(tiny_backbone, reg, device="cpu", alias_ttl=5.0, clock=clock)
    with TestClient(create_app(engine, ServerConfig())) as client:
        yield client, reg, engine, clock
    reg.close()


def test_pages_filters_and_entries(served):
    c, reg, engine, clock = served
    walked, after, pages = [], None, 0
    with statements(reg.engine) as sent:
        while True:
            body = c.get("/v1/tasks", params={"limit": 10, **({"after": after} if after else {})}).json()
            walked += body["tasks"]
            pages += 1
            after = body["next_after"]
            if after is None:
                break
    assert pages == 3 and len(sent) == 3  # one statement per page, none to resolve a task
    assert [t["task"] for t in walked] == ["alien"] + [f"walk{i:02d}" for i in range(25)]
    entry = {t["task"]: t for t in walked}
    assert entry["walk03"] | {"resident": None} == {
        "task": "walk03", "versions": 2, "latest": 2, "aliases": {"production": 1}, "servable": True,
        "version": "walk03:1", "num_classes": 4, "num_frames": 4, "views": 1, "resident": None}
    assert entry["alien"]["servable"] is False and "fp-other" in entry["alien"]["reason"]
    assert "resident" not in entry["alien"]
    # the resident flag is live: load a set, the (cached) page says so
    engine.acquire(engine.resolve("walk07"))
    page = c.get("/v1/tasks", params={"prefix": "walk0"}).json()
    assert [t["task"] for t in page["tasks"]] == [f"walk0{i}" for i in range(10)] and page["next_after"] is None
    assert {t["task"]: t["resident"] for t in page["tasks"]}["walk07"] == "device"
    assert [t["task"] for t in c.get("/v1/tasks", params={"alias": "production"}).json()["tasks"]] == ["walk03"]
    # the old shape is kept: backbone + tasks, with paging fields beside them
    assert set(c.get("/v1/tasks").json()) == {"backbone", "tasks", "next_after", "limit"}


def test_cached_for_the_alias_ttl_then_fresh(served):
    c, reg, engine, clock = served
    with statements(reg.engine) as sent:
        first = c.get("/v1/tasks", params={"limit": 5}).json()
        again = c.get("/v1/tasks", params={"limit": 5}).json()
    assert first == again and len(sent) == 1  # the second answer came from the cache
    reg.set_alias("walk01", "production", 1)
    reg.register(reg.materialize(reg.resolve("walk02")), task="also")  # a new task, on the first page by name
    assert c.get("/v1/tasks", params={"limit": 5}).json() == first  # within the TTL
    clock.now += 5.1
    fresh = {t["task"]: t for t in c.get("/v1/tasks", params={"limit": 5}).json()["tasks"]}
    assert fresh["walk01"]["aliases"] == {"production": 1}
    assert list(fresh) == ["alien", "also", "walk00", "walk01", "walk02"] and fresh["also"]["servable"] is True


def test_bad_parameters_are_client_errors(served):
    c, *_ = served
    for params, status in (({"limit": 0}, 422), ({"limit": 5000}, 422), ({"limit": "x"}, 422),
                           ({"after": "../etc"}, 400), ({"prefix": "a%"}, 400), ({"tag": "=v"}, 400)):
        r = c.get("/v1/tasks", params=params)
        assert r.status_code == status, (params, r.text)
        assert "Traceback" not in r.text


def test_listing_query_count_does_not_grow_with_tasks(tmp_path, tiny_backbone):
    reg = open_registry(home=tmp_path / "home")
    src, _, _ = make_bundle(tmp_path / "src", tiny_backbone, "walk")
    engine = Engine(tiny_backbone, reg, device="cpu", alias_ttl=0)  # no cache: every page queries
    counts = []
    with TestClient(create_app(engine, ServerConfig())) as c:
        for total in (10, 120):
            while len(reg.list_tasks()) < total:
                reg.register(src, task=f"t{len(reg.list_tasks()):03d}")
            with statements(reg.engine) as sent:
                body = c.get("/v1/tasks", params={"limit": 1000}).json()
            assert len(body["tasks"]) == total and all(t["servable"] for t in body["tasks"])
            counts.append(len(sent))
    reg.close()
    assert counts == [1, 1]


def test_a_version_whose_stored_config_is_broken_is_listed_as_not_servable(served):
    c, reg, engine, clock = served
    info = reg.resolve("walk05")
    with reg.engine.begin() as conn:  # a hostile or damaged row: the listing must say so, not crash
        conn.exec_driver_sql("UPDATE adapter_versions SET config = ? WHERE id = ?",
                             ('{"format_version": 1, "adapter": "nonsense"}', info.id))
    entry = {t["task"]: t for t in c.get("/v1/tasks", params={"prefix": "walk0"}).json()["tasks"]}["walk05"]
    assert entry["servable"] is False and "config.json" in entry["reason"], entry
    assert {t["task"]: t for t in c.get("/v1/tasks", params={"prefix": "walk0"}).json()["tasks"]}["walk04"][
        "servable"] is True
