"""The bundle's file names and its manifest: reading it strictly, writing it, and checking files against it.

``manifest.json`` is a JSON object ``{"format_version": 1, "files": {name: {"sha256": hex, "size": bytes}}}``
listing every other file of the bundle. A manifest is refused when its version differs, when an entry is not a
64-digit lowercase hex digest and a non-negative integer size, when a size exceeds that file's cap
(:func:`max_size`), or when it names a file that could land outside the bundle directory or hide in it (a path
separator, a leading dot, the manifest itself).

Every bundle file is a regular file: a symlink (even one the manifest lists), a directory or a device in a
bundle directory is refused, and files are read with O_NOFOLLOW. Every JSON file is read through
:func:`parse_json`, which bounds its size and nesting depth, so a hostile file gives a BundleError, never a
RecursionError.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from stadapter import __version__
from stadapter.errors import BundleError
from stadapter.fsio import open_regular, sha256_file

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
MAX_TENSOR_BYTES = 2 << 30  # adapter.safetensors
MAX_IMAGE_BYTES = 16 << 20  # a .png figure
MAX_TEXT_BYTES = 4 << 20  # config.json, README.md, metrics.json, manifest.json
MAX_LABELS_BYTES = 16 << 20  # labels.json (up to MAX_LABELS names)
MAX_JSON_DEPTH = 32  # nesting of arrays and objects in any JSON file of a bundle


def max_size(name: str) -> int:
    """The largest file a bundle may hold under ``name``."""
    if name == TENSORS:
        return MAX_TENSOR_BYTES
    if name == LABELS:
        return MAX_LABELS_BYTES
    return MAX_IMAGE_BYTES if name.endswith(".png") else MAX_TEXT_BYTES


def parse_json(raw: bytes | str, where: str, name: str) -> Any:
    """The JSON document ``raw`` (the file ``name``), refused with a BundleError naming ``where`` and ``name``
    when it is not valid JSON, longer than the file's cap, or nested deeper than MAX_JSON_DEPTH."""
    if len(raw) > max_size(name):
        raise BundleError(f"{where}: {name} is larger than {max_size(name)} bytes")
    try:
        value = json.loads(raw)
    except RecursionError:
        raise BundleError(f"{where}: {name} is nested more than {MAX_JSON_DEPTH} levels deep") from None
    except ValueError as e:
        raise BundleError(f"{where}: {name} is not valid JSON: {e}") from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise BundleError(f"{where}: {name} is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


def _depth(value: Any) -> int:
    """How deeply arrays and objects nest in a parsed JSON value (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, level)
        if level <= MAX_JSON_DEPTH:
            stack.extend((child, level + 1) for child in children)
    return deepest


def read_bounded(path: Path, where: str, name: str) -> bytes:
    """The bytes of the regular file ``path`` (never through a symlink), refused past ``name``'s cap."""
    try:
        with open_regular(path) as f:
            raw = f.read(max_size(name) + 1)
    except OSError as e:
        raise BundleError(f"{where}: cannot read {name}: {_reason(e)}") from None
    if len(raw) > max_size(name):
        raise BundleError(f"{where}: {name} is larger than {max_size(name)} bytes")
    return raw


def _reason(e: OSError) -> str:
    """An OSError in words; a symlink opened with O_NOFOLLOW says so."""
    return "it is a symbolic link" if e.errno == errno.ELOOP else (e.strerror or str(e))


def check_format_version(version: object, where: str, what: str = MANIFEST) -> None:
    """Refuse a bundle written in another format version, naming both versions."""
    if version != FORMAT_VERSION:
        raise BundleError(f"{where}: {what} has format version {version}; this stadapter ({__version__}) reads "
                          f"version {FORMAT_VERSION}")


def unsafe_names(names: Collection[str]) -> list[str]:
    """The names that are no plain file name inside a bundle directory (also: control characters, over 255
    characters)."""
    return sorted(n for n in names if not n or "/" in n or "\\" in n or n.startswith(".") or n == MANIFEST
                  or len(n) > 255 or any(ord(c) < 32 or ord(c) == 127 for c in n))


def shown(names: Collection[str]) -> str:
    """File names for a one-line message: printable ones as they are, others quoted and escaped."""
    return ", ".join(n if n.isprintable() else ascii(n) for n in names)


def parse_manifest(raw: bytes | str, where: str) -> dict[str, Any]:
    """The manifest in ``raw`` (JSON text), checked strictly (see the module docstring)."""
    manifest = parse_json(raw, where, MANIFEST)
    if not isinstance(manifest, dict):
        raise BundleError(f"{where}: {MANIFEST} is not a JSON object")
    check_format_version(manifest.get("format_version"), where)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise BundleError(f"{where}: {MANIFEST} lists no files")
    bad_names = unsafe_names(files)
    if bad_names:
        raise BundleError(f"{where}: {MANIFEST} lists unsafe file name(s) {shown(bad_names)}")
    bad_entries = sorted(name for name, e in files.items() if not _valid_entry(e))
    if bad_entries:
        raise BundleError(f"{where}: {MANIFEST} does not give a sha256 and a size in bytes for "
                          f"{', '.join(bad_entries)}")
    too_big = sorted(name for name, e in files.items() if e["size"] > max_size(name))
    if too_big:
        raise BundleError(f"{where}: {MANIFEST} lists file(s) larger than the bundle format allows: "
                          + ", ".join(f"{n} ({files[n]['size']} bytes, at most {max_size(n)})" for n in too_big))
    return manifest


def _valid_entry(entry: object) -> bool:
    if not isinstance(entry, dict):
        return False
    digest, size = entry.get("sha256"), entry.get("size")
    return (isinstance(digest, str) and SHA256_RE.match(digest) is not None
            and isinstance(size, int) and not isinstance(size, bool) and size >= 0)


def load_manifest(path: Path, where: str) -> dict[str, Any]:
    """Read (a regular file, never through a symlink) and check the manifest file at ``path``."""
    return parse_manifest(read_bounded(path, where, MANIFEST), where)


def read_manifest(directory: Path) -> dict[str, Any]:
    """The checked manifest of the bundle directory ``directory``."""
    return load_manifest(directory / MANIFEST, f"bundle {directory}")


def write_manifest(directory: Path) -> dict[str, Any]:
    """List every file of ``directory`` (its sha256 and size) in its manifest.json."""
    files = {}
    for f in sorted(directory.iterdir()):
        if f.name == MANIFEST or f.is_symlink() or not f.is_file():
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
    check_listing(directory, listed, where)
    for name, entry in listed.items():
        if not matches_entry(directory / name, entry):
            raise BundleError(f"{where}: {name} does not match its sha256 in the manifest (changed or corrupt)")
    return manifest


def check_listing(directory: Path, listed: Mapping[str, Any], where: str) -> None:
    """``directory`` holds exactly the files the manifest lists (besides the manifest), all regular files, with
    acceptable names (no pickles, nothing unexpected)."""
    check_file_names(set(listed), f"{where} {MANIFEST}")
    present = regular_files(directory, where) - {MANIFEST}
    unlisted, missing = sorted(present - set(listed)), sorted(set(listed) - present)
    if unlisted:
        raise BundleError(f"{where}: file(s) not in the manifest: {', '.join(unlisted)}")
    if missing:
        raise BundleError(f"{where}: file(s) listed in the manifest are missing: {', '.join(missing)}")


def regular_files(directory: Path, where: str) -> set[str]:
    """The names in ``directory``, refusing a symlink (listed in the manifest or not), a subdirectory or any
    other entry that is no regular file."""
    try:
        entries = list(os.scandir(directory))
    except OSError as e:
        raise BundleError(f"{where}: cannot list the bundle directory: {e.strerror or e}") from None
    odd = sorted(e.name for e in entries if e.is_symlink() or not stat.S_ISREG(e.stat(follow_symlinks=False).st_mode))
    if odd:
        raise BundleError(f"{where}: refusing {', '.join(odd)}: a bundle holds regular files only (no symbolic "
                          f"links or directories)")
    return {e.name for e in entries}


def matches_entry(path: Path, entry: dict[str, Any]) -> bool:
    """Whether the regular file ``path`` has the manifest entry's size and sha256 (False when it cannot be
    opened as a regular file, e.g. it became a symlink meanwhile)."""
    try:
        return os.lstat(path).st_size == entry["size"] and sha256_file(path) == entry["sha256"]
    except OSError:
        return False
