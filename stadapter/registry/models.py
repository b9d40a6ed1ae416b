"""The registry's tables (SQLAlchemy 2.0 declarative, typed). Alembic migrations in ``migrations/`` must
match these exactly; ``tests/test_registry_migrations.py`` fails when they drift apart.

    backbones         one row per backbone fingerprint (spec and weights tag as first seen)
    tasks             one row per task name; ``last_version`` allocates consecutive version numbers
    adapter_versions  one trained bundle of a task: config, labels, metrics, files (sha256, size), lineage,
                      Hub location once pushed
    aliases           task + name (production, staging, ...) -> one version of that task
    tags              free-form key/value pairs on a version

Every lookup the registry makes has an index (``tests/test_registry_scale.py`` reads the query plans): tasks by
name, versions by (task, number), aliases by (task, name) and by version, tags by (version, key) and by key,
versions by Hub location, by source repo + commit and by parent.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import JSON, DateTime, ForeignKey, Index, Integer, MetaData, String, Text, UniqueConstraint
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Backbone(Base):
    __tablename__ = "backbones"

    id: Mapped[int] = mapped_column(primary_key=True)
    spec: Mapped[str] = mapped_column(String(300))
    weights: Mapped[str | None] = mapped_column(String(500))
    fingerprint: Mapped[str] = mapped_column(String(128), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Task(Base):
    __tablename__ = "tasks"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    description: Mapped[str | None] = mapped_column(Text)
    recipe: Mapped[str | None] = mapped_column(String(100))
    # The highest version number handed out so far. Incremented under a row lock (PostgreSQL) or inside a
    # BEGIN IMMEDIATE transaction (SQLite) by every registration; never decremented, so numbers of removed
    # versions are not reused.
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[AdapterVersion]] = relationship(back_populates="task")


class AdapterVersion(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (
        UniqueConstraint("task_id", "version"),
        Index("ix_adapter_versions_hub", "hub_repo", "hub_commit"),
        Index("ix_adapter_versions_source", "source_repo", "source_commit"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="RESTRICT"))
    version: Mapped[int] = mapped_column(Integer)
    backbone_id: Mapped[int] = mapped_column(ForeignKey("backbones.id", ondelete="RESTRICT"), index=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)  # the bundle's config.json
    labels: Mapped[list[str]] = mapped_column(JSON)  # index -> class name
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    files: Mapped[dict[str, dict[str, Any]]] = mapped_column(JSON)  # name -> {"sha256", "size"}
    storage: Mapped[str] = mapped_column(String(1000))  # where the blobs were published (a file: URI)
    hub_repo: Mapped[str | None] = mapped_column(String(300))
    hub_commit: Mapped[str | None] = mapped_column(String(64))
    hub_tag: Mapped[str | None] = mapped_column(String(200))
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("adapter_versions.id", ondelete="SET NULL"),
                                                  index=True)
    source: Mapped[dict[str, Any] | None] = mapped_column(JSON)  # {"kind": "train" | "hub" | "import", ...}
    # ``source``'s repo and commit as columns (when they are strings that fit), so find_by_source is an index
    # lookup rather than a scan of every version's JSON.
    source_repo: Mapped[str | None] = mapped_column(String(300))
    source_commit: Mapped[str | None] = mapped_column(String(64))
    data: Mapped[str | None] = mapped_column(Text)  # training data description
    status: Mapped[str] = mapped_column(String(20), default="ready")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    task: Mapped[Task] = relationship(back_populates="versions")
    backbone: Mapped[Backbone] = relationship()
    aliases: Mapped[list[Alias]] = relationship(back_populates="version", order_by="Alias.name")
    tags: Mapped[list[Tag]] = relationship(back_populates="version", order_by="Tag.key",
                                           cascade="all, delete-orphan", passive_deletes=True)


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("task_id", "name"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(100))
    # The API checks that the version belongs to the alias's task.
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="RESTRICT"), index=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow, onupdate=utcnow)

    version: Mapped[AdapterVersion] = relationship(back_populates="aliases")


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("version_id", "key"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200), index=True)  # listings filter by tag
    value: Mapped[str] = mapped_column(Text)

    version: Mapped[AdapterVersion] = relationship(back_populates="tags")
