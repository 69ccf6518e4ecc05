"""The fleet's data model: nodes, their leases, and placements of models on them.

Domain types that mirror `modelplane.registry.v1` fleet messages field for field (so the generic
converters apply), and the pure rules over them: what a well-formed node or placement policy is,
when a node is live, and how a model's status is derived from its copies. No I/O here; the store
applies these rules inside its transactions.

Who writes what (docs/FLEET.md): a node's loader writes its node row and the observed side of its
placements; an operator writes the draining flag; the placer writes the desired side of
placements; the registry derives node states and models' statuses.
"""

from __future__ import annotations

import enum
import os
import re
import socket
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from pydantic import Field

from modelplane.common.types import (
    WORKING_STATES,
    LoadProgress,
    Model,
    ModelEvent,
    ModelState,
    ModelStatus,
    PhaseDuration,
    PlacementPolicy,
    ProtoDuration,
    Record,
)

# A DNS label, as Kubernetes names a StatefulSet's pods: the id must be usable as one.
_NODE_ID = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
# Kubernetes label syntax: an optional DNS-subdomain prefix and '/', then a name; values alike.
_LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_PREFIX = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_ADDRESS = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})$")
MAX_COPIES = 1000
DEFAULT_LEASE = timedelta(seconds=10)
MIN_LEASE = timedelta(seconds=1)
MAX_LEASE = timedelta(minutes=10)
# The lease whose holder is the placer, the one writer of placements' desired side.
PLACER_LEASE = "placer"


class NodeState(enum.IntEnum):
    UNSPECIFIED = 0
    LIVE = 1
    DRAINING = 2
    LOST = 3


class NodeDevice(Record):
    device: str
    capacity_bytes: int = 0
    used_bytes: int = 0
    total_bytes: int = 0
    product: str = ""

    @property
    def free_bytes(self) -> int:
        return max(0, self.capacity_bytes - self.used_bytes)


class Node(Record):
    node_id: str
    loader_address: str = ""
    triton_address: str = ""
    labels: dict[str, str] = Field(default_factory=dict)
    devices: list[NodeDevice] = Field(default_factory=list)
    holder: str = ""
    incarnation: int = 0
    lease_duration: ProtoDuration | None = None
    lease_expire_time: datetime | None = None
    lease_renew_time: datetime | None = None
    draining: bool = False
    state: NodeState = NodeState.UNSPECIFIED
    register_time: datetime | None = None
    create_time: datetime | None = None

    def lease_valid(self, now: datetime) -> bool:
        return self.lease_expire_time is not None and now < self.lease_expire_time

    def observed(self, now: datetime) -> Node:
        """The node with its state derived from its lease and draining flag as of `now`."""
        live = NodeState.DRAINING if self.draining else NodeState.LIVE
        state = live if self.lease_valid(now) else NodeState.LOST
        return self if state == self.state else self.model_copy(update={"state": state})


class PlacementStatus(Record):
    state: ModelState = ModelState.REGISTERED
    reason: str = ""
    progress: LoadProgress | None = None
    footprint_bytes: int = 0
    last_used_time: datetime | None = None
    update_time: datetime | None = None
    phase_durations: list[PhaseDuration] = Field(default_factory=list)
    observed_generation: int = 0
    evicted: bool = False
    version: int = 0
    incarnation: int = 0


class Placement(Record):
    model_name: str
    node_id: str
    version: int = 0
    generation: int = 0
    decision: str = ""
    status: PlacementStatus = Field(default_factory=PlacementStatus)
    create_time: datetime | None = None
    update_time: datetime | None = None

    @property
    def key(self) -> tuple[str, str]:
        return self.model_name, self.node_id


class PlacementTarget(Record):
    """What the placer wants of one copy (SetPlacements)."""

    model_name: str
    node_id: str
    version: int = 0
    redo: bool = False
    decision: str = ""


# Validation -----------------------------------------------------------------------------------


def is_valid_node_id(node_id: str) -> bool:
    return bool(_NODE_ID.match(node_id))


def label_problem(key: str, value: str) -> str | None:
    """What is wrong with one label (or node_selector entry), or None when it is well formed."""
    prefix, _, name = key.rpartition("/")
    if prefix and not (len(prefix) <= 253 and _LABEL_PREFIX.match(prefix)):
        return f"label key {key!r} has a malformed prefix: use a DNS subdomain before the '/'"
    if not _LABEL_NAME.match(name):
        return (
            f"label key {key!r} is not valid: use at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit"
        )
    if value and not _LABEL_NAME.match(value):
        return (
            f"label value {value!r} of {key!r} is not valid: use at most 63 letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit (or leave it empty)"
        )
    return None


def node_problems(node: Node) -> list[str]:
    """Everything wrong with a node a loader registers, each said so an operator can fix it."""
    problems = []
    if not is_valid_node_id(node.node_id):
        problems.append(
            f"node id {node.node_id!r} is not valid: use 1 to 63 lowercase letters, digits or '-', starting and "
            "ending with a letter or digit (e.g. node-0, or the StatefulSet pod name)"
        )
    for name, value in (("loader_address", node.loader_address), ("triton_address", node.triton_address)):
        match = _ADDRESS.match(value)
        if not match or not 0 < int(match.group(2)) < 65536:
            problems.append(f"{name} {value!r} is not host:port")
    if not node.holder.strip():
        problems.append("holder is empty: say which process registers the node (host, pid, a random part)")
    problems.extend(p for key, value in node.labels.items() if (p := label_problem(key, value)))
    problems.extend(device_problems(node.devices))
    return problems


def device_problems(devices: Iterable[NodeDevice]) -> list[str]:
    problems = []
    seen: set[str] = set()
    for device in devices:
        if not device.device:
            problems.append("a device has no name: use 'cpu' or 'gpu:<index>'")
        elif device.device in seen:
            problems.append(f"device {device.device!r} is listed twice")
        seen.add(device.device)
        if min(device.capacity_bytes, device.used_bytes, device.total_bytes) < 0:
            problems.append(f"device {device.device!r} has a negative byte count")
    return problems


def placement_policy_problems(policy: PlacementPolicy) -> list[str]:
    problems = []
    for name in ("min_copies", "max_copies"):
        value = getattr(policy, name)
        if not 0 <= value <= MAX_COPIES:
            problems.append(f"placement.{name} is {value}: use 0 to {MAX_COPIES}")
    if policy.max_copies and policy.min_copies > policy.max_copies:
        problems.append(
            f"placement.min_copies ({policy.min_copies}) exceeds placement.max_copies ({policy.max_copies})"
        )
    for key, value in policy.node_selector.items():
        problem = label_problem(key, value)
        if problem:
            problems.append(f"placement.node_selector: {problem}")
    return problems


def missing_labels(selector: Mapping[str, str], labels: Mapping[str, str]) -> dict[str, str]:
    """The entries of a model's node_selector that a node's labels do not carry."""
    return {key: value for key, value in selector.items() if labels.get(key) != value}


# Deriving a model's status from its copies ---------------------------------------------------

# Which copy speaks for the model: the one furthest along towards serving. FAILED speaks only
# when every copy failed; a copy still trying says more about the model than one that gave up.
_PRECEDENCE = (
    ModelState.READY,
    ModelState.LOADING,
    ModelState.CONVERTING,
    ModelState.VERIFYING,
    ModelState.FETCHING,
    ModelState.UNLOADING,
    ModelState.STAGED,
    ModelState.REGISTERED,
    ModelState.FAILED,
)


def counts(placement: Placement, model: Model, nodes: Mapping[str, Node], now: datetime) -> bool:
    """Whether a copy's observed state says anything true of the model now: its node is alive,
    the state was written by the node's current process, and it is of the model's current version."""
    node = nodes.get(placement.node_id)
    return (
        node is not None
        and node.lease_valid(now)
        and placement.status.incarnation == node.incarnation
        and placement.status.version == model.version
    )


def derive_status(
    model: Model, placements: Iterable[Placement], nodes: Mapping[str, Node], now: datetime
) -> ModelStatus:
    """A placed model's status as users see it: READY where at least one copy is READY, else
    the state of the copy furthest along; the reason says where each copy is. Fields that belong
    to the model rather than to a copy (manifest, profile, footprint) are kept."""
    status = model.status.model_copy(deep=True)
    current = [p for p in placements if counts(p, model, nodes, now)]
    if not current:
        state = ModelState.STAGED if status.profile is not None else ModelState.REGISTERED
        if status.state != state or status.progress is not None:
            status.update_time = now
        status.state, status.progress, status.phase_durations = state, None, []
        status.reason = "not held by any live node"
        return status
    rank = {state: index for index, state in enumerate(_PRECEDENCE)}
    leader = min(current, key=lambda p: (rank.get(p.status.state, len(rank)), p.node_id))
    if status.state != leader.status.state:
        status.update_time = now
    status.state = leader.status.state
    status.progress = leader.status.progress if leader.status.state in WORKING_STATES else None
    status.phase_durations = list(leader.status.phase_durations)
    status.reason = _summary(current, leader)
    used = [p.status.last_used_time for p in current if p.status.last_used_time is not None]
    if used and (status.last_used_time is None or max(used) > status.last_used_time):
        status.last_used_time = max(used)
    return status


def _summary(current: list[Placement], leader: Placement) -> str:
    ready = [p.node_id for p in current if p.status.state == ModelState.READY]
    if ready:
        text = f"ready on {len(ready)} of {len(current)} nodes ({', '.join(ready)})"
    elif leader.status.state == ModelState.FAILED:
        text = f"failed on every node ({len(current)})"
    else:
        text = f"{leader.status.state.name} on {leader.node_id}"
        if leader.status.reason:
            text += f": {leader.status.reason}"
    failed = [p for p in current if p.status.state == ModelState.FAILED]
    if failed:
        text += "; " + "; ".join(f"{p.node_id} failed: {p.status.reason}" for p in failed)
    return text


def removal_event(placement: Placement, why: str) -> ModelEvent:
    """The event that records a placement's removal, in the model's history."""
    return ModelEvent(
        model_name=placement.model_name,
        version=placement.version,
        from_state=placement.status.state,
        to_state=ModelState.UNSPECIFIED,
        message=f"removed from node {placement.node_id}: {why}",
        node_id=placement.node_id,
    )


# What a batch of the placer's writes sees and decides (SetPlacements) ----------------------------


@dataclass(frozen=True)
class PlacementScope:
    """The rows a batch of placement writes touches, as they are inside its transaction."""

    models: Mapping[str, Model]
    nodes: Mapping[str, Node]
    placements: Mapping[tuple[str, str], Placement]
    now: datetime


@dataclass
class PlacementWrites:
    """What a batch writes: placements made or changed, placements removed, and their events."""

    upserts: list[Placement] = field(default_factory=list)
    removals: list[Placement] = field(default_factory=list)
    events: list[ModelEvent] = field(default_factory=list)


def new_holder(process: str = "loader") -> str:
    """An identity for a process that registers a node: who and where, unique to this start."""
    return f"{process}@{socket.gethostname()} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
