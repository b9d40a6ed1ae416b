"""The authors' two released models (linziyi96/st-adapter, README "reproduced" results) and their label maps.

    k400  Kinetics-400, CLIP ViT-B/16, 12x384 (one adapter before the MLP of each block), 82.2% top-1,
          8 frames at stride 16, 3 temporal x 1 spatial views
    ssv2  Something-Something-v2, CLIP ViT-B/16, 24x384 (before MHSA and before the MLP), 66.9% top-1,
          8 frames of uniform segments, 1 temporal x 3 spatial views

Sampling and views come from :mod:`stadapter.recipes` (the ``k400`` and ``ssv2`` presets). The built-in label
maps are package data: ``k400_labels.json`` (the 400 class names of the standard Kinetics-400 label map, in its
order, which the official data lists index) and ``ssv2_labels.json`` (the 174 templates in the index order of the
dataset's ``labels.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from stadapter.bundle.config import MAX_LABEL_CHARS
from stadapter.errors import InputError

REPOSITORY = "https://github.com/linziyi96/st-adapter"
# The backbone the official code runs: OpenAI CLIP ViT-B/16 (QuickGELU). open_clip's plain "ViT-B-16" config
# uses nn.GELU, which is not the function the adapters were trained inside.
OFFICIAL_BACKBONE = "open_clip:ViT-B-16-quickgelu"
OFFICIAL_WEIGHTS = "openai"
MAX_LABEL_FILE_BYTES = 4 << 20


@dataclass(frozen=True)
class OfficialModel:
    preset: str  # the stadapter.recipes preset with the same sampling and test views
    dataset: str
    layout: str
    top1: float  # the top-1 accuracy the authors report, in percent
    views: str
    labels_file: str

    def provenance(self) -> dict[str, object]:
        return {"repository": REPOSITORY, "dataset": self.dataset, "layout": self.layout,
                "reported_top1": self.top1, "reported_views": self.views,
                "reported_by": "the authors (linziyi96/st-adapter README, reproduced results)"}


OFFICIAL_MODELS = {
    "k400": OfficialModel("k400", "Kinetics-400", "12x384", 82.2, "8 frames x 16 stride, 3 temporal x 1 spatial",
                          "k400_labels.json"),
    "ssv2": OfficialModel("ssv2", "Something-Something-v2", "24x384", 66.9,
                          "8 frames of uniform segments, 1 temporal x 3 spatial", "ssv2_labels.json"),
}


def official_model(preset: str) -> OfficialModel:
    if preset not in OFFICIAL_MODELS:
        raise InputError(f"unknown official preset {preset!r}; choose one of {', '.join(OFFICIAL_MODELS)}")
    return OFFICIAL_MODELS[preset]


def builtin_labels(preset: str) -> list[str]:
    """The built-in label map of an official preset, in head-row order."""
    text = resources.files("stadapter.official").joinpath(official_model(preset).labels_file).read_text("utf-8")
    labels = json.loads(text)
    assert isinstance(labels, list) and all(isinstance(x, str) for x in labels)
    return labels


def read_label_file(path: Path, num_classes: int) -> list[str]:
    """One class name per line (blank lines at the end ignored), exactly ``num_classes`` distinct names.
    Refused with one line naming the file and the line."""
    if not path.is_file():
        raise InputError(f"label file {path} does not exist")
    if path.stat().st_size > MAX_LABEL_FILE_BYTES:
        raise InputError(f"label file {path} is over {MAX_LABEL_FILE_BYTES >> 20} MiB")
    try:
        lines = path.read_text("utf-8-sig").split("\n")  # a BOM is not part of the first name
    except UnicodeDecodeError as e:
        raise InputError(f"label file {path} is not UTF-8 text: {e.reason} at byte {e.start}") from e
    while lines and not lines[-1].strip():
        lines.pop()
    seen: dict[str, int] = {}
    for n, line in enumerate(lines, 1):
        name = line.strip()
        if not name:
            raise InputError(f"label file {path}: line {n} is empty")
        if len(name) > MAX_LABEL_CHARS or not name.isprintable():
            raise InputError(f"label file {path}: line {n} is not a class name (1 to {MAX_LABEL_CHARS} printable "
                             f"characters)")
        if name in seen:
            raise InputError(f"label file {path}: line {n} repeats {name!r} (line {seen[name]})")
        seen[name] = n
    if len(lines) != num_classes:
        where = f"line {num_classes + 1} is one too many" if len(lines) > num_classes else \
            f"it ends at line {len(lines)}"
        raise InputError(f"label file {path} has {len(lines)} class names, the checkpoint's head has "
                         f"{num_classes} classes ({where})")
    return [line.strip() for line in lines]


__all__ = ["OFFICIAL_BACKBONE", "OFFICIAL_MODELS", "OFFICIAL_WEIGHTS", "REPOSITORY", "OfficialModel",
           "builtin_labels", "official_model", "read_label_file"]
