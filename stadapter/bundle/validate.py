"""The bundle's one trust boundary: :func:`check_bundle` decides whether a directory is a bundle stadapter accepts.

Import (``Registry.register``), pull (``hub.pull``) and everything that registers a bundle call it before a
single byte leaves the directory. It checks, in order, refusing with one BundleError naming the problem:

    manifest     a regular file, size and depth bounded, strict (format.py: names, digests, size caps)
    files        regular files only (no symlink, even a listed one), exactly the manifest's, none a pickle
    bytes        every file's size and sha256 against the manifest (JSON files: the very bytes then parsed)
    content      each file's bytes fit its name (content.py)
    config       config.json and labels.json field by field (config.py)
    tensors      exactly the names, shapes and float dtypes the config asks for, every value finite
                 (tensors.py)
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from stadapter.bundle.config import BundleConfig, parse_config
from stadapter.bundle.content import check_content
from stadapter.bundle.format import (
    CONFIG,
    LABELS,
    MANIFEST,
    METRICS,
    TENSORS,
    check_listing,
    matches_entry,
    parse_json,
    parse_manifest,
    read_bounded,
)
from stadapter.bundle.tensors import check_tensors
from stadapter.errors import BundleError

JSON_FILES = (CONFIG, LABELS, METRICS)


@dataclass(frozen=True)
class CheckedBundle:
    """A bundle directory that passed :func:`check_bundle`: its files as they will be registered, the parsed
    JSON documents, and the typed config."""

    files: dict[str, dict[str, Any]]  # name -> {"sha256", "size"}, the manifest included
    config: dict[str, Any]
    labels: list[str]
    metrics: Any  # metrics.json, or None
    parsed: BundleConfig


def check_bundle(directory: Path, where: str | None = None) -> CheckedBundle:
    """Check the bundle directory ``directory`` completely (see the module docstring); ``where`` names it in
    errors (default: ``bundle DIRECTORY``)."""
    directory = Path(directory)
    where = where or f"bundle {directory}"
    if not directory.is_dir():
        raise BundleError(f"bundle directory {directory} does not exist")
    raw_manifest = read_bounded(directory / MANIFEST, where, MANIFEST)
    listed: dict[str, dict[str, Any]] = parse_manifest(raw_manifest, where)["files"]
    check_listing(directory, listed, where)
    documents = {name: _read_listed_json(directory, name, listed[name], where)
                 for name in JSON_FILES if name in listed}
    for name in sorted(set(listed) - set(JSON_FILES)):
        if not matches_entry(directory / name, listed[name]):
            raise BundleError(f"{where}: {name} does not match its sha256 in the manifest (changed or corrupt)")
        check_content(directory / name, name, where)
    parsed = parse_config(documents[CONFIG], documents[LABELS], where)
    check_tensors(directory / TENSORS, parsed.adapter, where)
    files = {name: {"sha256": e["sha256"], "size": e["size"]} for name, e in sorted(listed.items())}
    files[MANIFEST] = {"sha256": hashlib.sha256(raw_manifest).hexdigest(), "size": len(raw_manifest)}
    return CheckedBundle(files, documents[CONFIG], documents[LABELS], documents.get(METRICS), parsed)


def _read_listed_json(directory: Path, name: str, entry: dict[str, Any], where: str) -> Any:
    """A JSON file of the bundle, read once: the bytes checked against the manifest are the bytes parsed."""
    raw = read_bounded(directory / name, where, name)
    if len(raw) != entry["size"] or hashlib.sha256(raw).hexdigest() != entry["sha256"]:
        raise BundleError(f"{where}: {name} does not match its sha256 in the manifest (changed or corrupt)")
    return parse_json(raw, where, name)


__all__ = ["CheckedBundle", "check_bundle"]
