"""The HTTP API: FastAPI in front of one engine, with dynamic batching (:mod:`stadapter.runtime.batcher`) in one
worker thread that owns the model.

    POST /v1/predict   a clip (multipart upload, field ``clip``) or a JSON ``{"path": ...}`` under an allowed
                       root, with one or more tasks -> each task's top-k labels
    GET  /v1/tasks     registered tasks, their versions and aliases, and whether they fit the running backbone:
                       a page (?limit=&after=, filters ?prefix=&alias=&tag=) in one query, cached for alias_ttl
    GET  /healthz      the process is up;  GET /readyz  the worker is running and accepting work
    GET  /metrics      Prometheus: requests, latency histograms, batch sizes, swaps, pool hits and misses
    GET  /docs         OpenAPI docs

A request is resolved (aliases re-resolved after ``alias_ttl`` seconds, so registry alias changes are picked up
without a restart), its tasks' adapter sets are prefetched into the pool, and the clip is decoded once (in the
request's thread, so decoding overlaps the model) into each task's test views. The job then enters the batcher's
bounded queue (full: 429) and is answered by a batched forward. A request not answered within
``request_timeout_s`` of its arrival gets 504 (a job still queued is then skipped). On shutdown new requests get
503 while queued and in-flight jobs are finished.

The trust boundary (:mod:`stadapter.runtime.httpguard`, :mod:`stadapter.runtime.uploads`): request bodies are read
as they stream, under a size limit (413 once it is passed, never after spooling the whole body) and a deadline
for the whole body (408); request headers have their own deadline and connections are capped (uvicorn's
``limit_concurrency``). An upload is stored under a fixed name in a private temp directory (its file name is only
shown); a client that goes away mid-upload is logged at info level and counted in
``stadapter_client_disconnects_total``, not answered as an error. Error details name no server path (the full
message goes to the log). With a token, every route but ``/healthz`` needs ``Authorization: Bearer <token>``
(401 otherwise; ``/readyz`` too, as it describes the backbone and its weights: give the probe the header).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from torch import Tensor

from stadapter import __version__
from stadapter.errors import (
    BackboneError,
    ConfigError,
    DecodeError,
    InputError,
    RegistryError,
    RegistryUnavailable,
    StadapterError,
)
from stadapter.registry import Registry
from stadapter.registry.db import redact as redact_url
from stadapter.runtime.batcher import Batcher, Job, NotReady, QueueFull
from stadapter.runtime.engine import Engine
from stadapter.runtime.httpguard import CLOSE, BearerAuth, HTTPProblem, Redactor, check_token, header_deadline_protocol
from stadapter.runtime.inputs import DecodeBusy, DecodePool, task_views
from stadapter.runtime.listing import DEFAULT_LIMIT, MAX_LIMIT, TaskListing
from stadapter.runtime.predict import task_results
from stadapter.runtime.types import TaskHandle
from stadapter.runtime.uploads import parse_tasks, read_body, read_upload
from stadapter.video.decode import DEFAULT_LIMITS, DecodeLimits

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("stadapter.server")


@dataclass
class ServerConfig:
    max_batch: int = 16  # clip views per forward (a job is never split; one larger job runs alone)
    max_wait_ms: float = 5.0  # how long the worker waits for more jobs after the first
    queue_size: int = 64  # jobs waiting for the worker; beyond it: 429
    allowed_roots: Sequence[str | Path] = ()  # JSON ``path`` requests must resolve under one of these
    max_upload_bytes: int = 48 << 20  # streamed to a temp file up to here: the most disk one upload takes
    max_tasks: int = 16  # tasks per request
    default_top_k: int = 5
    preload: Sequence[str] = ()  # tasks to make resident at start
    retry_after_s: int = 1
    request_timeout_s: float = 120.0  # from a request's arrival to its answer; beyond it: 504
    token: str | None = None  # bearer token every route but OPEN_PATHS needs (None: no authentication)
    body_timeout_s: float = 60.0  # the whole request body must arrive within this; beyond it: 408
    header_timeout_s: float = 10.0  # request line and headers must arrive within this; beyond it: closed
    keep_alive_s: int = 5  # an idle keep-alive connection is closed after this
    max_connections: int = 1024  # open connections; a request beyond it gets 503 (uvicorn's limit_concurrency)
    max_json_bytes: int = 1 << 20  # a JSON request body
    decode_limits: DecodeLimits = DEFAULT_LIMITS  # per clip: frame size, frames, duration, decoded bytes
    decode_workers: int = 4  # clips decoded at once
    decode_queue: int = 8  # clips waiting for a decode slot; beyond it: 429 before any decoding

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.queue_size < 1 or self.max_wait_ms < 0:
            raise InputError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        if not self.request_timeout_s > 0:
            raise InputError(f"request_timeout_s must be > 0, got {self.request_timeout_s}")
        if not (self.body_timeout_s > 0 and self.header_timeout_s > 0 and self.keep_alive_s >= 1):
            raise InputError("body and header timeouts must be > 0 and the keep-alive >= 1 s")
        if self.max_connections < 1 or self.max_upload_bytes < 1 or self.max_json_bytes < 1:
            raise InputError("max_connections, max_upload_bytes and max_json_bytes must be >= 1")
        if self.decode_workers < 1 or self.decode_queue < 0:
            raise InputError("decode_workers must be >= 1 and decode_queue >= 0")
        if self.token is not None:
            try:
                check_token(self.token)
            except ValueError as e:
                raise InputError(str(e)) from None
        roots = []
        for r in self.allowed_roots:
            p = Path(os.path.realpath(Path(r).expanduser()))
            if not p.is_dir():
                raise InputError(f"allowed root {r} is not a directory")
            roots.append(p)
        self.allowed_roots = tuple(roots)


# The status of each error a request can end in, first match wins; any other exception is a bug: 500.
STATUS_OF_ERROR: tuple[tuple[type[BaseException], int], ...] = (
    (NotReady, 503),
    (RegistryUnavailable, 503),  # a database outage, before RegistryError (an unknown task)
    (RegistryError, 404),
    (BackboneError, 409),
    (DecodeError, 422),
    (InputError, 400),
    (ConfigError, 400),
)
INTERNAL_ERROR = "internal error; see the server log"


def status_of(e: BaseException) -> int:
    if isinstance(e, HTTPProblem):
        return e.status
    return next((status for kind, status in STATUS_OF_ERROR if isinstance(e, kind)), 500)


def problem_of(e: BaseException, retry_after_s: int,
               redact: Callable[[str], str] | None = None) -> tuple[int, dict[str, str], dict[str, str]]:
    """(status, JSON body, headers) answering the error ``e``. Errors that are not StadapterErrors (bugs, like a
    bare ValueError from the forward) get 500 with a generic detail and are logged with their traceback; our own
    errors (BundleError, AdapterSetError, ...) keep their one-line message, passed through ``redact`` so that no
    server path reaches the client (a message it changed is logged in full)."""
    status = status_of(e)
    headers = dict(e.headers) if isinstance(e, HTTPProblem) else {}
    if status in (429, 503):  # busy or unavailable: say when to come back
        headers.setdefault("Retry-After", str(retry_after_s))
    if isinstance(e, HTTPProblem):
        detail = e.detail  # built from what the client sent only
    elif isinstance(e, (StadapterError, NotReady)):
        detail = redact(str(e)) if redact is not None else str(e)
        if detail != str(e):
            log.info("answered %d: %s", status, e)
    else:
        log.error("internal error answering a request", exc_info=e)
        detail = INTERNAL_ERROR
    return status, {"detail": detail}, headers


# -- metrics ------------------------------------------------------------------------------------------------

class Metrics:
    """The server's Prometheus metrics; also the batcher's observer."""

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
        self.rejected = Counter("stadapter_rejected", "Requests refused because the queue was full (429), the "
                                "server was not ready (503) or the bearer token was missing or wrong (401).",
                                ["reason"], registry=r)
        self.disconnects = Counter("stadapter_client_disconnects", "Requests whose client went away before "
                                   "sending its whole body (no answer was sent).", ["endpoint"], registry=r)
        r.register(_EngineCollector(engine))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    # the batcher's observer (stadapter.runtime.batcher.BatchObserver)
    def queued(self, depth: int) -> None:
        self.queue_depth.set(depth)

    def waited(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def ran(self, seconds: float, clips: int, jobs: int, tasks: int) -> None:
        self.forward.observe(seconds)
        self.batch_clips.observe(clips)
        self.batch_jobs.observe(jobs)
        self.batch_tasks.observe(tasks)


class _EngineCollector:
    """Pool and engine counters, read at scrape time."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def describe(self) -> list[Metric]:  # prometheus_client protocol; empty: no registration-time collect()
        return []

    def collect(self) -> Iterator[Metric]:
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


# -- request parsing ---------------------------------------------------------------------------------------

PREDICT_DOC = """Classify one clip with one or more tasks.

Send either **multipart/form-data** with the file in field `clip`, the tasks in `tasks` (comma-separated,
or the field repeated) and optionally `top_k`; or **application/json**
`{"path": "/data/clip.mp4", "tasks": ["k400", "ssv2@staging"], "top_k": 5}` where the path must lie under
one of the server's allowed roots (after resolving symlinks and `..`).

Errors: 400 bad request, 401 missing or wrong bearer token (when the server has one), 403 path outside the
allowed roots, 404 unknown task or missing file, 408 the body did not arrive within the server's body timeout,
409 a bundle trained on another backbone, 413 body too large, 422 a clip that cannot be decoded, is not a video
(text, a still image) or is over the server's decode limits (frame size, frame count, duration, decoded bytes;
checked from the headers before decoding), 429 queue full or every decode slot taken (answered before decoding),
500 a broken bundle or an internal error (logged by the server), 503 not ready, shutting down or the registry
database unavailable (with Retry-After), 504 no answer within the server's request timeout."""

PREDICT_OPENAPI = {"requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["clip", "tasks"], "properties": {
        "clip": {"type": "string", "format": "binary"},
        "tasks": {"type": "string", "description": "comma-separated task references"},
        "top_k": {"type": "integer", "default": 5}}}},
    "application/json": {"schema": {"type": "object", "required": ["path", "tasks"], "properties": {
        "path": {"type": "string"},
        "tasks": {"oneOf": [{"type": "array", "items": {"type": "string"}}, {"type": "string"}]},
        "top_k": {"type": "integer", "default": 5}}}}}}}


def check_path(raw: object, allowed: Sequence[str | Path]) -> Path:
    """The real path of ``raw`` if it lies under one of the ``allowed`` roots (real paths; symlinks and '..'
    resolved), else 403."""
    roots = [Path(r) for r in allowed]
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


@dataclass
class ClipRequest:
    """A parsed predict request."""

    path: Path  # the clip on disk: under an allowed root, or an upload saved in ``upload_dir``
    shown: str  # the clip as the answer names it (the path sent, or the upload's sanitised file name)
    refs: list[str]  # task references
    top_k: int
    upload_dir: Path | None = None  # a temporary directory to remove once the request is answered

    def server_names(self) -> list[tuple[str, str]]:
        """(server path, what the client knows it as) pairs, for taking server paths out of error details."""
        pairs = [(str(self.path), self.shown)]
        return pairs + [(str(self.upload_dir), "<upload>")] if self.upload_dir is not None else pairs


async def read_clip_request(request: Request, config: ServerConfig) -> ClipRequest:
    """The clip and tasks of a multipart or JSON predict request, read as the body streams: 413 past the size
    limit, 408 past the body timeout, ClientDisconnect when the client goes away (HTTPProblem for the rest)."""
    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    if not multipart and not ctype.startswith("application/json"):
        raise HTTPProblem(415, "send multipart/form-data (field 'clip') or application/json ('path')")
    limit = config.max_upload_bytes if multipart else config.max_json_bytes
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise HTTPProblem(413, f"request body larger than {limit} bytes", CLOSE)
    deadline = time.monotonic() + config.body_timeout_s
    if multipart:
        return await _read_multipart(request, config, limit, deadline)
    return await _read_json(request, config, limit, deadline)


async def _read_multipart(request: Request, config: ServerConfig, limit: int, deadline: float) -> ClipRequest:
    upload = await read_upload(request, limit, deadline, wanted=("tasks", "top_k"))
    try:
        refs = parse_tasks(upload.fields.get("tasks") or "", config.max_tasks)
        k = parse_top_k(next(iter(upload.fields.get("top_k", [])), None), config.default_top_k)
    except BaseException:
        shutil.rmtree(upload.directory, ignore_errors=True)
        raise
    return ClipRequest(upload.path, upload.shown, refs, k, upload.directory)


async def _read_json(request: Request, config: ServerConfig, limit: int, deadline: float) -> ClipRequest:
    raw = b"".join([chunk async for chunk in read_body(request, limit, deadline)])
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise HTTPProblem(400, "the body is not valid JSON") from None
    if not isinstance(body, dict):
        raise HTTPProblem(400, "the JSON body must be an object with 'path' and 'tasks'")
    refs = parse_tasks(body.get("tasks", ""), config.max_tasks)
    k = parse_top_k(body.get("top_k"), config.default_top_k)
    path = check_path(body.get("path"), config.allowed_roots)
    return ClipRequest(path, body["path"], refs, k)


# -- the app -----------------------------------------------------------------------------------------------

PREDICT = "/v1/predict"
OPEN_PATHS = ("/healthz",)  # answered without the bearer token (readiness and the rest need it)


def server_redactor(engine: Engine, config: ServerConfig) -> Redactor:
    """A Redactor for this server's paths: registry database and home, temp directory, allowed roots."""
    known: list[tuple[str, str]] = [(tempfile.gettempdir(), "<tmp>")]
    known += [(str(root), "<allowed root>") for root in config.allowed_roots]
    registry = engine.registry
    if isinstance(registry, Registry):
        known += [(registry.url, "<registry database>"), (redact_url(registry.url), "<registry database>"),
                  (str(registry.home), "<registry home>"), (str(registry.cache.parent), "<registry store>")]
    return Redactor(known + [(os.path.realpath(server), shown) for server, shown in known if server.startswith("/")])


class Api:
    """The endpoints over one engine and its batcher."""

    def __init__(self, engine: Engine, config: ServerConfig) -> None:
        self.engine, self.config = engine, config
        self.metrics = Metrics(engine)
        self.redact = server_redactor(engine, config)
        self.batcher = Batcher(engine, max_batch=config.max_batch, max_wait_ms=config.max_wait_ms,
                               queue_size=config.queue_size, observer=self.metrics)
        self.decodes = DecodePool(config.decode_workers, config.decode_queue)
        self.listing = TaskListing(engine, self.redact)
        self.shutting_down = False

    @asynccontextmanager
    async def lifespan(self, app: FastAPI) -> AsyncIterator[None]:
        """Start the worker and preload tasks; on shutdown finish the queued and in-flight jobs, then close the
        engine."""
        self.batcher.start()
        for ref in self.config.preload:
            try:
                self.engine.prefetch(ref)
            except StadapterError as e:
                log.warning("cannot preload %s: %s", ref, e)
        yield
        self.shutting_down = True
        await run_in_threadpool(self.batcher.stop)
        self.decodes.close()
        self.engine.close()

    def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    def readyz(self) -> dict[str, Any] | JSONResponse:
        if self.batcher.ready and not self.shutting_down:
            return {"status": "ready", **self.engine.describe()}
        return JSONResponse({"status": "shutting down" if self.shutting_down else "not ready"}, status_code=503)

    def prometheus(self) -> PlainTextResponse:
        return PlainTextResponse(self.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    def tasks(self, limit: Annotated[int, Query(ge=1, le=MAX_LIMIT, description="Tasks per page.")] = DEFAULT_LIMIT,
              after: Annotated[str | None, Query(description="The previous page's next_after.")] = None,
              prefix: Annotated[str | None, Query(description="Only task names starting with this.")] = None,
              alias: Annotated[str | None, Query(description="Only tasks with this alias.")] = None,
              tag: Annotated[str | None, Query(description="Only tasks with a version tagged KEY or KEY=VALUE.")]
              = None) -> dict[str, Any] | JSONResponse:
        """A page of the registered tasks by name (one query, cached for the alias TTL: see runtime/listing.py);
        ``next_after`` asks for the next page (null: the last one)."""
        try:
            page = self.listing.page(limit, after, prefix, alias, tag)  # a malformed filter: InputError, 400
        except Exception as e:  # noqa: BLE001 - answered like predict's errors (a database outage: 503)
            status, body, headers = problem_of(e, self.config.retry_after_s, self.redact)
            return JSONResponse(body, status_code=status, headers=headers)
        return {"backbone": self.engine.describe()["backbone"], **page, "limit": limit}

    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        clip: ClipRequest | None = None
        try:
            if self.shutting_down or not self.batcher.ready:
                self.metrics.rejected.labels("not_ready").inc()
                raise NotReady("the server is not ready or is shutting down")
            clip = await read_clip_request(request, self.config)
            handles, views = await self._decode(clip)
            deadline = t0 + self.config.request_timeout_s
            probs = await self._run_job(list(zip(views, handles, strict=True)), deadline)
            results = task_results(handles, views, probs, clip.top_k)
            return self._answer(t0, 200, {"clip": clip.shown, "tasks": results,
                                          "latency_ms": round((time.perf_counter() - t0) * 1000, 3)})
        except ClientDisconnect:  # nobody to answer: not an error of ours, and no status code to count
            self.metrics.disconnects.labels(PREDICT).inc()
            log.info("%s: the client went away before sending the whole request body", PREDICT)
            return JSONResponse({"detail": "client disconnected"}, status_code=400)
        except Exception as e:  # noqa: BLE001 - every failure becomes a JSON problem with the right status
            names = clip.server_names() if clip is not None else []
            status, body, headers = problem_of(e, self.config.retry_after_s, partial(self.redact, more=names))
            return self._answer(t0, status, body, headers)
        finally:
            if clip is not None and clip.upload_dir is not None:
                shutil.rmtree(clip.upload_dir, ignore_errors=True)

    async def _decode(self, clip: ClipRequest) -> tuple[list[TaskHandle], list[Tensor]]:
        """:meth:`_prepare` in the bounded decode pool. 429 before any decoding when the batcher's queue is full
        or every decode slot and queue place is taken."""
        if self.batcher.queue.full():
            raise self._busy("queue_full", self.batcher.queue_full())
        try:
            future = self.decodes.submit(self._prepare, clip)
        except DecodeBusy as e:
            raise self._busy("decode_busy", e) from None
        return await asyncio.wrap_future(future)

    def _busy(self, reason: str, error: Exception) -> HTTPProblem:
        """429 for ``error``, counted under ``reason`` (problem_of adds Retry-After)."""
        self.metrics.rejected.labels(reason).inc()
        return HTTPProblem(429, str(error))

    def _prepare(self, clip: ClipRequest) -> tuple[list[TaskHandle], list[Tensor]]:
        """Resolve the tasks, start loading their sets, and decode the clip (within the decode limits) into each
        task's views."""
        handles = [self.engine.resolve(r) for r in clip.refs]
        for h in handles:
            self.engine.prefetch(h)  # the set loads while the clip decodes
        return handles, task_views(self.engine, clip.path, handles, self.config.decode_limits)

    async def _run_job(self, units: list[tuple[Tensor, TaskHandle]], deadline: float) -> list[Tensor]:
        """The batcher's answer for ``units``; 429 when its queue is full, 504 past ``deadline``."""
        timeout = self.config.request_timeout_s
        expired = HTTPProblem(504, f"no answer within the server's request timeout ({timeout:g} s)")
        left = deadline - time.perf_counter()
        if left <= 0:
            raise expired
        job = Job(units)
        try:
            future = self.batcher.submit(job)
        except QueueFull as e:
            raise self._busy("queue_full", e) from None
        except NotReady:
            self.metrics.rejected.labels("not_ready").inc()
            raise
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), left)
        except asyncio.TimeoutError:
            if future.done() and not future.cancelled():
                return future.result()  # answered as the deadline passed (or the forward raised): that answer
            job.cancel()  # still queued: the worker skips it
            raise expired from None

    def _answer(self, t0: float, status: int, body: Any, headers: dict[str, str] | None = None) -> JSONResponse:
        self.metrics.requests.labels(PREDICT, str(status)).inc()
        self.metrics.latency.labels(PREDICT).observe(time.perf_counter() - t0)
        return JSONResponse(body, status_code=status, headers=headers)


def create_app(engine: Engine, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``engine``. Its lifespan starts the worker and, on shutdown, finishes the
    queued and in-flight jobs before closing the engine."""
    config = config or ServerConfig()
    api = Api(engine, config)
    description = "One frozen video backbone serving many tasks through hot-swapped ST-Adapter sets."
    if config.token is not None:
        description += " Every route but /healthz needs `Authorization: Bearer <token>` (401 otherwise)."
    app = FastAPI(title="stadapter", version=__version__, lifespan=api.lifespan, description=description)
    app.state.engine, app.state.batcher, app.state.metrics, app.state.config = engine, api.batcher, api.metrics, config
    if config.token is not None:
        app.add_middleware(BearerAuth, token=config.token, open_paths=OPEN_PATHS,
                           refused=api.metrics.rejected.labels("unauthorized").inc)
    app.add_api_route("/healthz", api.healthz, methods=["GET"], summary="Liveness: the process answers")
    app.add_api_route("/readyz", api.readyz, methods=["GET"], response_model=None,
                      summary="Readiness: the worker runs and accepts work")
    app.add_api_route("/metrics", api.prometheus, methods=["GET"], summary="Prometheus metrics",
                      response_class=PlainTextResponse)
    app.add_api_route("/v1/tasks", api.tasks, methods=["GET"], response_model=dict[str, Any],
                      summary="Registered tasks and whether they fit the running backbone")
    app.add_api_route(PREDICT, api.predict, methods=["POST"], response_model=None, description=PREDICT_DOC,
                      summary="Classify a clip with one or more tasks", openapi_extra=PREDICT_OPENAPI)
    return app


M_ARENA_MAX = -8  # glibc's mallopt parameter number


def cap_malloc_arenas(arenas: int = 2) -> bool:
    """Limit glibc to ``arenas`` malloc arenas for the threads started from now on (unless MALLOC_ARENA_MAX is
    set). Each request and decode thread otherwise gets an arena of its own, and under many concurrent uploads
    their fragments make the resident size creep: in a 240 s soak of 32 clients (benchmarks/soak.py, AMD EPYC,
    2 cores) RSS grew 8.2 MB/min with the default arenas and 1.4 MB/min (halves' medians 918.0 / 918.4 MB)
    with 2. Returns whether the cap was set (False off glibc)."""
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


def serve(engine: Engine, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
          graceful_timeout_s: int = 30, log_level: str = "info") -> None:
    """Run the server until SIGINT/SIGTERM; in-flight requests are finished before the process exits."""
    import signal

    import uvicorn

    def finished(signum: int, frame: FrameType | None) -> None:
        # uvicorn re-raises the signal it stopped on once it has shut down
        raise SystemExit(0)

    cap_malloc_arenas()
    server = uvicorn.Server(uvicorn_config(create_app(engine, config), config, host, port, log_level=log_level,
                                           graceful_timeout_s=graceful_timeout_s))
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, finished)
    try:
        server.run()
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if not server.started:
        raise SystemExit(3)  # as uvicorn.run: the address could not be bound


def uvicorn_config(app: FastAPI, config: ServerConfig, host: str = "127.0.0.1", port: int = 8000,
                   log_level: str = "info", graceful_timeout_s: int = 30) -> uvicorn.Config:
    """uvicorn's settings for ``app``: a deadline on request headers, idle keep-alive connections closed, and at
    most ``max_connections`` open (beyond: 503), so stalled clients cannot pile up."""
    import uvicorn

    return uvicorn.Config(app, host=host, port=port, log_level=log_level, http=header_deadline_protocol(
        config.header_timeout_s), timeout_keep_alive=config.keep_alive_s, limit_concurrency=config.max_connections,
        timeout_graceful_shutdown=graceful_timeout_s)


__all__ = ["ServerConfig", "create_app", "serve", "uvicorn_config", "check_path", "Metrics", "HTTPProblem"]
