"""Initial registry schema: contributors, credentials, experts, uploads, routers, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Frozen copies of the column types at this revision (models.py may change later).
ID = sa.String(32)
TOKEN_ID = sa.String(16)
SHA256 = sa.String(64)
NAME = sa.String(128)
ACTOR = sa.String(256)


def _utc() -> sa.DateTime:
    return sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "contributors",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.Column("revoke_reason", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_contributors"),
        sa.UniqueConstraint("name", name="uq_contributors_name"),
    )
    op.create_table(
        "credentials",
        sa.Column("id", TOKEN_ID, nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("contributor_id", ID, nullable=True),
        sa.Column("secret_hash", SHA256, nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.Column("last_used_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "(role = 'admin' AND contributor_id IS NULL)"
            " OR (role = 'contributor' AND contributor_id IS NOT NULL)",
            name=op.f("ck_credentials_role_owner"),
        ),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.id"],
            name="fk_credentials_contributor_id_contributors",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_credentials"),
    )
    op.create_index("ix_credentials_contributor_id", "credentials", ["contributor_id"])
    op.create_table(
        "enrollment_tokens",
        sa.Column("id", TOKEN_ID, nullable=False),
        sa.Column("secret_hash", SHA256, nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_by", ACTOR, nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("expires_at", _utc(), nullable=True),
        sa.Column("max_uses", sa.Integer(), nullable=False),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.Column("revoked_at", _utc(), nullable=True),
        sa.CheckConstraint(
            "uses >= 0 AND uses <= max_uses", name=op.f("ck_enrollment_tokens_uses")
        ),
        sa.PrimaryKeyConstraint("id", name="pk_enrollment_tokens"),
    )
    op.create_table(
        "experts",
        sa.Column("id", ID, nullable=False),
        sa.Column("contributor_id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("task_name", NAME, nullable=False),
        sa.Column("task_description", sa.Text(), nullable=False),
        sa.Column("task_type", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("state_reason", sa.Text(), nullable=False),
        sa.Column("base_model_id", sa.String(256), nullable=False),
        sa.Column("lora_rank", sa.Integer(), nullable=False),
        sa.Column("target_modules", sa.JSON(), nullable=False),
        sa.Column("label_names", sa.JSON(), nullable=False),
        sa.Column("example_count", sa.BigInteger(), nullable=False),
        sa.Column("content_sha256", SHA256, nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint(
            "state IN ('active', 'quarantined', 'retired')", name=op.f("ck_experts_state")
        ),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.id"],
            name="fk_experts_contributor_id_contributors",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_experts"),
        sa.UniqueConstraint(
            "contributor_id", "name", "version", name="uq_experts_contributor_id_name_version"
        ),
    )
    op.create_index("ix_experts_task_name", "experts", ["task_name"])
    op.create_index("ix_experts_state", "experts", ["state"])
    op.create_table(
        "expert_files",
        sa.Column("expert_id", ID, nullable=False),
        sa.Column("name", NAME, nullable=False),
        sa.Column("sha256", SHA256, nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name="fk_expert_files_expert_id_experts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("expert_id", "name", name="pk_expert_files"),
    )
    op.create_index("ix_expert_files_sha256", "expert_files", ["sha256"])
    op.create_table(
        "expert_statistics",
        sa.Column("expert_id", ID, nullable=False),
        sa.Column("hidden_size", sa.Integer(), nullable=False),
        sa.Column("covariance_rank", sa.Integer(), nullable=False),
        sa.Column("dp", sa.JSON(), nullable=True),
        sa.Column("gate_modules", sa.Integer(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name="fk_expert_statistics_expert_id_experts",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("expert_id", name="pk_expert_statistics"),
    )
    op.create_table(
        "uploads",
        sa.Column("contributor_id", ID, nullable=False),
        sa.Column("upload_id", NAME, nullable=False),
        sa.Column("manifest", sa.JSON(), nullable=False),
        sa.Column("total_bytes", sa.BigInteger(), nullable=False),
        sa.Column("received_bytes", sa.BigInteger(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("expert_id", ID, nullable=True),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("updated_at", _utc(), nullable=False),
        sa.CheckConstraint(
            "state IN ('receiving', 'committed', 'failed')", name=op.f("ck_uploads_state")
        ),
        sa.CheckConstraint(
            "received_bytes >= 0 AND received_bytes <= total_bytes", name=op.f("ck_uploads_bytes")
        ),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.id"],
            name="fk_uploads_contributor_id_contributors",
        ),
        sa.ForeignKeyConstraint(
            ["expert_id"],
            ["experts.id"],
            name="fk_uploads_expert_id_experts",
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("contributor_id", "upload_id", name="pk_uploads"),
    )
    op.create_index("ix_uploads_state", "uploads", ["state"])
    op.create_table(
        "router_versions",
        sa.Column("version", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("method", sa.String(64), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("active", sa.Boolean(), nullable=False),
        sa.Column("expert_ids", sa.JSON(), nullable=False),
        sa.Column("artifact_sha256", SHA256, nullable=True),
        sa.Column("artifact_size", sa.BigInteger(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("trigger", sa.String(32), nullable=False),
        sa.Column("created_by", ACTOR, nullable=False),
        sa.Column("created_at", _utc(), nullable=False),
        sa.Column("finished_at", _utc(), nullable=True),
        sa.Column("fit_seconds", sa.Float(), nullable=True),
        sa.CheckConstraint(
            "status IN ('training', 'ready', 'failed')", name=op.f("ck_router_versions_status")
        ),
        sa.CheckConstraint(
            "status = 'ready' OR NOT active", name=op.f("ck_router_versions_active_is_ready")
        ),
        sa.PrimaryKeyConstraint("version", name="pk_router_versions"),
    )
    op.create_index("ix_router_versions_method", "router_versions", ["method"])
    op.create_index(
        "ix_router_versions_one_active",
        "router_versions",
        ["active"],
        unique=True,
        sqlite_where=sa.text("active"),
        postgresql_where=sa.text("active"),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("at", _utc(), nullable=False),
        sa.Column("actor", ACTOR, nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(32), nullable=False),
        sa.Column("target_id", sa.String(200), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
    )
    op.create_index("ix_audit_log_action", "audit_log", ["action"])
    op.create_index("ix_audit_log_target_id", "audit_log", ["target_id"])


def downgrade() -> None:
    op.drop_table("audit_log")
    op.drop_table("router_versions")
    op.drop_table("uploads")
    op.drop_table("expert_statistics")
    op.drop_table("expert_files")
    op.drop_table("experts")
    op.drop_table("enrollment_tokens")
    op.drop_table("credentials")
    op.drop_table("contributors")
