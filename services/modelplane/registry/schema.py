"""The registry's tables. Alembic migrations in `migrations/` create and evolve them."""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

models = sa.Table(
    "models",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("task", sa.Integer, nullable=False),
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("desired_state", sa.Integer, nullable=False),
    # The current version's spec and the observed status, as the domain models' JSON.
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("status_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

model_versions = sa.Table(
    "model_versions",
    metadata,
    sa.Column("model_name", sa.String(64), primary_key=True),
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("spec_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
)

model_events = sa.Table(
    "model_events",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(64), nullable=False, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("from_state", sa.Integer, nullable=False),
    sa.Column("to_state", sa.Integer, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    # The node whose copy made the transition; empty for the model as a whole.
    sa.Column("node_id", sa.String(63), nullable=False, server_default=""),
)

# Asset contents are shared by digest: ten copies of one model store one tokenizer.
assets = sa.Table(
    "assets",
    metadata,
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("content", sa.LargeBinary, nullable=False),
)

model_assets = sa.Table(
    "model_assets",
    metadata,
    sa.Column("model_name", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("sha256", sa.String(64), nullable=False),
)

model_request_stats = sa.Table(
    "model_request_stats",
    metadata,
    sa.Column("model_name", sa.String(64), primary_key=True),
    sa.Column("total_requests", sa.BigInteger, nullable=False),
    sa.Column("cold_starts", sa.BigInteger, nullable=False),
    sa.Column("rate_1m", sa.Float, nullable=False, server_default="0"),
    sa.Column("rate_5m", sa.Float, nullable=False),
    sa.Column("rate_1h", sa.Float, nullable=False),
    # When the rates were last decayed, as seconds since the epoch.
    sa.Column("rates_time", sa.Float, nullable=False),
    # 24 counts, one per UTC hour of the day, as a JSON list.
    sa.Column("hour_of_day_json", sa.Text, nullable=False),
    sa.Column("last_request_time", sa.DateTime(timezone=True), nullable=True),
)

# Changes announced to the watchers of every replica (PostgreSQL): a notification carries a row's
# id, each replica reads the change from here. Rows are pruned minutes after they are written.
model_changes = sa.Table(
    "model_changes",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True, autoincrement=True),
    # The change as ModelChange.to_json writes it: change type, the model and its event.
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False, index=True),
)

# The fleet (fleet.py). Each row keeps its domain object as JSON, written whole; the columns beside
# it repeat what queries filter and lock on, and are written from the same object.
nodes = sa.Table(
    "nodes",
    metadata,
    sa.Column("node_id", sa.String(63), primary_key=True),
    sa.Column("incarnation", sa.BigInteger, nullable=False),
    sa.Column("holder", sa.Text, nullable=False),
    # NodeState.LIVE or LOST as last recorded; DRAINING and a lapsed lease are derived on reading.
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("draining", sa.Boolean, nullable=False),
    sa.Column("lease_expire_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("node_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

placements = sa.Table(
    "placements",
    metadata,
    sa.Column("model_name", sa.String(64), primary_key=True),
    sa.Column("node_id", sa.String(63), primary_key=True, index=True),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("generation", sa.BigInteger, nullable=False),
    # The observed state (PlacementStatus.state).
    sa.Column("state", sa.Integer, nullable=False),
    sa.Column("placement_json", sa.Text, nullable=False),
    sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("update_time", sa.DateTime(timezone=True), nullable=False),
)

# Named leases with an expiry, held by one holder at a time: the placer's leadership ("placer").
leases = sa.Table(
    "leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.Text, nullable=False),
    # Grows by one each time the lease changes hands: a fencing number for the holder's writes.
    sa.Column("term", sa.BigInteger, nullable=False),
    sa.Column("acquire_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("renew_time", sa.DateTime(timezone=True), nullable=False),
    sa.Column("expire_time", sa.DateTime(timezone=True), nullable=False),
)
