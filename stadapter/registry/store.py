"""The content-addressed blob store: every registered file lives once under ``blobs/ab/cdef...`` (its sha256).

Publishing a file writes a temporary file in the blob's own directory, fsyncs it, renames it into place and
fsyncs the directory, so a blob path is either absent or complete. A blob's bytes are hashed as they enter the
store (its name is that sha256, the store's trust anchor); reading them back checks sizes, and hashes again only
when asked (``Registry.verify = "always"``, ``--verify always``) or when copying out. Publishers hold a shared
lock on ``blobs/.lock`` from their first blob until their database row commits (readers hold it while they copy
blobs out); ``gc`` takes it exclusively, so it never deletes a blob whose row is about to commit.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from stadapter.errors import BundleError
from stadapter.fsio import copy_hashing, fsync_dir, publish_file, sha256_file
from stadapter.registry.db import file_lock

TMP_PREFIX = ".tmp-"


def blob_key(sha256: str) -> str:
    """Where a blob lives below a store's root (``ab/cdef...``), in this store and in a shared one; BundleError
    when ``sha256`` is not a lowercase hex digest."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise BundleError(f"not a sha256 digest: {sha256!r}")
    return f"{sha256[:2]}/{sha256[2:]}"


class BlobStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def uri(self) -> str:
        return self.root.resolve().as_uri()

    def path(self, sha256: str) -> Path:
        return self.root / blob_key(sha256)

    # -- locking ---------------------------------------------------------------------------------------
    def using(self) -> contextlib.AbstractContextManager[None]:
        """Hold while writing blobs and until the row that references them has committed, or while reading
        blobs out; ``collecting()`` waits for every holder."""
        return file_lock(self.root / ".lock", exclusive=False)

    def collecting(self) -> contextlib.AbstractContextManager[None]:
        return file_lock(self.root / ".lock", exclusive=True)

    # -- writing ---------------------------------------------------------------------------------------
    def put(self, source: Path, sha256: str, size: int) -> Path:
        """Publish ``source`` as the blob ``sha256``. The bytes are hashed as they are copied, so a source that
        changed since its digest was taken is refused. An intact blob already present is kept."""
        final = self.path(sha256)
        if self.check(final, sha256, size):
            return final
        if not final.parent.is_dir():
            final.parent.mkdir(parents=True, exist_ok=True)
            fsync_dir(self.root)  # the new fan-out directory's entry

        def copy(dst: BinaryIO) -> None:
            try:
                digest, written = copy_hashing(source, dst)  # a regular file only, never through a link
            except OSError as e:
                raise BundleError(f"cannot register {source}: {e.strerror or e}") from None
            if digest != sha256 or written != size:
                raise BundleError(f"{source} changed while it was being registered (sha256 or size differs "
                                  f"from the manifest)")

        publish_file(final, copy, prefix=TMP_PREFIX, mode=stat.S_IRUSR | stat.S_IRGRP | stat.S_IROTH)
        return final

    # -- reading ---------------------------------------------------------------------------------------
    def export(self, sha256: str, size: int, dest: Path, what: str, link: bool, hashed: bool = True) -> None:
        """Write the blob to ``dest`` (a hard link when ``link`` and possible, else a copy), checking its
        sha256 on the way (a hard link: only its size unless ``hashed``; a copy is always hashed as it is
        written); ``what`` names the file and version in errors."""
        blob = self.path(sha256)
        if not blob.is_file():
            raise BundleError(f"{what} is missing from the blob store {self.root} (blob {sha256[:12]}...)")
        if link:
            try:
                os.link(blob, dest)
            except OSError:
                link = False
        if link:
            intact = self.check(dest, sha256, size, hashed)
        else:
            with open(dest, "wb") as dst:
                digest, copied = copy_hashing(blob, dst)
            intact = digest == sha256 and copied == size
        if not intact:
            dest.unlink()
            raise BundleError(f"{what} is corrupt in the blob store: its bytes no longer match sha256 "
                              f"{sha256[:12]}... ({blob})")

    @staticmethod
    def check(path: Path, sha256: str, size: int, hashed: bool = True) -> bool:
        """Whether ``path`` is a file of ``size`` bytes whose sha256 is ``sha256`` (unless not ``hashed``: the
        store's trust mode, where a blob was hashed once, when it entered the store)."""
        return path.is_file() and path.stat().st_size == size and (not hashed or sha256_file(path) == sha256)

    # -- collecting ------------------------------------------------------------------------------------
    def sweep(self, referenced: Iterable[str]) -> tuple[int, int]:
        """Delete every blob not in ``referenced`` and every temporary file. Call under ``collecting()``."""
        keep = set(referenced)
        removed = freed = 0
        if not self.root.is_dir():
            return 0, 0
        for fan in sorted(self.root.iterdir()):
            if not fan.is_dir() or len(fan.name) != 2:
                continue
            for f in sorted(fan.iterdir()):
                if f.name.startswith(TMP_PREFIX) or (fan.name + f.name) not in keep:
                    freed += f.stat().st_size
                    f.unlink()
                    removed += 1
            with contextlib.suppress(OSError):
                fan.rmdir()  # only when empty
        return removed, freed

    def blobs(self) -> Iterator[str]:
        if not self.root.is_dir():
            return
        for fan in sorted(self.root.iterdir()):
            if fan.is_dir() and len(fan.name) == 2:
                for f in sorted(fan.iterdir()):
                    if not f.name.startswith(TMP_PREFIX):
                        yield fan.name + f.name


def remove_tree(path: Path) -> None:
    """Remove a materialized bundle directory (its files may be read-only hard links to blobs; unlinking a
    link leaves the blob alone)."""
    shutil.rmtree(path, ignore_errors=True)
