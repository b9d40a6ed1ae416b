"""The on-disk adapter bundle: one trained task, as stored locally and pushed to the Hub.

    adapter.safetensors   adapter + head tensors (safetensors only, never pickle)
    config.json           adapter config, task spec (sampling, frames, views), backbone (spec, weights,
                          fingerprint, preprocessing), task name, bundle format version, stadapter version
    labels.json           class names, index order
    README.md             model card
    metrics.json          optional evaluation results
    manifest.json         sha256 and size of every other file, and the bundle format version

Loading verifies every file against the manifest and refuses files it does not list and pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from stadapter import __version__
from stadapter.config import AdapterConfig, TaskSpec, dumps
from stadapter.errors import BundleError

FORMAT_VERSION = 1
TENSORS = "adapter.safetensors"
CONFIG = "config.json"
LABELS = "labels.json"
CARD = "README.md"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
REQUIRED = (TENSORS, CONFIG, LABELS, CARD)
OPTIONAL = (METRICS,)
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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

    def __post_init__(self) -> None:
        if len(self.labels) != self.adapter.num_classes:
            raise BundleError(f"bundle {self.task!r}: {len(self.labels)} labels for a head of "
                              f"{self.adapter.num_classes} classes")
        if len(set(self.labels)) != len(self.labels):
            raise BundleError(f"bundle {self.task!r}: class names repeat")
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
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        try:
            tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
            save_file(tensors, str(tmp / TENSORS),
                      metadata={"format": "stadapter-bundle", "format_version": str(FORMAT_VERSION)})
            (tmp / CONFIG).write_text(dumps(self.config_dict()))
            (tmp / LABELS).write_text(json.dumps(self.labels, indent=1, ensure_ascii=False) + "\n")
            (tmp / CARD).write_text(card if card is not None else default_card(self))
            if self.metrics is not None:
                (tmp / METRICS).write_text(json.dumps(self.metrics, indent=2, sort_keys=True) + "\n")
            write_manifest(tmp)
            for f in tmp.iterdir():
                _fsync(f)
            if directory.exists():
                directory.rmdir()
            os.replace(tmp, directory)
        except BaseException:
            for f in tmp.glob("*"):
                f.unlink(missing_ok=True)
            tmp.rmdir()
            raise
        return directory

    # -- reading -----------------------------------------------------------------------------------
    @classmethod
    def load(cls, directory: str | Path, verify: bool = True) -> "Bundle":
        directory = Path(directory)
        if not directory.is_dir():
            raise BundleError(f"bundle directory {directory} does not exist")
        if verify:
            verify_bundle(directory)
        try:
            config = json.loads((directory / CONFIG).read_text())
            labels = json.loads((directory / LABELS).read_text())
            tensors = load_file(str(directory / TENSORS))
            metrics = json.loads((directory / METRICS).read_text()) if (directory / METRICS).exists() else None
        except (OSError, ValueError) as e:
            raise BundleError(f"bundle {directory}: cannot read: {e}") from e
        version = config.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(f"bundle {directory} has format version {version}; this stadapter "
                              f"({__version__}) reads version {FORMAT_VERSION}")
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise BundleError(f"bundle {directory}: {LABELS} must be a list of class names")
        return cls(task=config["task"], adapter=AdapterConfig.from_dict(config["adapter"]),
                   spec=TaskSpec.from_dict(config["spec"]), backbone=config["backbone"], labels=labels,
                   tensors=tensors, metrics=metrics, extra=config.get("extra", {}))

    def check_backbone(self, fingerprint: str, spec: str = "") -> None:
        """Refuse a backbone other than the one this bundle was trained on, naming both."""
        mine = self.backbone.get("fingerprint")
        if mine != fingerprint:
            raise BundleError(
                f"bundle {self.task!r} was trained on backbone {self.backbone.get('spec')} "
                f"(weights {self.backbone.get('weights')}, fingerprint {mine}), but the running backbone is "
                f"{spec or '?'} (fingerprint {fingerprint})")


def write_manifest(directory: Path) -> dict[str, Any]:
    files = {}
    for f in sorted(directory.iterdir()):
        if f.name == MANIFEST or not f.is_file():
            continue
        files[f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BundleError(f"bundle {directory}: cannot read {MANIFEST}: {e}") from e
    if manifest.get("format_version") != FORMAT_VERSION:
        raise BundleError(f"bundle {directory} has format version {manifest.get('format_version')}; this "
                          f"stadapter reads version {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"bundle {directory}: {MANIFEST} lists no files")
    return manifest


def check_file_names(names: list[str] | set[str], where: str) -> None:
    """Refuse pickles and missing required files among a bundle's file names."""
    pickles = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise BundleError(f"{where}: refusing pickle file(s) {', '.join(pickles)}")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise BundleError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(names) - set(REQUIRED) - set(OPTIONAL) - {MANIFEST})
    if unknown and not all(n.endswith(".png") for n in unknown):
        raise BundleError(f"{where}: unexpected file(s) {', '.join(unknown)}")


def verify_bundle(directory: Path) -> dict[str, Any]:
    """Check every file against the manifest: sha256 and size; no unlisted files, no pickles."""
    manifest = read_manifest(directory)
    listed = manifest["files"]
    present = {f.name for f in directory.iterdir() if f.is_file() and f.name != MANIFEST}
    check_file_names(set(listed), f"bundle {directory} manifest")
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(f"bundle {directory}: file(s) not in the manifest: {', '.join(unlisted)}")
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"bundle {directory}: {name} is missing")
        if path.stat().st_size != entry.get("size") or sha256_file(path) != entry.get("sha256"):
            raise BundleError(f"bundle {directory}: {name} does not match its sha256 in the manifest "
                              f"(changed or corrupt)")
    return manifest


def default_card(bundle: Bundle) -> str:
    """A short model card; the Hub module writes the full one with YAML metadata."""
    return (f"# {bundle.task}\n\nAn ST-Adapter bundle for stadapter: {bundle.adapter.method}, "
            f"{bundle.adapter.num_classes} classes, {bundle.spec.num_frames} frames, backbone "
            f"`{bundle.backbone.get('spec')}`.\n")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
