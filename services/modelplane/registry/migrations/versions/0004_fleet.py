"""The fleet: nodes with their leases, placements of models on nodes, named leases (the placer's
leadership), and the node an event happened on.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("node_id", sa.String(63), primary_key=True),
        sa.Column("incarnation", sa.BigInteger, nullable=False),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("draining", sa.Boolean, nullable=False),
        sa.Column("lease_expire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("node_json", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "placements",
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("node_id", sa.String(63), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("generation", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("placement_json", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_placements_node_id", "placements", ["node_id"])
    op.create_table(
        "leases",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("holder", sa.Text, nullable=False),
        sa.Column("term", sa.BigInteger, nullable=False),
        sa.Column("acquire_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renew_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
    )
    with op.batch_alter_table("model_events") as batch:
        batch.add_column(sa.Column("node_id", sa.String(63), nullable=False, server_default=""))


def downgrade() -> None:
    with op.batch_alter_table("model_events") as batch:
        batch.drop_column("node_id")
    op.drop_table("leases")
    op.drop_index("ix_placements_node_id", "placements")
    op.drop_table("placements")
    op.drop_table("nodes")
