"""Work folders under ``$STADAPTER_HOME`` and the sweep that removes what killed processes left there.

    with work_dir(home, "pull") as tmp:     # $STADAPTER_HOME/tmp/pull-XXXXXXXX, removed on exit
        ...
    remove_stale(home, stale_after=3600)    # -> [Leftover(path, size), ...]

A process killed with SIGKILL runs no cleanup, so it can leave behind (all under ``home``):

    tmp/pull-XXXXXXXX, tmp/push-XXXXXXXX   the work folders of :func:`work_dir` (Hub pull and push)
    hub/bundles/ORG--NAME/.COMMIT.XXXXXXXX the staging folders of ``stadapter.fsio.publish_dir`` (Hub pulls)
    hub/cache/*/blobs/*.incomplete        partial downloads in the Hub cache

``remove_stale`` removes only names of exactly these shapes, and only when nothing in them was modified for
``stale_after`` seconds, so the folders of a pull still running are left alone. (The registry's own blob
temporaries and cache staging folders are swept by ``Registry.gc`` under the blob store's lock.)
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from stadapter.fsio import STAGING_RE, TEMP_RANDOM

STALE_AFTER_S = 3600.0
WORK_PURPOSES = ("pull", "push")
_WORK_RE = re.compile(rf"^(?:{'|'.join(WORK_PURPOSES)})-{TEMP_RANDOM}$")
_INCOMPLETE_SUFFIX = ".incomplete"


@dataclass(frozen=True)
class Leftover:
    """A removed folder or file and the bytes it held."""

    path: Path
    size: int


def work_root(home: Path) -> Path:
    return Path(home) / "tmp"


@contextlib.contextmanager
def work_dir(home: Path, purpose: str) -> Iterator[Path]:
    """A new folder ``home/tmp/PURPOSE-XXXXXXXX``, removed on exit; one a killed process leaves behind is
    removed by :func:`remove_stale`."""
    if purpose not in WORK_PURPOSES:
        raise ValueError(f"unknown work folder purpose {purpose!r}")
    root = work_root(home)
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"{purpose}-", dir=root) as tmp:
        yield Path(tmp)


def candidates(home: Path) -> Iterator[Path]:
    """Every path under ``home`` whose name has the shape of a work, staging or partial-download leftover."""
    home = Path(home)
    yield from _matching(work_root(home), lambda p: p.is_dir() and bool(_WORK_RE.match(p.name)))
    for repo_dir in _children(home / "hub" / "bundles"):
        yield from _matching(repo_dir, lambda p: p.is_dir() and bool(STAGING_RE.match(p.name)))
    for repo_dir in _children(home / "hub" / "cache"):
        yield from _matching(repo_dir / "blobs", lambda p: p.is_file() and p.name.endswith(_INCOMPLETE_SUFFIX))


def remove_stale(home: Path, stale_after: float = STALE_AFTER_S) -> list[Leftover]:
    """Remove the :func:`candidates` in which nothing was modified for ``stale_after`` seconds."""
    cutoff = time.time() - stale_after
    removed = []
    for path in candidates(home):
        newest, size = _newest_mtime_and_size(path)
        if newest > cutoff:
            continue
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        if not path.exists():
            removed.append(Leftover(path, size))
    return removed


def _children(directory: Path) -> list[Path]:
    try:
        return sorted(p for p in directory.iterdir() if p.is_dir() and not p.is_symlink())
    except OSError:
        return []


def _matching(directory: Path, wanted: Callable[[Path], bool]) -> Iterator[Path]:
    try:
        entries = sorted(directory.iterdir())
    except OSError:
        return
    for p in entries:
        if not p.is_symlink() and wanted(p):
            yield p


def _newest_mtime_and_size(path: Path) -> tuple[float, int]:
    """The latest modification time of ``path`` and anything in it (links not followed), and its bytes."""
    st = path.lstat()
    newest, size = st.st_mtime, st.st_size if path.is_file() else 0
    for parent, dirs, files in os.walk(path, followlinks=False):
        for name, is_file in [(d, False) for d in dirs] + [(f, True) for f in files]:
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(parent, name))
                newest = max(newest, st.st_mtime)
                size += st.st_size if is_file else 0
    return newest, size


__all__ = ["STALE_AFTER_S", "WORK_PURPOSES", "Leftover", "candidates", "remove_stale", "work_dir", "work_root"]
