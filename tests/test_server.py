"""`stadapter serve` over real HTTP on 127.0.0.1: concurrent clients across tasks, the bounded queue, bad clips,
allowed roots, alias changes, metrics, a forward that fails (once, or with a bug), the request timeout, a registry
database that goes away, and a graceful shutdown of the real command."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import httpx
import pytest
import torch
import uvicorn

from stadapter.config import TaskSpec
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.server import ServerConfig, create_app, uvicorn_config
from test_registry_support import _pg_admin
from test_runtime_support import register, write_clip

pytest_plugins = ["test_registry_support"]  # fixtures: pg_database

ROOT = Path(__file__).resolve().parent.parent
TASKS = {  # name -> (layout, spec)
    "walk": (dict(num_classes=5, width=8), TaskSpec(num_frames=4, sampling="segments", flip=False)),
    "swim": (dict(num_classes=3, width=16, positions=("attn", "mlp")),
             TaskSpec(num_frames=4, sampling="dense", frame_stride=2, temporal_views=2, spatial_views=3)),
    "jump": (dict(num_classes=7, width=8, last_k=1, activation="gelu"), TaskSpec(num_frames=2, frame_stride=4)),
}


class ServerThread:
    def __init__(self, app) -> None:
        # the server's own uvicorn settings (header deadline, keep-alive, connection limit)
        self.server = uvicorn.Server(uvicorn_config(app, app.state.config, "127.0.0.1", 0, log_level="warning",
                                                    graceful_timeout_s=10))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_backbone):
    """A registry with three tasks (different classes, layouts, frames, views) and a folder of clips."""
    tmp = tmp_path_factory.mktemp("server")
    home = tmp / "home"
    reg = open_registry(home=home)
    refs = {}
    for i, (name, (layout, spec)) in enumerate(TASKS.items()):
        info, tensors, model = register(reg, tmp, tiny_backbone, name, seed=20 + i, spec=spec, **layout)
        refs[name] = (tensors, model)
    clips = tmp / "clips"
    clips.mkdir()
    for i in range(3):
        write_clip(clips / f"c{i}.mp4", frames=20 + 5 * i, seed=i)
    (clips / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(3000))
    outside = tmp / "outside"
    outside.mkdir()
    write_clip(outside / "secret.mp4", frames=12, seed=9)
    (clips / "link.mp4").symlink_to(outside / "secret.mp4")
    yield {"reg": reg, "home": home, "refs": refs, "clips": clips, "outside": outside, "tmp": tmp}
    reg.close()


@contextmanager
def running(world, backbone, make_engine: Callable[..., Engine] = Engine, registry=None, **config):
    engine = make_engine(backbone, registry or world["reg"], device="cpu", alias_ttl=config.pop("alias_ttl", 2.0),
                         max_resident=config.pop("max_resident", 64))
    cfg = ServerConfig(allowed_roots=[world["clips"]], **config)
    with ServerThread(create_app(engine, cfg)) as server:
        yield server, engine


def expected_probs(engine: Engine, world, path: Path, name: str) -> torch.Tensor:
    """The task run alone, in-process, through its reference model on the same views."""
    h = engine.resolve(name)
    (views,) = engine.clip_views(path, [h])
    tensors, model = world["refs"][name]
    with torch.no_grad():
        return model(views, tensors).softmax(-1).mean(0)


def probs_of(result: dict, labels: list[str] | tuple[str, ...]) -> torch.Tensor:
    p = torch.zeros(len(labels))
    for item in result["top"]:
        p[labels.index(item["label"])] = item["prob"]
    return p


def test_concurrent_clients_across_several_tasks(world, tiny_backbone):
    with running(world, tiny_backbone, max_batch=16, max_wait_ms=20) as (server, engine):
        clips = sorted(world["clips"].glob("c*.mp4"))
        jobs = []
        for i in range(18):
            clip = clips[i % len(clips)]
            tasks = [list(TASKS)[i % 3]] + ([list(TASKS)[(i + 1) % 3]] if i % 2 else [])
            jobs.append((clip, tasks, i % 3 == 0))

        def call(job):
            clip, tasks, upload = job
            with httpx.Client(base_url=server.url, timeout=60) as c:
                if upload:
                    r = c.post("/v1/predict", files={"clip": (clip.name, clip.read_bytes(), "video/mp4")},
                               data={"tasks": ",".join(tasks), "top_k": "10"})
                else:
                    r = c.post("/v1/predict", json={"path": str(clip), "tasks": tasks, "top_k": 10})
            return job, r

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(call, jobs))
        for (clip, tasks, _), r in answers:
            assert r.status_code == 200, r.text
            body = r.json()
            assert [t["task"] for t in body["tasks"]] == tasks
            for t in body["tasks"]:
                h = engine.resolve(t["task"])
                assert t["views"] == h.spec.temporal_views * h.spec.spatial_views
                got = probs_of(t, h.labels)
                assert torch.allclose(got, expected_probs(engine, world, clip, t["task"]), atol=1e-5), t
        with httpx.Client(base_url=server.url) as c:
            metrics = c.get("/metrics").text
        sizes = [line for line in metrics.splitlines() if line.startswith("stadapter_batch_requests_count")]
        batches = float(sizes[0].split()[-1])
        assert batches < 18, "concurrent requests were batched together"
        mixed = [line for line in metrics.splitlines() if line.startswith('stadapter_batch_tasks_bucket{le="1.0"}')]
        assert float(mixed[0].split()[-1]) < batches, "some batch mixed tasks"


def test_full_queue_answers_429_and_the_server_keeps_serving(world, tiny_backbone):
    with running(world, tiny_backbone, max_batch=1, max_wait_ms=0, queue_size=1) as (server, _):
        clip = world["clips"] / "c2.mp4"

        def call(_):
            with httpx.Client(base_url=server.url, timeout=60) as c:
                return c.post("/v1/predict", json={"path": str(clip), "tasks": ["swim"]})

        with ThreadPoolExecutor(24) as pool:
            codes = [r.status_code for r in pool.map(call, range(48))]
        assert set(codes) <= {200, 429} and codes.count(429) >= 1 and codes.count(200) >= 2, codes
        with httpx.Client(base_url=server.url, timeout=60) as c:
            r = c.post("/v1/predict", json={"path": str(clip), "tasks": ["swim"]})
            assert r.status_code == 200
            assert 'stadapter_rejected_total{reason="queue_full"}' in c.get("/metrics").text


def test_bad_clips_paths_and_tasks_get_clear_errors_and_serving_goes_on(world, tiny_backbone):
    with running(world, tiny_backbone) as (server, _), httpx.Client(base_url=server.url, timeout=60) as c:
        good = {"path": str(world["clips"] / "c0.mp4"), "tasks": ["walk"]}
        r = c.post("/v1/predict", files={"clip": ("x.mp4", b"not a video at all" * 50, "video/mp4")},
                   data={"tasks": "walk"})
        assert r.status_code == 422 and "cannot open as a video" in r.json()["detail"], r.text
        r = c.post("/v1/predict", json={"path": str(world["clips"] / "broken.mp4"), "tasks": ["walk"]})
        assert r.status_code == 422, r.text
        assert c.post("/v1/predict", json=good).status_code == 200
        # outside the allowed roots: directly, through '..', and through a symlink inside the root
        for path in [str(world["outside"] / "secret.mp4"), str(world["clips"] / ".." / "outside" / "secret.mp4"),
                     str(world["clips"] / "link.mp4"), "/etc/passwd"]:
            r = c.post("/v1/predict", json={"path": path, "tasks": ["walk"]})
            assert r.status_code == 403 and "outside the allowed roots" in r.json()["detail"], (path, r.text)
        r = c.post("/v1/predict", json={"path": str(world["clips"] / "nope.mp4"), "tasks": ["walk"]})
        assert r.status_code == 404
        r = c.post("/v1/predict", json={**good, "tasks": ["walk", "unknown-task"]})
        assert r.status_code == 404 and "unknown-task" in r.json()["detail"]
        assert c.post("/v1/predict", json={**good, "tasks": []}).status_code == 400
        assert c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"}).status_code == 400
        assert c.post("/v1/predict", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        r = c.post("/v1/predict", json={**good, "tasks": "walk,swim", "top_k": 2})
        assert r.status_code == 200 and [len(t["top"]) for t in r.json()["tasks"]] == [2, 2]


def test_alias_change_is_picked_up_without_restart(world, tiny_backbone, tmp_path):
    reg = world["reg"]
    layout, spec = TASKS["walk"]
    v1, t1, m1 = register(reg, tmp_path, tiny_backbone, "hop", seed=41, spec=spec, **layout)
    v2, t2, m2 = register(reg, tmp_path, tiny_backbone, "hop", seed=42, spec=spec, **layout)
    reg.set_alias("hop", "production", 1)
    with running(world, tiny_backbone, alias_ttl=0.3) as (server, _), httpx.Client(base_url=server.url,
                                                                                    timeout=60) as c:
        req = {"path": str(world["clips"] / "c1.mp4"), "tasks": ["hop"]}
        assert c.post("/v1/predict", json=req).json()["tasks"][0]["version"] == "hop:1"
        reg.set_alias("hop", "production", 2)
        deadline = time.monotonic() + 10
        while c.post("/v1/predict", json=req).json()["tasks"][0]["version"] != "hop:2":
            assert time.monotonic() < deadline, "alias change not picked up"
            time.sleep(0.1)
        tasks = c.get("/v1/tasks").json()["tasks"]
        hop = next(t for t in tasks if t["task"] == "hop")
        assert hop["version"] == "hop:2" and hop["aliases"] == {"production": 2} and hop["servable"]


def test_health_readiness_tasks_docs_and_metrics(world, tiny_backbone):
    with running(world, tiny_backbone, max_resident=1) as (server, _), httpx.Client(base_url=server.url,
                                                                                    timeout=60) as c:
        assert c.get("/healthz").json() == {"status": "ok"}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["device"] == "cpu"
        names = {t["task"] for t in c.get("/v1/tasks").json()["tasks"]}
        assert set(TASKS) <= names
        spec = c.get("/openapi.json").json()
        assert "/v1/predict" in spec["paths"] and "multipart/form-data" in json.dumps(spec["paths"]["/v1/predict"])
        for name in ["walk", "swim", "walk", "jump"]:
            r = c.post("/v1/predict", json={"path": str(world["clips"] / "c0.mp4"), "tasks": [name]})
            assert r.status_code == 200
        text = c.get("/metrics").text
        for needle in ['stadapter_requests_total{code="200",endpoint="/v1/predict"} 4.0',
                       "stadapter_request_latency_seconds_bucket", "stadapter_batch_size_bucket",
                       "stadapter_adapter_swaps_total", 'stadapter_pool_hits_total{tier="device"}',
                       "stadapter_pool_misses_total", "stadapter_pool_evictions_total",
                       "stadapter_pool_resident_sets 1.0"]:
            assert needle in text, needle
        swaps = next(float(line.split()[-1]) for line in text.splitlines()
                     if line.startswith("stadapter_adapter_swaps_total"))
        assert swaps >= 4


class FlakyEngine(Engine):
    """The real engine with faults injected into its forward: calls numbered in ``failing_calls`` (from 1) raise
    ``error`` (the batcher calls ``predict`` once per forward)."""

    def __init__(self, *args, failing_calls: set[int], error: Exception, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.failing_calls, self.error, self.calls = failing_calls, error, 0

    def predict(self, requests):
        self.calls += 1
        if self.calls in self.failing_calls:
            raise self.error
        return super().predict(requests)


def flaky(calls: set[int], error: Exception) -> Callable[..., FlakyEngine]:
    return partial(FlakyEngine, failing_calls=calls, error=error)


@pytest.mark.timeout(90)
def test_a_forward_that_fails_once_is_answered_not_left_hanging(world, tiny_backbone):
    make_engine = flaky({1}, RuntimeError("a transient device error"))
    with running(world, tiny_backbone, make_engine, max_wait_ms=0) as (server, engine), \
            httpx.Client(base_url=server.url, timeout=30) as c:
        clip = world["clips"] / "c1.mp4"
        r = c.post("/v1/predict", json={"path": str(clip), "tasks": ["walk"], "top_k": 10})
        assert r.status_code == 200, r.text
        (result,) = r.json()["tasks"]
        h = engine.resolve("walk")
        assert torch.allclose(probs_of(result, h.labels), expected_probs(engine, world, clip, "walk"), atol=1e-5)
        assert engine.calls == 2, "the failed forward ran once more, alone, and no more"


@pytest.mark.timeout(90)
def test_an_unexpected_error_in_the_forward_is_a_logged_500_not_a_400(world, tiny_backbone, caplog):
    make_engine = flaky({1, 2}, ValueError("shapes do not broadcast"))  # fails in the batch and alone
    with running(world, tiny_backbone, make_engine, max_wait_ms=0) as (server, engine), \
            httpx.Client(base_url=server.url, timeout=30) as c, caplog.at_level(logging.ERROR, "stadapter"):
        req = {"path": str(world["clips"] / "c0.mp4"), "tasks": ["walk"]}
        r = c.post("/v1/predict", json=req)
        assert r.status_code == 500, r.text
        assert r.json() == {"detail": "internal error; see the server log"}
        logged = [rec for rec in caplog.records if rec.exc_info and rec.exc_info[0] is ValueError]
        assert logged and "shapes do not broadcast" in str(logged[0].exc_info[1])
        assert engine.calls == 2
        assert c.post("/v1/predict", json=req).status_code == 200, "the server keeps serving"


@pytest.mark.timeout(90)
def test_a_request_past_its_timeout_answers_504_and_serving_goes_on(world, tiny_backbone):
    # the worker waits 3 s for more requests after the first, longer than the 0.5 s the request may take
    with running(world, tiny_backbone, max_batch=64, max_wait_ms=3000, request_timeout_s=0.5) as (server, _), \
            httpx.Client(base_url=server.url, timeout=30) as c:
        t0 = time.monotonic()
        r = c.post("/v1/predict", json={"path": str(world["clips"] / "c0.mp4"), "tasks": ["walk"]})
        assert r.status_code == 504, r.text
        assert time.monotonic() - t0 < 2.5
        detail = r.json()["detail"]
        assert "timeout (0.5 s)" in detail and "\n" not in detail, detail
        assert c.get("/readyz").status_code == 200
        assert 'stadapter_requests_total{code="504",endpoint="/v1/predict"} 1.0' in c.get("/metrics").text


@pytest.mark.postgres
@pytest.mark.timeout(120)
def test_a_registry_database_outage_answers_503_not_404(world, tiny_backbone, pg_database, tmp_path):
    reg = open_registry(pg_database, tmp_path / "home", upgrade=True)
    try:
        layout, spec = TASKS["walk"]
        register(reg, tmp_path, tiny_backbone, "walk", seed=20, spec=spec, **layout)
        # alias_ttl=0: every request resolves its tasks in the database
        with running(world, tiny_backbone, registry=reg, alias_ttl=0) as (server, _), \
                httpx.Client(base_url=server.url, timeout=30) as c:
            req = {"path": str(world["clips"] / "c0.mp4"), "tasks": ["walk"]}
            assert c.post("/v1/predict", json=req).status_code == 200
            assert c.post("/v1/predict", json={**req, "tasks": ["nope"]}).status_code == 404
            with _pg_admin() as admin:  # the database goes away under the running server
                admin.execute(f'DROP DATABASE "{pg_database.rsplit("/", 1)[1]}" WITH (FORCE)')
            for tasks in (["walk"], ["nope"]):
                r = c.post("/v1/predict", json={**req, "tasks": tasks})
                assert r.status_code == 503, r.text
                assert "registry database" in r.json()["detail"] and r.headers["retry-after"] == "1"
            r = c.get("/v1/tasks")
            assert r.status_code == 503 and "registry database" in r.json()["detail"], r.text
    finally:
        reg.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_shuts_down_gracefully_finishing_in_flight_requests(world):
    port = _free_port()
    env = {**os.environ, "STADAPTER_HOME": str(world["home"]), "PYTHONUNBUFFERED": "1"}
    env.pop("STADAPTER_DB", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "stadapter", "serve", "--port", str(port), "--backbone", "tiny", "--weights", "none",
         "--device", "cpu", "--preload", "walk", "--max-wait-ms", "1500", "--request-timeout", "60",
         "--allowed-root", str(world["clips"])],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not become ready"
            time.sleep(0.1)
        result = {}

        def slow_request():  # the worker holds it for up to 1.5 s waiting for more
            result["r"] = httpx.post(f"{url}/v1/predict", timeout=30,
                                     json={"path": str(world["clips"] / "c0.mp4"), "tasks": ["walk"]})

        t = threading.Thread(target=slow_request)
        t.start()
        time.sleep(0.6)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert result["r"].status_code == 200, result["r"].text
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url}/healthz", timeout=1)


def test_serve_caps_malloc_arenas_unless_the_user_chose(monkeypatch):
    """glibc's per-thread arenas made a soak's RSS creep (benchmarks/soak.py); serve caps them, but never
    overrides an explicit MALLOC_ARENA_MAX."""
    import sys

    from stadapter.runtime.server import cap_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "8")
    assert cap_malloc_arenas() is False
    monkeypatch.delenv("MALLOC_ARENA_MAX")
    assert cap_malloc_arenas() is sys.platform.startswith("linux")


def test_busy_and_unavailable_answers_say_when_to_retry():
    from stadapter.errors import RegistryUnavailable
    from stadapter.runtime.server import HTTPProblem, problem_of

    for error, status in ((HTTPProblem(429, "the queue is full"), 429), (RegistryUnavailable("db gone"), 503)):
        got, body, headers = problem_of(error, 7)
        assert got == status and headers["Retry-After"] == "7" and body["detail"]
    assert "Retry-After" not in problem_of(HTTPProblem(404, "no such clip"), 7)[2]
