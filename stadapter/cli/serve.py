"""`stadapter serve`: the HTTP API over one backbone and every registered task."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stadapter.cli.common import DbOpt, DeviceOpt, console, user_errors


@user_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", envvar="STADAPTER_BACKBONE",
        help="Backbone spec (default: the one the first --preload task was trained on).")] = None,
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="Backbone weights: none, a local "
                                                "file, or a pretrained tag.")] = None,
    preload: Annotated[list[str] | None, typer.Option(
        "--preload", "--task", "-t", help="Task(s) to resolve and make resident at start (repeatable).")] = None,
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Clip views per batched forward.")] = 16,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0,
                                               help="Wait for more requests after the first.")] = 5.0,
    queue_size: Annotated[int, typer.Option("--queue-size", min=1, help="Requests waiting; beyond: 429.")] = 64,
    request_timeout: Annotated[float, typer.Option(
        "--request-timeout", min=0.001, help="Seconds from a request's arrival to its answer; beyond: 504.")] = 120.0,
    allowed_root: Annotated[list[Path] | None, typer.Option(
        "--allowed-root", help="Directory whose clips may be named by path in JSON requests (repeatable).")] = None,
    max_resident: Annotated[int, typer.Option("--max-resident", min=1,
                                              help="Adapter sets resident on the device.")] = 64,
    alias_ttl: Annotated[float, typer.Option("--alias-ttl", min=0,
                                             help="Seconds before task names and aliases are re-resolved.")] = 2.0,
    compile_mode: Annotated[str | None, typer.Option(
        "--compile", help="CUDA only: torch.compile mode (default, reduce-overhead, max-autotune).")] = None,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
) -> None:
    """Serve every registered task on one backbone: POST /v1/predict, GET /v1/tasks, /healthz, /readyz,
    /metrics, OpenAPI docs at /docs."""
    from stadapter.registry import open_registry
    from stadapter.runtime.engine import Engine
    from stadapter.runtime.server import ServerConfig
    from stadapter.runtime.server import serve as run

    preload = list(preload or [])
    config = ServerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          allowed_roots=list(allowed_root or []), preload=preload, request_timeout_s=request_timeout)
    reg = open_registry(db)
    engine = Engine.open(reg, backbone=backbone, weights=weights, tasks=preload, device=device,
                         max_resident=max_resident, alias_ttl=alias_ttl, compile=compile_mode)
    d = engine.describe()
    console.print(f"stadapter serve: {d['backbone']} on {d['device_name']} ({d['dtype']}), "
                  f"http://{host}:{port}/docs", highlight=False)
    try:
        run(engine, config, host=host, port=port)
    finally:
        reg.close()
