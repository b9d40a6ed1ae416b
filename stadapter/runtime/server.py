"""The HTTP API: FastAPI in front of one engine, with dynamic batching in one worker thread that owns the model.

    POST /v1/predict   a clip (multipart upload, field ``clip``) or a JSON ``{"path": ...}`` under an allowed
                       root, with one or more tasks -> each task's top-k labels
    GET  /v1/tasks     registered tasks, their versions and aliases, and whether they fit the running backbone
    GET  /healthz      the process is up;  GET /readyz  the worker is running and accepting work
    GET  /metrics      Prometheus: requests, latency histograms, batch sizes, swaps, pool hits and misses
    GET  /docs         OpenAPI docs

A request is resolved (aliases re-resolved after ``alias_ttl`` seconds, so registry alias changes are picked up
without a restart), its tasks' adapter sets are prefetched into the pool, and the clip is decoded once (in the
request's thread, so decoding overlaps the model) into each task's test views. The job then enters a bounded
queue (full: 429). The worker takes jobs until the batch holds ``max_batch`` clip views or ``max_wait_ms``
passed since the first, runs one mixed-task forward, and answers each job. On shutdown new requests get 503
while queued and in-flight jobs are finished.
"""

from __future__ import annotations

import asyncio
import logging
import os
import queue
import shutil
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.concurrency import run_in_threadpool

from stadapter import __version__
from stadapter.errors import (AdapterSetError, BackboneError, BundleError, DecodeError, InputError, RegistryError,
                              StadapterError)
from stadapter.runtime.engine import Engine, TaskHandle, top_k

log = logging.getLogger("stadapter.server")


@dataclass
class ServerConfig:
    max_batch: int = 16  # clip views per forward (a job is never split; one larger job runs alone)
    max_wait_ms: float = 5.0  # how long the worker waits for more jobs after the first
    queue_size: int = 64  # jobs waiting for the worker; beyond it: 429
    allowed_roots: Sequence[str | Path] = ()  # JSON ``path`` requests must resolve under one of these
    max_upload_bytes: int = 512 << 20
    max_tasks: int = 16  # tasks per request
    default_top_k: int = 5
    preload: Sequence[str] = ()  # tasks to make resident at start
    retry_after_s: int = 1

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise InputError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        roots = []
        for r in self.allowed_roots:
            p = Path(os.path.realpath(Path(r).expanduser()))
            if not p.is_dir():
                raise InputError(f"allowed root {r} is not a directory")
            roots.append(p)
        self.allowed_roots = tuple(roots)


class HTTPProblem(Exception):
    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


def status_of(e: BaseException) -> int:
    if isinstance(e, HTTPProblem):
        return e.status
    if isinstance(e, NotReady):
        return 503
    if isinstance(e, DecodeError):
        return 422
    if isinstance(e, RegistryError):
        return 404
    if isinstance(e, BackboneError):
        return 409
    if isinstance(e, (InputError, ValueError)):
        return 400
    if isinstance(e, (AdapterSetError, BundleError)):
        return 500
    return 500


# -- metrics ------------------------------------------------------------------------------------------------

class Metrics:
    def __init__(self, engine: Engine) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("stadapter_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "code"], registry=r)
        self.latency = Histogram("stadapter_request_latency_seconds", "Request latency by endpoint.", ["endpoint"],
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30), registry=r)
        self.queue_wait = Histogram("stadapter_queue_wait_seconds", "Time a job waited for the worker.",
                                    buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5), registry=r)
        self.forward = Histogram("stadapter_forward_seconds", "Time of one batched forward.",
                                 buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10), registry=r)
        self.batch_clips = Histogram("stadapter_batch_size", "Clip views per batched forward.",
                                     buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.batch_jobs = Histogram("stadapter_batch_requests", "Requests per batched forward.",
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_tasks = Histogram("stadapter_batch_tasks", "Distinct tasks per batched forward.",
                                     buckets=(1, 2, 4, 8, 16, 32), registry=r)
        self.queue_depth = Gauge("stadapter_queue_depth", "Jobs waiting for the worker.", registry=r)
        self.rejected = Counter("stadapter_rejected", "Requests refused because the queue was full (429) or the "
                                "server was not ready (503).", ["reason"], registry=r)
        r.register(_EngineCollector(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    """Pool and engine counters, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self):  # noqa: D401 - prometheus_client protocol; empty: no registration-time collect()
        return []

    def collect(self):
        e, s = self.engine, self.engine.pool.stats
        hits = CounterMetricFamily("stadapter_pool_hits", "Adapter-set requests served without a store read, "
                                   "by tier (device: resident; host: promoted from pinned memory).", labels=["tier"])
        hits.add_metric(["device"], s.hits)
        hits.add_metric(["host"], s.host_hits)
        yield hits
        yield CounterMetricFamily("stadapter_pool_misses", "Adapter-set requests that read the local store.",
                                  value=s.misses)
        yield CounterMetricFamily("stadapter_pool_prefetches", "Adapter-set loads started when a request "
                                  "arrived.", value=s.prefetches)
        yield CounterMetricFamily("stadapter_pool_evictions", "Sets evicted from the device tier.", value=s.evictions)
        yield CounterMetricFamily("stadapter_pool_loads", "Sets loaded (store or host tier).", value=s.loads)
        yield CounterMetricFamily("stadapter_pool_load_seconds", "Time spent loading sets.", value=s.load_seconds)
        yield GaugeMetricFamily("stadapter_pool_resident_sets", "Sets resident on the device.",
                                value=len(e.pool.resident_keys()))
        yield GaugeMetricFamily("stadapter_pool_resident_bytes", "Device bytes of resident sets.",
                                value=e.pool.resident_bytes)
        yield CounterMetricFamily("stadapter_adapter_swaps", "Bindings of a different adapter set than the one "
                                  "bound before (task switches, within and across batches).", value=e.swaps)
        yield CounterMetricFamily("stadapter_batches", "Batched forwards run.", value=e.batches)


# -- the worker ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class Job:
    units: list[tuple[Any, TaskHandle]]  # (views (V, T, 3, H, W), task)
    future: Future = field(default_factory=Future)
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def size(self) -> int:
        return sum(int(v.shape[0]) for v, _ in self.units)


class QueueFull(Exception):
    pass


class NotReady(Exception):
    pass


class Batcher:
    """Dynamic batching in one thread that owns the model."""

    def __init__(self, engine: Engine, config: ServerConfig, metrics: Metrics) -> None:
        self.engine, self.config, self.metrics = engine, config, metrics
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=config.queue_size)
        self._stop = threading.Event()
        self._accepting = False
        self._thread = threading.Thread(target=self._run, name="stadapter-batcher", daemon=True)
        self._carry: Job | None = None

    @property
    def ready(self) -> bool:
        return self._accepting and self._thread.is_alive()

    def start(self) -> None:
        self._accepting = True
        self._thread.start()

    def submit(self, job: Job) -> Future:
        if not self.ready:
            raise NotReady("the server is not accepting work (starting or shutting down)")
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"the queue is full ({self.config.queue_size} requests waiting); retry later") from None
        self.metrics.queue_depth.set(self.queue.qsize())
        return job.future

    def stop(self, timeout: float | None = 60.0) -> None:
        """Refuse new work, finish every queued job, then end the thread."""
        self._accepting = False
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        while True:  # a job that slipped in as the worker ended
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            job.future.set_exception(NotReady("the server shut down before this request ran"))

    def _next(self, timeout: float) -> Job | None:
        if self._carry is not None:
            job, self._carry = self._carry, None
            return job
        try:
            return self.queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _run(self) -> None:
        cfg = self.config
        while True:
            first = self._next(0.05)
            if first is None:
                if self._stop.is_set() and self.queue.empty():
                    return
                continue
            batch, size = [first], first.size
            deadline = time.perf_counter() + cfg.max_wait_ms / 1000
            while size < cfg.max_batch:
                left = deadline - time.perf_counter()
                if left <= 0 and self.queue.empty():
                    break
                job = self._next(max(left, 0))
                if job is None:
                    break
                if size + job.size > cfg.max_batch:
                    self._carry = job
                    break
                batch.append(job)
                size += job.size
            self.metrics.queue_depth.set(self.queue.qsize())
            self._process(batch)

    def _process(self, batch: list[Job]) -> None:
        now = time.perf_counter()
        for job in batch:
            self.metrics.queue_wait.observe(now - job.enqueued)
        units = [u for job in batch for u in job.units]
        try:
            probs = self._forward(units, batch)
        except Exception:  # noqa: BLE001 - isolate the failing job(s), answer the others
            if len(batch) == 1:
                return self._fail(batch[0])
            for job in batch:
                self._process([job])
            return
        k = 0
        for job in batch:
            n = len(job.units)
            if not job.future.done():
                job.future.set_result(probs[k:k + n])
            k += n

    def _forward(self, units: list, batch: list[Job]) -> list:
        t0 = time.perf_counter()
        probs = self.engine.predict(units)
        self.metrics.forward.observe(time.perf_counter() - t0)
        self.metrics.batch_clips.observe(sum(int(v.shape[0]) for v, _ in units))
        self.metrics.batch_jobs.observe(len(batch))
        self.metrics.batch_tasks.observe(len({h.key for _, h in units}))
        return probs

    def _fail(self, job: Job) -> None:
        try:
            self._forward(job.units, [job])
        except Exception as e:  # noqa: BLE001 - handed to the request
            if not isinstance(e, StadapterError):
                log.exception("forward failed")
            if not job.future.done():
                job.future.set_exception(e)


# -- the app ----------------------------------------------------------------------------------------------

PREDICT_DOC = """Classify one clip with one or more tasks.

Send either **multipart/form-data** with the file in field `clip`, the tasks in `tasks` (comma-separated,
or the field repeated) and optionally `top_k`; or **application/json**
`{"path": "/data/clip.mp4", "tasks": ["k400", "ssv2@staging"], "top_k": 5}` where the path must lie under
one of the server's allowed roots (after resolving symlinks and `..`).

Errors: 400 bad request, 403 path outside the allowed roots, 404 unknown task or missing file, 409 a bundle
trained on another backbone, 413 upload too large, 422 a clip that cannot be decoded, 429 queue full,
503 not ready or shutting down."""

PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["clip", "tasks"], "properties": {
        "clip": {"type": "string", "format": "binary"},
        "tasks": {"type": "string", "description": "comma-separated task references"},
        "top_k": {"type": "integer", "default": 5}}}},
    "application/json": {"schema": {"type": "object", "required": ["path", "tasks"], "properties": {
        "path": {"type": "string"},
        "tasks": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
        "top_k": {"type": "integer", "default": 5}}}}}}}


def check_path(raw: str, roots: Sequence[Path]) -> Path:
    """The real path of ``raw`` if it lies under one of ``roots`` (symlinks and '..' resolved), else 403."""
    if not roots:
        raise HTTPProblem(403, "reading clips by path is disabled: start the server with --allowed-root DIR")
    if not isinstance(raw, str) or not raw or "\x00" in raw:
        raise HTTPProblem(400, "path must be a non-empty string")
    p = Path(raw).expanduser()
    if not p.is_absolute():
        p = roots[0] / p
    real = Path(os.path.realpath(p))
    if not any(real == root or real.is_relative_to(root) for root in roots):
        raise HTTPProblem(403, f"path {raw} is outside the allowed roots")
    if not real.is_file():
        raise HTTPProblem(404, f"no such clip: {raw}")
    return real


def parse_tasks(value: Any, limit: int) -> list[str]:
    if isinstance(value, str):
        items = value.split(",")
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        items = [part for v in value for part in v.split(",")]
    else:
        raise HTTPProblem(400, "tasks must be a string (comma-separated) or a list of strings")
    refs = list(dict.fromkeys(t.strip() for t in items if t.strip()))
    if not refs:
        raise HTTPProblem(400, "no task given")
    if len(refs) > limit:
        raise HTTPProblem(400, f"at most {limit} tasks per request, got {len(refs)}")
    return refs


def parse_top_k(value: Any, default: int) -> int:
    if value is None or value == "":
        return default
    try:
        k = int(value)
    except (TypeError, ValueError):
        raise HTTPProblem(400, f"top_k must be an integer, got {value!r}") from None
    if k < 1:
        raise HTTPProblem(400, "top_k must be >= 1")
    return k


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. Its lifespan starts the worker and, on shutdown, finishes the
    queued and in-flight jobs before closing the engine."""
    config = config or ServerConfig()
    metrics = Metrics(engine)
    batcher = Batcher(engine, config, metrics)
    state = {"shutting_down": False}

    async def lifespan(app: FastAPI):
        batcher.start()
        for ref in config.preload:
            try:
                engine.prefetch(ref)
            except StadapterError as e:
                log.warning("cannot preload %s: %s", ref, e)
        yield
        state["shutting_down"] = True
        await run_in_threadpool(batcher.stop)
        engine.close()

    app = FastAPI(title="stadapter", version=__version__, lifespan=lifespan,
                  description="One frozen video backbone serving many tasks through hot-swapped ST-Adapter sets.")
    app.state.engine, app.state.batcher, app.state.metrics, app.state.config = engine, batcher, metrics, config

    def answer(endpoint: str, t0: float, status: int, body: Any, headers: dict[str, str] | None = None):
        metrics.requests.labels(endpoint, str(status)).inc()
        metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return JSONResponse(body, status_code=status, headers=headers)

    def problem(endpoint: str, t0: float, e: BaseException):
        status = status_of(e)
        headers = getattr(e, "headers", None)
        if status == 500 and not isinstance(e, StadapterError):
            log.exception("internal error", exc_info=e)
        return answer(endpoint, t0, status, {"detail": getattr(e, "detail", None) or str(e)}, headers)

    @app.get("/healthz", summary="Liveness: the process answers")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the worker runs and accepts work")
    def readyz():
        if batcher.ready and not state["shutting_down"]:
            return {"status": "ready", **engine.describe()}
        return JSONResponse({"status": "shutting down" if state["shutting_down"] else "not ready"}, status_code=503)

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    def prometheus() -> PlainTextResponse:
        return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/tasks", summary="Registered tasks and whether they fit the running backbone")
    def tasks() -> dict[str, Any]:
        out = []
        for t in engine.registry.list_tasks():
            item: dict[str, Any] = {"task": t.name, "versions": t.versions, "latest": t.latest,
                                    "aliases": t.aliases}
            try:
                h = engine.resolve(t.name)
                item.update(servable=True, version=h.name, num_classes=h.num_classes, num_frames=h.num_frames,
                            views=h.spec.temporal_views * h.spec.spatial_views, resident=engine.pool.where(h.key))
            except StadapterError as e:
                item.update(servable=False, reason=str(e))
            out.append(item)
        return {"backbone": engine.describe()["backbone"], "tasks": out}

    @app.post("/v1/predict", summary="Classify a clip with one or more tasks", description=PREDICT_DOC,
              openapi_extra=PREDICT_OPENAPI)
    async def predict(request: Request):
        t0 = time.perf_counter()
        endpoint = "/v1/predict"
        tmpdir = None
        try:
            if state["shutting_down"] or not batcher.ready:
                metrics.rejected.labels("not_ready").inc()
                raise HTTPProblem(503, "the server is not ready or is shutting down",
                                  {"Retry-After": str(config.retry_after_s)})
            ctype = request.headers.get("content-type", "")
            if ctype.startswith("multipart/form-data"):
                length = request.headers.get("content-length")
                if length and length.isdigit() and int(length) > config.max_upload_bytes:
                    raise HTTPProblem(413, f"upload larger than {config.max_upload_bytes} bytes")
                form = await request.form(max_files=1, max_fields=16)
                upload = form.get("clip")
                if upload is None or isinstance(upload, str):
                    raise HTTPProblem(400, "multipart requests need the clip file in field 'clip'")
                try:
                    refs = parse_tasks(form.getlist("tasks") or "", config.max_tasks)
                    k = parse_top_k(form.get("top_k"), config.default_top_k)
                    tmpdir = tempfile.mkdtemp(prefix="stadapter-upload-")
                    name = Path(upload.filename or "clip").name or "clip"
                    path = Path(tmpdir) / name
                    await run_in_threadpool(_save_upload, upload.file, path, config.max_upload_bytes)
                    shown = upload.filename or "upload"
                finally:
                    await form.close()
            elif ctype.startswith("application/json"):
                try:
                    body = await request.json()
                except ValueError:
                    raise HTTPProblem(400, "the body is not valid JSON") from None
                if not isinstance(body, dict):
                    raise HTTPProblem(400, "the JSON body must be an object with 'path' and 'tasks'")
                refs = parse_tasks(body.get("tasks", ""), config.max_tasks)
                k = parse_top_k(body.get("top_k"), config.default_top_k)
                path = check_path(body.get("path"), config.allowed_roots)  # type: ignore[arg-type]
                shown = body["path"]
            else:
                raise HTTPProblem(415, "send multipart/form-data (field 'clip') or application/json ('path')")

            def prepare() -> tuple[list[TaskHandle], list]:
                handles = [engine.resolve(r) for r in refs]
                for h in handles:
                    engine.prefetch(h)  # the set loads while the clip decodes
                return handles, engine.clip_views(path, handles)

            handles, views = await run_in_threadpool(prepare)
            try:
                future = batcher.submit(Job(list(zip(views, handles))))
            except QueueFull as e:
                metrics.rejected.labels("queue_full").inc()
                raise HTTPProblem(429, str(e), {"Retry-After": str(config.retry_after_s)}) from None
            except NotReady as e:
                metrics.rejected.labels("not_ready").inc()
                raise HTTPProblem(503, str(e), {"Retry-After": str(config.retry_after_s)}) from None
            probs = await asyncio.wrap_future(future)
            results = [{"task": h.ref, "version": h.name, "views": int(v.shape[0]),
                        "top": [{"label": lab, "prob": p} for lab, p in top_k(pr, h.labels, k)]}
                       for h, v, pr in zip(handles, views, probs)]
            return answer(endpoint, t0, 200, {"clip": shown, "tasks": results,
                                              "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON problem with the right status
            return problem(endpoint, t0, e)
        finally:
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)

    return app


def _save_upload(src, dest: Path, limit: int) -> None:
    total = 0
    with open(dest, "wb") as out:
        while chunk := src.read(1 << 20):
            total += len(chunk)
            if total > limit:
                raise HTTPProblem(413, f"upload larger than {limit} bytes")
            out.write(chunk)
    if total == 0:
        raise DecodeError("the uploaded clip is empty (0 bytes)")


def serve(engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: float = 30.0, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests are finished before the process exits."""
    import signal

    import uvicorn

    def finished(signum, frame):  # uvicorn re-raises the signal it stopped on once it has shut down
        raise SystemExit(0)

    app = create_app(engine, config)
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, finished)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


__all__ = ["ServerConfig", "create_app", "serve", "check_path", "Batcher", "Job", "Metrics"]
