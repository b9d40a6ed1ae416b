"""`stadapter data ...`: datasets on disk (the built-in synthetic motion set)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from stadapter.cli.common import console, user_errors
from stadapter.errors import StadapterError

app = typer.Typer(help="Datasets: generate the built-in synthetic motion set.", no_args_is_help=True)


@app.command("synth")
@user_errors
def synth(
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the set into (created).")],
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same clips.")] = 0,
    clips_per_class: Annotated[int, typer.Option(help="Clips per class (8 classes).")] = 40,
    frames: Annotated[int, typer.Option(help="Frames per clip.")] = 16,
    size: Annotated[int, typer.Option(help="Frame width and height in pixels (even).")] = 64,
    val_fraction: Annotated[float, typer.Option(help="Share of each class's clips that goes to val.txt.")] = 0.25,
    force: Annotated[bool, typer.Option("--force", help="Write into a folder that already holds files.")] = False,
) -> None:
    """Write the built-in synthetic motion set (8 classes of H.264 MP4 clips).

    Textured objects on textured backgrounds move left / right / up / down, rotate clockwise /
    anticlockwise, or grow / shrink; a clip played backwards belongs to the opposite class. Writes one folder
    per class, train.txt and val.txt (path label lines), labels.json and synth.json. Deterministic for a seed.
    """
    from stadapter.video.synthetic import generate

    if out.exists() and not out.is_dir():
        raise StadapterError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise StadapterError(f"{out} is not empty; pass --force to write into it")
    columns = (TextColumn("[bold]synth[/]"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("clips", total=None)

        def step(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        result = generate(out, seed=seed, clips_per_class=clips_per_class, frames=frames, size=size,
                          val_fraction=val_fraction, progress=step)
    console.print(f"wrote {result.num_train} training and {result.num_val} validation clips of "
                  f"{len(result.classes)} classes to {result.root}", highlight=False)
    console.print(f"  {result.train}\n  {result.val}\n  {result.labels}", highlight=False)
