"""The :class:`Bundle`: one trained task in memory, saved to and loaded from a bundle directory."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from stadapter.bundle.config import check_labels, read_config, read_json
from stadapter.bundle.content import is_png
from stadapter.bundle.format import (
    CARD,
    CONFIG,
    FORMAT_VERSION,
    LABELS,
    MAX_IMAGE_BYTES,
    METRICS,
    TENSORS,
    unsafe_names,
    write_manifest,
)
from stadapter.bundle.validate import check_bundle
from stadapter.config import AdapterConfig, TaskSpec, dumps
from stadapter.errors import BundleError
from stadapter.fsio import publish_dir


@dataclass
class Bundle:
    task: str
    adapter: AdapterConfig
    spec: TaskSpec
    backbone: dict[str, Any]  # spec, weights, fingerprint, image_size, mean, std
    labels: list[str]
    tensors: dict[str, torch.Tensor]
    metrics: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. training recipe, data description
    figures: dict[str, bytes] = field(default_factory=dict)  # NAME.png -> PNG bytes (curves, confusion matrix)

    def __post_init__(self) -> None:
        check_labels(self.labels, self.adapter.num_classes, f"bundle {self.task!r}")
        for name, data in self.figures.items():
            if not name.endswith(".png") or unsafe_names([name]) or not is_png(data[:16]) \
                    or len(data) > MAX_IMAGE_BYTES:
                raise BundleError(f"bundle {self.task!r}: figure {name!r} is not a PNG file of at most "
                                  f"{MAX_IMAGE_BYTES} bytes with a plain .png name")
        head = self.tensors.get("head.weight")
        if head is not None and head.shape[0] != len(self.labels):
            raise BundleError(f"bundle {self.task!r}: head has {head.shape[0]} rows for {len(self.labels)} labels")

    # -- writing -----------------------------------------------------------------------------------
    def config_dict(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "task": self.task, "adapter": self.adapter.to_dict(),
                "spec": self.spec.to_dict(), "backbone": self.backbone, "extra": self.extra}

    def save(self, directory: str | Path, card: str | None = None) -> Path:
        """Write the bundle into ``directory`` (created; must be empty or absent). Files are written to a
        temporary sibling, fsynced, then renamed into place, so a killed process leaves no half bundle."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise BundleError(f"bundle directory {directory} is not empty")
        return publish_dir(directory, lambda staging: self._write(staging, card))

    def _write(self, directory: Path, card: str | None) -> None:
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        save_file(tensors, str(directory / TENSORS),
                  metadata={"format": "stadapter-bundle", "format_version": str(FORMAT_VERSION)})
        (directory / CONFIG).write_text(dumps(self.config_dict()))
        (directory / LABELS).write_text(json.dumps(self.labels, indent=1, ensure_ascii=False) + "\n")
        (directory / CARD).write_text(card if card is not None else default_card(self))
        if self.metrics is not None:
            (directory / METRICS).write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
        for name, data in self.figures.items():
            (directory / name).write_bytes(data)
        write_manifest(directory)

    # -- reading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> Bundle:
        """Load a bundle directory; with ``verify``, the directory is first checked completely (every file
        against the manifest, regular files only, config, labels, tensor names, shapes and values: see
        :func:`~stadapter.bundle.validate.check_bundle`)."""
        directory = Path(directory)
        where = f"bundle {directory}"
        if not directory.is_dir():
            raise BundleError(f"bundle directory {directory} does not exist")
        parsed = check_bundle(directory, where).parsed if verify else read_config(directory, where)
        metrics = read_json(directory, METRICS, where) if (directory / METRICS).exists() else None
        try:
            tensors = load_file(str(directory / TENSORS))
        except (OSError, SafetensorError) as e:
            raise BundleError(f"{where}: cannot read {TENSORS}: {e}") from e
        figures = {f.name: f.read_bytes() for f in sorted(directory.glob("*.png"))}  # checked by check_bundle
        return cls(task=parsed.task, adapter=parsed.adapter, spec=parsed.spec, backbone=parsed.backbone,
                   labels=list(parsed.labels), tensors=tensors, metrics=metrics, extra=parsed.extra,
                   figures=figures)

    def check_backbone(self, fingerprint: str, spec: str = "") -> None:
        """Refuse a backbone other than the one this bundle was trained on, naming both."""
        mine = self.backbone.get("fingerprint")
        if mine != fingerprint:
            raise BundleError(
                f"bundle {self.task!r} was trained on backbone {self.backbone.get('spec')} "
                f"(weights {self.backbone.get('weights')}, fingerprint {mine}), but the running backbone is "
                f"{spec or '?'} (fingerprint {fingerprint})")


def default_card(bundle: Bundle) -> str:
    """A short model card; the Hub module writes the full one with YAML metadata."""
    return (f"# {bundle.task}\n\nAn ST-Adapter bundle for stadapter: {bundle.adapter.method}, "
            f"{bundle.adapter.num_classes} classes, {bundle.spec.num_frames} frames, backbone "
            f"`{bundle.backbone.get('spec')}`.\n")
