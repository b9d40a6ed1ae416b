"""`stadapter serve`: the HTTP API over one backbone and every registered task."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from stadapter.cli.common import (
    DbOpt,
    DeviceOpt,
    MaxDecodedMbOpt,
    MaxFramesOpt,
    MaxPixelsOpt,
    MaxSecondsOpt,
    VerifyOpt,
    console,
    decode_limits,
    err_console,
    user_errors,
)
from stadapter.video.decode import DEFAULT_LIMITS


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


@user_errors
def serve(
    host: Annotated[str, typer.Option("--host", help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535, help="Port (0: any free one).")] = 8000,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", envvar="STADAPTER_BACKBONE",
        help="Backbone spec. Default: the one the first --preload task was trained on, else the one most "
             "registered tasks were trained on (nothing is downloaded for it).")] = None,
    weights: Annotated[str | None, typer.Option("--weights", "-w", help="Backbone weights: none, a local "
                                                "file, or a pretrained tag. Default: the ones the chosen "
                                                "task's bundle names (a moved local file: pass its new path).")] = None,
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
    token: Annotated[str | None, typer.Option(
        "--token", envvar="STADAPTER_TOKEN", show_default=False,
        help="Bearer token every route but /healthz needs (Authorization: Bearer TOKEN); none: open.")] = None,
    max_upload_mb: Annotated[int, typer.Option(
        "--max-upload-mb", min=1, help="Largest upload (MiB), also the most temp disk one upload takes; beyond: "
                                       "413. A 10 s 1080p H.264 clip is about 10-25 MiB.")] = 48,
    body_timeout: Annotated[float, typer.Option(
        "--body-timeout", min=0.001, help="Seconds for a request's whole body to arrive; beyond: 408.")] = 60.0,
    header_timeout: Annotated[float, typer.Option(
        "--header-timeout", min=0.001, help="Seconds for a request's headers to arrive; beyond: closed.")] = 10.0,
    keep_alive: Annotated[int, typer.Option("--keep-alive", min=1,
                                            help="Seconds an idle keep-alive connection stays open.")] = 5,
    max_connections: Annotated[int, typer.Option("--max-connections", min=1,
                                                 help="Open connections; a request beyond gets 503.")] = 1024,
    max_pixels: MaxPixelsOpt = DEFAULT_LIMITS.max_pixels,
    max_frames: MaxFramesOpt = DEFAULT_LIMITS.max_frames,
    max_seconds: MaxSecondsOpt = DEFAULT_LIMITS.max_seconds,
    max_decoded_mb: MaxDecodedMbOpt = DEFAULT_LIMITS.max_decoded_bytes >> 20,
    decode_workers: Annotated[int, typer.Option("--decode-workers", min=1, help="Clips decoded at once.")] = 4,
    decode_queue: Annotated[int, typer.Option(
        "--decode-queue", min=0, help="Clips waiting for a decode slot; beyond: 429 before decoding.")] = 8,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    verify: VerifyOpt = "store",
    on_ray: Annotated[bool, typer.Option(
        "--ray", help="Serve on a Ray Serve cluster: the same HTTP API over --replicas engines, requests routed "
                      "by their first task to a replica that holds it (needs: pip install 'stadapter[ray]').")] = False,
    address: Annotated[str | None, typer.Option(
        "--address", show_default=False, help="With --ray: the Ray cluster to join (e.g. auto, or "
                                              "ray://HEAD:10001); default: start a local one.")] = None,
    replicas: Annotated[int, typer.Option("--replicas", min=1, help="With --ray: engine replicas.")] = 2,
    max_resident_per_replica: Annotated[int, typer.Option(
        "--max-resident-per-replica", min=1, help="With --ray: adapter sets each replica keeps resident (Ray's "
                                                  "multiplexing LRU and the replica's pool).")] = 8,
) -> None:
    """Serve every registered task on one backbone: POST /v1/predict, GET /v1/tasks, /healthz, /readyz,
    /metrics, OpenAPI docs at /docs."""
    from stadapter.registry import open_registry
    from stadapter.runtime.engine import Engine, tasks_on_other_backbones
    from stadapter.runtime.server import ServerConfig
    from stadapter.runtime.server import serve as run

    preload = list(preload or [])
    config = ServerConfig(max_batch=max_batch, max_wait_ms=max_wait_ms, queue_size=queue_size,
                          allowed_roots=list(allowed_root or []), preload=preload, request_timeout_s=request_timeout,
                          token=token or None, max_upload_bytes=max_upload_mb << 20, body_timeout_s=body_timeout,
                          header_timeout_s=header_timeout, keep_alive_s=keep_alive, max_connections=max_connections,
                          decode_limits=decode_limits(max_pixels, max_frames, max_seconds, max_decoded_mb),
                          decode_workers=decode_workers, decode_queue=decode_queue)
    if config.token is None and not is_loopback(host):
        err_console.print(f"[bold yellow]warning:[/] serving on {host} without a token: anyone who can reach this "
                          "address can use the API (set --token or STADAPTER_TOKEN)", highlight=False)
    if on_ray:
        from stadapter.runtime.ray_app import require_ray, serve_on_ray

        require_ray()  # a StadapterError naming the install command when Ray is missing
        console.print(f"stadapter serve --ray: {replicas} replica(s), {max_resident_per_replica} resident set(s) "
                      f"each, http://{host}:{port}/docs", highlight=False)
        serve_on_ray(config, db=db, backbone=backbone, weights=weights, device=device, replicas=replicas,
                     max_resident=max_resident_per_replica, alias_ttl=alias_ttl, compile_mode=compile_mode,
                     address=address, host=host, port=port, verify=verify)
        return
    reg = open_registry(db)
    reg.verify = verify
    engine = Engine.open(reg, backbone=backbone, weights=weights, tasks=preload, device=device,
                         max_resident=max_resident, alias_ttl=alias_ttl, compile=compile_mode)
    d = engine.describe()
    console.print(f"stadapter serve: {d['backbone']} on {d['device_name']} ({d['dtype']}), "
                  f"http://{host}:{port}/docs", highlight=False, soft_wrap=True)
    others = tasks_on_other_backbones(reg, engine.fingerprint)
    if others:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        err_console.print(f"warning: {len(others)} registered task(s) were trained on another backbone and will "
                          f"answer 409 here ({shown}); serve them with another `stadapter serve --preload TASK` "
                          f"or `--backbone SPEC --weights FILE`", highlight=False, markup=False, soft_wrap=True)
    try:
        run(engine, config, host=host, port=port)
    finally:
        reg.close()
