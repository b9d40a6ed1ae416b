"""The registry and runtime at N registered tasks (``python benchmarks/runtime.py --tasks 1000,10000``): for each
database (SQLite, PostgreSQL) and each N, side by side:

    registration   bundles registered per second through the Python API (check_bundle, blobs, row); the first
                   ``--scale-contents`` bundles are distinct, the rest reuse their contents under new task names
                   (the blobs dedup, every registration still checks its bundle)
    ls             ``stadapter ls --limit 100`` end to end (a new process: interpreter start, imports, query)
    /v1/tasks      over real HTTP: ?limit=100 repeated (cached for the alias TTL, 2 s as `serve`), and a full
                   paginated walk (every page a miss)
    resolve        Registry.resolve of random bare task names (production, else latest), p50/p99
    cold load      a task resolved again and made resident after eviction (files verified earlier), p99
    first load     a task never seen by this engine, whose bundle directory was never built: resolve,
                   materialize (hard links; the store trusted: sizes, not sha256), map, p99
    zipf           the Zipf(1.1) stream over all N tasks with 64 resident (benchmarks/runtime.py part e)

Tasks grow in place: N = 1,000 is measured, then 9,000 more are registered for N = 10,000.
"""

from __future__ import annotations

import os
import resource
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.model.video_vit import VideoViT
from stadapter.registry import open_registry
from stadapter.runtime.engine import Engine

GOALS = {"tasks_p99_ms": ("<=", 50.0), "walk_s": ("<=", 2.0), "ls_s": ("<=", 1.0), "resolve_p99_ms": ("<=", 2.0),
         "cold_load_p99_ms": ("<=", 10.0), "first_load_p99_ms": ("<=", 15.0),
         "zipf_throughput_ratio": (">=", 0.9), "zipf_p99_ratio": ("<=", 1.5)}
ROOT = Path(__file__).resolve().parent.parent


def pct(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q))


@contextmanager
def database(kind: str, admin_url: str, root: Path) -> Iterator[str]:
    """A fresh database URL of ``kind``: an SQLite file under ``root``, or a new PostgreSQL database (dropped
    afterwards) on the server of ``admin_url``."""
    if kind == "sqlite":
        yield f"sqlite:///{root / 'scale.db'}"
        return
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(admin_url)
    name = f"stadapter_bench_{secrets.token_hex(4)}"
    connect = dict(host=u.host, port=u.port or 5432, user=u.username, dbname=u.database or "postgres",
                   autocommit=True)
    with psycopg.connect(**connect) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield u.set(database=name).render_as_string(hide_password=False)
    finally:
        with psycopg.connect(**connect) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Scale:
    """One database: register tasks in steps and measure at each N."""

    def __init__(self, bench: Any, url: str, kind: str, root: Path) -> None:
        self.bench, self.url, self.kind, self.root = bench, url, kind, root
        self.home = root / "home"
        self.reg = open_registry(url, self.home, upgrade=True)
        self.names: list[str] = []
        self.contents: list[Path] = []
        self.reg_seconds = 0.0
        self.distinct_seconds = 0.0

    def log(self, msg: str) -> None:
        self.bench.log(f"[{self.kind}] {msg}")

    # -- registering ---------------------------------------------------------------------------------
    def make_contents(self, backbone: Any, n: int, width: int, frames: int) -> None:
        desc = {**backbone.describe(), "weights": getattr(backbone, "weights", "none"),
                "fingerprint": backbone.fingerprint()}
        gen = torch.Generator().manual_seed(7)
        for i in range(n):
            cfg = AdapterConfig(num_classes=5 + i % 20, width=width)
            model = VideoViT(backbone, cfg, frames)
            tensors = {k: torch.randn(v.shape, generator=gen) * 0.02 for k, v in model.init_adapter_set().items()}
            self.contents.append(Bundle(task=f"content{i}", adapter=cfg, spec=TaskSpec(num_frames=frames),
                                        backbone=desc, labels=[f"c{j}" for j in range(cfg.num_classes)],
                                        tensors=tensors).save(self.root / "contents" / f"c{i}"))

    def grow(self, total: int) -> None:
        start = len(self.names)
        t_all = time.perf_counter()
        for i in range(start, total):
            name = f"s{i:05d}"
            t0 = time.perf_counter()
            self.reg.register(self.contents[i % len(self.contents)], task=name)
            if i < len(self.contents):
                self.distinct_seconds += time.perf_counter() - t0
            self.names.append(name)
            if i % 50 == 0:  # some aliases and tags, as a real registry has
                self.reg.set_alias(name, "production", 1)
            if (i + 1) % 2000 == 0:
                self.log(f"registered {i + 1} tasks")
        self.reg_seconds += time.perf_counter() - t_all

    # -- measuring -----------------------------------------------------------------------------------
    def measure(self, n: int, backbone: Any, out: dict[str, Any]) -> None:
        b = self.bench
        out["registration_per_s"] = round(n / self.reg_seconds, 1)
        out["registration_distinct_per_s"] = round(min(n, len(self.contents)) / self.distinct_seconds, 1)
        out["ls_s"], out["ls_p50_s"], out["ls_cpu_s"] = self.ls()
        rng = np.random.default_rng(n)
        refs = [self.names[k] for k in rng.integers(0, n, size=2000)]
        fresh = open_registry(self.url, self.home)
        try:
            for r in refs[:50]:
                fresh.resolve(r)
            times, cpu = [], []
            for r in refs:
                c0, t0 = time.thread_time(), time.perf_counter()
                fresh.resolve(r)
                times.append((time.perf_counter() - t0) * 1000)
                cpu.append((time.thread_time() - c0) * 1000)
        finally:
            fresh.close()
        out["resolve_p50_ms"], out["resolve_p99_ms"] = round(pct(times, 50), 3), round(pct(times, 99), 3)
        out["resolve_cpu_p99_ms"] = round(pct(cpu, 99), 3)
        engine = Engine(backbone, self.reg, device="cpu", max_resident=64, alias_ttl=2.0)
        try:
            self.http(engine, n, out)
            self.loads(engine, rng, n, out)
            self.log(f"N={n}: Zipf stream")
            zipf = b.zipf(names=self.names[:n], bb=backbone, registry=self.reg)
            out.update({k: zipf[k] for k in ("zipf_throughput_ratio", "zipf_p99_ratio", "zipf_prepare_s",
                                             "zipf_hit_rate")})
        finally:
            engine.close()

    def ls(self) -> tuple[float, float, float]:
        """(slowest, median) wall seconds of 5 runs, and the median CPU seconds (user + sys) of the process,
        which a busy machine inflates far less than the wall time."""
        env = {**os.environ, "STADAPTER_HOME": str(self.home), "STADAPTER_DB": self.url, "COLUMNS": "160"}
        times, cpu = [], []
        for _ in range(5):
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "stadapter", "ls", "--limit", "100"], env=env, cwd=ROOT,
                                  capture_output=True, text=True, check=False)
            times.append(time.perf_counter() - t0)
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
            if proc.returncode != 0 or "more tasks follow" not in proc.stdout:
                raise RuntimeError(f"stadapter ls failed: {proc.stderr or proc.stdout}")
        return round(max(times), 3), round(pct(times, 50), 3), round(pct(cpu, 50), 3)

    def http(self, engine: Engine, n: int, out: dict[str, Any]) -> None:
        import httpx
        import uvicorn

        from stadapter.runtime.server import ServerConfig, create_app, uvicorn_config

        app = create_app(engine, ServerConfig())
        server = uvicorn.Server(uvicorn_config(app, app.state.config, "127.0.0.1", 0, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        while not server.started:
            time.sleep(0.02)
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        try:
            with httpx.Client(base_url=url, timeout=60) as c:
                lat = []
                for _ in range(300):
                    t0 = time.perf_counter()
                    r = c.get("/v1/tasks", params={"limit": 100})
                    lat.append((time.perf_counter() - t0) * 1000)
                    assert r.status_code == 200 and len(r.json()["tasks"]) == 100
                out["tasks_p50_ms"], out["tasks_p99_ms"] = round(pct(lat, 50), 2), round(pct(lat, 99), 2)
                seen, after, pages, page_ms = 0, None, 0, []
                t_walk = time.perf_counter()
                while True:
                    t0 = time.perf_counter()
                    body = c.get("/v1/tasks", params={"limit": 100, **({"after": after} if after else {})}).json()
                    page_ms.append((time.perf_counter() - t0) * 1000)
                    seen += len(body["tasks"])
                    pages += 1
                    after = body["next_after"]
                    if after is None:
                        break
                out["walk_s"] = round(time.perf_counter() - t_walk, 3)
                out["walk_page_p99_ms"] = round(pct(page_ms, 99), 2)
                assert seen == n, (seen, n)
        finally:
            server.should_exit = True
            thread.join(30)

    def loads(self, engine: Engine, rng: np.random.Generator, n: int, out: dict[str, Any]) -> None:
        """First loads (never seen by this engine, bundle directory never built), then cold loads of the
        same tasks (evicted, resolved again)."""
        picks = [self.names[k] for k in rng.choice(n, size=min(200, n), replace=False)]
        first, first_cpu = [], []
        for name in picks:
            c0, t0 = time.thread_time(), time.perf_counter()
            engine.acquire(engine.resolve(name))
            first.append((time.perf_counter() - t0) * 1000)
            first_cpu.append((time.thread_time() - c0) * 1000)
        cold, cold_cpu = [], []
        for name in picks:
            h = engine.resolve(name)
            engine.pool.evict(h.key)
            c0, t0 = time.thread_time(), time.perf_counter()
            engine.acquire(engine.resolve(name, refresh=True))
            cold.append((time.perf_counter() - t0) * 1000)
            cold_cpu.append((time.thread_time() - c0) * 1000)
        engine.pool.clear()
        out["first_load_cpu_p99_ms"], out["cold_load_cpu_p99_ms"] = (round(pct(first_cpu, 99), 2),
                                                                     round(pct(cold_cpu, 99), 2))
        out["first_load_p50_ms"], out["first_load_p99_ms"] = round(pct(first, 50), 2), round(pct(first, 99), 2)
        out["cold_load_p50_ms"], out["cold_load_p99_ms"] = round(pct(cold, 50), 2), round(pct(cold, 99), 2)

    def close(self) -> None:
        self.reg.close()


def run_scale(bench: Any, sizes: list[int], kinds: list[str], admin_url: str, contents: int) -> dict[str, Any]:
    """Every figure for every (database, N); adds rows to the bench's table."""
    from stadapter.model.loading import load_backbone

    spec = bench.args.zipf_backbone or "small"
    backbone = load_backbone(spec, "none")
    width = max(8, backbone.dim // 2)
    results: dict[str, Any] = {}
    for kind in kinds:
        root = bench.root / f"scale-{kind}"
        root.mkdir()
        with database(kind, admin_url, root) as url:
            scale = Scale(bench, url, kind, root)
            try:
                scale.make_contents(backbone, contents, width, 4)
                for n in sizes:
                    bench.log(f"[{kind}] registering up to {n} tasks")
                    scale.grow(n)
                    figures: dict[str, Any] = {}
                    scale.measure(n, backbone, figures)
                    results[f"{kind}_{n}"] = figures
                    bench.log(f"[{kind}] N={n}: {figures}")
            finally:
                scale.close()
    for key in sorted({k for f in results.values() for k in f}):
        goal = GOALS.get(key)
        note = f"goal {goal[0]} {goal[1]}" if goal else ""
        values = []
        for kind in kinds:
            for n in sizes:
                v = results.get(f"{kind}_{n}", {}).get(key)
                ok = "" if goal is None or v is None else (" ok" if (v >= goal[1] if goal[0] == ">=" else
                                                                     v <= goal[1]) else " MISSED")
                values.append(f"{kind[:2]} {n}: {v}{ok}")
        bench.row("scale", key, "; ".join(values), note)
    results["scale_backbone"] = spec
    results["scale_contents"] = contents
    return results
