"""The first schema: models, versions, events, assets and request statistics.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "models",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("task", sa.Integer, nullable=False),
        sa.Column("state", sa.Integer, nullable=False),
        sa.Column("desired_state", sa.Integer, nullable=False),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("status_json", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_versions",
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("spec_json", sa.Text, nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "model_events",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("model_name", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("from_state", sa.Integer, nullable=False),
        sa.Column("to_state", sa.Integer, nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("request_id", sa.String(128), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_model_events_model_name", "model_events", ["model_name"])
    op.create_table(
        "assets",
        sa.Column("sha256", sa.String(64), primary_key=True),
        sa.Column("content", sa.LargeBinary, nullable=False),
    )
    op.create_table(
        "model_assets",
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("sha256", sa.String(64), nullable=False),
    )
    op.create_table(
        "model_request_stats",
        sa.Column("model_name", sa.String(64), primary_key=True),
        sa.Column("total_requests", sa.BigInteger, nullable=False),
        sa.Column("cold_starts", sa.BigInteger, nullable=False),
        sa.Column("rate_5m", sa.Float, nullable=False),
        sa.Column("rate_1h", sa.Float, nullable=False),
        sa.Column("rates_time", sa.Float, nullable=False),
        sa.Column("hour_of_day_json", sa.Text, nullable=False),
        sa.Column("last_request_time", sa.DateTime(timezone=True), nullable=True),
    )


def downgrade() -> None:
    for table in ("model_request_stats", "model_assets", "assets", "model_events", "model_versions", "models"):
        op.drop_table(table)
