"""initial registry schema: backbones, tasks, adapter versions, aliases, tags

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "backbones",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("spec", sa.String(300), nullable=False),
        sa.Column("weights", sa.String(500), nullable=True),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_backbones")),
        sa.UniqueConstraint("fingerprint", name=op.f("uq_backbones_fingerprint")),
    )
    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("description", sa.Text(), nullable=True),
        sa.Column("recipe", sa.String(100), nullable=True),
        sa.Column("last_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint("name", name=op.f("uq_tasks_name")),
    )
    op.create_table(
        "adapter_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("backbone_id", sa.Integer(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=True),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("storage", sa.String(1000), nullable=False),
        sa.Column("hub_repo", sa.String(300), nullable=True),
        sa.Column("hub_commit", sa.String(64), nullable=True),
        sa.Column("hub_tag", sa.String(200), nullable=True),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("source", sa.JSON(), nullable=True),
        sa.Column("data", sa.Text(), nullable=True),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="RESTRICT",
                                name=op.f("fk_adapter_versions_task_id_tasks")),
        sa.ForeignKeyConstraint(["backbone_id"], ["backbones.id"], ondelete="RESTRICT",
                                name=op.f("fk_adapter_versions_backbone_id_backbones")),
        sa.ForeignKeyConstraint(["parent_id"], ["adapter_versions.id"], ondelete="SET NULL",
                                name=op.f("fk_adapter_versions_parent_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("task_id", "version", name=op.f("uq_adapter_versions_task_id_version")),
    )
    op.create_index(op.f("ix_adapter_versions_backbone_id"), "adapter_versions", ["backbone_id"])
    op.create_index("ix_adapter_versions_hub", "adapter_versions", ["hub_repo", "hub_commit"])
    op.create_table(
        "aliases",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["task_id"], ["tasks.id"], ondelete="CASCADE", name=op.f("fk_aliases_task_id_tasks")),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], ondelete="RESTRICT",
                                name=op.f("fk_aliases_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_aliases")),
        sa.UniqueConstraint("task_id", "name", name=op.f("uq_aliases_task_id_name")),
    )
    op.create_index(op.f("ix_aliases_version_id"), "aliases", ["version_id"])
    op.create_table(
        "tags",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version_id", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(["version_id"], ["adapter_versions.id"], ondelete="CASCADE",
                                name=op.f("fk_tags_version_id_adapter_versions")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tags")),
        sa.UniqueConstraint("version_id", "key", name=op.f("uq_tags_version_id_key")),
    )


def downgrade() -> None:
    op.drop_table("tags")
    op.drop_index(op.f("ix_aliases_version_id"), table_name="aliases")
    op.drop_table("aliases")
    op.drop_index("ix_adapter_versions_hub", table_name="adapter_versions")
    op.drop_index(op.f("ix_adapter_versions_backbone_id"), table_name="adapter_versions")
    op.drop_table("adapter_versions")
    op.drop_table("tasks")
    op.drop_table("backbones")
