"""A bundle's ``config.json`` and ``labels.json``, parsed and checked into one typed value (no torch).

:func:`parse_config` is the only reader of these two files: loading a bundle, registering it, pulling it from
the Hub and serving a registered version all go through it, so a bundle a later step would refuse is refused
at the first one.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stadapter.bundle.format import CONFIG, LABELS, check_format_version
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.errors import BundleError, ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class BundleConfig:
    """What config.json and labels.json of a bundle say."""

    task: str
    adapter: AdapterConfig
    spec: TaskSpec
    backbone: dict[str, Any]  # spec, weights, fingerprint (never empty), image_size, mean, std
    labels: tuple[str, ...]  # class names in head-row order
    extra: dict[str, Any] = field(default_factory=dict)  # e.g. training recipe, data description

    @property
    def fingerprint(self) -> str:
        return str(self.backbone["fingerprint"])


def check_labels(labels: object, num_classes: int, where: str) -> tuple[str, ...]:
    """``labels`` as a tuple, when it is a list of distinct class names, one per head row."""
    if not isinstance(labels, Sequence) or isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{where}: {LABELS} must be a list of class names")
    if len(labels) != num_classes:
        raise BundleError(f"{where}: {len(labels)} labels for a head of {num_classes} classes")
    repeated = sorted(name for name, n in Counter(labels).items() if n > 1)
    if repeated:
        raise BundleError(f"{where}: class names repeat: {', '.join(repeated)}")
    return tuple(labels)


def parse_config(config: object, labels: object, where: str) -> BundleConfig:
    """Check the parsed JSON of config.json and labels.json; BundleError naming ``where`` and the problem.

    Checked: the format version, a non-empty task name, the adapter and spec sections (valid configs), a
    backbone section with a fingerprint, an ``extra`` object, and the labels (see :func:`check_labels`)."""
    if not isinstance(config, dict):
        raise BundleError(f"{where}: {CONFIG} is not a JSON object")
    check_format_version(config.get("format_version"), where, CONFIG)
    task = config.get("task")
    if not isinstance(task, str) or not task:
        raise BundleError(f"{where}: {CONFIG} names no task")
    adapter = _section(config, "adapter", where, AdapterConfig.from_dict)
    spec = _section(config, "spec", where, TaskSpec.from_dict)
    backbone = _section(config, "backbone", where, dict)
    if not isinstance(backbone.get("fingerprint"), str) or not backbone["fingerprint"]:
        raise BundleError(f"{where}: {CONFIG} names no backbone fingerprint")
    extra = config.get("extra", {})
    if not isinstance(extra, dict):
        raise BundleError(f"{where}: {CONFIG}: 'extra' must be a JSON object")
    return BundleConfig(task, adapter, spec, backbone, check_labels(labels, adapter.num_classes, where), extra)


def _section(config: dict[str, Any], key: str, where: str, build: Callable[[dict[str, Any]], T]) -> T:
    """``build(config[key])``, with a missing, non-object or invalid section reported as a BundleError."""
    if key not in config:
        raise BundleError(f"{where}: {CONFIG} has no {key!r} section")
    if not isinstance(config[key], dict):
        raise BundleError(f"{where}: {CONFIG}: {key!r} must be a JSON object")
    try:
        return build(config[key])
    except ConfigError as e:
        raise BundleError(f"{where}: {CONFIG}: {key!r}: {e}") from None


def read_json(directory: Path, name: str, where: str) -> Any:
    """The parsed JSON file ``name`` of a bundle directory."""
    try:
        return json.loads((directory / name).read_bytes())
    except OSError as e:
        raise BundleError(f"{where}: cannot read {name}: {e.strerror or e}") from None
    except ValueError as e:
        raise BundleError(f"{where}: {name} is not valid JSON: {e}") from None


def read_config(directory: Path, where: str | None = None) -> BundleConfig:
    """The checked config and labels of the bundle directory ``directory``."""
    where = where or f"bundle {directory}"
    return parse_config(read_json(directory, CONFIG, where), read_json(directory, LABELS, where), where)
