"""`stadapter import-official`: the authors' trained checkpoints (K400, SSv2) as registered tasks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from stadapter.cli.common import DbOpt, JsonOpt, console, user_errors


@user_errors
def import_official(
    checkpoint: Annotated[Path, typer.Argument(
        help="An official checkpoint-N.pth (the training dict, or a bare state dict of the trainable tensors).",
        show_default=False)],
    task: Annotated[str, typer.Option("--task", help="Register under this task name.", show_default=False)],
    preset: Annotated[str, typer.Option(
        "--preset", help="Which released model: k400 (12x384, 8x16 frames, 3x1 views) or ssv2 (24x384, 8 "
                         "segments, 1x3 views).", show_default=False)],
    labels: Annotated[Path | None, typer.Option(
        "--labels", help="Class names, one per line, in head-row order (default: the built-in Kinetics-400 or "
                         "Something-Something-v2 label map).", show_default=False)] = None,
    backbone: Annotated[str | None, typer.Option(
        "--backbone", "-b", help="Backbone spec (default open_clip:ViT-B-16-quickgelu: OpenAI CLIP ViT-B/16 with "
                                 "QuickGELU, as the official code).", show_default=False)] = None,
    weights: Annotated[str | None, typer.Option(
        "--weights", "-w", help="Backbone weights: a local state dict file (e.g. open_clip_model.safetensors of "
                                "timm/vit_base_patch16_clip_224.openai) or a pretrained tag (default 'openai', "
                                "which downloads once).",
        show_default=False)] = None,
    out: Annotated[Path | None, typer.Option(
        "--out", help="Also write the bundle directory here (absent or empty).", show_default=False)] = None,
    no_register: Annotated[bool, typer.Option(
        "--no-register", help="Only write the bundle (needs --out); do not register it.")] = False,
    db: DbOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Import one of the authors' trained ST-Adapter checkpoints (linziyi96/st-adapter) as a task.

    The file is read with torch.load(weights_only=True); its layout (positions, blocks, widths, kernel,
    classes) is read from its keys and checked against the preset; every key is mapped exactly (a missing,
    unexpected or mis-shaped key is refused). The bundle gets the preset's sampling and test views and is
    pinned to the backbone's fingerprint."""
    from stadapter.official import import_official as run

    outcome = run(checkpoint, task, preset, labels=labels, backbone=backbone, weights=weights, out=out,
                  register=not no_register, registry=db)
    if as_json:
        typer.echo(json.dumps({"ref": outcome.ref, "bundle": str(outcome.bundle_dir) if outcome.bundle_dir else None,
                               "layout": outcome.layout.describe(), "trainable_params": outcome.trainable_params}))
        return
    done = f"registered {outcome.ref}" if outcome.ref else f"wrote {outcome.bundle_dir}"
    console.print(f"{done}: {outcome.layout.describe()}, {outcome.trainable_params:,} parameters", highlight=False,
                  soft_wrap=True)
