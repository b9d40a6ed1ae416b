"""`stadapter model-info`: parameters and GMACs of a preset on a backbone."""

from __future__ import annotations

import dataclasses
import json
from typing import Annotated

import typer
from rich.table import Table

from stadapter.cli.common import DEFAULT_BACKBONE, BackboneOpt, JsonOpt, WeightsOpt, console, user_errors
from stadapter.config import METHODS
from stadapter.errors import ConfigError


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

    GMACs count one multiply-add once (as fvcore, which the paper used). Use --weights none to avoid any
    download; the counts do not depend on the weights.
    """
    import torch

    from stadapter.model.flops import count_gmacs
    from stadapter.model.loading import load_backbone
    from stadapter.model.video_vit import VideoViT, count_parameters
    from stadapter.recipes import preset as get_preset

    recipe = get_preset(preset)
    changes = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if method is not None:
        changes["method"] = method
    adapter = dataclasses.replace(recipe.adapter, **changes) if changes else recipe.adapter
    num_frames = frames if frames is not None else recipe.task.num_frames
    if num_frames < 1:
        raise ConfigError(f"--frames must be >= 1, got {num_frames}")
    bb = load_backbone(backbone, weights)
    model = VideoViT(bb, adapter, num_frames).eval()
    tensors = model.init_adapter_set()
    model.bind(tensors)
    trainable = count_parameters(tensors)
    backbone_params = sum(p.numel() for p in bb.parameters())
    replaced = sum(t.numel() for k, t in tensors.items() if k.startswith("backbone."))
    total = backbone_params + trainable - replaced
    clip = torch.zeros(1, num_frames, 3, *bb.image_size)
    gmacs = count_gmacs(model, clip)
    backbone_gmacs = count_gmacs(bb, clip[0])
    result = {"backbone": str(bb.spec), "preset": preset, "method": adapter.method, "frames": num_frames,
              "image_size": list(bb.image_size), "trainable_params": trainable, "total_params": total,
              "gmacs_per_view": round(gmacs, 4), "backbone_gmacs_per_view": round(backbone_gmacs, 4)}
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"{preset} on {backbone}", show_header=False)
    table.add_row("method", adapter.method)
    table.add_row("adapters", f"r={adapter.width}, kernel {adapter.kernel}, {'+'.join(adapter.positions)}, "
                              f"{len(model.slots())} in all")
    table.add_row("frames x size", f"{num_frames} x {bb.image_size[0]}x{bb.image_size[1]}")
    table.add_row("trainable params", f"{trainable:,} ({100 * trainable / backbone_params:.2f}% of the backbone)")
    table.add_row("total params", f"{total:,}")
    table.add_row("GMACs per view", f"{gmacs:.2f} (backbone alone {backbone_gmacs:.2f})")
    console.print(table)
