"""Durable file helpers shared by the bundle format, the registry's blob store and the Hub client (no torch).

    open_regular(path)                 open a regular file for reading, never through a symlink (O_NOFOLLOW)
    sha256_file(path)                  hex digest of a regular file, read in chunks (never through a symlink)
    copy_hashing(source, dst)          copy a file into an open binary file, hashing the bytes on the way
    fsync_file(path), fsync_dir(path)  make a file's bytes, or a rename inside a directory, durable
    publish_dir(dest, write)           build a directory next to ``dest`` and rename it into place, so a
                                       killed process leaves either no ``dest`` or a complete one
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_RANDOM = r"[a-z0-9_]{8}"  # the random part tempfile.mkdtemp adds to a prefix
STAGING_RE = re.compile(rf"^\..+\.{TEMP_RANDOM}$")  # publish_dir's staging folders: ".{dest.name}." + random

CHUNK = 1 << 20


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading in binary mode when it is a regular file. A symlink (even to a regular file)
    raises OSError(ELOOP), a directory, FIFO or device OSError(EINVAL); opening never blocks on a FIFO."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _blocks(path: Path) -> Iterator[bytes]:
    with open_regular(path) as f:
        while block := f.read(CHUNK):
            yield block


def sha256_file(path: Path) -> str:
    """The hex sha256 of the file at ``path``."""
    digest = hashlib.sha256()
    for block in _blocks(path):
        digest.update(block)
    return digest.hexdigest()


def copy_hashing(source: Path, dst: BinaryIO) -> tuple[str, int]:
    """Copy the regular file ``source`` (never through a symlink) into ``dst``; returns (hex sha256, byte count)
    of the bytes actually copied."""
    digest = hashlib.sha256()
    copied = 0
    for block in _blocks(source):
        digest.update(block)
        dst.write(block)
        copied += len(block)
    return digest.hexdigest(), copied


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside ``directory`` durable (a no-op where directories cannot be opened or synced)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_file(dest: Path, write: Callable[[BinaryIO], object], *, prefix: str | None = None,
                 mode: int | None = None) -> Path:
    """Write a file atomically: ``write`` fills a temporary sibling (name ``prefix`` + random, default
    ``.{dest.name}.``), which is fsynced, given ``mode`` if set, renamed onto ``dest``, and the directory
    fsynced. When ``write`` raises, the temporary file is removed and ``dest`` is left as it was."""
    dest = Path(dest)
    fd, name = tempfile.mkstemp(prefix=prefix if prefix is not None else f".{dest.name}.", dir=dest.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)
    return dest


def publish_dir(dest: Path, write: Callable[[Path], None], *, sync_files: bool = True, durable: bool = True,
                keep_existing: Callable[[Path], bool] | None = None) -> Path:
    """Create the directory ``dest`` (absent, or an empty directory) all at once.

    ``write(staging)`` fills a new temporary sibling of ``dest`` (named ``.{dest.name}.*``). Its files (unless
    ``sync_files`` is false, e.g. for hard links to files already durable) and the directory itself are then
    fsynced, it is renamed onto ``dest``, and the parent directory is fsynced. When ``write`` or the rename
    raises, the temporary directory is removed and ``dest`` is left as it was. ``durable=False`` skips every
    fsync (still all at once, but a crash may lose it): for a cache that is checked and rebuilt when incomplete.

    keep_existing: asked when the rename fails because ``dest`` was filled meanwhile (another process built
    the same directory); when it answers True that directory is kept and this copy dropped, else the error
    propagates."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))  # matches STAGING_RE
    try:
        write(staging)
        if sync_files and durable:
            for f in staging.iterdir():
                fsync_file(f)
        if durable:
            fsync_dir(staging)
        try:
            os.rename(staging, dest)  # POSIX: replaces an empty directory, refuses a non-empty one
        except OSError:
            if keep_existing is None or not dest.is_dir() or not keep_existing(dest):
                raise
            shutil.rmtree(staging, ignore_errors=True)
        if durable:
            fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return dest


__all__ = ["CHUNK", "copy_hashing", "fsync_dir", "fsync_file", "open_regular", "publish_dir", "sha256_file"]
