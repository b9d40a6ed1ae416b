"""Bundles that follow their registry rows: the files of a version whose blobs are not in this machine's blob
store are fetched, each verified against the sha256 its row records, from a shared object store or from the
Hub commit the version was pushed to (or pulled from).

    STADAPTER_STORE=file:///mnt/team/stadapter     # or s3://bucket/prefix, gs://bucket/prefix (fsspec)

A shared store holds blobs in the local store's layout (``blobs/ab/cdef...``). When it is configured every
registration publishes its blobs there before its row commits (:func:`publish_files`), so that a teammate on
another machine, sharing the database, loads the version with no manual pull; :func:`publish_version`
publishes a version registered before. Reading order for a missing blob: the shared store, then the Hub
commit (``HF_ENDPOINT`` / ``HF_TOKEN`` as for ``pull``; the Hub transport is :func:`stadapter.hub.fetch_files`).

A pushed commit carries a model card and a manifest written for its repo, so those two may differ from the
row's: the manifest is rebuilt from the row's file list, and the card from the bundle's own card templates;
either is accepted only when its sha256 is the row's. A blob whose bytes do not match is refused, never
stored; a version whose files are nowhere reachable gets one error naming every place that was tried.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from stadapter.errors import BundleError, HubError, RegistryError
from stadapter.fsio import copy_hashing
from stadapter.registry.store import TMP_PREFIX, BlobStore, blob_key

if TYPE_CHECKING:
    from stadapter.registry.api import Registry, VersionInfo

ENV = "STADAPTER_STORE"
CHUNK = 1 << 20
PROTOCOL_PACKAGES = {"s3": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}


class SharedStore:
    """A blob store behind an fsspec URL (``file://``, ``s3://``, ``gs://``, ...), in the local layout."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        protocol = url.split("://", 1)[0] if "://" in url else ""
        if not protocol:
            raise RegistryError(f"{ENV}={url!r} is not a URL; use file:///path, s3://bucket/prefix or "
                                f"gs://bucket/prefix")
        try:
            from fsspec.core import url_to_fs

            self.fs, self.root = url_to_fs(self.url)
        except ImportError as e:
            package = PROTOCOL_PACKAGES.get(protocol, str(e.name or "fsspec"))
            raise RegistryError(f"{ENV}={url}: the {protocol}:// store needs the {package} package "
                                f"(pip install {package})") from None
        except Exception as e:  # noqa: BLE001 - any backend's failure becomes one line
            raise RegistryError(f"{ENV}={url}: {_one_line(e)}") from None

    def __repr__(self) -> str:
        return f"SharedStore({self.url!r})"

    def path(self, sha256: str) -> str:
        return f"{self.root.rstrip('/')}/blobs/{blob_key(sha256)}"

    def has(self, sha256: str, size: int) -> bool:
        path = self.path(sha256)
        try:
            return bool(self.fs.exists(path)) and int(self.fs.size(path)) == size
        except Exception as e:  # noqa: BLE001 - any backend's failure (credentials, network) is one line
            raise RegistryError(f"shared store {self.url}: {_one_line(e)}") from None

    def upload(self, source: Path, sha256: str, size: int) -> bool:
        """Publish the local file ``source`` (already checked to be the blob ``sha256``) unless an intact-sized
        blob is there; written under a temporary name first, so a reader never sees half a blob. Returns
        whether it was uploaded."""
        if self.has(sha256, size):
            return False
        final = self.path(sha256)
        tmp = f"{final.rsplit('/', 1)[0]}/{TMP_PREFIX}{os.getpid()}-{sha256[:12]}"
        try:
            self.fs.makedirs(final.rsplit("/", 1)[0], exist_ok=True)
            self.fs.put_file(str(source), tmp)
            self.fs.mv(tmp, final)
        except Exception as e:  # noqa: BLE001 - any backend's failure is one line
            raise RegistryError(f"cannot publish blob {sha256[:12]}... to the shared store {self.url}: "
                                f"{_one_line(e)}") from None
        return True

    def download(self, sha256: str, out: BinaryIO, size: int) -> str:
        """Copy the blob into ``out``, at most ``size`` + 1 bytes (a blob swapped for a larger one after
        :meth:`has` never fills the disk); returns the sha256 of what was read (the caller compares)."""
        digest = hashlib.sha256()
        left = size + 1
        with self.fs.open(self.path(sha256), "rb") as f:
            while left > 0 and (chunk := f.read(min(CHUNK, left))):
                digest.update(chunk)
                out.write(chunk)
                left -= len(chunk)
        return digest.hexdigest()


def shared_store(url: str | None = None) -> SharedStore | None:
    """The shared store ``url`` names, else ``$STADAPTER_STORE``; None when neither is set."""
    url = url if url is not None else os.environ.get(ENV, "").strip()
    return SharedStore(url) if url else None


# -- publishing ------------------------------------------------------------------------------------------

def publish_files(blobs: BlobStore, files: dict[str, dict[str, Any]], store: SharedStore | None = None) -> int:
    """Upload the blobs of ``files`` (name -> sha256, size) from the local store to the shared store (default
    ``$STADAPTER_STORE``; nothing when none is set). Returns how many were uploaded."""
    store = store or shared_store()
    if store is None:
        return 0
    uploaded = 0
    for entry in files.values():
        sha, size = str(entry["sha256"]), int(entry["size"])
        uploaded += store.upload(blobs.path(sha), sha, size)
    return uploaded


def publish_version(registry: Registry, ref: str | VersionInfo, store: SharedStore | None = None) -> int:
    """Publish a registered version's blobs to the shared store (fetching any this machine lacks first)."""
    store = store or shared_store()
    if store is None:
        raise RegistryError(f"no shared store: set {ENV} (file:///path, s3://bucket/prefix, gs://bucket/prefix)")
    info = registry.resolve(ref) if isinstance(ref, str) else ref
    with registry.blobs.using():
        fetch_missing(registry, info)
        uploaded = 0
        for name, entry in sorted(info.files.items()):
            sha, size = str(entry["sha256"]), int(entry["size"])
            local = registry._store_with(info, sha)
            if not local.check(local.path(sha), sha, size):
                raise BundleError(f"{info.ref}: {name} is corrupt in the blob store {local.root}; not published")
            uploaded += store.upload(local.path(sha), sha, size)
        return uploaded


# -- fetching --------------------------------------------------------------------------------------------

def fetch_missing(registry: Registry, info: VersionInfo) -> int:
    """Bring every blob of ``info`` that no local store holds into this registry's blob store, verified
    against the row's sha256s. Call while holding ``registry.blobs.using()``. Returns how many were fetched;
    BundleError naming every place looked in when some file is nowhere."""
    missing = {name: e for name, e in info.files.items() if not _held(registry, info, str(e["sha256"]))}
    if not missing:
        return 0
    tried: list[str] = []
    fetched = 0
    store = shared_store()
    if store is None:
        tried.append(f"no shared store ({ENV} is not set)")
    else:
        fetched += _from_shared(registry, info, missing, store, tried)
    if missing and info.hub_repo and info.hub_commit:
        fetched += _from_hub(registry, info, missing, tried)
    elif missing:
        tried.append("no Hub commit (the version was never pushed or pulled)")
    if missing:
        names = ", ".join(sorted(missing))
        verb = "is" if len(missing) == 1 else "are"
        raise BundleError(f"{info.ref}: {names} {verb} missing from the blob store {registry.blobs.root} and not "
                          f"reachable elsewhere; also looked in: " + "; ".join(tried))
    return fetched


def _held(registry: Registry, info: VersionInfo, sha256: str) -> bool:
    return registry._store_with(info, sha256).path(sha256).is_file()


@contextmanager
def _staging(blobs: BlobStore, sha256: str) -> Iterator[Path]:
    """A temporary file beside where the blob will live (``gc`` sweeps one a killed process leaves)."""
    folder = blobs.path(sha256).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=TMP_PREFIX + "fetch-", dir=folder)
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)


def _adopt(blobs: BlobStore, info: VersionInfo, name: str, entry: dict[str, Any], where: str,
           write: Callable[[BinaryIO], str]) -> None:
    """Write a candidate for the blob through ``write`` (which returns its sha256) and keep it only when it
    is the row's bytes; BundleError naming ``where`` otherwise."""
    sha, size = str(entry["sha256"]), int(entry["size"])
    with _staging(blobs, sha) as tmp:
        with open(tmp, "wb") as out:
            digest = write(out)
        if digest != sha or tmp.stat().st_size != size:
            raise BundleError(f"{info.ref}: {name} from {where} does not match the sha256 the registry "
                              f"recorded ({sha[:12]}...): tampered or corrupt, refused")
        blobs.put(tmp, sha, size)


def _from_shared(registry: Registry, info: VersionInfo, missing: dict[str, dict[str, Any]],
                 store: SharedStore, tried: list[str]) -> int:
    got = 0
    absent = []
    for name, entry in sorted(missing.items()):
        sha = str(entry["sha256"])
        if not store.has(sha, int(entry["size"])):
            absent.append(name)
            continue
        try:
            _adopt(registry.blobs, info, name, entry, f"the shared store {store.url}",
                   functools.partial(_download, store, sha, int(entry["size"])))
        except Exception as e:  # any backend's failure is one line
            if isinstance(e, BundleError):
                raise
            raise RegistryError(f"{info.ref}: cannot read {name} from the shared store {store.url}: "
                                f"{_one_line(e)}") from None
        del missing[name]
        got += 1
    if absent:
        tried.append(f"the shared store {store.url} (lacks {', '.join(absent)})")
    return got


def _from_hub(registry: Registry, info: VersionInfo, missing: dict[str, dict[str, Any]],
              tried: list[str]) -> int:
    from stadapter import hub

    repo, commit = str(info.hub_repo), str(info.hub_commit)
    where = f"Hub {repo}@{commit[:12]}"
    try:
        paths = hub.fetch_files(repo, commit, sorted(missing),
                                sizes={n: int(e["size"]) for n, e in missing.items()})
    except HubError as e:
        tried.append(f"the {where} ({e})")
        return 0
    got = 0
    for name, entry in sorted(missing.items()):
        path = paths.get(name)
        blob = path.resolve() if path is not None else None
        if blob is not None and BlobStore.check(blob, str(entry["sha256"]), int(entry["size"])):
            _adopt(registry.blobs, info, name, entry, where, functools.partial(_copied, blob))
            del missing[name]
            got += 1
    # A push writes a model card and a manifest for its repo: rebuild the row's own from what was fetched.
    for name, entry in sorted(missing.items()):
        text = _rebuilt(registry, info, name)
        if text is not None and hashlib.sha256(text).hexdigest() == entry["sha256"]:
            _adopt(registry.blobs, info, name, entry, where, functools.partial(_write, text))
            del missing[name]
            got += 1
    for name in missing:
        if name in paths and name not in _DOCUMENTS:  # there, but not the row's bytes
            hub.forget(paths[name])
            raise BundleError(f"{info.ref}: {name} from the {where} does not match the sha256 the registry "
                              f"recorded ({str(missing[name]['sha256'])[:12]}...): tampered or corrupt, refused")
    if missing:
        tried.append(f"the {where} (lacks {', '.join(sorted(missing))} as registered)")
    return got


_DOCUMENTS = ("README.md", "manifest.json")


def _rebuilt(registry: Registry, info: VersionInfo, name: str) -> bytes | None:
    """The row's manifest (from its file list), or its model card (from the bundle's card templates, once the
    other files are here); None for any other file."""
    from stadapter.bundle import CARD, FORMAT_VERSION, MANIFEST

    if name == MANIFEST:
        listed = {n: {"sha256": e["sha256"], "size": e["size"]} for n, e in sorted(info.files.items())
                  if n != MANIFEST}
        return (json.dumps({"format_version": FORMAT_VERSION, "files": listed}, indent=2, sort_keys=True)
                + "\n").encode()
    if name != CARD:
        return None
    needed = {n: e for n, e in info.files.items() if n not in (CARD, MANIFEST)}
    if not all(_held(registry, info, str(e["sha256"])) for e in needed.values()):
        return None
    return _card_candidates(registry, info, needed)


def _card_candidates(registry: Registry, info: VersionInfo, needed: dict[str, dict[str, Any]]) -> bytes | None:
    from stadapter.bundle import Bundle, default_card
    from stadapter.model_card import render_card

    want = info.files["README.md"]["sha256"]
    with tempfile.TemporaryDirectory(prefix="stadapter-card-") as tmp:
        for n, e in needed.items():
            registry._store_with(info, str(e["sha256"])).export(str(e["sha256"]), int(e["size"]), Path(tmp) / n,
                                                                f"{info.ref}: {n}", link=False)
        try:
            bundle = Bundle.load(tmp, verify=False)
        except BundleError:
            return None
    for make in (lambda: default_card(bundle), lambda: render_card(bundle),
                 lambda: render_card(bundle, version=info.version)):
        text = make().encode()
        if hashlib.sha256(text).hexdigest() == want:
            return text
    return None


def _download(store: SharedStore, sha256: str, size: int, out: BinaryIO) -> str:
    return store.download(sha256, out, size)


def _copied(source: Path, out: BinaryIO) -> str:
    return copy_hashing(source, out)[0]


def _write(data: bytes, out: BinaryIO) -> str:
    out.write(data)
    return hashlib.sha256(data).hexdigest()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text[:300] or type(e).__name__


__all__ = ["ENV", "SharedStore", "fetch_missing", "publish_files", "publish_version", "shared_store"]
