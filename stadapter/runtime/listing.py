"""GET /v1/tasks: pages of the registry's task listing, each one SQL statement (``Registry.list_page``), cached
for the engine's alias TTL so that a burst of listings costs the database one query per page and registry
changes (new versions, moved aliases) show within the same TTL as in predictions.

A task's entry says whether the running backbone can serve the version its bare name resolves to (production,
else latest) from the listing's own row (that version's backbone fingerprint and config): no task is resolved
or loaded to answer a listing. ``resident`` is read live from the pool on every answer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from stadapter.bundle import parse_config
from stadapter.config import AdapterConfig, TaskSpec
from stadapter.errors import InputError, RegistryError, StadapterError
from stadapter.registry.queries import MAX_PAGE, Filters, check_limit

if TYPE_CHECKING:
    from stadapter.registry import TaskInfo
    from stadapter.runtime.engine import Engine

DEFAULT_TTL_S = 2.0  # when the engine has no alias TTL (aliases never re-resolved), listings still refresh
CACHED_PAGES = 256  # distinct (limit, after, filters) pages kept; clients choose the keys, so it is bounded
DEFAULT_LIMIT = 100
MAX_LIMIT = MAX_PAGE  # the registry's page cap (queries.check_limit), the one bound


@dataclass(frozen=True)
class _Page:
    expires: float
    items: list[tuple[dict[str, Any], int | None]]  # (entry without "resident", version id served)
    next_after: str | None


class TaskListing:
    """Cached pages of task entries for one engine."""

    def __init__(self, engine: Engine, redact: Callable[[str], str], clock: Callable[[], float] | None = None) -> None:
        self.engine = engine
        self.redact = redact
        self.clock = clock or engine.clock
        self.ttl = engine.alias_ttl if engine.alias_ttl is not None else DEFAULT_TTL_S
        self._pages: OrderedDict[tuple[Any, ...], _Page] = OrderedDict()
        self._lock = threading.Lock()
        self.queries = 0  # pages read from the registry (the rest came from the cache)

    def page(self, limit: int = DEFAULT_LIMIT, after: str | None = None, prefix: str | None = None,
             alias: str | None = None, tag: str | None = None) -> dict[str, Any]:
        """``{"tasks": [...], "next_after": name or None}``; InputError for a bad page size or filter,
        RegistryUnavailable when the database is down."""
        try:
            check_limit(limit)
            Filters(after, prefix, alias, tag)
        except RegistryError as e:
            raise InputError(str(e)) from None
        key = (limit, after, prefix, alias, tag)
        now = self.clock()
        with self._lock:
            cached = self._pages.get(key)
            if cached is not None and now < cached.expires:
                self._pages.move_to_end(key)
            else:
                cached = None
        if cached is None:
            listed = self.engine.registry.list_page(limit, after, prefix, alias, tag)
            items = [(self._entry(t), t.current_id) for t in listed.tasks]
            cached = _Page(now + self.ttl, items, listed.next_after)
            with self._lock:
                self.queries += 1
                if self.ttl > 0:
                    self._pages[key] = cached
                    self._pages.move_to_end(key)
                    while len(self._pages) > CACHED_PAGES:
                        self._pages.popitem(last=False)
        where = self.engine.pool.where
        tasks = [entry | {"resident": where(vid)} if entry["servable"] else entry for entry, vid in cached.items]
        return {"tasks": tasks, "next_after": cached.next_after}

    def clear(self) -> None:
        with self._lock:
            self._pages.clear()

    def _entry(self, task: TaskInfo) -> dict[str, Any]:
        entry: dict[str, Any] = {"task": task.name, "versions": task.versions, "latest": task.latest,
                                 "aliases": task.aliases}
        ref = f"{task.name}:{task.current}"
        if task.current is None:
            return entry | {"servable": False, "reason": f"task {task.name!r} has no versions"}
        if task.current_fingerprint != self.engine.fingerprint:
            return entry | {"servable": False, "reason": (
                f"{ref} was trained on backbone fingerprint {task.current_fingerprint}, but the running backbone "
                f"has fingerprint {self.engine.fingerprint}")}
        config = task.current_config
        try:  # the sections registration checked in full (parse_config, 15x slower, names what is wrong)
            assert isinstance(config, dict)
            adapter, spec = AdapterConfig.from_dict(config["adapter"]), TaskSpec.from_dict(config["spec"])
        except Exception:  # noqa: BLE001 - any malformed section: let the full check say what is wrong
            try:
                parsed = parse_config(config, task.current_labels, ref)
                adapter, spec = parsed.adapter, parsed.spec
            except StadapterError as e:
                return entry | {"servable": False, "reason": self.redact(str(e))}
        return entry | {"servable": True, "version": ref, "num_classes": adapter.num_classes,
                        "num_frames": spec.num_frames, "views": spec.temporal_views * spec.spatial_views}


__all__ = ["TaskListing", "DEFAULT_LIMIT", "MAX_LIMIT"]
