"""The registry's errors; each maps to one gRPC status code (see modelplane.common.errors)."""

from __future__ import annotations

from modelplane.common.errors import Aborted, FailedPrecondition, InvalidArgument, ModelNotFound

__all__ = ["InvalidModelSpec", "ModelBusy", "ModelNotFound", "StaleTransition"]


class InvalidModelSpec(InvalidArgument):
    reason = "INVALID_MODEL_SPEC"


class StaleTransition(Aborted):
    """The writer's view of the model is out of date: another version or state superseded it."""

    reason = "STALE_TRANSITION"


class ModelBusy(FailedPrecondition):
    reason = "MODEL_BUSY"
