"""`stadapter serve --ray`: the HTTP API of :mod:`stadapter.runtime.server` as a Ray Serve application, over N
replicas that each own one engine (backbone resident once), its adapter pool and our batcher.

    client ──HTTP──▶ Serve proxy ──▶ Ingress (1 replica, no torch)
        reads the body under the server's size and time limits, checks the bearer token, takes the request's
        first task as the multiplexed model id
        ──handle.options(multiplexed_model_id=TASK)──▶ TaskReplica (N replicas)
        @serve.multiplexed keeps the TASK's set loaded (LRU of --max-resident-per-replica sets, as our pool),
        so Ray routes a task to a replica that holds it; the request runs through the very FastAPI app of
        server.create_app, in process: same routes, errors, OpenAPI, batching across tasks
    Board (1 replica): each TaskReplica reports its Prometheus exposition every few seconds; GET /metrics on
        the ingress answers them all, each sample labelled replica="..."

A replica that dies mid-request: the ingress answers that request 503 with Retry-After (never a hang: every
forward waits at most the request timeout, then 504), and Ray starts a replacement. Each replica re-resolves
aliases after the alias TTL (its engine's), so an alias moved in the registry reaches every replica within it.
Answers carry ``X-Stadapter-Replica`` (which replica served it) and, for predictions, ``X-Stadapter-Resident``
(``1`` when the first task's set was resident on that replica before the request: the affinity hit).

Ray is optional (``pip install 'stadapter[ray]'``); this module imports it only when an app is built. It
imports no torch at module level: the ingress and board processes stay small.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from stadapter.errors import StadapterError

if TYPE_CHECKING:
    from starlette.types import Message, Receive, Scope, Send

    from stadapter.runtime.server import ServerConfig

log = logging.getLogger("stadapter.ray")

APP_NAME = "stadapter"
PREDICT = "/v1/predict"
OPEN_PATHS = ("/healthz",)
REPLICA_HEADER = "x-stadapter-replica"
RESIDENT_HEADER = "x-stadapter-resident"
FORWARDED_ENV = ("STADAPTER_DB", "STADAPTER_HOME", "STADAPTER_STORE", "HF_ENDPOINT", "HF_TOKEN", "HF_HUB_OFFLINE",
                 "HF_HUB_DISABLE_TELEMETRY", "HF_HUB_DISABLE_XET")
INSTALL_HINT = "serving on Ray needs Ray Serve: pip install 'stadapter[ray]' (or pip install 'ray[serve]')"


class RayUnavailable(StadapterError):
    """Ray Serve is not installed, or the cluster cannot be reached."""


@dataclass(frozen=True)
class RaySettings:
    """What every replica needs to build its engine and server, in plain values (no torch objects), so that
    the ingress and board processes can unpickle it without importing torch."""

    db: str | None = None  # the registry every replica shares (PostgreSQL for several machines)
    backbone: str | None = None
    weights: str | None = None
    device: str = "auto"
    replicas: int = 2
    max_resident: int = 4  # adapter sets per replica: Ray's multiplexing LRU and our pool alike
    alias_ttl: float = 2.0
    compile: str | None = None
    server: dict[str, Any] = field(default_factory=dict)  # ServerConfig keyword arguments (decode_limits: dict)
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0
    metrics_interval_s: float = 2.0
    max_ongoing: int = 0  # requests a replica takes at once (0: the server's queue size + max batch)
    env: dict[str, str] = field(default_factory=dict)  # environment of every replica (registry, store, Hub)
    route_by_task: bool = True  # False: Ray's task-blind routing (a baseline for benchmarks/serve_scale.py)
    verify: str | None = None  # the registry's materialize verification (serve --verify); None: its default

    def __post_init__(self) -> None:
        if self.replicas < 1 or self.max_resident < 1:
            raise StadapterError("--replicas and --max-resident-per-replica must be >= 1")

    def limit(self, name: str, default: Any) -> Any:
        return self.server.get(name, default)


def forwarded_env() -> dict[str, str]:
    """The variables of this process a replica on another machine needs too (registry, shared store, Hub)."""
    return {k: os.environ[k] for k in FORWARDED_ENV if os.environ.get(k)}


# -- requests through Ray --------------------------------------------------------------------------------

@dataclass
class Forwarded:
    """An HTTP request, whole, as the ingress hands it to a replica."""

    method: str
    path: str
    query: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    task: str | None = None  # the first task (also the multiplexed model id when routing by task)


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    replica: str = ""
    resident: bool | None = None  # the first task's set was resident before the request (None: no task)


async def call_asgi(app: Any, request: Forwarded) -> Answer:
    """Run one request through the ASGI ``app`` in this process and collect its answer."""
    scope: dict[str, Any] = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": request.method,
        "scheme": "http", "path": request.path, "raw_path": request.path.encode(), "root_path": "",
        "query_string": request.query, "headers": request.headers, "client": ("ray-ingress", 0),
        "server": ("ray-replica", 0), "state": {},
    }
    sent = False
    start: dict[str, Any] = {}
    chunks: list[bytes] = []

    async def receive() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": request.body, "more_body": False}
        await asyncio.Event().wait()  # the client never disconnects
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            start.update(message)
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))

    await app(scope, receive, send)
    return Answer(int(start.get("status", 500)), list(start.get("headers", [])), b"".join(chunks))


def first_task(content_type: str, body: bytes) -> str | None:
    """The first task a predict request names (its routing key), or None when it names none readably (the
    replica then answers the error). Parsed as the server parses it (:mod:`stadapter.runtime.uploads`)."""
    from stadapter.runtime.httpguard import HTTPProblem
    from stadapter.runtime.uploads import form_fields, parse_tasks

    value: Any = None
    try:
        if content_type.startswith("application/json"):
            parsed = json.loads(body)
            value = parsed.get("tasks") if isinstance(parsed, dict) else None
        elif content_type.startswith("multipart/form-data"):
            value = form_fields(content_type, body, ("tasks",)).get("tasks")
        return parse_tasks(value, limit=1 << 30)[0][:200]
    except (ValueError, RecursionError, HTTPProblem):
        return None


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> Answer:
    raw = json.dumps(body).encode()
    h = [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
    return Answer(status, h + [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()], raw)


async def _send(answer: Answer, send: Send) -> None:
    headers = [(k, v) for k, v in answer.headers if k.lower() != b"content-length"]
    headers.append((b"content-length", str(len(answer.body)).encode()))
    if answer.replica:
        headers.append((REPLICA_HEADER.encode(), answer.replica.encode()))
    if answer.resident is not None:
        headers.append((RESIDENT_HEADER.encode(), b"1" if answer.resident else b"0"))
    await send({"type": "http.response.start", "status": answer.status, "headers": headers})
    await send({"type": "http.response.body", "body": answer.body})


# -- metrics from every replica --------------------------------------------------------------------------

def merge_expositions(reports: dict[str, str]) -> bytes:
    """One Prometheus exposition of several replicas' (replica id -> text), each sample labelled with its
    replica."""
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    for replica, text in sorted(reports.items()):
        for fam in text_string_to_metric_families(text):
            merged = families.get(fam.name)
            if merged is None:
                merged = families[fam.name] = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for s in fam.samples:
                merged.add_sample(s.name, {**s.labels, "replica": replica}, s.value, s.timestamp, s.exemplar)

    class _Collected:
        def collect(self) -> list[Metric]:
            return list(families.values())

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collected())
    return generate_latest(registry)


# -- the application -------------------------------------------------------------------------------------

def _ray() -> Any:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise RayUnavailable(INSTALL_HINT) from None
    return ray, serve


def require_ray() -> None:
    """RayUnavailable, with the install hint, when Ray Serve cannot be imported."""
    _ray()


def build_app(settings: RaySettings) -> Any:
    """The Ray Serve application (bound deployments) for ``settings``; run it with ``serve.run``."""
    ray, serve = _ray()
    del ray
    actor_env = {"runtime_env": {"env_vars": dict(settings.env)}} if settings.env else {}
    max_ongoing = settings.max_ongoing or int(settings.limit("queue_size", 64)) + int(settings.limit("max_batch", 16))

    @serve.deployment(name="Board", num_replicas=1, ray_actor_options={"num_cpus": 0, **actor_env})
    class Board:
        """The latest Prometheus exposition of every live replica."""

        def __init__(self) -> None:
            self.reports: dict[str, tuple[float, str, int]] = {}

        def report(self, replica: str, text: str, pid: int) -> None:
            self.reports[replica] = (time.monotonic(), text, pid)

        def exposition(self) -> bytes:
            fresh = time.monotonic() - 5 * settings.metrics_interval_s - 10
            self.reports = {r: v for r, v in self.reports.items() if v[0] >= fresh}
            return merge_expositions({r: v[1] for r, v in self.reports.items()})

        def replicas(self) -> dict[str, int]:
            """replica id -> process id of the replicas that reported lately (for operators and tests)."""
            fresh = time.monotonic() - 5 * settings.metrics_interval_s - 10
            return {r: v[2] for r, v in self.reports.items() if v[0] >= fresh}

    @serve.deployment(name="TaskReplica", num_replicas=settings.replicas, max_ongoing_requests=max_ongoing,
                      ray_actor_options={"num_cpus": settings.replica_cpus, "num_gpus": settings.replica_gpus,
                                         **actor_env})
    class TaskReplica:
        """One engine, its pool and batcher, behind the FastAPI app of runtime/server.py."""

        def __init__(self, board: Any) -> None:
            from stadapter.registry import open_registry
            from stadapter.runtime.engine import Engine
            from stadapter.runtime.server import ServerConfig, cap_malloc_arenas, create_app
            from stadapter.video.decode import DecodeLimits

            cap_malloc_arenas()
            kwargs = dict(settings.server)
            if isinstance(kwargs.get("decode_limits"), dict):
                kwargs["decode_limits"] = DecodeLimits(**kwargs["decode_limits"])
            config = ServerConfig(**kwargs)
            self.registry = open_registry(settings.db)
            if settings.verify is not None:
                self.registry.verify = settings.verify
            self.engine = Engine.open(self.registry, backbone=settings.backbone, weights=settings.weights,
                                      tasks=list(config.preload), device=settings.device,
                                      max_resident=settings.max_resident, alias_ttl=settings.alias_ttl,
                                      compile=settings.compile)
            self.app = create_app(self.engine, config)
            self.metrics = self.app.state.metrics
            self.board = board
            context = serve.get_replica_context()
            self.replica = str(getattr(context, "replica_id", None) and context.replica_id.unique_id
                               or getattr(context, "replica_tag", "replica"))
            self._lifespan: Any = None
            self._started = asyncio.Lock()
            self._stop = threading.Event()
            threading.Thread(target=self._report_loop, name="stadapter-metrics", daemon=True).start()

        async def _start(self) -> None:
            async with self._started:
                if self._lifespan is None:
                    lifespan = self.app.router.lifespan_context(self.app)
                    await lifespan.__aenter__()
                    self._lifespan = lifespan

        def _report_loop(self) -> None:
            while not self._stop.wait(settings.metrics_interval_s):
                self.report()

        def report(self) -> None:
            try:
                self.board.report.remote(self.replica, self.metrics.exposition().decode(), os.getpid()).result(
                    timeout_s=10)
            except Exception as e:  # noqa: BLE001 - metrics must never take a replica down
                log.warning("cannot report metrics: %s", e)

        @serve.multiplexed(max_num_models_per_replica=settings.max_resident)
        async def load(self, task: str) -> str:
            """Make ``task``'s set resident (our pool loads it; Ray records that this replica holds it)."""
            from starlette.concurrency import run_in_threadpool

            await run_in_threadpool(self.engine.prefetch, task)
            return task

        def _resident(self, task: str) -> bool | None:
            """Whether ``task`` resolves and its set is on the device now (None: it does not resolve)."""
            try:
                handle = self.engine.resolve(task)
            except StadapterError:
                return None
            return self.engine.pool.where(handle.key) == "device"

        async def handle(self, request: Forwarded) -> Answer:
            from starlette.concurrency import run_in_threadpool

            await self._start()
            routed = serve.get_multiplexed_model_id()
            task = routed or request.task
            resident = None
            if task:
                resident = await run_in_threadpool(self._resident, task)
                if resident is not None and routed:
                    await self.load(task)
            answer = await call_asgi(self.app, request)
            answer.replica, answer.resident = self.replica, resident  # None: no task, or one that does not resolve
            return answer

        async def __del__(self) -> None:
            if not hasattr(self, "_stop"):
                return  # __init__ failed
            self._stop.set()
            if self._lifespan is not None:
                await self._lifespan.__aexit__(None, None, None)  # finishes queued and in-flight jobs
            self.registry.close()

    @serve.deployment(name="Ingress", num_replicas=1, max_ongoing_requests=max(256, max_ongoing),
                      ray_actor_options={"num_cpus": 0, **actor_env})
    class Ingress:
        """Reads each request under the server's limits and forwards it to the replica its first task is
        routed to."""

        def __init__(self, replicas: Any, board: Any) -> None:
            from stadapter.runtime.httpguard import BearerAuth

            self.replicas, self.board = replicas, board
            token = settings.limit("token", None)
            self.asgi: Any = BearerAuth(self._route, token, OPEN_PATHS) if token else self._route

        async def __call__(self, request: Any) -> Any:
            from starlette.responses import Response

            captured: dict[str, Any] = {"headers": [], "body": []}

            async def send(message: Message) -> None:
                if message["type"] == "http.response.start":
                    captured["status"], captured["headers"] = message["status"], message.get("headers", [])
                elif message["type"] == "http.response.body":
                    captured["body"].append(message.get("body", b""))

            await self.asgi(request.scope, request.receive, send)
            response = Response(b"".join(captured["body"]), status_code=int(captured.get("status", 500)))
            response.raw_headers = list(captured["headers"])
            return response

        async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
            path = scope.get("path", "/")
            if path == "/healthz":
                await _send(_json(200, {"status": "ok"}), send)
                return
            if path == "/metrics":
                text = await self.board.exposition.remote()
                await _send(Answer(200, [(b"content-type", b"text/plain; version=0.0.4; charset=utf-8")], text),
                            send)
                return
            await _send(await self._forward(scope, receive), send)

        async def _forward(self, scope: Scope, receive: Receive) -> Answer:
            from starlette.requests import ClientDisconnect, Request

            from stadapter.runtime.httpguard import HTTPProblem
            from stadapter.runtime.uploads import read_body

            request = Request(scope, receive)
            headers = list(scope.get("headers", []))
            ctype = request.headers.get("content-type", "")
            multipart = ctype.startswith("multipart/form-data")
            limit = int(settings.limit("max_upload_bytes" if multipart else "max_json_bytes",
                                       48 << 20 if multipart else 1 << 20))
            deadline = time.monotonic() + float(settings.limit("body_timeout_s", 60.0))
            retry = str(settings.limit("retry_after_s", 1))
            try:
                body = b"".join([c async for c in read_body(request, limit, deadline)])
            except HTTPProblem as e:
                return _json(e.status, {"detail": e.detail}, e.headers)
            except ClientDisconnect:
                return _json(400, {"detail": "client disconnected"})
            task = first_task(ctype, body) if scope.get("path") == PREDICT and scope["method"] == "POST" else None
            forwarded = Forwarded(scope["method"], scope.get("path", "/"), scope.get("query_string", b""),
                                  headers, body, task)
            routed = task and settings.route_by_task
            handle = self.replicas.options(multiplexed_model_id=task) if routed else self.replicas
            timeout = float(settings.limit("request_timeout_s", 120.0)) + 5.0
            try:
                answer: Answer = await asyncio.wait_for(handle.handle.remote(forwarded), timeout)
            except asyncio.TimeoutError:
                return _json(504, {"detail": f"no answer within the server's request timeout ({timeout:g} s)"})
            except Exception as e:  # a replica that died or cannot be reached: 503, never a hang
                if _is_bug(e):
                    log.error("internal error in a replica", exc_info=e)
                    return _json(500, {"detail": "internal error; see the server log"})
                log.warning("request lost its replica: %s", type(e).__name__)
                return _json(503, {"detail": "the replica serving this request became unavailable (it died or is "
                                             "restarting); retry"}, {"Retry-After": retry})
            return answer

    board = cast(Any, Board).bind()
    return cast(Any, Ingress).bind(cast(Any, TaskReplica).bind(board), board)


def _is_bug(e: BaseException) -> bool:
    """An exception raised by our code in a replica (RayTaskError), not the loss of the replica."""
    from ray.exceptions import RayActorError, RayTaskError

    return isinstance(e, RayTaskError) and not isinstance(e, RayActorError) and \
        not isinstance(getattr(e, "cause", None), RayActorError)


def start(settings: RaySettings, *, address: str | None = None, host: str = "127.0.0.1", port: int = 8000,
          blocking: bool = True) -> Any:
    """Connect to the Ray cluster at ``address`` (None: start a local one; "auto": the running one), start
    Serve's HTTP proxy on ``host:port`` and deploy the app. With ``blocking``, serve until interrupted, then
    delete the app; otherwise return the ingress handle."""
    ray, serve = _ray()
    try:
        if not ray.is_initialized():
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
        serve.start(http_options={"host": host, "port": port})
        handle = serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    except (ConnectionError, RuntimeError, ValueError) as e:
        lines = [line.strip() for line in str(e).splitlines() if line.strip()]
        raise RayUnavailable(f"cannot start the stadapter app on Ray Serve{f' at {address}' if address else ''}: "
                             f"{(lines[-1] if lines else type(e).__name__)[:300]} (see the replica logs)") from None
    if not blocking:
        return handle
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.delete(APP_NAME)
    return None


def server_kwargs(config: ServerConfig) -> dict[str, Any]:
    """``config`` as plain keyword arguments (what :class:`RaySettings` carries to every replica)."""
    import dataclasses

    kwargs = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    kwargs["allowed_roots"] = [str(r) for r in config.allowed_roots]
    kwargs["preload"] = list(config.preload)
    kwargs["decode_limits"] = dataclasses.asdict(config.decode_limits)
    return kwargs


def serve_on_ray(config: ServerConfig, *, db: str | None, backbone: str | None, weights: str | None, device: str,
                 replicas: int, max_resident: int, alias_ttl: float, compile_mode: str | None,
                 address: str | None, host: str, port: int, verify: str | None = None) -> None:
    """What `stadapter serve --ray` runs: deploy the app and serve until interrupted. A CUDA ``device`` gives
    each replica one GPU."""
    _ray()  # RayUnavailable with the install hint before anything else
    from stadapter.registry import open_registry

    with open_registry(db) as reg:  # an unreachable database or an unknown task fails here, in one line
        for ref in config.preload:
            reg.resolve(ref)
    settings = RaySettings(db=db, backbone=backbone, weights=weights, device=device, replicas=replicas,
                           max_resident=max_resident, alias_ttl=alias_ttl, compile=compile_mode,
                           server=server_kwargs(config), replica_gpus=1.0 if device.startswith("cuda") else 0.0,
                           env=forwarded_env(), verify=verify)
    start(settings, address=address, host=host, port=port, blocking=True)


__all__ = ["APP_NAME", "Answer", "Forwarded", "RaySettings", "RayUnavailable", "build_app", "call_asgi",
           "first_task", "forwarded_env", "merge_expositions", "require_ray", "serve_on_ray", "server_kwargs",
           "start"]
