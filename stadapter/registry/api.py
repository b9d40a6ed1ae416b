"""The Registry API: register bundles as numbered versions of a task, resolve references, materialize verified
bundle directories, and keep aliases, tags, Hub locations and lineage.

    reg = open_registry()                         # $STADAPTER_DB, else SQLite in $STADAPTER_HOME
    info = reg.register(Path("runs/ssv2/bundle"))  # -> ssv2:4
    reg.set_alias("ssv2", "production", 4)
    bundle = reg.load_bundle("ssv2")              # production, else the latest version; files verified

A registration first checks the bundle directory completely (``stadapter.bundle.check_bundle``: manifest,
regular files only, sizes, JSON schema, labels, tensor names, shapes and values), then publishes every file into the
content-addressed blob store (``store.py``), and only then commits the database row, in a transaction that
allocates the next version number under a lock (a row lock on the task in PostgreSQL, BEGIN IMMEDIATE in
SQLite). A process killed at any point leaves either no row, or a row whose files are all complete.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

from sqlalchemy import Connection, CursorResult, Engine, Result, Row, Select, delete, select, update
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.orm import Session, selectinload

from stadapter.bundle.format import MANIFEST, shown, unsafe_names
from stadapter.bundle.validate import check_bundle
from stadapter.errors import BackboneError, BundleError, RegistryError, RegistryUnavailable
from stadapter.fsio import publish_dir
from stadapter.registry import db as dbm
from stadapter.registry import queries
from stadapter.registry.leftovers import STALE_AFTER_S, Leftover, remove_stale
from stadapter.registry.models import AdapterVersion, Alias, Backbone, Tag, Task, utcnow
from stadapter.registry.remote import fetch_missing, publish_files
from stadapter.registry.store import BlobStore, remove_tree

if TYPE_CHECKING:
    from stadapter.bundle import Bundle

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z")
PRODUCTION = "production"
TASKS_NAMED = 20  # an unknown task's error names this many known tasks (a registry may hold thousands)
SCHEMA_ERROR_RE = re.compile(r"no such (table|column)|has no column named", re.IGNORECASE)
T = TypeVar("T")


# -- value objects ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class VersionInfo:
    """One registered version of a task, detached from the database."""

    id: int
    task: str
    version: int
    backbone_spec: str
    backbone_fingerprint: str
    config: dict[str, Any]
    labels: list[str]
    metrics: dict[str, Any] | None
    files: dict[str, dict[str, Any]]  # name -> {"sha256": ..., "size": ...}
    hub_repo: str | None
    hub_commit: str | None
    hub_tag: str | None
    source: dict[str, Any] | None
    parent_id: int | None
    data: str | None
    status: str
    created_at: datetime
    aliases: list[str]
    backbone_weights: str | None = None
    storage: str = ""
    parent: str | None = None  # the parent's "task:version" while it exists
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.task}:{self.version}"

    @property
    def size(self) -> int:
        return sum(int(e["size"]) for e in self.files.values())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ref"] = self.ref
        d["created_at"] = self.created_at.isoformat()
        return d

    def __hash__(self) -> int:
        return hash((self.id, self.task, self.version))


@dataclass(frozen=True)
class TaskInfo:
    name: str
    description: str | None
    recipe: str | None
    versions: int
    latest: int | None
    aliases: dict[str, int]
    latest_metrics: dict[str, Any] | None
    current: int | None = None  # the version the bare task name serves: production, else latest
    # That version's id, config, labels and backbone fingerprint, for a server's listing (not in to_dict).
    current_id: int | None = field(default=None, repr=False, compare=False)
    current_config: dict[str, Any] | None = field(default=None, repr=False, compare=False)
    current_labels: list[str] | None = field(default=None, repr=False, compare=False)
    current_fingerprint: str | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "description": self.description, "recipe": self.recipe,
                "versions": self.versions, "latest": self.latest, "aliases": self.aliases,
                "latest_metrics": self.latest_metrics, "current": self.current}


@dataclass(frozen=True)
class TaskPage:
    """One page of the task listing; ``next_after`` (the last name shown) asks for the next page, None at the
    end."""

    tasks: list[TaskInfo]
    next_after: str | None


# -- references ------------------------------------------------------------------------------------------

def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise RegistryError(f"invalid {what} name {name!r}: use 1-100 letters, digits, '.', '_' or '-', "
                            f"starting with a letter or digit")
    return name


def parse_ref(ref: str) -> tuple[str, int | None, str | None]:
    """"task" -> (task, None, None); "task:3" -> (task, 3, None); "task@staging" -> (task, None, "staging").
    "task:latest" is the latest version, whatever the aliases say."""
    bad = RegistryError(f"not a registry reference: {ref!r}; use TASK, TASK:VERSION or TASK@ALIAS")
    if not isinstance(ref, str) or not ref:
        raise bad
    if "@" in ref:
        task, _, alias = ref.partition("@")
        if not NAME_RE.match(task) or not NAME_RE.match(alias):
            raise bad
        return task, None, alias
    if ":" in ref:
        task, _, version = ref.partition(":")
        if not NAME_RE.match(task):
            raise bad
        if version == "latest":
            return task, -1, None
        v = version[1:] if version[:1] in ("v", "V") else version
        if not v.isdigit() or int(v) < 1:
            raise bad
        return task, int(v), None
    if not NAME_RE.match(ref):
        raise bad
    return ref, None, None


# -- the registry ------------------------------------------------------------------------------------------

class Registry:
    """Versions of every task's adapter bundle: a database (metadata) plus a blob store (files).

    Use :func:`open_registry` rather than the constructor; close it (or use it as a context manager) to
    release the database connections.
    """

    def __init__(self, engine: Engine, home: Path, url: str | None = None, store: Path | None = None) -> None:
        self.engine = engine
        self.home = Path(home)
        self.url = url or engine.url.render_as_string(hide_password=False)
        root = Path(store) if store is not None else dbm.store_dir(self.home, self.url)
        self.blobs = BlobStore(root / "blobs")
        self.cache = root / "bundles"
        self._writer = engine.execution_options(sqlite_begin="IMMEDIATE")
        self._reader = dbm.single_statement(engine)
        self.verify = "store"  # "always": materialize re-hashes every file (see materialize)

    def __repr__(self) -> str:
        return f"Registry({dbm.redact(self.url)!r}, home={str(self.home)!r})"

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- sessions ----------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        """One transaction; commits on success. Database failures become RegistryUnavailable, except the
        transient ones (deadlock, serialization failure, a locked SQLite file) that ``_retry`` retries."""
        try:
            with Session(self._writer if write else self.engine, expire_on_commit=False) as s, s.begin():
                yield s
        except OperationalError as e:
            if _transient(e):
                raise
            raise self._database_error(e) from e

    @contextlib.contextmanager
    def _read(self) -> Iterator[Connection]:
        """A connection for one read statement, without a transaction around it (no BEGIN / ROLLBACK round
        trips: see ``db.single_statement``); database failures become RegistryUnavailable."""
        try:
            with self._reader.connect() as conn:
                yield conn
        except OperationalError as e:
            raise self._database_error(e) from e

    def _retry(self, fn: Callable[[], T], attempts: int = 8, integrity: bool = False) -> T:
        """Run a transaction function again after a transient failure (and, with ``integrity``, after a
        unique violation caused by a concurrent insert)."""
        for i in range(attempts):
            try:
                return fn()
            except DBAPIError as e:
                again = _transient(e) or (integrity and isinstance(e, IntegrityError))
                if not again or i == attempts - 1:
                    if isinstance(e, OperationalError):
                        raise self._database_error(e) from e
                    raise
                time.sleep(0.05 * (i + 1))
        raise AssertionError("unreachable")

    def _database_error(self, e: OperationalError) -> RegistryError:
        """A database failure as the user's error: RegistryError for a schema that lacks a table or column
        (run ``stadapter db upgrade``), RegistryUnavailable for everything else (unreachable, gone, I/O)."""
        message = f"registry database {dbm.redact(self.url)}: {_first_line(e.orig)}"
        if SCHEMA_ERROR_RE.search(str(e.orig)):
            return RegistryError(f"{message}; is it at the newest schema? (stadapter db upgrade)")
        return RegistryUnavailable(message)

    # -- registering -------------------------------------------------------------------------------------
    def register(self, bundle_dir: Path, *, task: str | None = None, source: dict[str, Any] | None = None,
                 parent: VersionInfo | None = None, data: str | None = None) -> VersionInfo:
        """Verify the bundle directory, publish its files into the blob store, and record it as the next
        version of ``task`` (default: the task named in its config.json).

        source: lineage, e.g. ``{"kind": "train"}`` or ``{"kind": "hub", "repo": ..., "commit": ...}``; a Hub
        source also records the Hub location (see :meth:`find_by_source`). parent: the version this one was
        trained from. data: a description of the training data (default: the config's ``extra.data``).
        """
        bundle_dir = Path(bundle_dir)
        checked = check_bundle(bundle_dir)  # a bad bundle is refused here: no blob written, no version number
        files, config, labels, metrics = checked.files, checked.config, checked.labels, checked.metrics
        name = check_name(task or checked.parsed.task, "task")
        backbone, fingerprint, extra = checked.parsed.backbone, checked.parsed.fingerprint, checked.parsed.extra
        if data is None and extra.get("data") is not None:
            data = extra["data"] if isinstance(extra["data"], str) else json.dumps(extra["data"], sort_keys=True)
        hub = (source or {}).get("kind") == "hub"
        source_repo, source_commit = queries.source_columns(source)
        recipe = extra.get("recipe") if isinstance(extra.get("recipe"), str) else None

        with self.blobs.using():
            for fname, entry in files.items():
                self.blobs.put(bundle_dir / fname, entry["sha256"], entry["size"])
            publish_files(self.blobs, files)  # to the shared store ($STADAPTER_STORE) too, before the row

            def insert() -> VersionInfo:
                with self._tx(write=True) as s:
                    backbone_id = _ensure(s, Backbone, {"fingerprint": fingerprint},
                                          {"spec": str(backbone.get("spec") or "?"),
                                           "weights": _opt_str(backbone.get("weights"))})
                    task_id = _ensure(s, Task, {"name": name}, {"recipe": recipe, "last_version": 0})
                    if parent is not None and s.get(AdapterVersion, parent.id) is None:
                        raise RegistryError(f"parent version {parent.ref} is no longer in the registry")
                    # Takes the task row's lock (PostgreSQL) until commit; SQLite holds the database lock.
                    number = s.execute(
                        update(Task).where(Task.id == task_id).values(last_version=Task.last_version + 1)
                        .returning(Task.last_version), execution_options={"synchronize_session": False},
                    ).scalar_one()
                    row = AdapterVersion(
                        task_id=task_id, version=number, backbone_id=backbone_id, config=config, labels=labels,
                        metrics=metrics, files=files, storage=self.blobs.uri, source=source,
                        hub_repo=source.get("repo") if hub and source else None,
                        hub_commit=source.get("commit") if hub and source else None,
                        hub_tag=source.get("tag") if hub and source else None,
                        source_repo=source_repo, source_commit=source_commit,
                        parent_id=parent.id if parent is not None else None, data=data, status="ready",
                        created_at=utcnow())
                    s.add(row)
                    s.flush()
                    return self._load(s, row.id)

            # A unique violation means another process created the same task or backbone concurrently
            # (PostgreSQL): the retry finds its row.
            return self._retry(insert, integrity=True)

    # -- reading -----------------------------------------------------------------------------------------
    def resolve(self, ref: str, fingerprint: str | None = None) -> VersionInfo:
        """``task`` (its production alias, else the latest version), ``task:3``, ``task:latest`` or
        ``task@alias``. With ``fingerprint``, refuse a version trained on another backbone."""
        name, number, alias = parse_ref(ref)
        with self._read() as conn:  # one statement; anything but a match goes the long way, for its message
            rows = conn.execute(*queries.resolve(name, number, alias)).all()
        if rows and (fingerprint is None or rows[0].backbone_fingerprint == fingerprint):
            return _version_info(rows)
        with self._tx() as s:
            task = self._task(s, name)
            version_id = self._version_id(s, task, number, alias)
            info = self._load(s, version_id)
            if fingerprint is not None and info.backbone_fingerprint != fingerprint:
                fits = s.scalars(select(AdapterVersion.version).join(Backbone)
                                 .where(AdapterVersion.task_id == task.id, Backbone.fingerprint == fingerprint)
                                 .order_by(AdapterVersion.version)).all()
                raise BackboneError(
                    f"{info.ref} ({ref}) was trained on backbone {info.backbone_spec} (weights "
                    f"{info.backbone_weights}, fingerprint {info.backbone_fingerprint}), but the running backbone "
                    f"has fingerprint {fingerprint}; versions of {name} trained on it: {_ranges(fits) or 'none'}")
        return info

    def _version_id(self, s: Session, task: Task, number: int | None, alias: str | None) -> int:
        """The id of the version a parsed reference names (see :func:`parse_ref`), or RegistryError."""
        if alias is not None:
            row = s.scalar(select(Alias).where(Alias.task_id == task.id, Alias.name == alias))
            if row is None:
                names = s.scalars(select(Alias.name).where(Alias.task_id == task.id).order_by(Alias.name)).all()
                raise RegistryError(f"task {task.name!r} has no alias {alias!r} (aliases: "
                                    f"{', '.join(names) or 'none'})")
            return int(row.version_id)
        if number is not None and number > 0:
            found = s.scalar(select(AdapterVersion.id).where(AdapterVersion.task_id == task.id,
                                                             AdapterVersion.version == number))
            if found is None:
                raise RegistryError(f"task {task.name!r} has no version {number} (versions: "
                                    f"{_ranges(self._numbers(s, task.id))})")
            return int(found)
        found = None
        if number is None:  # a bare task name: its production alias first
            found = s.scalar(select(Alias.version_id).where(Alias.task_id == task.id, Alias.name == PRODUCTION))
        if found is None:
            found = s.scalar(select(AdapterVersion.id).where(AdapterVersion.task_id == task.id)
                             .order_by(AdapterVersion.version.desc()).limit(1))
        if found is None:
            raise RegistryError(f"task {task.name!r} has no versions")
        return int(found)

    def get(self, version_id: int) -> VersionInfo:
        return self._info(version_id)

    def list_tasks(self, limit: int | None = None, after: str | None = None, prefix: str | None = None,
                   alias: str | None = None, tag: str | None = None) -> list[TaskInfo]:
        """Tasks by name (all of them, or ``limit``); see :meth:`list_page` for the filters."""
        return self.list_page(limit, after, prefix, alias, tag).tasks

    def list_page(self, limit: int | None = 100, after: str | None = None, prefix: str | None = None,
                  alias: str | None = None, tag: str | None = None) -> TaskPage:
        """A page of at most ``limit`` tasks (None: all) by name, after the task named ``after``, with names
        starting with ``prefix``, having an alias ``alias``, having a version tagged ``tag`` ("KEY" or
        "KEY=VALUE"). One SQL statement, whatever the number of tasks."""
        queries.check_limit(limit)
        stmt, params = queries.listing(queries.Filters(after, prefix, alias, tag), limit, self.engine.dialect.name)
        with self._read() as conn:
            rows = conn.execute(stmt, params).all()
        tasks: list[TaskInfo] = []
        for r in rows:
            if not tasks or tasks[-1].name != r.name:
                tasks.append(TaskInfo(r.name, r.description, r.recipe, int(r.n or 0), r.latest, {},
                                      r.latest_metrics, r.current, r.current_id, r.current_config,
                                      r.current_labels, r.current_fingerprint))
            if r.alias_name is not None:
                tasks[-1].aliases[r.alias_name] = r.alias_version
        if limit is not None and len(tasks) > limit:
            return TaskPage(tasks[:limit], tasks[limit - 1].name)
        return TaskPage(tasks, None)

    def list_versions(self, task: str) -> list[VersionInfo]:
        with self._tx() as s:
            t = self._task(s, check_name(task, "task"))
            rows = s.scalars(self._query().where(AdapterVersion.task_id == t.id).order_by(AdapterVersion.version))
            return [self._to_info(s, r) for r in rows]

    def find_by_source(self, repo: str, commit: str, task: str | None = None) -> VersionInfo | None:
        """A version pulled from (or pushed to) ``repo`` at ``commit``, so pulling the same commit twice is a
        no-op. The earliest match wins; ``task`` narrows the search."""
        with self._tx() as s:
            # A pulled version pushed elsewhere later keeps its origin only in ``source`` (source_repo/commit).
            found = s.scalar(queries.by_source(repo, commit, task))
            return self._load(s, found) if found is not None else None

    # -- files -------------------------------------------------------------------------------------------
    def materialize(self, info: VersionInfo | str, dest: Path | None = None, *, verify: bool | None = None) -> Path:
        """A bundle directory holding ``info``'s files.

        Without ``dest``: a cache directory under ``$STADAPTER_HOME/bundles`` (read-only hard links to the
        blobs where possible), reused while its files stay intact. With ``dest`` (absent or empty): a
        writable copy, e.g. to export or push, every byte checked against its sha256 as it is copied. The file
        and task names read back from the database are checked again before any path is built from them.

        ``verify``: whether the cache directory's files are hashed again (default: ``self.verify == "always"``).
        Otherwise the store is trusted: a blob's sha256 is its name, checked when it entered the store
        (``BlobStore.put``), and only the names and sizes are checked here (the safetensors header is checked
        by whoever reads it)."""
        info = self._as_info(info)
        _check_stored_names(info)
        hashed = self.verify == "always" if verify is None else verify
        if dest is not None:
            dest = Path(dest)
            if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
                raise RegistryError(f"{dest} exists and is not an empty directory")
            self._build(info, dest, link=False)
            return dest
        dest = self._cache_dir(info)
        if dest.is_dir():
            if self._intact(info, dest, hashed):
                return dest
            remove_tree(dest)
        self._build(info, dest, link=True, hashed=hashed)
        return dest

    def load_bundle(self, ref_or_info: str | VersionInfo, fingerprint: str | None = None) -> Bundle:
        """The version's bundle, loaded from verified files."""
        from stadapter.bundle import Bundle

        info = self.resolve(ref_or_info, fingerprint) if isinstance(ref_or_info, str) else ref_or_info
        if fingerprint is not None and info.backbone_fingerprint != fingerprint:
            self.resolve(info.ref, fingerprint)  # raises, naming both fingerprints
        path = self.materialize(info, verify=True)
        bundle = Bundle.load(path, verify=False)  # materialize() just checked every file's sha256
        bundle.task = info.task
        return bundle

    def _store_with(self, info: VersionInfo, sha256: str) -> BlobStore:
        """This registry's blob store, or the one the version was published into (another STADAPTER_HOME on
        a shared file system) when only that one has the blob."""
        if self.blobs.path(sha256).is_file() or not info.storage.startswith("file:"):
            return self.blobs
        from urllib.parse import unquote, urlparse

        other = BlobStore(Path(unquote(urlparse(info.storage).path)))
        return other if other.path(sha256).is_file() else self.blobs

    def _cache_dir(self, info: VersionInfo) -> Path:
        check_name(info.task, "task")  # read back from the database: checked again before it names a path
        return self.cache / info.task / f"{info.version}-{_files_digest(info.files)}"

    def _intact(self, info: VersionInfo, directory: Path, hashed: bool = True) -> bool:
        present = {f.name for f in directory.iterdir()}
        return present == set(info.files) and all(
            self.blobs.check(directory / n, e["sha256"], int(e["size"]), hashed) for n, e in info.files.items())

    def _build(self, info: VersionInfo, dest: Path, link: bool, hashed: bool = True) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        with self.blobs.using():  # gc waits; it would take this half-built directory for a stale one
            fetch_missing(self, info)  # blobs this machine lacks: from the shared store or the Hub (remote.py)
            self._build_locked(info, dest, link, hashed)

    def _build_locked(self, info: VersionInfo, dest: Path, link: bool, hashed: bool = True) -> None:
        def export(staging: Path) -> None:
            for name, entry in sorted(info.files.items()):
                self._store_with(info, entry["sha256"]).export(entry["sha256"], int(entry["size"]),
                                                               staging / name, f"{info.ref}: {name}", link=link,
                                                               hashed=hashed)

        # Hard links share the blobs' (already durable) bytes, and a cache directory a crash left incomplete is
        # rebuilt (_intact), so it is not fsynced. When another process materialized the same version first, its
        # directory is kept if intact.
        publish_dir(dest, export, sync_files=not link, durable=not link,
                    keep_existing=lambda built: self._intact(info, built, hashed))

    # -- changing ----------------------------------------------------------------------------------------
    def set_alias(self, task: str, name: str, version: int | str | VersionInfo) -> VersionInfo:
        """Point ``task@name`` at a version (a number, a reference, or a VersionInfo of that task)."""
        check_name(name, "alias")
        if name.isdigit() or name == "latest":
            raise RegistryError(f"alias name {name!r} would read as a version; choose another")
        if isinstance(version, VersionInfo):
            info = version
        elif isinstance(version, int) or (isinstance(version, str) and version.isdigit()):
            info = self.resolve(f"{task}:{int(version)}")
        else:
            info = self.resolve(version)
        if info.task != task:
            raise RegistryError(f"alias {task}@{name} cannot point at {info.ref}, a version of another task")

        def write() -> None:
            with self._tx(write=True) as s:
                task_id = self._task(s, task).id
                if s.get(AdapterVersion, info.id) is None:
                    raise RegistryError(f"{info.ref} is no longer in the registry")
                row = s.scalar(select(Alias).where(Alias.task_id == task_id, Alias.name == name))
                if row is None:
                    s.add(Alias(task_id=task_id, name=name, version_id=info.id, updated_at=utcnow()))
                else:
                    row.version_id = info.id
                    row.updated_at = utcnow()

        self._retry(write)
        return self._info(info.id)

    def remove_alias(self, task: str, name: str) -> None:
        def write() -> None:
            with self._tx(write=True) as s:
                task_id = self._task(s, task).id
                n = _rowcount(s.execute(delete(Alias).where(Alias.task_id == task_id, Alias.name == name)))
                if not n:
                    raise RegistryError(f"task {task!r} has no alias {name!r}")

        self._retry(write)

    def remove_version(self, info: VersionInfo | str, force: bool = False) -> None:
        """Delete a version's row (its blobs go at the next ``gc``). Refused while an alias points at it,
        unless ``force``, which removes those aliases too."""
        info = self._as_info(info)

        def write() -> None:
            with self._tx(write=True) as s:
                row = s.get(AdapterVersion, info.id)
                if row is None:
                    raise RegistryError(f"{info.ref} is not in the registry")
                aliases = s.scalars(select(Alias.name).where(Alias.version_id == info.id)).all()
                if aliases and not force:
                    raise RegistryError(f"{info.ref} is what alias(es) {', '.join(sorted(aliases))} point to; move "
                                        f"or remove them first (stadapter alias), or force the removal")
                s.execute(delete(Alias).where(Alias.version_id == info.id))
                s.execute(delete(Tag).where(Tag.version_id == info.id))
                s.execute(update(AdapterVersion).where(AdapterVersion.parent_id == info.id).values(parent_id=None),
                          execution_options={"synchronize_session": False})
                s.execute(delete(AdapterVersion).where(AdapterVersion.id == info.id))

        self._retry(write)
        cached = self._cache_dir(info)
        if cached.exists():
            remove_tree(cached)

    def set_hub(self, info: VersionInfo | str, repo: str, commit: str, tag: str | None = None) -> VersionInfo:
        """Record that the version was pushed to ``repo`` at ``commit`` (and ``tag``)."""
        info = self._as_info(info)

        def write() -> None:
            with self._tx(write=True) as s:
                n = _rowcount(s.execute(update(AdapterVersion).where(AdapterVersion.id == info.id)
                                        .values(hub_repo=repo, hub_commit=commit, hub_tag=tag),
                                        execution_options={"synchronize_session": False}))
                if not n:
                    raise RegistryError(f"{info.ref} is not in the registry")

        self._retry(write)
        return self._info(info.id)

    def set_tag(self, info: VersionInfo | str, key: str, value: str) -> VersionInfo:
        info = self._as_info(info)
        if not key or len(key) > 200:
            raise RegistryError(f"tag keys are 1-200 characters, got {key!r}")

        def write() -> None:
            with self._tx(write=True) as s:
                row = s.scalar(select(Tag).where(Tag.version_id == info.id, Tag.key == key))
                if row is None:
                    s.add(Tag(version_id=info.id, key=key, value=str(value)))
                else:
                    row.value = str(value)

        self._retry(write)
        return self._info(info.id)

    def remove_tag(self, info: VersionInfo | str, key: str) -> VersionInfo:
        info = self._as_info(info)

        def write() -> None:
            with self._tx(write=True) as s:
                if not _rowcount(s.execute(delete(Tag).where(Tag.version_id == info.id, Tag.key == key))):
                    raise RegistryError(f"{info.ref} has no tag {key!r}")

        self._retry(write)
        return self._info(info.id)

    def describe_task(self, task: str, description: str | None = None, recipe: str | None = None) -> None:
        """Set a task's description and/or recipe name."""
        def write() -> None:
            with self._tx(write=True) as s:
                t = self._task(s, task)
                if description is not None:
                    t.description = description
                if recipe is not None:
                    t.recipe = recipe

        self._retry(write)

    def gc(self, stale_after: float | None = None,
           on_leftover: Callable[[Leftover], None] | None = None) -> tuple[int, int]:
        """Delete blobs no version references, stale temporary files, and cache directories of removed
        versions. Returns (files removed, bytes freed). Waits for registrations in progress to commit.

        Also removes what killed pulls and pushes left under ``home`` (work folders, staging folders, partial
        downloads: :mod:`stadapter.registry.leftovers`) once untouched for ``stale_after`` seconds (default
        one hour), each counted as one removed file and passed to ``on_leftover``."""
        leftovers = remove_stale(self.home, STALE_AFTER_S if stale_after is None else stale_after)
        for leftover in leftovers:
            if on_leftover is not None:
                on_leftover(leftover)
        removed, freed = self._collect()
        return removed + len(leftovers), freed + sum(x.size for x in leftovers)

    def _collect(self) -> tuple[int, int]:
        with self.blobs.collecting():
            with self._tx() as s:
                rows = s.execute(select(Task.name, AdapterVersion.version, AdapterVersion.files)
                                 .join(Task, AdapterVersion.task_id == Task.id)).all()
            referenced = {e["sha256"] for _, _, files in rows for e in files.values()}
            removed, freed = self.blobs.sweep(referenced)
            keep = {(task, f"{version}-{_files_digest(files)}") for task, version, files in rows}
            if self.cache.is_dir():
                for task_dir in self.cache.iterdir():
                    if not task_dir.is_dir():
                        continue
                    for d in task_dir.iterdir():
                        if (task_dir.name, d.name) not in keep:
                            remove_tree(d)
                    with contextlib.suppress(OSError):
                        task_dir.rmdir()
        return removed, freed

    # -- helpers -----------------------------------------------------------------------------------------
    def _as_info(self, info: VersionInfo | str) -> VersionInfo:
        return self.resolve(info) if isinstance(info, str) else info

    def _task(self, s: Session, name: str) -> Task:
        task = s.scalar(select(Task).where(Task.name == name))
        if task is None:
            known = s.scalars(select(Task.name).order_by(Task.name).limit(TASKS_NAMED + 1)).all()
            listed = ", ".join(known[:TASKS_NAMED]) + (", ... (stadapter ls)" if len(known) > TASKS_NAMED else "")
            raise RegistryError(f"no task {name!r} in the registry {dbm.redact(self.url)} (tasks: "
                                f"{listed or 'none yet'}); get one with `stadapter import-official "
                                f"CHECKPOINT --task {name} --preset k400|ssv2` (the authors' trained models), "
                                f"`stadapter pull ORG/NAME` or `stadapter train`")
        return task

    def _numbers(self, s: Session, task_id: int) -> list[int]:
        return list(s.scalars(select(AdapterVersion.version).where(AdapterVersion.task_id == task_id)
                              .order_by(AdapterVersion.version)))

    @staticmethod
    def _query() -> Select[AdapterVersion]:
        return select(AdapterVersion).options(selectinload(AdapterVersion.task), selectinload(AdapterVersion.backbone),
                                              selectinload(AdapterVersion.aliases), selectinload(AdapterVersion.tags))

    def _info(self, version_id: int) -> VersionInfo:
        with self._tx() as s:
            return self._load(s, version_id)

    def _load(self, s: Session, version_id: int) -> VersionInfo:
        rows = s.execute(queries.by_id(), {"id": version_id}).all()
        if not rows:
            raise RegistryError(f"version id {version_id} is not in the registry")
        return _version_info(rows)

    @staticmethod
    def _to_info(s: Session, row: AdapterVersion) -> VersionInfo:
        parent = None
        if row.parent_id is not None:
            p = s.execute(select(Task.name, AdapterVersion.version).join(Task, AdapterVersion.task_id == Task.id)
                          .where(AdapterVersion.id == row.parent_id)).first()
            parent = f"{p[0]}:{p[1]}" if p else None
        return VersionInfo(
            id=row.id, task=row.task.name, version=row.version, backbone_spec=row.backbone.spec,
            backbone_fingerprint=row.backbone.fingerprint, config=row.config, labels=list(row.labels),
            metrics=row.metrics, files=row.files, hub_repo=row.hub_repo, hub_commit=row.hub_commit,
            hub_tag=row.hub_tag, source=row.source, parent_id=row.parent_id, data=row.data, status=row.status,
            created_at=_utc(row.created_at), aliases=[a.name for a in row.aliases],
            backbone_weights=row.backbone.weights,
            storage=row.storage, parent=parent, tags={t.key: t.value for t in row.tags})


def open_registry(db: str | None = None, home: Path | None = None, *, upgrade: bool = False) -> Registry:
    """Open the registry: ``db`` (an SQLAlchemy URL or an SQLite file path), else ``$STADAPTER_DB``, else
    SQLite at ``$STADAPTER_HOME/registry.db``; blobs live under ``home`` (default ``$STADAPTER_HOME``).

    The default SQLite database upgrades its schema itself; any other database must be at the newest schema
    (``stadapter db upgrade``) unless ``upgrade`` is true."""
    home = Path(home) if home is not None else dbm.default_home()
    target = dbm.resolve_target(db, home)
    engine = dbm.make_engine(target.url)
    try:
        if upgrade:
            dbm.upgrade(engine, "head")
        dbm.ensure_schema(engine, target, home)
    except BaseException:
        engine.dispose()
        raise
    return Registry(engine, home, target.url, dbm.store_dir(home, target.url))


@contextlib.contextmanager
def opened(registry: Registry | str | None) -> Iterator[Registry]:
    """``registry`` itself when it is an open registry (left open); else the one at that database URL (None:
    the default database), closed afterwards."""
    if registry is not None and not isinstance(registry, str):
        yield registry
        return
    with open_registry(registry) as reg:
        yield reg


# -- small helpers -----------------------------------------------------------------------------------------

def _ensure(s: Session, model: type, key: dict[str, Any], values: dict[str, Any]) -> int:
    """The id of the row matching ``key``, inserted with ``values`` when missing."""
    row = s.scalar(select(model).filter_by(**key))
    if row is None:
        row = model(**key, **values)
        s.add(row)
        s.flush()
    return int(row.id)


def _check_stored_names(info: VersionInfo) -> None:
    """Refuse a version whose task or file names, as the database holds them, could build a path outside its
    directory (the same checks as at registration)."""
    check_name(info.task, "task")
    bad = unsafe_names(info.files.keys() - {MANIFEST})
    if bad:
        raise BundleError(f"{info.ref}: the registry lists unsafe file name(s) {shown(bad)}; refusing to "
                          f"write them")


def _files_digest(files: dict[str, dict[str, Any]]) -> str:
    """Names a cache directory by its content, so two databases sharing one home never mix up versions."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]


def _version_info(rows: Sequence[Row[Any]]) -> VersionInfo:
    """A VersionInfo from the rows of ``queries.version_rows`` (one per alias x tag pair of one version)."""
    r = rows[0]
    aliases = sorted({x.alias_name for x in rows if x.alias_name is not None})
    tags = {x.tag_key: x.tag_value for x in sorted(rows, key=lambda x: x.tag_key or "") if x.tag_key is not None}
    parent = f"{r.parent_task}:{r.parent_version}" if r.parent_task is not None else None
    return VersionInfo(
        id=r.id, task=r.task_name, version=r.version, backbone_spec=r.backbone_spec,
        backbone_fingerprint=r.backbone_fingerprint, config=r.config, labels=list(r.labels), metrics=r.metrics,
        files=r.files, hub_repo=r.hub_repo, hub_commit=r.hub_commit, hub_tag=r.hub_tag, source=r.source,
        parent_id=r.parent_id, data=r.data, status=r.status, created_at=_utc(r.created_at), aliases=aliases,
        backbone_weights=r.backbone_weights, storage=r.storage, parent=parent, tags=tags)


def _utc(created: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored in UTC); PostgreSQL aware ones."""
    return created.replace(tzinfo=timezone.utc) if created.tzinfo is None else created.astimezone(timezone.utc)


def _opt_str(value: Any) -> str | None:
    return None if value is None else str(value)


def _transient(e: DBAPIError) -> bool:
    """A deadlock or serialization failure (PostgreSQL), or an SQLite file still locked after the busy
    timeout: worth retrying the whole transaction."""
    code = getattr(e.orig, "sqlstate", None) or getattr(e.orig, "pgcode", None)
    if code in ("40001", "40P01"):
        return True
    return "database is locked" in str(e.orig)


def _first_line(e: BaseException | None) -> str:
    return str(e).strip().splitlines()[0] if e is not None and str(e).strip() else repr(e)


def _rowcount(result: Result[Any]) -> int:
    """Rows an UPDATE or DELETE touched (its result is a CursorResult)."""
    return int(cast("CursorResult[Any]", result).rowcount)


def _ranges(numbers: Sequence[int]) -> str:
    """[1, 2, 3, 5] -> "1-3, 5"."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and n == spans[-1][1] + 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)
