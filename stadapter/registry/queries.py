"""The registry's hot read paths, each one SQL statement whatever the registry's size: resolving a reference to
a version (with its task, backbone, parent, aliases and tags), and one page of the task listing (with each
task's version count, latest version and metrics, aliases, and the version its bare name serves).

Both are SQLAlchemy Core statements over the ORM tables; :mod:`stadapter.registry.api` runs them and turns the
rows into its value objects. Every lookup they make is an index lookup (``tests/test_registry_scale.py`` reads
the query plans on SQLite and PostgreSQL).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import ColumnElement, Integer, Select, Table, and_, bindparam, exists, func, or_, select

from stadapter.errors import RegistryError
from stadapter.registry.models import AdapterVersion, Alias, Backbone, Tag, Task

TASKS = cast(Table, Task.__table__)
VERSIONS = cast(Table, AdapterVersion.__table__)
ALIASES = cast(Table, Alias.__table__)
TAGS = cast(Table, Tag.__table__)
BACKBONES = cast(Table, Backbone.__table__)
PRODUCTION = "production"
MAX_PAGE = 1000
PREFIX_RE = re.compile(r"^[A-Za-z0-9._-]{1,100}\Z")
# Task names use only these ASCII characters, all below DEL: every name starting with P sorts in [P, P + DEL).
ABOVE_NAME_CHARS = "\x7f"


def source_columns(source: Any) -> tuple[str | None, str | None]:
    """(repo, commit) of a version's ``source``, each only when it is a string that fits its column (the same
    rule as migration 0002's backfill)."""
    if not isinstance(source, dict):
        return None, None
    repo, commit = source.get("repo"), source.get("commit")
    return (repo if isinstance(repo, str) and len(repo) <= 300 else None,
            commit if isinstance(commit, str) and len(commit) <= 64 else None)


# -- resolve ---------------------------------------------------------------------------------------------

def resolve(name: str, number: int | None, alias: str | None) -> tuple[Select[Any], dict[str, Any]]:
    """The statement (built once per kind of reference) and parameters resolving a parsed reference (see
    ``parse_ref``): ``task@alias``, ``task:N``, ``task:latest`` (-1), or ``task`` (production, else latest).
    It returns no row when there is no such version."""
    if alias is not None:
        return _resolve_statement("alias"), {"name": name, "alias": alias}
    if number is not None and number > 0:
        return _resolve_statement("number"), {"name": name, "number": number}
    return _resolve_statement("latest" if number is not None else "bare"), {"name": name, "alias": PRODUCTION}


@functools.cache
def _resolve_statement(kind: str) -> Select[Any]:
    return version_rows(version_id(kind))


def version_id(kind: str) -> ColumnElement[Any]:
    """The id of the version a reference of ``kind`` names, as a scalar subquery over bound parameters
    ``name``, ``number`` and ``alias`` (NULL when there is none)."""
    task_id = select(TASKS.c.id).where(TASKS.c.name == bindparam("name")).scalar_subquery()
    alias = select(ALIASES.c.version_id).where(ALIASES.c.task_id == task_id,
                                               ALIASES.c.name == bindparam("alias")).scalar_subquery()
    if kind == "alias":
        return alias
    if kind == "number":
        return select(VERSIONS.c.id).where(VERSIONS.c.task_id == task_id,
                                           VERSIONS.c.version == bindparam("number")).scalar_subquery()
    latest = (select(VERSIONS.c.id).where(VERSIONS.c.task_id == task_id)
              .order_by(VERSIONS.c.version.desc()).limit(1).scalar_subquery())
    return latest if kind == "latest" else func.coalesce(alias, latest)  # bare: the alias is "production"


@functools.cache
def by_id() -> Select[Any]:
    """:func:`version_rows` of the version whose id is the bound parameter ``id``."""
    return version_rows(bindparam("id"))


def version_rows(which: ColumnElement[Any]) -> Select[Any]:
    """One version (``which``: an id or a subquery giving one) with its task name, backbone, parent reference,
    and one row per (alias, tag) pair pointing at it (outer joins: at least one row when the version exists)."""
    v, t, b = VERSIONS, TASKS, BACKBONES
    parent, parent_task = VERSIONS.alias("parent"), TASKS.alias("parent_task")
    al, tg = ALIASES.alias("al"), TAGS.alias("tg")
    return (select(v, t.c.name.label("task_name"), b.c.spec.label("backbone_spec"),
                   b.c.fingerprint.label("backbone_fingerprint"), b.c.weights.label("backbone_weights"),
                   parent_task.c.name.label("parent_task"), parent.c.version.label("parent_version"),
                   al.c.name.label("alias_name"), tg.c.key.label("tag_key"), tg.c.value.label("tag_value"))
            .select_from(v.join(t, v.c.task_id == t.c.id).join(b, v.c.backbone_id == b.c.id)
                         .outerjoin(parent, parent.c.id == v.c.parent_id)
                         .outerjoin(parent_task, parent_task.c.id == parent.c.task_id)
                         .outerjoin(al, al.c.version_id == v.c.id)
                         .outerjoin(tg, tg.c.version_id == v.c.id))
            .where(v.c.id == which))


def by_source(repo: str, commit: str, task: str | None = None) -> Select[Any]:
    """The earliest version pushed to or pulled from ``repo`` at ``commit`` (its Hub location, or the repo and
    commit of its ``source``), of ``task`` when given: two index lookups OR-ed."""
    v = VERSIONS
    q = select(func.min(v.c.id)).where(or_(and_(v.c.hub_repo == repo, v.c.hub_commit == commit),
                                            and_(v.c.source_repo == repo, v.c.source_commit == commit)))
    if task is not None:
        q = q.where(v.c.task_id == select(TASKS.c.id).where(TASKS.c.name == task).scalar_subquery())
    return q


# -- listing ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Filters:
    """Which tasks a listing shows: names after ``after`` (the previous page's last name), starting with
    ``prefix``, having an alias named ``alias``, having a version tagged ``tag`` ("KEY" or "KEY=VALUE")."""

    after: str | None = None
    prefix: str | None = None
    alias: str | None = None
    tag: str | None = None

    def __post_init__(self) -> None:
        for what, value in (("after", self.after), ("prefix", self.prefix), ("alias", self.alias)):
            if value is not None and not PREFIX_RE.match(value):
                raise RegistryError(f"invalid {what} {value[:120]!r}: use 1-100 letters, digits, '.', '_' or '-'")
        if self.tag is not None and not (isinstance(self.tag, str) and 0 < len(self.tag.partition("=")[0]) <= 200):
            raise RegistryError(f"invalid tag filter {str(self.tag)[:220]!r}: use KEY or KEY=VALUE (key 1-200 "
                                f"characters)")


def check_limit(limit: int | None) -> int | None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE):
        raise RegistryError(f"invalid page size {limit!r}: use 1-{MAX_PAGE}")
    return limit


def _conditions(shape: tuple[bool, ...], dialect: str) -> list[ColumnElement[bool]]:
    after, prefix, alias, tag, tag_value = shape
    t = TASKS
    out: list[ColumnElement[bool]] = []
    if after:
        out.append(t.c.name > bindparam("after"))
    if prefix:
        if dialect == "sqlite":  # a range over the (BINARY) unique index; LIKE would be case-insensitive there
            out += [t.c.name >= bindparam("prefix"), t.c.name < bindparam("prefix_end")]
        else:
            out.append(t.c.name.like(bindparam("prefix_like"), escape="/"))
    if alias:
        out.append(exists().where(ALIASES.c.task_id == t.c.id, ALIASES.c.name == bindparam("alias")))
    if tag:
        values = [TAGS.c.value == bindparam("tag_value")] if tag_value else []
        out.append(exists().select_from(TAGS.join(VERSIONS, TAGS.c.version_id == VERSIONS.c.id)).where(
            VERSIONS.c.task_id == t.c.id, TAGS.c.key == bindparam("tag_key"), *values))
    return out


def listing(filters: Filters, limit: int | None, dialect: str) -> tuple[Select[Any], dict[str, Any]]:
    """The statement (built once per combination of filters) and parameters of one page of tasks by name
    (``limit`` + 1 of them, so the caller sees whether more follow), one row per (task, alias): the task, its
    version count and latest version, the latest version's metrics, the version its bare name serves
    (production, else latest) with that version's config, labels and backbone."""
    f = filters
    key, eq, value = (f.tag or "").partition("=")
    shape = (f.after is not None, f.prefix is not None, f.alias is not None, f.tag is not None, bool(eq))
    params: dict[str, Any] = {"after": f.after, "alias": f.alias, "tag_key": key, "tag_value": value,
                              "production": PRODUCTION}
    if f.prefix is not None:
        escaped = f.prefix.replace("/", "//").replace("_", "/_").replace("%", "/%")
        params |= {"prefix": f.prefix, "prefix_end": f.prefix + ABOVE_NAME_CHARS, "prefix_like": escaped + "%"}
    if limit is not None:
        params["page_limit"] = limit + 1
    return _listing(shape, limit is not None, dialect), params


@functools.cache
def _listing(shape: tuple[bool, ...], limited: bool, dialect: str) -> Select[Any]:
    t, v = TASKS, VERSIONS
    page_q = select(t.c.id, t.c.name, t.c.description, t.c.recipe).where(*_conditions(shape, dialect))
    page_q = page_q.order_by(t.c.name)
    if limited:
        page_q = page_q.limit(bindparam("page_limit", type_=Integer))
    page = page_q.cte("page")
    stats = (select(v.c.task_id, func.count(v.c.id).label("n"), func.max(v.c.version).label("latest"))
             .where(v.c.task_id.in_(select(page.c.id))).group_by(v.c.task_id).subquery("stats"))
    latest = VERSIONS.alias("latest_v")
    production = ALIASES.alias("prod")
    current = VERSIONS.alias("cur")
    backbone = BACKBONES.alias("cur_backbone")
    al = ALIASES.alias("al")
    al_v = VERSIONS.alias("al_v")
    joined = (page.outerjoin(stats, stats.c.task_id == page.c.id)
              .outerjoin(latest, and_(latest.c.task_id == page.c.id, latest.c.version == stats.c.latest))
              .outerjoin(production, and_(production.c.task_id == page.c.id,
                                          production.c.name == bindparam("production")))
              .outerjoin(current, current.c.id == func.coalesce(production.c.version_id, latest.c.id))
              .outerjoin(backbone, backbone.c.id == current.c.backbone_id)
              .outerjoin(al, al.c.task_id == page.c.id)
              .outerjoin(al_v, al_v.c.id == al.c.version_id))
    return (select(page.c.name, page.c.description, page.c.recipe, stats.c.n, stats.c.latest,
                   latest.c.metrics.label("latest_metrics"), current.c.id.label("current_id"),
                   current.c.version.label("current"), current.c.config.label("current_config"),
                   current.c.labels.label("current_labels"), backbone.c.fingerprint.label("current_fingerprint"),
                   backbone.c.spec.label("current_backbone"), al.c.name.label("alias_name"),
                   al_v.c.version.label("alias_version"))
            .select_from(joined).order_by(page.c.name, al.c.name))
