"""The registry's errors; each maps to one gRPC status code (see modelplane.common.errors)."""

from __future__ import annotations

from modelplane.common.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    ModelNotFound,
    NotFound,
    Unavailable,
)

__all__ = [
    "InvalidModelSpec",
    "InvalidNode",
    "InvalidPlacement",
    "ModelBusy",
    "ModelNotFound",
    "ModelPlaced",
    "NodeIdInUse",
    "NodeLeaseLost",
    "NodeNotFound",
    "NodeUnavailable",
    "NotPlacerLeader",
    "PlacementNotFound",
    "StaleTransition",
    "WatchUnavailable",
]


class InvalidModelSpec(InvalidArgument):
    reason = "INVALID_MODEL_SPEC"


class StaleTransition(Aborted):
    """The writer's view of the model is out of date: another version or state superseded it."""

    reason = "STALE_TRANSITION"


class ModelBusy(FailedPrecondition):
    reason = "MODEL_BUSY"


class WatchUnavailable(Unavailable):
    """A replica on PostgreSQL cannot follow other replicas' changes (its LISTEN connection is down)."""

    reason = "WATCH_UNAVAILABLE"


class ModelPlaced(FailedPrecondition):
    """A model-level transition of a model whose status is derived from its copies on nodes."""

    reason = "MODEL_PLACED"


class InvalidNode(InvalidArgument):
    reason = "INVALID_NODE"


class NodeNotFound(NotFound):
    reason = "NODE_NOT_FOUND"

    def __init__(self, node_id: str) -> None:
        super().__init__(
            f"Node '{node_id}' is not registered. List the nodes with `modelplane nodes ls` and check the id.",
            metadata={"node": node_id},
        )


class NodeIdInUse(AlreadyExists):
    """A second process claims a node id whose lease another process holds."""

    reason = "NODE_ID_IN_USE"


class NodeLeaseLost(FailedPrecondition):
    """The caller no longer holds the node's lease: it lapsed, or another process registered it."""

    reason = "NODE_LEASE_LOST"


class NodeUnavailable(FailedPrecondition):
    """The node cannot take a copy: it is lost, or draining; or it cannot be deleted while live."""

    reason = "NODE_UNAVAILABLE"


class InvalidPlacement(InvalidArgument):
    reason = "INVALID_PLACEMENT"


class PlacementNotFound(NotFound):
    reason = "PLACEMENT_NOT_FOUND"


class NotPlacerLeader(FailedPrecondition):
    """A placement write on behalf of a placer that does not hold the placer's lease."""

    reason = "NOT_PLACER_LEADER"
