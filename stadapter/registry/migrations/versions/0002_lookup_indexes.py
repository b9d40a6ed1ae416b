"""indexes for every registry lookup: source repo + commit columns (backfilled), parent, tag key

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def source_columns(source: Any) -> tuple[str | None, str | None]:
    """(repo, commit) of a version's ``source`` JSON, each only when it is a string that fits its column."""
    if not isinstance(source, dict):
        return None, None
    repo, commit = source.get("repo"), source.get("commit")
    return (repo if isinstance(repo, str) and len(repo) <= 300 else None,
            commit if isinstance(commit, str) and len(commit) <= 64 else None)


def upgrade() -> None:
    op.add_column("adapter_versions", sa.Column("source_repo", sa.String(300), nullable=True))
    op.add_column("adapter_versions", sa.Column("source_commit", sa.String(64), nullable=True))
    versions = sa.table("adapter_versions", sa.column("id", sa.Integer()), sa.column("source", sa.JSON()),
                        sa.column("source_repo", sa.String()), sa.column("source_commit", sa.String()))
    bind = op.get_bind()
    rows = bind.execute(sa.select(versions.c.id, versions.c.source).where(versions.c.source.is_not(None))).all()
    for vid, source in rows:
        repo, commit = source_columns(source)
        if repo is not None or commit is not None:
            bind.execute(sa.update(versions).where(versions.c.id == vid).values(source_repo=repo, source_commit=commit))
    op.create_index("ix_adapter_versions_source", "adapter_versions", ["source_repo", "source_commit"])
    op.create_index(op.f("ix_adapter_versions_parent_id"), "adapter_versions", ["parent_id"])
    op.create_index(op.f("ix_tags_key"), "tags", ["key"])


def downgrade() -> None:
    op.drop_index(op.f("ix_tags_key"), table_name="tags")
    op.drop_index(op.f("ix_adapter_versions_parent_id"), table_name="adapter_versions")
    op.drop_index("ix_adapter_versions_source", table_name="adapter_versions")
    # Plain ALTER TABLE ... DROP COLUMN (SQLite 3.35+): a batch copy of the table would trip the foreign keys
    # that point at it.
    op.drop_column("adapter_versions", "source_commit")
    op.drop_column("adapter_versions", "source_repo")
