"""Changes announced to every registry replica: the rows that PostgreSQL notifications point at.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    op.create_table(
        "model_changes",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("payload", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_changes_create_time", "model_changes", ["create_time"])


def downgrade() -> None:
    op.drop_index("ix_model_changes_create_time", "model_changes")
    op.drop_table("model_changes")
