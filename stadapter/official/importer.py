"""``stadapter import-official``: an official ST-Adapter checkpoint -> a bundle on the official backbone ->
a registered task.

The checkpoint's keys give the layout (positions, blocks, widths, kernel, classes: :mod:`.checkpoint`); it
must match the preset's adapter positions (k400: before the MLP; ssv2: before MHSA and the MLP) and the
backbone's width and depth. The bundle gets the preset's sampling and test views, the built-in label map (or
``labels``), and, in its config's ``extra``, where the weights came from and the accuracy the authors reported
(the model card prints it).
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stadapter.bundle import Bundle
from stadapter.config import AdapterConfig
from stadapter.errors import AdapterSetError, BackboneError, InputError
from stadapter.fsio import sha256_file
from stadapter.model.backbone import Backbone, OpenClipBackbone
from stadapter.model.loading import load_backbone
from stadapter.model.video_vit import VideoViT, check_adapter_set, count_parameters
from stadapter.official.checkpoint import OfficialLayout, infer_layout, read_checkpoint, to_adapter_set
from stadapter.official.presets import (
    OFFICIAL_BACKBONE,
    OFFICIAL_WEIGHTS,
    builtin_labels,
    official_model,
    read_label_file,
)
from stadapter.recipes import preset as recipe_preset
from stadapter.registry.api import check_name

if TYPE_CHECKING:
    from stadapter.registry import Registry


@dataclass(frozen=True)
class ImportOutcome:
    """layout: what the checkpoint holds; bundle_dir: the written bundle (None when it was only registered);
    ref: the registered version (None with ``register=False``)."""

    layout: OfficialLayout
    trainable_params: int
    bundle_dir: Path | None
    ref: str | None


def check_official_backbone(bb: Backbone, layout: OfficialLayout) -> None:
    """The official forward runs inside OpenAI CLIP's vision tower, QuickGELU in every MLP: refuse another
    kind of backbone, another activation, or a width or depth the checkpoint does not fit."""
    if not isinstance(bb, OpenClipBackbone):
        raise BackboneError(f"backbone {bb.spec} is not an open_clip CLIP vision tower; the official checkpoints "
                            f"run inside CLIP ViT-B/16 (use {OFFICIAL_BACKBONE})")
    act = type(bb.visual.transformer.resblocks[0].mlp.gelu).__name__
    if act != "QuickGELU":
        raise BackboneError(f"backbone {bb.spec} uses {act} in its MLPs; the official model uses CLIP's QuickGELU "
                            f"(use an open_clip '-quickgelu' config, e.g. {OFFICIAL_BACKBONE})")
    if bb.dim != layout.dim:
        raise AdapterSetError(f"the checkpoint's adapters read {layout.dim}-wide tokens (fc1.weight "
                              f"[{layout.width}, {layout.dim}]); backbone {bb.spec} is {bb.dim} wide")
    if layout.blocks[-1] != bb.depth - 1:
        raise AdapterSetError(f"the checkpoint has adapters up to block {layout.blocks[-1]}; backbone {bb.spec} "
                              f"has {bb.depth} blocks (the official code puts adapters in the last N blocks)")


def adapter_config(layout: OfficialLayout, depth: int) -> AdapterConfig:
    """The AdapterConfig of the official forward: no activation after the conv, CLS pooling averaged over
    frames, then ln_post, dropout 0.5 and the head."""
    return AdapterConfig(num_classes=layout.num_classes, method="st-adapter", width=layout.width,
                         kernel=layout.kernel, positions=layout.positions,
                         last_k=None if len(layout.blocks) == depth else len(layout.blocks),
                         activation="none", dropout=0.5, pool="cls")


def import_official(checkpoint: Path, task: str, preset: str, *, labels: Path | None = None,
                    backbone: str | None = None, weights: str | None = None, out: Path | None = None,
                    register: bool = True, registry: Registry | str | None = None) -> ImportOutcome:
    """Map ``checkpoint`` onto a bundle for ``task`` with ``preset``'s sampling and views, on ``backbone``
    (default CLIP ViT-B/16 QuickGELU with OpenAI weights, which downloads once); write it to ``out`` (absent or
    empty) and/or register it in ``registry`` (an open registry, a database URL, or None: the default one)."""
    check_name(task, "task")
    model = official_model(preset)
    recipe = recipe_preset(model.preset)
    if not register and out is None:
        raise InputError("nothing to do: pass --out DIR to write the bundle when it is not registered")
    state = read_checkpoint(checkpoint)
    layout = infer_layout(state)
    tensors = to_adapter_set(state, layout)
    if layout.positions != recipe.adapter.positions:
        raise AdapterSetError(f"the checkpoint's adapters sit {'+'.join(layout.positions)} in each block; the "
                              f"official {preset} model has them {'+'.join(recipe.adapter.positions)} "
                              f"({model.layout}); pick the other --preset")
    if labels is not None:
        names = read_label_file(labels, layout.num_classes)
    else:
        names = builtin_labels(preset)
        if len(names) != layout.num_classes:
            raise AdapterSetError(f"the checkpoint's head has {layout.num_classes} classes, the built-in {preset} "
                                  f"label map {len(names)}; pass --labels FILE (one class name per line)")
    bb = load_backbone(backbone or OFFICIAL_BACKBONE, OFFICIAL_WEIGHTS if backbone is None and weights is None
                       else weights)
    check_official_backbone(bb, layout)
    adapter = adapter_config(layout, bb.depth)
    check_adapter_set(VideoViT(bb, adapter, recipe.task.num_frames).expected_shapes(), tensors)
    digest = sha256_file(checkpoint)
    bundle = Bundle(task=task, adapter=adapter, spec=recipe.task, backbone=_backbone_info(bb), labels=names,
                    tensors=tensors, extra=_extra(preset, checkpoint, digest, layout, count_parameters(tensors),
                                                  released=labels is None and _is_release(layout, adapter)))
    return _write(bundle, layout, out, register, registry, {"kind": "official", "checkpoint": checkpoint.name,
                                                            "sha256": digest, "preset": preset})


def _backbone_info(bb: Backbone) -> dict[str, Any]:
    from stadapter.training.api import backbone_info

    return backbone_info(bb)


def _register(directory: Path, task: str, registry: Registry | str | None, source: dict[str, Any]) -> str:
    from stadapter.registry import opened

    with opened(registry) as reg:
        return reg.register(directory, task=task, source=source).ref


def _is_release(layout: OfficialLayout, adapter: AdapterConfig) -> bool:
    """Whether the checkpoint has the layout of a released model: 384 wide, kernel (3, 1, 1), every block."""
    return layout.width == 384 and layout.kernel == (3, 1, 1) and adapter.last_k is None


def _extra(preset: str, checkpoint: Path, digest: str, layout: OfficialLayout, params: int,
           released: bool) -> dict[str, Any]:
    model = official_model(preset)
    source = (f"imported by `stadapter import-official` from `{checkpoint.name}` (sha256 {digest}), a checkpoint "
              f"of the authors' code ({model.provenance()['repository']})")
    if released:
        description = (f"Weights: the authors' trained ST-Adapter for {model.dataset} ({model.layout}), {source}. "
                       f"The authors report {model.top1:.1f}% top-1 on {model.dataset} with {model.views}; that "
                       f"figure is theirs, not measured by stadapter.")
    else:
        description = (f"Weights: {source}, with the {preset} preset's sampling and views. Its layout "
                       f"({layout.describe()}) or labels differ from the released {model.dataset} model, so the "
                       f"accuracy the authors report for that model ({model.top1:.1f}% top-1) does not apply.")
    official = {**model.provenance(), "checkpoint": checkpoint.name, "checkpoint_sha256": digest,
                "checkpoint_layout": layout.describe(), "released_layout": released}
    return {"recipe": preset, "trainable_params": params, "description": description, "official": official}


def _write(bundle: Bundle, layout: OfficialLayout, out: Path | None, register: bool,
           registry: Registry | str | None, source: dict[str, Any]) -> ImportOutcome:
    params = count_parameters(bundle.tensors)
    staging = None
    if out is None:
        staging = Path(tempfile.mkdtemp(prefix="stadapter-official-"))
        out = staging / "bundle"
    try:
        bundle.save(out)
        ref = None
        if register:
            ref = _register(out, bundle.task, registry, source)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return ImportOutcome(layout, params, None if staging is not None else out, ref)
