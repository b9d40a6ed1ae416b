"""`stadapter serve --ray` (stadapter/runtime/ray_app.py) on a local Ray cluster the test starts on 127.0.0.1:
tiny backbone, 2 replicas on the CPU, 8 tasks. Same answers as the single-process server; requests routed by
task to replicas that hold it (the affinity hit rate of a Zipf(1.1) stream is printed and must be >= 0.9);
metrics of both replicas on /metrics; an alias move reaches every replica within the alias TTL; a replica
killed mid-stream costs no request an answer (200, or a clear 503), and Ray replaces it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest

from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine
from stadapter.runtime.ray_app import (
    APP_NAME,
    REPLICA_HEADER,
    RESIDENT_HEADER,
    RaySettings,
    first_task,
    merge_expositions,
    start,
)
from stadapter.runtime.server import ServerConfig, create_app
from test_runtime_support import make_bundle, write_clip
from test_server import ServerThread

slow = pytest.mark.slow
TASKS = [f"t{i}" for i in range(8)]
ALIAS_TTL = 1.0
TOKEN = "ray-test-token-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, tiny_backbone):
    """8 tasks (t0 with two versions, production -> 1) in an SQLite registry, a clip, and the Ray Serve app."""
    ray = pytest.importorskip("ray", reason="pip install 'stadapter[ray]'")
    from ray import serve

    tmp = tmp_path_factory.mktemp("ray")
    home = tmp / "home"
    db = f"sqlite:///{tmp / 'registry.db'}"
    with open_registry(db, home, upgrade=True) as reg:
        for i, task in enumerate(TASKS):
            reg.register(make_bundle(tmp / f"b-{task}", tiny_backbone, task, seed=i, num_classes=3 + i % 3)[0])
        reg.register(make_bundle(tmp / "b-t0-v2", tiny_backbone, "t0", seed=100, num_classes=3)[0])
        reg.set_alias("t0", "production", 1)
    clip = write_clip(tmp / "clip.mp4")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 << 20, logging_level="WARNING",
             log_to_driver=False)
    port = _free_port()
    settings = RaySettings(db=db, device="cpu", replicas=2, max_resident=4, alias_ttl=ALIAS_TTL, replica_cpus=0.5,
                           metrics_interval_s=0.5, server={"max_wait_ms": 5.0, "token": TOKEN},
                           env={"STADAPTER_HOME": str(home), "OMP_NUM_THREADS": "1"})
    try:
        start(settings, port=port, blocking=False)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            yield {"client": client, "db": db, "home": home, "clip": clip, "serve": serve, "port": port}
    finally:
        serve.shutdown()
        ray.shutdown()


def _predict(client, clip, tasks: list[str]):
    return client.post("/v1/predict", files={"clip": ("clip.mp4", clip.read_bytes(), "video/mp4")},
                       data={"tasks": ",".join(tasks), "top_k": "3"})


def _single_process(db, home, clip, requests: list[list[str]]) -> list[dict]:
    """The answers of the one-process server (uvicorn, same FastAPI app) to the same requests."""
    with open_registry(db, home) as reg:
        engine = Engine.open(reg, device="cpu", max_resident=8, alias_ttl=ALIAS_TTL)
        with ServerThread(create_app(engine, ServerConfig(max_wait_ms=5.0))) as server, \
                httpx.Client(base_url=server.url, timeout=60) as client:
            return [_predict(client, clip, tasks).json()["tasks"] for tasks in requests]


def _same(a: list[dict], b: list[dict]) -> bool:
    return [(t["version"], [x["label"] for x in t["top"]]) for t in a] == \
        [(t["version"], [x["label"] for x in t["top"]]) for t in b] and \
        np.allclose([x["prob"] for t in a for x in t["top"]], [x["prob"] for t in b for x in t["top"]], atol=1e-4)


@slow
def test_routes_errors_and_openapi_are_the_single_process_servers(cluster):
    c = cluster["client"]
    assert c.get("/healthz").json() == {"status": "ok"}
    bare = f"http://127.0.0.1:{cluster['port']}"
    assert httpx.get(bare + "/healthz", timeout=30).status_code == 200  # open, as in the one-process server
    refused = httpx.post(bare + "/v1/predict", json={"path": "x", "tasks": ["t1"]}, timeout=30)
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert httpx.get(bare + "/metrics", timeout=30).status_code == 401
    assert c.get("/readyz").json()["status"] == "ready"
    paths = c.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/tasks", "/healthz", "/readyz", "/metrics"} <= set(paths)
    assert sorted(t["task"] for t in c.get("/v1/tasks").json()["tasks"]) == TASKS
    r = _predict(c, cluster["clip"], ["nope"])
    assert r.status_code == 404 and "no task 'nope'" in r.json()["detail"]
    r = c.post("/v1/predict", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["detail"] == "the body is not valid JSON"
    r = c.post("/v1/predict", content=b"x" * 10, headers={"content-type": "text/plain"})
    assert r.status_code == 415


@slow
def test_concurrent_requests_over_8_tasks_match_the_single_process_server(cluster):
    c, clip = cluster["client"], cluster["clip"]
    requests = [[t] for t in TASKS] + [[TASKS[i], TASKS[(i + 3) % 8]] for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda tasks: _predict(c, clip, tasks), requests))
    assert [r.status_code for r in got] == [200] * len(requests)
    assert len({r.headers[REPLICA_HEADER] for r in got}) == 2  # both replicas served
    expected = _single_process(cluster["db"], cluster["home"], clip, requests)
    for r, want in zip(got, expected, strict=True):
        assert _same(r.json()["tasks"], want), (r.json(), want)


@slow
def test_zipf_stream_lands_on_replicas_holding_its_task(cluster):
    c, clip = cluster["client"], cluster["clip"]
    rng = np.random.default_rng(0)
    weights = 1.0 / np.arange(1, 9) ** 1.1
    stream = [TASKS[i] for i in rng.choice(8, size=160, p=weights / weights.sum())]
    with ThreadPoolExecutor(4) as pool:
        warm = list(pool.map(lambda t: _predict(c, clip, [t]), stream[:40]))
        measured = list(pool.map(lambda t: _predict(c, clip, [t]), stream[40:]))
    assert all(r.status_code == 200 for r in warm + measured)
    hits = sum(r.headers[RESIDENT_HEADER] == "1" for r in measured) / len(measured)
    print(f"affinity hit rate after warm-up: {hits:.3f} over {len(measured)} requests (Zipf 1.1, 8 tasks, "
          f"2 replicas x 4 resident sets)")
    assert hits >= 0.9


@slow
def test_metrics_of_every_replica_reach_prometheus(cluster):
    c = cluster["client"]
    for t in TASKS[:4]:
        assert _predict(c, cluster["clip"], [t]).status_code == 200
    time.sleep(1.5)  # two report intervals
    text = c.get("/metrics").text
    replicas = {line.split('replica="')[1].split('"')[0] for line in text.splitlines()
                if line.startswith("stadapter_requests_total{")}
    assert len(replicas) == 2
    assert "stadapter_pool_resident_sets{" in text


@slow
def test_an_alias_move_reaches_every_replica_within_the_ttl(cluster):
    c, clip = cluster["client"], cluster["clip"]
    firsts = TASKS[1:]  # routed by the first task (its replica), the moved alias second
    before = [_predict(c, clip, [t, "t0"]).json()["tasks"][1]["version"] for t in firsts]
    assert set(before) == {"t0:1"}
    with open_registry(cluster["db"], cluster["home"]) as reg:
        reg.set_alias("t0", "production", 2)
    time.sleep(ALIAS_TTL + 0.5)
    after = [_predict(c, clip, [t, "t0"]) for t in firsts * 2]
    assert len({r.headers[REPLICA_HEADER] for r in after}) == 2
    assert {r.json()["tasks"][1]["version"] for r in after} == {"t0:2"}


@slow
def test_a_killed_replica_loses_no_request_and_is_replaced(cluster):
    c, clip, serve = cluster["client"], cluster["clip"], cluster["serve"]
    board = serve.get_deployment_handle("Board", APP_NAME)
    pids = board.replicas.remote().result(timeout_s=30)
    assert len(pids) == 2
    victim = sorted(pids.values())[0]

    def one(i: int):
        try:
            return _predict(c, clip, [TASKS[i % 8]])
        except httpx.TimeoutException:  # a hang: what must never happen
            return None

    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(one, i) for i in range(48)]
        while not any(f.done() for f in futures):  # serving has begun: kill while the rest are in flight
            time.sleep(0.005)
        os.kill(victim, signal.SIGKILL)
        in_flight = sum(not f.done() for f in futures)
        answers = [f.result() for f in futures]
    assert in_flight >= 8, in_flight  # the kill met requests in flight (else this test checked nothing)
    assert None not in answers
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 503}, codes
    for r in answers:
        if r.status_code == 503:
            assert "replica" in r.json()["detail"] and r.headers["retry-after"]
    print(f"after SIGKILL of one replica: {codes.count(200)} answered 200, {codes.count(503)} answered 503")
    deadline = time.monotonic() + 90  # Ray starts a replacement; both replicas serve again
    while time.monotonic() < deadline:
        now = board.replicas.remote().result(timeout_s=30)
        if len(now) == 2 and victim not in now.values():
            break
        time.sleep(1)
    assert len(now) == 2 and victim not in now.values()
    assert all(_predict(c, clip, [t]).status_code == 200 for t in TASKS)


def test_first_task_and_merged_metrics_units():
    assert first_task("application/json", json.dumps({"tasks": [" a ,b", "c"]}).encode()) == "a"
    assert first_task("application/json", b"[1]") is None
    body = (b'--XX\r\nContent-Disposition: form-data; name="clip"; filename="c.mp4"\r\n\r\ntasks=zzz\r\n'
            b'--XX\r\nContent-Disposition: form-data; name="tasks"\r\n\r\nk400@prod,ssv2\r\n--XX--\r\n')
    assert first_task("multipart/form-data; boundary=XX", body) == "k400@prod"
    assert first_task("multipart/form-data; boundary=XX", b"garbage") is None
    merged = merge_expositions({"r1": "# TYPE x_total counter\nx_total 2.0\n",
                                "r2": "# TYPE x_total counter\nx_total 3.0\n"}).decode()
    assert 'x_total{replica="r1"} 2.0' in merged and 'x_total{replica="r2"} 3.0' in merged


def test_serve_ray_without_ray_says_how_to_install_it(tmp_path):
    code = ("import sys; sys.modules['ray'] = None\n"  # as if Ray were not installed: `import ray` fails
            "from stadapter.cli.main import app\n"
            "app(['serve', '--ray', '--replicas', '2'])\n")
    env = {**os.environ, "STADAPTER_HOME": str(tmp_path / "home")}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 1
    assert "pip install 'stadapter[ray]'" in r.stderr + r.stdout and "Traceback" not in r.stderr
