"""The lifecycle graph (DESIGN.md) and how a status moves along it.

One set of rules for both things that go through a lifecycle: a model as a whole (single node,
TransitionModel) and one copy of it on one node (TransitionPlacement). Both statuses carry the same
fields for it (state, reason, progress, update_time, phase_durations).
"""

from __future__ import annotations

from datetime import datetime
from typing import TypeVar

from modelplane.common.types import (
    WORKING_STATES,
    LoadProgress,
    ModelState,
    ModelStatus,
    PackageManifest,
    PhaseDuration,
    ServingProfile,
)
from modelplane.registry.errors import StaleTransition
from modelplane.registry.fleet import PlacementStatus

# FAILED and REGISTERED (a reset) are reachable from every state, and a state may "transition" to
# itself to report progress.
_NEXT: dict[ModelState, frozenset[ModelState]] = {
    # VERIFYING: the package is already in the loader's cache (fetched before a crash cut the
    # load short, or the same files registered under another name) and is checked, not fetched.
    ModelState.REGISTERED: frozenset({ModelState.FETCHING, ModelState.VERIFYING}),
    ModelState.FETCHING: frozenset({ModelState.VERIFYING}),
    ModelState.VERIFYING: frozenset({ModelState.CONVERTING, ModelState.STAGED}),
    ModelState.CONVERTING: frozenset({ModelState.STAGED}),
    ModelState.STAGED: frozenset({ModelState.LOADING, ModelState.FETCHING, ModelState.VERIFYING}),
    ModelState.LOADING: frozenset({ModelState.READY, ModelState.UNLOADING, ModelState.STAGED}),
    ModelState.READY: frozenset({ModelState.UNLOADING, ModelState.LOADING, ModelState.STAGED}),
    ModelState.UNLOADING: frozenset({ModelState.STAGED}),
    ModelState.FAILED: frozenset(
        {ModelState.FETCHING, ModelState.VERIFYING, ModelState.LOADING, ModelState.UNLOADING, ModelState.STAGED}
    ),
}

S = TypeVar("S", ModelStatus, PlacementStatus)


def check_step(
    subject: str,
    current: ModelState,
    to_state: ModelState,
    *,
    expected_from_state: ModelState = ModelState.UNSPECIFIED,
    progress_only: bool = False,
    metadata: dict[str, str],
) -> None:
    """Refuses (ABORTED) a step the writer may not take from `current`; `subject` names what moves
    ("Model 'minilm'", "Copy of model 'minilm' on node 'node-1'")."""
    if expected_from_state and current != expected_from_state:
        raise StaleTransition(f"{subject} is {current.name}, not {expected_from_state.name}.", metadata=metadata)
    if progress_only:
        if to_state != current:
            raise StaleTransition(f"Progress for {to_state.name} but {subject} is {current.name}.", metadata=metadata)
        return
    legal = to_state in (ModelState.FAILED, ModelState.REGISTERED, current) or to_state in _NEXT.get(
        current, frozenset()
    )
    if not legal:
        raise StaleTransition(f"{subject} cannot go from {current.name} to {to_state.name}.", metadata=metadata)


def advance(
    status: S,
    to_state: ModelState,
    *,
    message: str,
    progress: LoadProgress | None,
    progress_only: bool,
    begins_operation: bool,
    now: datetime,
) -> S:
    """The status after one step: the new state and reason, the phase just left timed, progress
    kept only while working."""
    status = status.model_copy(deep=True)
    if progress_only:
        status.progress = progress
        return status
    previous = status.state
    if begins_operation:
        status.phase_durations = []
    if previous != to_state:
        if previous in WORKING_STATES and status.update_time is not None and not begins_operation:
            status.phase_durations.append(PhaseDuration(phase=previous, duration=now - status.update_time))
        status.update_time = now
    status.state = to_state
    status.reason = message
    status.progress = progress if to_state in WORKING_STATES else None
    return status


def with_package_facts(
    status: ModelStatus, manifest: PackageManifest | None, profile: ServingProfile | None, footprint_bytes: int
) -> ModelStatus:
    """The model's status with what a load established about the package, wherever it ran."""
    updates: dict[str, object] = {}
    if manifest is not None:
        updates["manifest"] = manifest
    if profile is not None:
        updates["profile"] = profile
    if footprint_bytes:
        updates["footprint_bytes"] = footprint_bytes
    return status.model_copy(update=updates) if updates else status
