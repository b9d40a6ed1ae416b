"""Where the registry lives, how to connect to it, and its schema migrations (Alembic, run programmatically).

The default database is SQLite at ``$STADAPTER_HOME/registry.db`` (WAL, foreign keys on), upgraded to the
newest schema on first use. Any SQLAlchemy URL can be given instead (``--db`` or ``STADAPTER_DB``); such a
database is never migrated behind the user's back: one at an older schema raises an error that says to run
``stadapter db upgrade``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, OperationalError
from sqlalchemy.pool import ConnectionPoolEntry

from stadapter.errors import RegistryError

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
DB_FILE = "registry.db"
BUSY_TIMEOUT_S = 60.0
VERSION_TABLE = "alembic_version"
NO_BEGIN = "NONE"  # sqlite_begin execution option: no BEGIN (single_statement)


def default_home() -> Path:
    """``$STADAPTER_HOME``, else the platform's user data directory for stadapter."""
    env = os.environ.get("STADAPTER_HOME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("stadapter", appauthor=False))


def default_url(home: Path) -> str:
    return f"sqlite:///{Path(home) / DB_FILE}"


@dataclass(frozen=True)
class Target:
    url: str
    is_default: bool  # the SQLite file inside STADAPTER_HOME, which upgrades itself


def resolve_target(db: str | None = None, home: Path | None = None) -> Target:
    """``db`` (an SQLAlchemy URL or a path to an SQLite file), else ``$STADAPTER_DB``, else the default."""
    db = db or os.environ.get("STADAPTER_DB") or None
    if db is None:
        return Target(default_url(Path(home) if home is not None else default_home()), True)
    if "://" not in db:  # a plain path to an SQLite file
        return Target(f"sqlite:///{Path(db).expanduser().resolve()}", False)
    return Target(db, False)


def store_dir(home: Path, url: str) -> Path:
    """Where a database's blobs and cached bundles live: ``$STADAPTER_HOME`` itself for the default SQLite
    database (``blobs/``, ``bundles/``), ``$STADAPTER_HOME/stores/<id>/`` for any other database, so that
    ``gc`` with one database never deletes files that only another database references."""
    home = Path(home)
    if url == default_url(home):
        return home
    try:
        key = make_url(url).render_as_string(hide_password=True).replace("***", "")
    except ArgumentError:
        key = url
    ident = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = home / "stores" / ident
    note = root / "DATABASE"
    if not note.exists():
        root.mkdir(parents=True, exist_ok=True)
        note.write_text(redact(url) + "\n")
    return root


def redact(url: str) -> str:
    """The URL with any password hidden, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return url


def make_engine(url: str) -> Engine:
    """An engine for ``url``. SQLite gets WAL, foreign keys, a busy timeout, and BEGIN IMMEDIATE for write
    transactions (use ``engine.execution_options(sqlite_begin="IMMEDIATE")``), so two writers queue on the
    database lock instead of failing when a reader upgrades to a writer."""
    try:
        parsed = make_url(url)
    except ArgumentError as e:
        raise RegistryError(f"not a database URL: {url!r} ({e})") from e
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(parsed, connect_args={"timeout": BUSY_TIMEOUT_S})
        _sqlite_setup(engine)
        return engine
    try:
        return create_engine(parsed, pool_pre_ping=True)
    except NoSuchModuleError as e:
        raise RegistryError(f"not a database URL stadapter can use: {redact(url)} ({e})") from e
    except ImportError as e:  # e.g. psycopg missing
        raise RegistryError(f"cannot use {redact(url)}: {e} (for PostgreSQL: pip install 'stadapter[postgres]')") \
            from e


def _sqlite_setup(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: sqlite3.Connection, _record: ConnectionPoolEntry) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves (below)
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        cursor.execute("PRAGMA foreign_keys=ON")
        _set_wal(cursor)
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
        if mode != NO_BEGIN:
            conn.exec_driver_sql(f"BEGIN {mode}")


def single_statement(engine: Engine) -> Engine:
    """The engine for reads of one statement each (a resolve, a listing page): no transaction around them,
    so the statement is the only round trip. SQLite runs a lone statement atomically without BEGIN;
    PostgreSQL's AUTOCOMMIT spares the BEGIN and ROLLBACK a transaction would send."""
    if engine.dialect.name == "sqlite":
        return engine.execution_options(sqlite_begin=NO_BEGIN)
    return engine.execution_options(isolation_level="AUTOCOMMIT")


def _set_wal(cursor: sqlite3.Cursor) -> None:
    """Switch a SQLite database to WAL (persistent, so only its first connection changes anything). Changing
    the journal mode can answer SQLITE_BUSY at once, without the busy handler, while another process opens the
    new file; retry within the busy timeout."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if cursor.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) and "busy" not in str(e):
                raise
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


# -- migrations ------------------------------------------------------------------------------------------

def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic Config pointing at the migrations inside the package (no alembic.ini needed)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


@functools.lru_cache(maxsize=1)
def script_directory() -> ScriptDirectory:
    """The packaged migrations (read once per process)."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config())


REVISION_RE = re.compile(r'^(down_revision|revision)\s*=\s*(None|"([^"]+)")\s*$', re.MULTILINE)


@functools.lru_cache(maxsize=1)
def head_revision() -> str:
    """The newest packaged migration, read from the migration files themselves (``revision = "..."`` and
    ``down_revision = ...`` lines) without importing Alembic: opening a registry, e.g. for ``stadapter ls``,
    stays cheap. ``tests/test_registry_migrations.py`` checks it against Alembic's own answer."""
    revisions: set[str] = set()
    parents: set[str] = set()
    for path in sorted((MIGRATIONS / "versions").glob("*.py")):
        found = {key: value for key, _, value in REVISION_RE.findall(path.read_text(encoding="utf-8"))}
        if found.get("revision"):
            revisions.add(found["revision"])
            if found.get("down_revision"):
                parents.add(found["down_revision"])
    heads = sorted(revisions - parents)
    if len(heads) != 1:
        raise RegistryError(f"the packaged migrations have {len(heads)} heads ({', '.join(heads)}); expected one")
    return heads[0]


def current_revision(engine: Engine) -> str | None:
    """The database's schema revision (Alembic's version table, read with one query), or None for a database
    without the registry's tables."""
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table(VERSION_TABLE):
                return None
            found = conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    except OperationalError as e:
        raise RegistryError(f"cannot open the registry database {redact(str(engine.url))}: {e.orig}") from e
    if len(found) > 1:
        raise RegistryError(f"the registry database {redact(str(engine.url))} records several schema revisions "
                            f"({', '.join(found)}); fix it with `stadapter db upgrade`")
    return found[0] if found else None


def upgrade(engine: Engine, revision: str = "head") -> None:
    _run(engine, "upgrade", revision)


def downgrade(engine: Engine, revision: str) -> None:
    _run(engine, "downgrade", revision)


def _run(engine: Engine, what: str, revision: str) -> None:
    from alembic import command
    from alembic.util import CommandError

    cfg = alembic_config(engine)
    try:
        with engine.execution_options(sqlite_begin="IMMEDIATE").begin() as conn:  # SQLite: one writer, waits
            cfg.attributes["connection"] = conn
            getattr(command, what)(cfg, revision)
    except CommandError as e:
        raise RegistryError(f"stadapter db {what} {revision}: {e}") from e
    except OperationalError as e:
        raise RegistryError(f"cannot {what} the registry database {redact(str(engine.url))}: {e.orig}") from e


def history() -> list[tuple[str, str | None, str]]:
    """(revision, down_revision, message) from the first migration to the head."""
    revs = list(script_directory().walk_revisions())
    return [(r.revision, r.down_revision if isinstance(r.down_revision, str) or r.down_revision is None
             else ",".join(r.down_revision), r.doc or "") for r in reversed(revs)]


def check_schema(engine: Engine) -> None:
    """Raise unless the database is at the packaged head revision."""
    head = head_revision()
    current = current_revision(engine)
    if current == head:
        return
    where = redact(str(engine.url))
    if current is None:
        has_tables = bool(set(inspect(engine).get_table_names()) - {"alembic_version"})
        what = "has no stadapter registry schema" + (" (it holds other tables)" if has_tables else "")
        raise RegistryError(f"the registry database {where} {what}; create it with "
                            f"`stadapter db upgrade --db {where}`")
    known = {r.revision for r in script_directory().walk_revisions()}
    if current in known:
        raise RegistryError(f"the registry database {where} is at schema revision {current}, older than this "
                            f"stadapter's {head}; run `stadapter db upgrade --db {where}`")
    raise RegistryError(f"the registry database {where} is at schema revision {current}, which this stadapter "
                        f"does not know (a newer stadapter wrote it); upgrade stadapter")


@contextlib.contextmanager
def file_lock(path: Path, exclusive: bool = True) -> Iterator[None]:
    """An advisory lock on ``path`` (flock; a no-op where fcntl is missing). Released when the process dies."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def ensure_schema(engine: Engine, target: Target, home: Path) -> None:
    """The default SQLite database upgrades itself (under a file lock, so concurrent first uses do not race);
    any other database must already be at the head revision."""
    if target.is_default:
        head = head_revision()
        if current_revision(engine) != head:
            with file_lock(home / ".registry.lock"):
                if current_revision(engine) != head:
                    upgrade(engine, "head")
    check_schema(engine)
