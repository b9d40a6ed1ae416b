"""The bundle's file names and its manifest: reading it strictly, writing it, and checking files against it.

``manifest.json`` is a JSON object ``{"format_version": 1, "files": {name: {"sha256": hex, "size": bytes}}}``
listing every other file of the bundle. A manifest is refused when its version differs, when an entry is not a
64-digit lowercase hex digest and a non-negative integer size, or when it names a file that could land outside
the bundle directory or hide in it (a path separator, a leading dot, the manifest itself).
"""

from __future__ import annotations

import json
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

from stadapter import __version__
from stadapter.errors import BundleError
from stadapter.fsio import sha256_file

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
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


def check_format_version(version: object, where: str, what: str = MANIFEST) -> None:
    """Refuse a bundle written in another format version, naming both versions."""
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: {what} has format version {version}; this stadapter ({__version__}) reads "
                          f"version {FORMAT_VERSION}")


def unsafe_names(names: Collection[str]) -> list[str]:
    """The names that are no plain file name inside a bundle directory."""
    return sorted(n for n in names if not n or "/" in n or "\\" in n or n.startswith(".") or n == MANIFEST
                  or Path(n).is_absolute())


def parse_manifest(raw: bytes | str, where: str) -> dict[str, Any]:
    """The manifest in ``raw`` (JSON text), checked strictly (see the module docstring)."""
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise BundleError(f"{where}: {MANIFEST} is not valid JSON: {e}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: {MANIFEST} is not a JSON object")
    check_format_version(manifest.get("format_version"), where)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: {MANIFEST} lists no files")
    bad_names = unsafe_names(files)
    if bad_names:
        raise BundleError(f"{where}: {MANIFEST} lists unsafe file name(s) {', '.join(bad_names)}")
    bad_entries = sorted(name for name, e in files.items() if not _valid_entry(e))
    if bad_entries:
        raise BundleError(f"{where}: {MANIFEST} does not give a sha256 and a size in bytes for "
                          f"{', '.join(bad_entries)}")
    return manifest


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    digest, size = entry.get("sha256"), entry.get("size")
    return (isinstance(digest, str) and SHA256_RE.match(digest) is not None
            and isinstance(size, int) and not isinstance(size, bool) and size >= 0)


def load_manifest(path: Path, where: str) -> dict[str, Any]:
    """Read and check the manifest file at ``path``."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise BundleError(f"{where}: cannot read {MANIFEST}: {e.strerror or e}") from None
    return parse_manifest(raw, where)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checked manifest of the bundle directory ``directory``."""
    return load_manifest(directory / MANIFEST, f"bundle {directory}")


def write_manifest(directory: Path) -> dict[str, Any]:
    """List every file of ``directory`` (its sha256 and size) in its manifest.json."""
    files = {}
    for f in sorted(directory.iterdir()):
        if f.name == MANIFEST or not f.is_file():
            continue
        files[f.name] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    manifest = {"format_version": FORMAT_VERSION, "files": files}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def check_file_names(names: Collection[str], where: str) -> None:
    """Refuse pickles, missing required files and unexpected files among a bundle's file names."""
    pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
    if pickles:
        raise BundleError(f"{where}: refusing pickle file(s) {', '.join(pickles)}")
    missing = [n for n in REQUIRED if n not in names]
    if missing:
        raise BundleError(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(names) - set(REQUIRED) - set(OPTIONAL) - {MANIFEST})
    if unknown and not all(n.endswith(".png") for n in unknown):
        raise BundleError(f"{where}: unexpected file(s) {', '.join(unknown)}")


def verify_bundle(directory: Path, where: str | None = None) -> dict[str, Any]:
    """Check every file against the manifest: sha256 and size; no unlisted files, no pickles. Returns the
    manifest. ``where`` names the bundle in errors (default: its directory)."""
    where = where or f"bundle {directory}"
    manifest = load_manifest(directory / MANIFEST, where)
    listed: dict[str, dict[str, Any]] = manifest["files"]
    check_file_names(set(listed), f"{where} {MANIFEST}")
    present = {f.name for f in directory.iterdir() if f.is_file() and f.name != MANIFEST}
    unlisted = sorted(present - set(listed))
    if unlisted:
        raise BundleError(f"{where}: file(s) not in the manifest: {', '.join(unlisted)}")
    for name, entry in listed.items():
        path = directory / name
        if not path.is_file():
            raise BundleError(f"{where}: {name} is missing")
        if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
            raise BundleError(f"{where}: {name} does not match its sha256 in the manifest (changed or corrupt)")
    return manifest
