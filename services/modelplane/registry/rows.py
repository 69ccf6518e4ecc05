"""Rows of the registry's tables ⇄ domain objects.

Each table keeps its domain object as JSON, and repeats in columns what queries filter and lock
on; the column values are always made here from the same object, so the two never disagree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa

from modelplane.common.redact import mask_credentials
from modelplane.common.types import DesiredState, Model, ModelEvent, ModelSpec, ModelState, ModelStatus
from modelplane.registry.fleet import Node, NodeState, Placement


def utc(value: datetime | None) -> datetime | None:
    # SQLite returns naive datetimes; every time the registry stores is UTC.
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def model_from_row(row: sa.Row) -> Model:
    spec = ModelSpec.model_validate_json(row.spec_json)
    # Registrations refuse credentials in a source URI; a row written before they did (or by hand)
    # still never hands one to a reader, a watcher or a log.
    spec.source_uri = mask_credentials(spec.source_uri)
    return Model(
        spec=spec,
        version=row.version,
        desired_state=DesiredState(row.desired_state),
        status=ModelStatus.model_validate_json(row.status_json),
        create_time=utc(row.create_time),
    )


def event_from_row(row: sa.Row) -> ModelEvent:
    return ModelEvent(
        id=row.id,
        model_name=row.model_name,
        version=row.version,
        from_state=ModelState(row.from_state),
        to_state=ModelState(row.to_state),
        message=row.message,
        request_id=row.request_id,
        create_time=utc(row.create_time),
        node_id=row.node_id,
    )


def node_from_row(row: sa.Row) -> Node:
    """The node as last written; its state as recorded (see Node.observed for the live one)."""
    return Node.model_validate_json(row.node_json)


def node_values(node: Node, now: datetime) -> dict[str, Any]:
    assert node.lease_expire_time is not None
    assert node.create_time is not None
    return {
        "incarnation": node.incarnation,
        "holder": node.holder,
        "state": int(NodeState.LOST if node.state == NodeState.LOST else NodeState.LIVE),
        "draining": node.draining,
        "lease_expire_time": node.lease_expire_time,
        "node_json": node.model_dump_json(),
        "create_time": node.create_time,
        "update_time": now,
    }


def placement_from_row(row: sa.Row) -> Placement:
    return Placement.model_validate_json(row.placement_json)


def placement_values(placement: Placement) -> dict[str, Any]:
    assert placement.create_time is not None
    assert placement.update_time is not None
    return {
        "version": placement.version,
        "generation": placement.generation,
        "state": int(placement.status.state),
        "placement_json": placement.model_dump_json(),
        "create_time": placement.create_time,
        "update_time": placement.update_time,
    }
