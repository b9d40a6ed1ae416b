"""The seams between the runtime's parts: what the engine needs of a registry, a resolved task, and a batch
segment (consecutive clips of one task) that the engine, the inference kernel and the compiled path share.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from stadapter.config import AdapterConfig, TaskSpec
from stadapter.runtime.pool import ResidentSet

if TYPE_CHECKING:  # the registry (and SQLAlchemy) loads only when an engine is opened on one
    from stadapter.registry.api import TaskInfo, TaskPage, VersionInfo


class Registry(Protocol):
    """What the runtime asks of a registry (:class:`stadapter.registry.Registry` is the real one)."""

    def resolve(self, ref: str, fingerprint: str | None = None) -> VersionInfo:
        """The version ``ref`` names; with ``fingerprint``, refuse one trained on another backbone."""
        ...

    def materialize(self, info: VersionInfo) -> Path:
        """A directory holding the version's bundle files, each checked against its sha256."""
        ...

    def list_tasks(self) -> list[TaskInfo]:
        """Every task with its versions and aliases."""
        ...

    def list_page(self, limit: int | None = 100, after: str | None = None, prefix: str | None = None,
                  alias: str | None = None, tag: str | None = None) -> TaskPage:
        """A page of tasks by name after ``after``, filtered; one query whatever the registry's size."""
        ...


@dataclass(frozen=True, eq=False)
class TaskHandle:
    """A resolved task version the engine can run."""

    ref: str  # what was asked for: "k400", "k400:3", "k400@staging"
    info: VersionInfo
    adapter: AdapterConfig
    spec: TaskSpec
    labels: tuple[str, ...]
    expected: Mapping[str, tuple[int, ...]]

    @property
    def key(self) -> int:
        return self.info.id

    @property
    def name(self) -> str:
        return self.info.ref  # "task:version"

    @property
    def task(self) -> str:
        return self.info.task

    @property
    def num_frames(self) -> int:
        return self.spec.num_frames

    @property
    def num_classes(self) -> int:
        return self.adapter.num_classes


@dataclass(frozen=True)
class Segment:
    """Clips ``start`` to ``stop`` (exclusive) of a batch, all of one task: its handle and resident set."""

    start: int
    stop: int
    resident: ResidentSet
    handle: TaskHandle

    def rows(self, num_frames: int) -> slice:
        """The segment's rows of the batch's frames, (N*T, ...) laid out clip after clip."""
        return slice(self.start * num_frames, self.stop * num_frames)


def segments_of(handles: list[TaskHandle], sets: Mapping[int, ResidentSet]) -> list[Segment]:
    """One segment per run of consecutive clips of the same task (``sets`` maps a handle's key to its set)."""
    segments: list[Segment] = []
    start = 0
    for i, h in enumerate(handles):
        if i + 1 == len(handles) or handles[i + 1].key != h.key:
            segments.append(Segment(start, i + 1, sets[h.key], h))
            start = i + 1
    return segments


__all__ = ["Registry", "Segment", "TaskHandle", "segments_of"]
