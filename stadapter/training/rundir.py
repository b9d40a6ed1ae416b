"""A training run's folder (``--out``): what it holds, and when it may be reused.

    OUT/checkpoint.pt     the latest checkpoint (resumable)
    OUT/metrics.jsonl     one JSON line per step and per evaluation
    OUT/tensorboard/      event files (``--log-to tensorboard``)
    OUT/bundle/           the trained bundle (with curves.png and, after a validation, confusion.png)

A folder that holds a run is refused unless the run is resumed (``--resume``) or started again
(``--overwrite``, which deletes the run's own files above and nothing else: in ``tensorboard/`` only the event
files, ``bundle/`` only when it holds a bundle).
"""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from stadapter.bundle.format import MANIFEST
from stadapter.errors import ConfigError

CHECKPOINT = "checkpoint.pt"
METRICS_LOG = "metrics.jsonl"
BUNDLE_DIR = "bundle"
TENSORBOARD_DIR = "tensorboard"
CURVES = "curves.png"
CONFUSION = "confusion.png"
EVENTS_PREFIX = "events.out.tfevents."  # the event files torch.utils.tensorboard writes


def previous_run(out: Path) -> list[str]:
    """The run files ``out`` already holds (empty for a new or an unrelated folder)."""
    return [name for name in (CHECKPOINT, METRICS_LOG, BUNDLE_DIR) if (out / name).exists()]


def prepare_run_dir(out: Path, *, resume: bool, overwrite: bool, delete: bool = True) -> None:
    """Refuse to reuse a run folder without ``resume`` or ``overwrite``; with ``overwrite`` (and ``delete``: the
    main process of a torchrun job), delete the old run's files. One-line ConfigErrors."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in --out and --overwrite starts it again; pass one of them")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file, not a folder")
    found = previous_run(out)
    if found and not (resume or overwrite):
        raise ConfigError(f"{out} already holds a training run ({', '.join(found)}); pass --resume to continue it "
                          f"or --overwrite to start it again, or choose another --out")
    if overwrite and delete:
        for path in _run_paths(out):  # all checked before anything is deleted
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
        with contextlib.suppress(OSError):
            (out / TENSORBOARD_DIR).rmdir()  # when only our event files were in it


def _run_paths(out: Path) -> list[Path]:
    """What ``--overwrite`` deletes: the run's files (regular files or links), its bundle folder (one holding a
    bundle's manifest) and the TensorBoard event files in ``OUT/tensorboard`` (nothing else there). A path of
    the wrong kind (a folder named checkpoint.pt, a bundle folder that holds no bundle) is refused, so that
    --overwrite never deletes what the run did not write."""
    paths = []
    for name in (CHECKPOINT, METRICS_LOG, CURVES):
        path = out / name
        if path.is_dir() and not path.is_symlink():
            raise ConfigError(f"--overwrite: {path} is a folder, not the run's file; move it or choose another --out")
        if path.exists() or path.is_symlink():
            paths.append(path)
    bundle = out / BUNDLE_DIR
    if bundle.is_symlink():
        paths.append(bundle)  # the link only, never what it points to
    elif bundle.exists():
        if not (bundle / MANIFEST).is_file():
            raise ConfigError(f"--overwrite: {bundle} is not a bundle (no {MANIFEST}); move it or choose another "
                              f"--out")
        paths.append(bundle)
    board = out / TENSORBOARD_DIR
    if board.is_dir() and not board.is_symlink():
        paths += [p for p in board.iterdir() if p.name.startswith(EVENTS_PREFIX) and p.is_file()]
    return paths


__all__ = ["BUNDLE_DIR", "CHECKPOINT", "CONFUSION", "CURVES", "METRICS_LOG", "TENSORBOARD_DIR",
           "prepare_run_dir", "previous_run"]
