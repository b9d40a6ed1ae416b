"""A bundle's ``config.json`` and ``labels.json``, parsed and checked into one typed value (no torch).

:func:`parse_config` is the only reader of these two files: loading a bundle, registering it, pulling it from
the Hub and serving a registered version all go through it, so a bundle a later step would refuse is refused
at the first one. Every field of the ``adapter`` and ``spec`` sections is checked against the type its config
dataclass declares, and the known ``backbone`` fields against theirs, before anything is built from them: a
wrong field gives an error naming it (``config.json: 'adapter': width must be an integer, got 4.5``).
"""

from __future__ import annotations

import types
import typing
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from stadapter.bundle.format import CONFIG, LABELS, check_format_version, parse_json, read_bounded
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.errors import BundleError, ConfigError

T = TypeVar("T")
MAX_LABELS = 100_000  # classes a bundle may have
MAX_LABEL_CHARS = 1_000  # characters in one class name
# The backbone section's known fields and their types (others are kept as they are).
BACKBONE_FIELDS: dict[str, Any] = {"spec": str, "weights": str | None, "fingerprint": str, "dim": int, "depth": int,
                                   "image_size": tuple[int, ...], "patch_size": tuple[int, ...], "num_prefix": int,
                                   "mean": tuple[float, ...], "std": tuple[float, ...]}
TYPE_WORDS = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "null"}


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
    """``labels`` as a tuple, when it is a list of distinct, non-empty class names (at most MAX_LABELS of at
    most MAX_LABEL_CHARS characters), one per head row."""
    if not isinstance(labels, Sequence) or isinstance(labels, str) or not all(isinstance(x, str) for x in labels):
        raise BundleError(f"{where}: {LABELS} must be a list of class names (strings)")
    if len(labels) > MAX_LABELS:
        raise BundleError(f"{where}: {LABELS} has {len(labels)} class names; a bundle has at most {MAX_LABELS}")
    if not all(0 < len(x) <= MAX_LABEL_CHARS for x in labels):
        raise BundleError(f"{where}: {LABELS}: class names must be 1 to {MAX_LABEL_CHARS} characters long")
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
    adapter = _section(config, "adapter", where, AdapterConfig.from_dict, AdapterConfig)
    spec = _section(config, "spec", where, TaskSpec.from_dict, TaskSpec)
    backbone = _section(config, "backbone", where, dict)
    if not isinstance(backbone.get("fingerprint"), str) or not backbone["fingerprint"]:
        raise BundleError(f"{where}: {CONFIG} names no backbone fingerprint")
    check_fields(backbone, BACKBONE_FIELDS, where, "backbone")
    extra = config.get("extra") or {}  # null, as some earlier bundles wrote, is an empty object
    if not isinstance(extra, dict):
        raise BundleError(f"{where}: {CONFIG}: 'extra' must be a JSON object")
    return BundleConfig(task, adapter, spec, backbone, check_labels(labels, adapter.num_classes, where), extra)


def _section(config: dict[str, Any], key: str, where: str, build: Callable[[dict[str, Any]], T],
             schema: type | None = None) -> T:
    """``build(config[key])``, with a missing, non-object or invalid section reported as a BundleError. With
    ``schema`` (a dataclass), every field is first checked against the type it declares."""
    if key not in config:
        raise BundleError(f"{where}: {CONFIG} has no {key!r} section")
    if not isinstance(config[key], dict):
        raise BundleError(f"{where}: {CONFIG}: {key!r} must be a JSON object")
    try:
        built = build(config[key])
    except (ConfigError, TypeError, ValueError) as e:
        # The config's own checks name the field; anything else (a type it did not expect, which from_dict
        # reports as "ClassName: ...") is reported by the field whose type is wrong.
        if schema is not None and (not isinstance(e, ConfigError) or str(e).startswith(schema.__name__)):
            check_fields(config[key], typing.get_type_hints(schema), where, key)
        raise BundleError(f"{where}: {CONFIG}: {key!r}: {e}") from None
    if schema is not None:  # values the config accepted, but of another type than it declares (4.5 for an int)
        check_fields(config[key], typing.get_type_hints(schema), where, key)
    return built


def check_fields(section: dict[str, Any], types_by_field: dict[str, Any], where: str, key: str) -> None:
    """Refuse the first field of ``section`` whose JSON value does not fit its declared type, naming it."""
    for name, value in section.items():
        hint = types_by_field.get(name)
        if hint is not None and not _fits(value, hint):
            raise BundleError(f"{where}: {CONFIG}: {key!r}: {name} must be {_words(hint)}, got {value!r:.80}")


def _fits(value: Any, hint: Any) -> bool:
    """Whether a parsed JSON value fits a type annotation (int, float, str, bool, None, unions, tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if origin is tuple:
        if not isinstance(value, list):
            return False
        if len(args) == 2 and args[1] is Ellipsis:
            return all(_fits(v, args[0]) for v in value)
        return len(value) == len(args) and all(_fits(v, a) for v, a in zip(value, args, strict=True))
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint in (str, bool, type(None)):
        return isinstance(value, hint)
    return True  # Any, or a type JSON cannot express: left to the dataclass


def _words(hint: Any) -> str:
    """A type annotation in words: ``int | None`` -> "an integer or null"."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_words(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_words(args[0]).split(' ', 1)[1]}s"
        words = [_words(a).split(" ", 1)[1] for a in args]
        return f"a list of {len(args)} {words[0]}s" if len(set(words)) == 1 else f"a list of {', '.join(words)}"
    return TYPE_WORDS.get(hint, str(hint))


def read_json(directory: Path, name: str, where: str) -> Any:
    """The parsed JSON file ``name`` of a bundle directory (a regular file; size and depth bounded)."""
    return parse_json(read_bounded(directory / name, where, name), where, name)


def read_config(directory: Path, where: str | None = None) -> BundleConfig:
    """The checked config and labels of the bundle directory ``directory``."""
    where = where or f"bundle {directory}"
    return parse_config(read_json(directory, CONFIG, where), read_json(directory, LABELS, where), where)
