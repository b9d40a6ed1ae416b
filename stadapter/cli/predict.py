"""`stadapter predict`: classify clips with one or more registered tasks on one shared backbone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stadapter.cli.common import JsonOpt, console, user_errors
from stadapter.errors import InputError

DbOpt = Annotated[str | None, typer.Option(
    "--db", envvar="STADAPTER_DB", show_default=False,
    help="Registry database: an SQLAlchemy URL or an SQLite file. Default: SQLite at "
         "$STADAPTER_HOME/registry.db.")]
DeviceOpt = Annotated[str, typer.Option(
    "--device", help="cpu, cuda, cuda:N, or auto (CUDA when available).")]


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
) -> None:
    """Top-k labels of each clip for each task. Each clip is decoded once; every task applies its own frame
    sampler and test views (softmax averaged over views)."""
    from stadapter.registry import open_registry
    from stadapter.runtime.engine import Engine, top_k as topk

    refs = [r.strip() for r in task.split(",") if r.strip()]
    if not refs:
        raise InputError("--task names no task")
    if len(set(refs)) != len(refs):
        raise InputError(f"--task repeats a task: {task}")
    with open_registry(db) as reg:
        engine = Engine.open(reg, backbone=backbone, weights=weights, tasks=refs, device=device,
                             max_resident=max(len(refs), 1))
        try:
            handles = [engine.resolve(r) for r in refs]
            decoded = [(clip, engine.clip_views(clip, handles)) for clip in clips]  # DecodeError names the clip
            results = []
            for clip, views in decoded:
                probs = engine.predict(list(zip(views, handles)))
                results.append({"clip": str(clip), "tasks": [
                    {"task": h.ref, "version": h.name, "views": int(v.shape[0]),
                     "top": [{"label": lab, "prob": p} for lab, p in topk(pr, h.labels, top_k)]}
                    for h, v, pr in zip(handles, views, probs)]})
            meta = engine.describe()
        finally:
            engine.close()
    if json_out:
        typer.echo(json.dumps({"device": meta["device_name"], "backbone": meta["backbone"], "results": results},
                              indent=2))
        return
    for r in results:
        table = Table(title=r["clip"], title_justify="left", show_lines=False)
        table.add_column("task")
        table.add_column("#", justify="right")
        table.add_column("label")
        table.add_column("probability", justify="right")
        for t in r["tasks"]:
            for rank, item in enumerate(t["top"], 1):
                table.add_row(f"{t['version']} ({t['views']} views)" if rank == 1 else "", str(rank),
                              item["label"], f"{item['prob']:.4f}")
        console.print(table)
