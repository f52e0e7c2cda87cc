"""Contributors' Flower SuperNode public keys (node authentication of federated rounds).

Revision ID: 0004
Revises: 0003
Create Date: 2027-01-12
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "node_keys",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("contributor_id", sa.String(32), nullable=False),
        sa.Column("public_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["contributor_id"],
            ["contributors.id"],
            name="fk_node_keys_contributor_id_contributors",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_node_keys"),
    )
    op.create_index("ix_node_keys_contributor_id", "node_keys", ["contributor_id"])


def downgrade() -> None:
    op.drop_index("ix_node_keys_contributor_id", table_name="node_keys")
    op.drop_table("node_keys")
