"""The on-disk adapter bundle: one trained task, as stored locally, registered, and pushed to the Hub.

    adapter.safetensors   adapter + head tensors (safetensors only, never pickle)
    config.json           adapter config, task spec (sampling, frames, views), backbone (spec, weights,
                          fingerprint, preprocessing), task name, bundle format version, stadapter version
    labels.json           class names, index order
    README.md             model card
    metrics.json          optional evaluation results
    manifest.json         sha256 and size of every other file, and the bundle format version

This package is the one owner of that format:

    format.py    file names, format version, manifest (strict read, write, verify a directory against it)
    config.py    config.json + labels.json -> BundleConfig (parse_config, used by every reader)
    content.py   the safetensors header reader, and content checks by file name (no pickles)
    tensors.py   what adapter.safetensors must hold for a config: names, shapes, float dtypes, finite values
    validate.py  check_bundle: the one trust boundary every import and pull goes through
    bundle.py    Bundle: tensors + config in memory, save (atomic) and load (verified)

Loading verifies every file against the manifest and refuses files it does not list, symlinks and pickles. Everything
but ``Bundle`` and ``default_card`` is importable without torch; those two are imported on first use, so the
registry and the file helpers stay light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from stadapter.bundle.config import MAX_LABELS, BundleConfig, check_labels, parse_config, read_config
from stadapter.bundle.content import HeaderEntry, SafetensorsHeader, check_content, is_pickle, read_safetensors_header
from stadapter.bundle.format import (
    CARD,
    CONFIG,
    FORMAT_VERSION,
    LABELS,
    MANIFEST,
    METRICS,
    OPTIONAL,
    PICKLE_SUFFIXES,
    REQUIRED,
    TENSORS,
    check_file_names,
    check_format_version,
    load_manifest,
    max_size,
    parse_json,
    parse_manifest,
    read_manifest,
    unsafe_names,
    verify_bundle,
    write_manifest,
)
from stadapter.bundle.tensors import check_tensors
from stadapter.bundle.validate import CheckedBundle, check_bundle
from stadapter.fsio import sha256_file

if TYPE_CHECKING:
    from stadapter.bundle.bundle import Bundle, default_card


def __getattr__(name: str) -> Any:
    """``Bundle`` and ``default_card`` (they need torch), imported when first asked for."""
    if name in ("Bundle", "default_card"):
        value = getattr(importlib.import_module("stadapter.bundle.bundle"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CARD", "CONFIG", "FORMAT_VERSION", "LABELS", "MANIFEST", "MAX_LABELS", "METRICS", "OPTIONAL",
           "PICKLE_SUFFIXES", "REQUIRED", "TENSORS", "Bundle", "BundleConfig", "CheckedBundle", "HeaderEntry",
           "SafetensorsHeader", "check_bundle", "check_content", "check_file_names", "check_format_version",
           "check_labels", "check_tensors", "default_card", "is_pickle", "load_manifest", "max_size",
           "parse_config", "parse_json", "parse_manifest", "read_config", "read_manifest",
           "read_safetensors_header", "sha256_file", "unsafe_names", "verify_bundle", "write_manifest"]
