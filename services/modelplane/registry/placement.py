"""Where models should be: the placer's decisions for a fleet of nodes, as one pure function.

`plan(nodes, models, placements, rates, now, policy)` reads plain views of the fleet and returns
the placements to add, to redo (a new generation) and to remove, each with a reason a person can
read, and the copies it could not place (pending), with why. No I/O, no clock of its own (`now`
is an argument), nothing random, every loop in a sorted order: the same inputs give the same plan.
The registry's placer loop (one process at a time, under a lease) reads these views from its
tables, calls `plan`, and writes the desired side of the placements (`apply_plan` says exactly
what that means); each node's loader makes its own placements true. docs/FLEET.md has the design.

How many copies a model wants:
- none, unless it is *wanted*: the operator keeps it loaded (desired LOADED), a request waits for
  it (on demand), it was used within its idle TTL, or it is expected to be requested (its forecast
  rate is at least `warm_rate`: the fleet's preloading);
- then at least `min_copies` (and 1), and as many as its request rate needs at `copy_capacity_rps`
  per copy, at most `max_copies` and one per matching node;
- copies fall back only when the remaining ones would run at most at `scale_down_utilisation`, the
  last copy only when the model is no longer wanted (idle past its TTL and expected rate below half
  of `warm_rate`), and never a copy younger than `min_copy_age_seconds`: adding and removing use
  different thresholds, so a rate that hovers never adds and removes the same copy.

Where a copy goes (filter, then score, as GPUStack and the Kubernetes scheduler do):
- a node that is live, not draining, has a device of the model's kind (a GPU model holds its bytes
  on every GPU of the node, as the loader places it), carries the model's `node_selector` labels,
  whose budget could hold the model at all, holds no copy of it yet and has no recent failure of it;
- the one with free memory that scores best: `spread` (the most free memory left, by fraction;
  the default) or `binpack` (the least left), preferring a zone that holds fewer copies of it;
- else the node where displacing copies frees room at the least cost: copies of lower priority
  classes, and copies of its own class that together serve fewer requests/s than it by a factor
  of `1 + displace_margin`, taken by least worth per byte (a big cold copy frees the most for the
  least); never a pinned copy, never hotter or higher ones. The k-th copy of a model is worth
  rate/k; a copy the operator keeps loaded (up to min copies) or a request waits for is worth
  infinitely much within its class.

Moves: copies on a lost node (or an unknown one), or on a node without the model's device kind,
are removed at once and placed elsewhere; copies on a draining node, or on a node that no longer
carries the model's labels, stay until the model has its copies READY elsewhere (make before
break). A placement whose load failed, or that the node gave
up (evicted: the loader recorded STAGED with observed_generation == generation), is a record, not
a copy: the copy is placed elsewhere, and the record bars its node for that model for
`retry_after_seconds`; then it is removed, or redone there (a new generation) if that node is again
the best place. A placement of an older version is redone (a new generation) with the current
one. Nothing else moves: no rebalancing for a small gain.

Memory is the placer's own account: each device's bytes used that no placement on the list
explains (the runtime, copies still unloading) plus the footprints of the copies it keeps or adds.
It never removes a copy because the account says a node is full: the node's loader is the
authority on its memory and reports what it had to evict.
"""

from __future__ import annotations

import bisect
import enum
import heapq
import math
from collections import defaultdict
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace

from modelplane.common.types import RESIDENT_STATES, ModelState, Priority, Task
from modelplane.registry.fleet import missing_labels

# The reason a loader records on a placement it had to evict (state STAGED).
EVICTED_REASON = "evicted"
# A model not wanted any more keeps its copies until its expected rate falls below this share of
# `warm_rate`: the band between placing and removing that keeps a hovering rate from flapping.
KEEP_FRACTION = 0.5
NO_DEVICES: list[str] = []
# A placement acted on in one of these states holds nothing: the node evicted or unloaded it.
GIVEN_UP_STATES = frozenset({ModelState.STAGED, ModelState.REGISTERED, ModelState.UNSPECIFIED})
# Enum members bound once: looking one up on its class is a slow attribute access, and the hot
# paths (every record, every copy of every node) compare states and classes many times per plan.
_READY, _FAILED = ModelState.READY, ModelState.FAILED
_PINNED, _NORMAL = Priority.PINNED, Priority.NORMAL
_RESIDENT = frozenset(int(s) for s in RESIDENT_STATES)
_GIVEN_UP = frozenset(int(s) for s in GIVEN_UP_STATES)
# Placement passes in one plan at most (each after the first runs only if the last placed a copy).
MAX_PASSES = 6


class Strategy(enum.StrEnum):
    SPREAD = "spread"
    BINPACK = "binpack"


class Action(enum.StrEnum):
    ADD = "add"
    RETRY = "retry"  # the placement stays; its generation is bumped (load again, or a new version)
    REMOVE = "remove"


def device_kind(device: str) -> str:
    """ "cpu" for "cpu", "gpu" for "gpu:0": the loader's device names."""
    return device.partition(":")[0]


# Inputs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceView:
    name: str  # "cpu" or "gpu:<index>", as the node's loader names its devices
    capacity_bytes: int  # the loader's budget for the device (its memory less the safety margin)
    used_bytes: int = 0  # what the node last reported held there: models, runtime, anything else


@dataclass(frozen=True)
class NodeView:
    id: str
    devices: tuple[DeviceView, ...]
    live: bool = True  # its lease is valid; a node that is not live is lost
    draining: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelView:
    name: str
    footprint_bytes: int  # measured where known, else the estimate; on each device of its kind
    version: int = 1
    task: Task = Task.UNSPECIFIED
    device_kind: str = "cpu"  # "cpu" or "gpu"
    priority: Priority = Priority.NORMAL
    desired_loaded: bool = False  # the operator keeps it loaded (desired_state LOADED)
    min_copies: int = 1
    max_copies: int = 0  # 0: as many as its rate needs and matching nodes allow
    node_selector: Mapping[str, str] = field(default_factory=dict)
    on_demand: bool = False  # a request waits for it and it has no copy
    copy_capacity_rps: float = 0.0  # requests/s one copy serves; 0: the policy's
    idle_ttl_seconds: float | None = None  # None: the policy's; 0: never idle (the spec's idle_ttl)
    last_request_time: float | None = None  # seconds since the epoch, from request statistics


@dataclass(frozen=True)
class PlacementView:
    model: str
    node: str
    version: int = 1
    # Desired side (the placer's): bumped whenever it wants the placement (re)done.
    generation: int = 1
    placed_time: float = 0.0  # when the placer created the placement or last bumped its generation
    # Observed side (only that node's loader's).
    observed_generation: int = 0
    state: ModelState = ModelState.UNSPECIFIED
    reason: str = ""
    footprint_bytes: int = 0  # measured on that node; 0 when not yet known
    last_used: float | None = None
    observed_time: float | None = None  # when the observed side last changed

    @property
    def acted(self) -> bool:
        """The node's loader has finished acting on the current generation."""
        return self.observed_generation >= self.generation

    @property
    def ready(self) -> bool:
        return self.acted and self.state == ModelState.READY

    @property
    def failed(self) -> bool:
        return self.acted and self.state == ModelState.FAILED

    @property
    def given_up(self) -> bool:
        """The node evicted or unloaded it and will not load it again until asked (no flapping)."""
        return self.acted and self.state in GIVEN_UP_STATES


@dataclass(frozen=True)
class PlacementPolicy:
    strategy: Strategy = Strategy.SPREAD
    # Requests/s one copy serves, for models that do not say: copies = ceil(rate / capacity).
    copy_capacity_rps: float = 20.0
    # An extra copy goes once the others would run at most at this share of their capacity.
    scale_down_utilisation: float = 0.7
    # No copy younger than this is removed for falling demand (ModelMesh's minimum churn age).
    min_copy_age_seconds: float = 300.0
    # A model not kept loaded loses its last copy once unused for this long (0: never for idleness).
    # The loader's idle TTL default.
    idle_ttl_seconds: float = 1800.0
    # Expected requests/s at which a model gets a copy before anyone asks: one request in the
    # loader's preloading horizon of 5 minutes.
    warm_rate: float = 1 / 300
    # A copy displaces a same-class one only if it is worth more than (1 + margin) times as much.
    displace_margin: float = 0.5
    # A node where a model's load failed, or whose loader evicted it, is not asked for it again for
    # this long (its record stays and says why); then the record goes, or is redone there.
    retry_after_seconds: float = 600.0
    # Copies of one model prefer nodes of different values of this label.
    zone_label: str = "topology.kubernetes.io/zone"

    def __post_init__(self) -> None:
        checks = {
            "strategy must be 'spread' or 'binpack'": self.strategy in tuple(Strategy),
            "copy_capacity_rps must be above 0": self.copy_capacity_rps > 0,
            "scale_down_utilisation must be above 0 and at most 1": 0 < self.scale_down_utilisation <= 1,
            "min_copy_age_seconds must be 0 or more": self.min_copy_age_seconds >= 0,
            "idle_ttl_seconds must be 0 (never idle) or more": self.idle_ttl_seconds >= 0,
            "warm_rate must be above 0": self.warm_rate > 0,
            "displace_margin must be 0 or more": self.displace_margin >= 0,
            "retry_after_seconds must be 0 or more": self.retry_after_seconds >= 0,
        }
        wrong = [message for message, ok in checks.items() if not ok]
        if wrong:
            raise ValueError(f"invalid placement policy: {'; '.join(wrong)}")


# Outputs -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlacementChange:
    action: Action
    model: str
    node: str
    version: int
    reason: str


@dataclass(frozen=True)
class Pending:
    """Copies a model should have and could not get: the autoscaler's signal and a 503's message."""

    model: str
    wanted: int
    placed: int
    reason: str
    # Some matching node could hold it once room is made there (a retry may succeed); False when
    # no node can (no device of its kind, no node with its labels, every budget too small).
    room_may_come: bool = False


@dataclass(frozen=True)
class PlacementPlan:
    changes: tuple[PlacementChange, ...] = ()
    pending: tuple[Pending, ...] = ()

    @property
    def adds(self) -> tuple[PlacementChange, ...]:
        return tuple(c for c in self.changes if c.action == Action.ADD)

    @property
    def retries(self) -> tuple[PlacementChange, ...]:
        return tuple(c for c in self.changes if c.action == Action.RETRY)

    @property
    def removes(self) -> tuple[PlacementChange, ...]:
        return tuple(c for c in self.changes if c.action == Action.REMOVE)

    @property
    def empty(self) -> bool:
        return not self.changes


def apply_plan(placements: Iterable[PlacementView], plan: PlacementPlan, now: float) -> list[PlacementView]:
    """The desired side after the placer writes `plan`: what the registry stores. Added placements
    start at generation 1, unobserved; a retry bumps the generation (and sets the version); the
    observed side is left as the loaders wrote it."""
    by_key = {(p.model, p.node): p for p in placements}
    for change in plan.changes:
        key = (change.model, change.node)
        if change.action == Action.REMOVE:
            by_key.pop(key, None)
        elif change.action == Action.ADD:
            by_key[key] = PlacementView(change.model, change.node, version=change.version, placed_time=now)
        else:
            old = by_key[key]
            by_key[key] = replace(old, version=change.version, generation=old.generation + 1, placed_time=now)
    return [by_key[key] for key in sorted(by_key)]


def plan(
    nodes: Iterable[NodeView],
    models: Iterable[ModelView],
    placements: Iterable[PlacementView],
    rates: Mapping[str, float],
    now: float,
    policy: PlacementPolicy | None = None,
    *,
    only: Collection[str] | None = None,
) -> PlacementPlan:
    """The placements to add, redo and remove so the fleet holds what its models need.

    `rates`: expected requests/s per model (absent: 0). `only`: decide for these models alone (an
    on-demand request's placement), leaving every other model's records as they are, except copies
    a placement displaces."""
    return _Planner(nodes, models, placements, rates, now, policy or PlacementPolicy(), only).run()


# The work ------------------------------------------------------------------------------------


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def _rate(value: float) -> str:
    return f"{value:.3g} requests/s" if value >= 0.1 else f"{value * 60:.2g} requests/min"


def _class(priority: Priority) -> Priority:
    return priority or _NORMAL


@dataclass(slots=True)
class _Copy:
    model: ModelView
    node: str
    bytes: int
    ready: bool
    placed_time: float
    last_used: float
    leaving: bool = False  # on a node that is draining or no longer matches the model


@dataclass(slots=True)
class _Order:
    """A node's copies in displacement order: lowest class first, then least worth per byte, then
    least recently used; with running sums of their bytes and (within each class) their worth."""

    classes: list[int]  # -class of each copy: ascending
    copies: list[_Copy]
    freed: list[int]
    lost: list[float]

    def segment(self, priority: Priority) -> tuple[int, int]:
        """Where the copies of lower classes end, and where those of `priority`'s class end."""
        return bisect.bisect_left(self.classes, -int(priority)), bisect.bisect_right(self.classes, -int(priority))


class _Node:
    """One live node as the placer accounts it within one plan."""

    def __init__(self, view: NodeView) -> None:
        self.view = view
        self.capacity = {d.name: d.capacity_bytes for d in view.devices}
        self.committed = {d.name: d.used_bytes for d in view.devices}
        self.kinds: dict[str, list[str]] = {}
        for d in view.devices:
            self.kinds.setdefault(device_kind(d.name), []).append(d.name)
        self.copies: dict[str, _Copy] = {}
        self.barred: dict[str, str] = {}  # model → why this node may not take it in this plan
        self.victim_order: dict[str, _Order] = {}  # see _Planner._victim_order

    def devices(self, kind: str) -> list[str]:
        return self.kinds.get(kind, NO_DEVICES)

    def budget(self, kind: str) -> int:
        """The most bytes a model of this kind could ever hold here; -1 without such a device."""
        return min((self.capacity[d] for d in self.devices(kind)), default=-1)

    def free(self, kind: str) -> int:
        return min((self.capacity[d] - self.committed[d] for d in self.devices(kind)), default=-1)

    def free_fraction_after(self, kind: str, nbytes: int) -> float:
        return min(
            ((self.capacity[d] - self.committed[d] - nbytes) / self.capacity[d] for d in self.devices(kind)),
            default=-1.0,
        )

    def hold(self, copy: _Copy, resident: int = 0) -> None:
        """Counts the copy's bytes; `resident`: bytes of it the node reported as used, which the
        copy's own account now holds."""
        self.copies[copy.model.name] = copy
        committed = self.committed
        for d in self.devices(copy.model.device_kind):
            committed[d] = max(0, committed[d] - resident) + copy.bytes

    def forget_resident(self, kind: str, nbytes: int) -> None:
        """Bytes the node reported that a placement explains, for a record that is not a copy."""
        for d in self.devices(kind):
            self.committed[d] = max(0, self.committed[d] - nbytes)

    def release(self, name: str) -> _Copy:
        copy = self.copies.pop(name)
        for d in self.devices(copy.model.device_kind):
            self.committed[d] -= copy.bytes
        return copy


@dataclass(frozen=True)
class _Need:
    target: int  # copies to have
    keep: int  # copies to keep before scaling down (>= target)
    why: str  # empty when the model is not wanted (written only if a copy must go: see _scale_down)
    ttl: float = 0.0


class _Planner:
    def __init__(
        self,
        nodes: Iterable[NodeView],
        models: Iterable[ModelView],
        placements: Iterable[PlacementView],
        rates: Mapping[str, float],
        now: float,
        policy: PlacementPolicy,
        only: Collection[str] | None,
    ) -> None:
        self.policy = policy
        self.now = now
        self.views = {n.id: n for n in nodes}
        self.nodes = {n.id: _Node(n) for n in sorted(self.views.values(), key=lambda n: n.id) if n.live}
        self.models = {m.name: m for m in models}
        self.rates = rates
        self.records = sorted(placements, key=lambda p: (p.model, p.node))
        self.deciding_all = only is None
        self.focus = set(self.models) if only is None else set(only) & set(self.models)
        self.copies: dict[str, dict[str, _Copy]] = defaultdict(dict)  # model → node → copy
        self.last_used: dict[str, float] = {}
        self.needs: dict[str, _Need] = {}
        self.wanting: list[str] = []  # models that want copies, in name order
        self.removed: dict[tuple[str, str], PlacementChange] = {}
        self.added: dict[tuple[str, str], PlacementChange] = {}
        self.retried: dict[tuple[str, str], PlacementChange] = {}
        self.pending: dict[str, Pending] = {}
        self.hopeless: dict[tuple, tuple[float, int, int]] = {}  # see _group
        self.barred_models: set[str] = set()
        self.staying_count: dict[str, int] = defaultdict(int)  # copies not leaving their node, per model

    # The passes ------------------------------------------------------------------------------

    def run(self) -> PlacementPlan:
        self._take_records()
        names = sorted(self.focus)
        for name in names:
            self.needs[name] = self._need(self.models[name])
            if self.copies.get(name):
                self._scale_down(self.models[name])
        self.wanting = [name for name in names if self.needs[name].target]
        self._place()
        for name in names:
            if self.copies.get(name):
                self._finish_moves(self.models[name])
        return self._result()

    def _take_records(self) -> None:
        """Sorts the stored placements into copies (kept, memory counted) and records to drop."""
        for p in self.records:
            model, node = self.models.get(p.model), self.nodes.get(p.node)
            if p.last_used is not None:
                self.last_used[p.model] = max(self.last_used.get(p.model, p.last_used), p.last_used)
            acted = p.observed_generation >= p.generation
            resident = 0
            state = int(p.state)
            if model is not None and acted and state in _RESIDENT:
                resident = p.footprint_bytes or model.footprint_bytes
            decides = p.model in self.focus
            if model is None:
                if self.deciding_all:
                    self._remove(p, f"model '{p.model}' is no longer registered")
                continue
            if node is None:
                if decides:
                    view = self.views.get(p.node)
                    why = "its lease expired" if view is not None else "it is no longer registered"
                    self._remove(p, f"node {p.node} is lost ({why}); the copy is placed again elsewhere")
                continue
            if model.device_kind not in node.kinds:
                # Not a copy: the node cannot hold the model at all (its device is gone, or the
                # model's kind changed). Removed at once, as on a lost node, never kept for a move.
                node.forget_resident(model.device_kind, resident)
                if decides:
                    self._remove(p, f"{p.node} has no {model.device_kind} device; the copy is placed again elsewhere")
                continue
            if acted and (state == _FAILED or state in _GIVEN_UP):
                since = self.now - (p.observed_time if p.observed_time is not None else p.placed_time)
                if state == _FAILED:
                    what = f"its load failed on {p.node} {since:.0f} s ago ({p.reason})"
                elif p.reason.startswith(EVICTED_REASON):
                    what = f"{p.node}'s loader evicted it {since:.0f} s ago"
                else:
                    what = f"{p.node}'s loader gave it up {since:.0f} s ago ({p.reason or p.state.name})"
                node.forget_resident(model.device_kind, resident)
                if since < self.policy.retry_after_seconds:
                    node.barred[p.model] = what  # the record stays: the node is not asked again yet
                    self.barred_models.add(p.model)
                elif decides:
                    self._remove(p, f"{what}; it may be placed there again")
                continue
            ready = acted and state == _READY
            if p.version != model.version and decides:
                self._retry(p.model, p.node, model.version, f"version {model.version} replaces version {p.version}")
                ready = False
            nbytes = model.footprint_bytes if not ready else (p.footprint_bytes or model.footprint_bytes)
            plain = not model.node_selector and not node.view.draining
            leaving = not plain and self._fits_node(model, node) is not None
            copy = _Copy(model, p.node, nbytes, ready, p.placed_time, p.last_used or 0.0, leaving)
            node.hold(copy, resident)
            self.copies[p.model][p.node] = copy
            if not leaving:
                self.staying_count[p.model] += 1

    def _need(self, m: ModelView) -> _Need:
        rate = self._rate_of(m.name)
        capacity = m.copy_capacity_rps or self.policy.copy_capacity_rps
        ttl = self.policy.idle_ttl_seconds if m.idle_ttl_seconds is None else m.idle_ttl_seconds
        last, used = m.last_request_time, self.last_used.get(m.name)
        if used is not None and (last is None or used > last):
            last = used
        in_use = last is not None and (not ttl or self.now - last < ttl)
        quiet = not (m.desired_loaded or m.on_demand or in_use or self.copies.get(m.name))
        if quiet and rate < self.policy.warm_rate * KEEP_FRACTION:
            return _Need(0, 0, "", ttl)  # most of a large catalogue: nothing to decide
        whys = []
        if m.desired_loaded:
            whys.append("the operator keeps it loaded")
        if _class(m.priority) == _PINNED and self.copies[m.name]:
            whys.append("pinned: never unloaded for idleness")  # as the loader: no idle TTL
        if m.on_demand:
            whys.append("a request waits for it")
        if in_use and last is not None:
            whys.append(f"used {self.now - last:.0f} s ago")
        if rate >= self.policy.warm_rate:
            whys.append(f"expected {_rate(rate)}")
        still = bool(whys) or rate >= self.policy.warm_rate * KEEP_FRACTION
        if not still:
            return _Need(0, 0, "", ttl)
        floor = max(1, m.min_copies)
        by_rate = math.ceil(rate / capacity - 1e-9)
        target = max(floor, by_rate) if whys else 0
        keep = max(floor, math.ceil(rate / (capacity * self.policy.scale_down_utilisation) - 1e-9), target)
        if m.max_copies:
            target, keep = min(target, m.max_copies), min(keep, m.max_copies)
        if by_rate > floor:
            whys.append(f"{by_rate} copies of {_rate(capacity)} each serve it")
        return _Need(target, keep, "; ".join(whys) or "expected requests keep it")

    def _staying(self, m: ModelView) -> list[_Copy]:
        return [c for c in self.copies[m.name].values() if not c.leaving]

    def _scale_down(self, m: ModelView) -> None:
        """Removes copies beyond what the model keeps: the youngest are safe, loading ones go first."""
        if not self.copies.get(m.name):
            return
        need = self.needs[m.name]
        copies = self._staying(m) if need.keep else list(self.copies[m.name].values())
        excess = len(copies) - need.keep
        if excess <= 0:
            return
        over_max = bool(m.max_copies) and len(copies) > m.max_copies
        old = [c for c in copies if over_max or self.now - c.placed_time >= self.policy.min_copy_age_seconds]
        zones = self._zone_counts(copies)
        binpack = self.policy.strategy == Strategy.BINPACK

        def order(c: _Copy) -> tuple:
            fill = self.nodes[c.node].free_fraction_after(m.device_kind, 0)
            return (c.ready, -zones[self._zone(c.node)], -fill if binpack else fill, c.node)

        if need.keep:
            why = f"{len(copies) - 1} copies serve its {_rate(self._rate_of(m.name))}"
        else:
            why = f"not wanted: not kept loaded, unused for {need.ttl:.0f} s and no requests expected"
        for copy in sorted(old, key=order)[:excess]:
            self._drop(copy, f"fewer copies: {why}")

    def _finish_moves(self, m: ModelView) -> None:
        """Removes copies on draining or no longer matching nodes once enough are READY elsewhere."""
        need = self.needs[m.name]
        leaving = [c for c in self.copies[m.name].values() if c.leaving]
        if not leaving:
            return
        ready = sum(c.ready for c in self._staying(m))
        if need.target and ready < need.target:
            return
        for copy in leaving:
            why = self._fits_node(m, self.nodes[copy.node])
            self._drop(copy, f"moved: {copy.node} {why}, and {ready} READY copies are elsewhere")

    # Placing ---------------------------------------------------------------------------------

    def _heat(self, m: ModelView, k: int) -> float:
        """What the model's k-th copy is worth: requests/s it serves; infinite when the operator
        keeps it loaded (up to min copies) or a request waits for it (the first)."""
        if (m.desired_loaded and k <= max(1, m.min_copies)) or (m.on_demand and k == 1):
            return math.inf
        return self._rate_of(m.name) / k

    def _rate_of(self, name: str) -> float:
        """Expected requests/s; absent, negative or NaN count as none."""
        rate = self.rates.get(name, 0.0)
        return float(rate) if rate > 0 else 0.0  # NaN > 0 is false

    def _place(self) -> None:
        """Places copies, hottest first within each class, until a pass places nothing: a copy
        placed late can make an earlier one's victims cheaper (a model's second copy makes its
        first worth less), and the next plan must not find what this one could have."""
        for _ in range(MAX_PASSES):
            placed = len(self.added)
            self.pending = {name: p for name, p in self.pending.items() if name not in self.focus}
            self.hopeless.clear()
            self._place_pass()
            if len(self.added) == placed:
                return

    def _place_pass(self) -> None:
        queue: list[tuple[int, float, str]] = []

        def push(m: ModelView) -> None:
            staying = self.staying_count[m.name]
            if staying < self.needs[m.name].target:
                heapq.heappush(queue, (int(_class(m.priority)), -self._heat(m, staying + 1), m.name))

        for name in self.wanting:
            push(self.models[name])
        while queue:
            _, _, name = heapq.heappop(queue)
            m = self.models[name]
            staying = self.staying_count[m.name]
            if staying >= self.needs[name].target or name in self.pending:
                continue
            displaced = self._place_one(m, staying + 1)
            if displaced is None:
                continue
            for victim in displaced:
                if victim.name in self.focus:
                    self.pending.pop(victim.name, None)
                    push(victim)
            push(m)

    def _place_one(self, m: ModelView, k: int) -> list[ModelView] | None:
        """Places the model's k-th copy; the models it displaced, or None (then it is pending)."""
        group = self._group(m)
        heat = self._heat(m, k)
        bound = self.hopeless.get(group) if group is not None else None
        if bound is not None and heat <= bound[0] and m.footprint_bytes > bound[1]:
            self._pend(m, some_node_fits=m.footprint_bytes <= bound[2], heat=heat)
            return None
        placed = self._place_somewhere(m, k, heat)
        if placed is not None:
            self.hopeless.clear()  # memory and copies' worth changed: earlier failures may succeed
        elif group is not None:
            self.hopeless[group] = self._bound(m, heat)
        return placed

    def _group(self, m: ModelView) -> tuple | None:
        """Models that see the same nodes: of one class, device kind and selector, with no copy and
        no record barring a node. Once a copy of the group finds no room, the most room any of
        those nodes could make for it is known; a copy no hotter that needs more than that fails
        too, until the plan changes something, and is not tried: plans of a full fleet with many
        expected models stay fast, and decide exactly as if each were tried."""
        if self.copies.get(m.name) or m.name in self.barred_models:
            return None
        return (_class(m.priority), m.device_kind, tuple(sorted(m.node_selector.items())))

    def _bound(self, m: ModelView, heat: float) -> tuple[float, int, int]:
        """(worth, the most room a node of the model's group could make at that worth, the largest
        budget among them) after the model's copy found no room."""
        room, budget = -1, -1
        for node in self.nodes.values():
            if self._fits_node(m, node) is not None:
                continue
            order = self._victim_order(node, m.device_kind)
            lower, allowed = order.segment(_class(m.priority))
            # The longest prefix whose same-class worth stays below the bar (it only grows).
            last = bisect.bisect_left(order.lost, heat / (1 + self.policy.displace_margin), lower, allowed) - 1
            last = max(last, lower - 1)
            room = max(room, node.free(m.device_kind) + (order.freed[last] if last >= 0 else 0))
            budget = max(budget, node.budget(m.device_kind))
        return heat, room, budget

    def _place_somewhere(self, m: ModelView, k: int, heat: float) -> list[ModelView] | None:
        candidates = [n for n in self.nodes.values() if self._eligible(m, n) is None]
        zones = self._zone_counts(self._staying(m))
        free = [n for n in candidates if n.free(m.device_kind) >= m.footprint_bytes]
        why = self.needs[m.name].why
        if free:
            node = min(free, key=lambda n: self._score(m, n, zones))
            room = _gib(node.free(m.device_kind))
            self._add(m, node, f"copy {k}: {why}; {node.view.id} has {room} free ({self.policy.strategy})")
            return []
        best: tuple[tuple, _Node, list[_Copy], float] | None = None
        for node in candidates:
            found = self._victims(m, heat, node)
            if found is None:
                continue
            victims, lost, lost_below = found
            cost = (lost, lost_below, len(victims), self._score(m, node, zones))
            if best is None or cost < best[0]:
                best = (cost, node, victims, lost)
        if best is None:
            self._pend(m, some_node_fits=bool(candidates), heat=heat)
            return None
        _, node, victims, lost = best
        worth = "waits for a request" if heat == math.inf else f"is worth {_rate(heat)}"
        for v in victims:
            what = f"{_class(v.model.priority).name.lower()}, {_rate(self._victim_heat(v))}"
            self._drop(v, f"displaced by '{m.name}' ({_class(m.priority).name.lower()}), which {worth} ({what})")
        names = ", ".join(repr(v.model.name) for v in victims)
        self._add(m, node, f"copy {k}: {why}; displaces {names} (of its class together {_rate(lost)})")
        return [v.model for v in victims]

    def _victim_heat(self, copy: _Copy) -> float:
        """What displacing the copy costs: the worth of the model's last staying copy (so the model,
        placed again, is worth exactly what it lost and cannot take the place back: no cycles);
        nothing for a copy that is moving off its node anyway."""
        return 0.0 if copy.leaving else self._heat(copy.model, self.staying_count[copy.model.name])

    def _victims(self, m: ModelView, heat: float, node: _Node) -> tuple[list[_Copy], float, float] | None:
        """The copies to displace on `node` for the model to fit, the worth they serve of its class
        and of lower classes, or None.

        A copy may displace copies of lower classes, and copies of its own class that together are
        worth less than it by the margin; never pinned ones, never ones on other devices. Taken in
        the node's displacement order (lowest class first, then least worth per byte, then least
        recently used), the victims are the shortest prefix that frees enough: found by bisection
        on running sums, and accepted if the worth of its class in it is below the bar."""
        deficit = m.footprint_bytes - node.free(m.device_kind)
        order = self._victim_order(node, m.device_kind)
        lower, allowed = order.segment(_class(m.priority))
        if allowed == 0 or order.freed[allowed - 1] < deficit:
            return None
        last = bisect.bisect_left(order.freed, deficit, 0, allowed)
        below = order.lost[min(last, lower - 1)] if lower else 0.0
        lost = order.lost[last] if last >= lower else 0.0
        if lost and not lost < heat / (1 + self.policy.displace_margin):
            return None
        if last >= lower and heat == 0:
            return None  # a copy worth nothing displaces nothing of its class
        return order.copies[: last + 1], lost, below

    def _victim_order(self, node: _Node, kind: str) -> _Order:
        """The node's copies on devices of `kind` in displacement order, with running sums; kept
        until a copy on the node, or a copy of a model it holds, changes (see _changed)."""
        cached = node.victim_order.get(kind)
        if cached is not None:
            return cached
        entries = []
        for c in node.copies.values():
            if c.model.device_kind != kind or _class(c.model.priority) == _PINNED:
                continue
            worth = self._victim_heat(c)
            entries.append(
                (-int(_class(c.model.priority)), worth / max(1, c.bytes), c.last_used, c.model.name, worth, c)
            )
        entries.sort(key=lambda e: e[:4])
        order = _Order([e[0] for e in entries], [e[5] for e in entries], [], [])
        freed, lost = 0, 0.0
        for i, e in enumerate(entries):
            if i and e[0] != entries[i - 1][0]:
                lost = 0.0  # worth is summed within a class
            freed, lost = freed + e[5].bytes, lost + e[4]
            order.freed.append(freed)
            order.lost.append(lost)
        node.victim_order[kind] = order
        return order

    def _score(self, m: ModelView, node: _Node, zones: Mapping[str, int]) -> tuple:
        zone = zones.get(self._zone(node.view.id), 0)
        if self.policy.strategy == Strategy.BINPACK:
            return (zone, node.free(m.device_kind) - m.footprint_bytes, len(node.copies), node.view.id)
        return (zone, -node.free_fraction_after(m.device_kind, m.footprint_bytes), len(node.copies), node.view.id)

    def _zone(self, node: str) -> str:
        return self.views[node].labels.get(self.policy.zone_label, "")

    def _zone_counts(self, copies: Iterable[_Copy]) -> dict[str, int]:
        counts: dict[str, int] = defaultdict(int)
        for c in copies:
            counts[self._zone(c.node)] += 1
        return counts

    # Filters ---------------------------------------------------------------------------------

    def _fits_node(self, m: ModelView, node: _Node) -> str | None:
        """Why a live node cannot hold the model, or None: the filters that hold for a copy it has."""
        view = node.view
        if view.draining:
            return "is draining"
        if not node.devices(m.device_kind):
            return f"has no {m.device_kind} device"
        missing = m.node_selector and missing_labels(m.node_selector, view.labels)
        if missing:
            return "lacks the labels " + ", ".join(f"{k}={v}" for k, v in sorted(missing.items()))
        return None

    def _eligible(self, m: ModelView, node: _Node) -> str | None:
        """Why the node cannot take a new copy of the model, or None."""
        why = self._fits_node(m, node)
        if why is not None:
            return why
        if node.budget(m.device_kind) < m.footprint_bytes:
            return f"has a {m.device_kind} budget of {_gib(node.budget(m.device_kind))}"
        if m.name in self.copies and node.view.id in self.copies[m.name]:
            return "holds a copy already"
        return node.barred.get(m.name)

    def _pend(self, m: ModelView, *, some_node_fits: bool, heat: float) -> None:
        need = self.needs[m.name]
        placed = self.staying_count[m.name]
        if some_node_fits:
            worth = "a request waits for it" if heat == math.inf else f"its next copy is worth {_rate(heat)}"
            matching = [n for n in self.nodes.values() if self._eligible(m, n) is None]
            roomiest = max(matching, key=lambda n: (n.free(m.device_kind), n.view.id), default=None)
            free = f" ({roomiest.view.id})" if roomiest is not None else ""
            largest = _gib(max(0, roomiest.free(m.device_kind))) if roomiest is not None else _gib(0)
            reason = (
                f"the largest free {m.device_kind} memory of a matching node is {largest}{free}, below its "
                f"footprint {_gib(m.footprint_bytes)}, and {worth}: every copy that could make room is pinned, "
                f"of a higher class, or not colder by a factor of {1 + self.policy.displace_margin:g}"
            )
        else:
            reason = self._why_no_node(m)
        self.pending[m.name] = Pending(m.name, need.target, placed, reason, some_node_fits)

    def _why_no_node(self, m: ModelView) -> str:
        """The filter that rules out the most nodes, in words an operator can act on: no device of
        the model's kind, no node with its labels, no budget as large as it, or each node's reason."""
        if not self.nodes:
            return "no node is live"
        kind, nodes = m.device_kind, list(self.nodes.values())
        kinds = sorted({device_kind(d) for n in nodes for d in n.capacity})
        if all(not n.devices(kind) for n in nodes):
            return f"no live node has a {kind} device (they have: {', '.join(kinds)})"
        with_device = [n for n in nodes if n.devices(kind)]
        if m.node_selector and all(missing_labels(m.node_selector, n.view.labels) for n in with_device):
            wanted = ", ".join(f"{k}={v}" for k, v in sorted(m.node_selector.items()))
            return f"no live node with a {kind} device carries the labels {wanted} (the model's node_selector)"
        matching = [n for n in with_device if self._fits_node(m, n) is None]
        if matching and all(n.budget(kind) < m.footprint_bytes for n in matching):
            largest = max(matching, key=lambda n: (n.budget(kind), n.view.id))
            return (
                f"the largest {kind} budget of a matching live node is {_gib(largest.budget(kind))} "
                f"({largest.view.id}), below its footprint {_gib(m.footprint_bytes)}"
            )
        counts: dict[str, list[str]] = defaultdict(list)
        for node in nodes:
            counts[self._eligible(m, node) or "?"].append(node.view.id)
        parts = []
        for why, ids in sorted(counts.items(), key=lambda item: (-len(item[1]), item[0])):
            shown = ", ".join(ids[:3]) + (f" and {len(ids) - 3} more" if len(ids) > 3 else "")
            parts.append(f"{shown} {why}")
        size = _gib(m.footprint_bytes)
        return f"no live node can take a copy of '{m.name}' ({kind}, {size}): " + "; ".join(parts)

    # Recording -------------------------------------------------------------------------------

    def _changed(self, model: str, node: _Node) -> None:
        """A copy of `model` came or went on `node`: its order, and the orders of the nodes holding
        the model's other copies (whose worth just changed), are made again when next needed."""
        node.victim_order.clear()
        for other in self.copies[model]:
            self.nodes[other].victim_order.clear()

    def _add(self, m: ModelView, node: _Node, reason: str) -> None:
        self._changed(m.name, node)
        copy = _Copy(m, node.view.id, m.footprint_bytes, False, self.now, 0.0)
        node.hold(copy)
        self.copies[m.name][node.view.id] = copy
        self.staying_count[m.name] += 1
        self.added[(m.name, node.view.id)] = PlacementChange(Action.ADD, m.name, node.view.id, m.version, reason)

    def _drop(self, copy: _Copy, reason: str) -> None:
        self._changed(copy.model.name, self.nodes[copy.node])
        self.nodes[copy.node].release(copy.model.name)
        del self.copies[copy.model.name][copy.node]
        if not copy.leaving:
            self.staying_count[copy.model.name] -= 1
        key = (copy.model.name, copy.node)
        if self.added.pop(key, None) is None:
            self.retried.pop(key, None)
            self.removed[key] = PlacementChange(Action.REMOVE, key[0], key[1], copy.model.version, reason)

    def _remove(self, p: PlacementView, reason: str) -> None:
        self.removed[(p.model, p.node)] = PlacementChange(Action.REMOVE, p.model, p.node, p.version, reason)

    def _retry(self, model: str, node: str, version: int, reason: str) -> None:
        self.retried[(model, node)] = PlacementChange(Action.RETRY, model, node, version, reason)

    def _result(self) -> PlacementPlan:
        changes = dict(self.retried)
        for key, change in self.removed.items():
            if key in self.added:  # a record dropped and placed again on the same node: redo it
                added = self.added.pop(key)
                changes[key] = replace(added, action=Action.RETRY, reason=f"{added.reason} (was: {change.reason})")
            else:
                changes[key] = change
        changes.update(self.added)
        order = {Action.REMOVE: 0, Action.RETRY: 1, Action.ADD: 2}
        return PlacementPlan(
            changes=tuple(sorted(changes.values(), key=lambda c: (order[c.action], c.model, c.node))),
            pending=tuple(self.pending[name] for name in sorted(self.pending)),
        )
