"""`stadapter predict`: classify clips with one or more registered tasks on one shared backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stadapter.cli.common import (
    DbOpt,
    DeviceOpt,
    JsonOpt,
    MaxDecodedMbOpt,
    MaxFramesOpt,
    MaxPixelsOpt,
    MaxSecondsOpt,
    VerifyOpt,
    console,
    decode_limits,
    print_error,
    user_errors,
)
from stadapter.errors import InputError
from stadapter.video.decode import DEFAULT_LIMITS


@user_errors
def predict(
    clips: Annotated[list[Path], typer.Argument(help="Video files.", show_default=False)],
    task: Annotated[str, typer.Option(
        "--task", "-t", help="Task(s), comma-separated: TASK, TASK:VERSION or TASK@ALIAS.", show_default=False)],
    top_k: Annotated[int, typer.Option("--top-k", "-k", min=1, help="Labels to show per task.")] = 5,
    json_out: JsonOpt = False,
    db: DbOpt = None,
    device: DeviceOpt = "auto",
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", help="Backbone spec (default: the one the first task was trained on).")] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", "-w", help="Backbone weights: none, a local file, or a pretrained tag (default: the "
                                "first task's).")] = None,
    max_pixels: MaxPixelsOpt = DEFAULT_LIMITS.max_pixels,
    max_frames: MaxFramesOpt = DEFAULT_LIMITS.max_frames,
    max_seconds: MaxSecondsOpt = DEFAULT_LIMITS.max_seconds,
    max_decoded_mb: MaxDecodedMbOpt = DEFAULT_LIMITS.max_decoded_bytes >> 20,
    verify: VerifyOpt = "store",
) -> None:
    """Top-k labels of each clip for each task. Each clip is decoded once; every task applies its own frame
    sampler and test views (softmax averaged over views). A clip that cannot be decoded, or is over the decode
    limits, gets one error line (an "error" entry with --json); the other clips are still answered, and the
    exit code is 1."""
    from stadapter.registry import open_registry
    from stadapter.runtime.predict import predict_files

    refs = [r.strip() for r in task.split(",") if r.strip()]
    if not refs:
        raise InputError("--task names no task")
    if len(set(refs)) != len(refs):
        raise InputError(f"--task repeats a task: {task}")
    with open_registry(db) as reg:
        reg.verify = verify
        found = predict_files(reg, clips, refs, k=top_k, device=device, backbone=backbone, weights=weights,
                              limits=decode_limits(max_pixels, max_frames, max_seconds, max_decoded_mb))
    if json_out:
        typer.echo(json.dumps(found.to_dict(), indent=2))
        for message in found.errors:
            print_error(message)
    else:
        print_tables(found.results)
    if found.errors:
        raise typer.Exit(1)


def print_tables(results: list[dict[str, Any]]) -> None:
    """One table per answered clip, in order; one ``error: ...`` line (stderr) per clip that failed."""
    for r in results:
        if "error" in r:
            print_error(r["error"])
            continue
        table = Table(title=r["clip"], title_justify="left", show_lines=False)
        table.add_column("task")
        table.add_column("#", justify="right")
        table.add_column("label")
        table.add_column("probability", justify="right")
        for t in r["tasks"]:
            for rank, item in enumerate(t["top"], 1):
                views = f"{t['views']} view{'s' if t['views'] != 1 else ''}"
                table.add_row(f"{t['version']} ({views})" if rank == 1 else "", str(rank), item["label"],
                              f"{item['prob']:.4f}")
        console.print(table)
