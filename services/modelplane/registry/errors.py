"""The registry's errors; each maps to one gRPC status code (see modelplane.common.errors)."""

from __future__ import annotations

from modelplane.common.errors import Aborted, FailedPrecondition, InvalidArgument, ModelNotFound, Unavailable

__all__ = ["InvalidModelSpec", "ModelBusy", "ModelNotFound", "StaleTransition", "WatchUnavailable"]


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
