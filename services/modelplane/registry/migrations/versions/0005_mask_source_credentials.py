"""Credentials in stored source URIs are masked: registrations refuse them now, and none
registered before may stay in the database (a backup or a replica would keep it).

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

import json

import sqlalchemy as sa
from alembic import op

from modelplane.common.redact import mask_credentials

revision = "0005"
down_revision = "0004"


def _mask_specs(table: str, keys: tuple[str, ...]) -> None:
    connection = op.get_bind()
    columns = ", ".join(keys)
    where = " AND ".join(f"{key} = :{key}" for key in keys)
    for row in connection.execute(sa.text(f"SELECT {columns}, spec_json FROM {table}")).mappings().all():  # noqa: S608 - fixed names
        spec = json.loads(row["spec_json"])
        masked = mask_credentials(spec.get("source_uri", ""))
        if masked != spec.get("source_uri", ""):
            spec["source_uri"] = masked
            connection.execute(
                sa.text(f"UPDATE {table} SET spec_json = :spec_json WHERE {where}"),  # noqa: S608 - fixed names
                {"spec_json": json.dumps(spec), **{key: row[key] for key in keys}},
            )


def upgrade() -> None:
    _mask_specs("models", ("name",))
    _mask_specs("model_versions", ("model_name", "version"))


def downgrade() -> None:
    """Nothing to restore: the credentials are gone, as intended."""
