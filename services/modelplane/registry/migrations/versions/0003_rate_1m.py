"""A one-minute request rate per model: the loader's preloading reacts to bursts with it.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    with op.batch_alter_table("model_request_stats") as batch:
        batch.add_column(sa.Column("rate_1m", sa.Float, nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("model_request_stats") as batch:
        batch.drop_column("rate_1m")
