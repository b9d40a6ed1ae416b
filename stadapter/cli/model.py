"""`stadapter model-info`: parameters and GMACs of a preset on a backbone."""

from __future__ import annotations

import json
from typing import Annotated

import typer
from rich.table import Table

from stadapter.cli.common import BackboneOpt, JsonOpt, WeightsOpt, console, user_errors
from stadapter.config import DEFAULT_BACKBONE, METHODS


@user_errors
def model_info(
    backbone: BackboneOpt = DEFAULT_BACKBONE,
    weights: WeightsOpt = None,
    preset: Annotated[str, typer.Option(help="Recipe preset: k400, ssv2, diving48, ucf101, hmdb51.")] = "k400",
    num_classes: Annotated[int | None, typer.Option(help="Override the preset's number of classes.")] = None,
    frames: Annotated[int | None, typer.Option(help="Frames per view (default: the preset's).")] = None,
    method: Annotated[str | None, typer.Option(help=f"Override the method: {', '.join(METHODS)}.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Trainable and total parameters, and GMACs per view counted over a real forward pass.

    GMACs count one multiply-add once (as fvcore, which the paper used). The counts do not depend on the
    weights, so by default none are read or downloaded (a seeded random init); --weights loads them anyway.
    """
    from stadapter.model.summary import summarize_preset

    s = summarize_preset(backbone, weights or "none", preset, num_classes=num_classes, frames=frames, method=method)
    if as_json:
        typer.echo(json.dumps(s.to_dict()))
        return
    adapter = s.adapter
    table = Table(title=f"{preset} on {backbone}", show_header=False)
    table.add_row("method", adapter.method)
    table.add_row("adapters", f"r={adapter.width}, kernel {adapter.kernel}, {'+'.join(adapter.positions)}, "
                              f"{s.num_adapters} in all")
    table.add_row("frames x size", f"{s.frames} x {s.image_size[0]}x{s.image_size[1]}")
    table.add_row("trainable params", f"{s.trainable_params:,} ({100 * s.trainable_params / s.backbone_params:.2f}% "
                                      "of the backbone)")
    table.add_row("total params", f"{s.total_params:,}")
    table.add_row("GMACs per view", f"{s.gmacs_per_view:.2f} (backbone alone {s.backbone_gmacs_per_view:.2f})")
    console.print(table)
