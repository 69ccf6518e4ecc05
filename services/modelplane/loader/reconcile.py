"""Reconciliation of one node: what it should hold against what its Triton and its residency hold.

Level-triggered: each round reads the whole picture again (what Triton holds, what the desired
source says) and returns the actions that converge them, so a restart or a lost event changes
nothing. It loads what this node should hold and does not, unloads what Triton holds and this
node should not, puts back to a true state what a crash or a Triton restart left untrue, and
rebuilds the memory budget from what Triton holds. It never touches the state of a model this
node does not own, nor of one its residency is working on.

What this node should hold comes from a `DesiredSource`: today `CatalogueDesire` (one node holds
every model; those the registry wants LOADED); with placements (issue 17), this node's placements.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from modelplane.common.types import WORKING_STATES, DesiredState, Model, ModelState
from modelplane.loader.budget import effective
from modelplane.loader.decisions import Discard, Load, Reset, Unload
from modelplane.loader.memory import MemoryManager
from modelplane.loader.triton_control import TritonControl
from modelplane.registry.client import RegistryClient


@dataclass(frozen=True)
class NodeView:
    """What this node should hold, as its desired source reads it now."""

    # Every model of the catalogue, as this node sees it: its state is that of this node's copy
    # (today the registry's model state; with placements, this node's placement state).
    models: Mapping[str, Model]
    # The models whose state on this node this node writes: only these are reset or unloaded with
    # a record. Today every model; with placements, those placed on this node.
    owned: frozenset[str]
    # The models this node should hold loaded (a subset of `owned`).
    wanted: frozenset[str]


class DesiredSource(Protocol):
    async def read(self) -> NodeView:
        """What this node should hold now."""
        ...


class CatalogueDesire:
    """One node holding the whole catalogue: it owns every model, and should hold loaded those
    whose desired state is LOADED."""

    def __init__(self, registry: RegistryClient) -> None:
        self.registry = registry

    async def read(self) -> NodeView:
        models = {m.name: m for m in await self.registry.list_models()}
        wanted = frozenset(name for name, m in models.items() if m.desired_state == DesiredState.LOADED)
        return NodeView(models=models, owned=frozenset(models), wanted=wanted)


@dataclass(frozen=True)
class ReconcileResult:
    loaded: list[str] = field(default_factory=list)
    unloaded: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ReconcilePlan:
    """The actions of one round, in the order they are carried out: resets first (a load then
    starts from a true state), loads most important first, then unloads (each awaited in turn)."""

    resets: list[Reset] = field(default_factory=list)
    loads: list[Load] = field(default_factory=list)
    unloads: list[Unload | Discard] = field(default_factory=list)

    @property
    def result(self) -> ReconcileResult:
        unloaded = [u.name for u in self.unloads if isinstance(u, Unload) or u.unload]
        return ReconcileResult(loaded=[load.model.name for load in self.loads], unloaded=unloaded)


def plan_reconcile(
    view: NodeView, in_triton: Mapping[str, str], busy: set[str], last_used: Callable[[str], float]
) -> ReconcilePlan:
    """The actions that converge this node. `in_triton`: Triton's state of each model in its
    repository; `busy`: the models the residency is loading or unloading now; `last_used`: when
    each model was last requested (seconds since the epoch), to restore the most recent first."""
    ready = {name for name, state in in_triton.items() if state == "READY"}
    resets: list[Reset] = []
    to_load: list[Model] = []
    for name, model in view.models.items():
        if name not in view.owned or name in busy:
            continue
        stale = model.state in WORKING_STATES or (model.state == ModelState.READY and name not in ready)
        wanted = name in view.wanted
        state = model.state
        if model.state in WORKING_STATES or (stale and not wanted):
            # Work that no job of this loader is doing was cut off (this loader or Triton was
            # killed): back to where its files allow, so a new load starts from a true state.
            state = ModelState.STAGED if model.status.profile is not None else ModelState.REGISTERED
            cut = f"{model.state.name.lower()} was interrupted" if model.state in WORKING_STATES else ""
            resets.append(Reset(model, state, f"{cut or 'not loaded in Triton'} (found by reconciliation)"))
        # A FAILED model needs a person; an explicit load retries it.
        if wanted and (state != ModelState.READY or stale) and state != ModelState.FAILED:
            to_load.append(model)

    def restore_order(model: Model) -> tuple[int, float]:
        # Most important first, so a smaller budget after a restart keeps what matters.
        return (int(effective(model.spec.priority)), -last_used(model.name))

    loads = [Load(model, "reconcile") for model in sorted(to_load, key=restore_order)]
    unloads: list[Unload | Discard] = []
    for name, state in in_triton.items():
        known = name in view.models
        loaded_unwanted = state == "READY" and name not in view.wanted and name not in busy
        if known and name in view.owned:
            if loaded_unwanted:
                unloads.append(Unload(name, "reconcile"))
        elif not known:  # not in the catalogue at all: nothing to record, its entry goes too
            unloads.append(Discard(name, unload=loaded_unwanted))
        elif loaded_unwanted:  # another node's to record: out of this Triton, entry kept for later
            unloads.append(Discard(name, unload=True, remove_entry=False))
    return ReconcilePlan(resets=resets, loads=loads, unloads=unloads)


class Reconciler:
    def __init__(self, desired: DesiredSource, triton: TritonControl, memory: MemoryManager) -> None:
        self.desired = desired
        self.triton = triton
        self.memory = memory

    async def plan(self, busy: Callable[[], set[str]]) -> ReconcilePlan:
        """Reads Triton and the desired source, rebuilds the budget from what Triton holds, and
        returns the round's actions. `busy` says what the residency is working on right now."""
        in_triton = {m.name: m.state for m in await self.triton.index()}
        view = await self.desired.read()
        ready = {n: view.models[n] for n, s in in_triton.items() if s == "READY" and n in view.models}
        working = busy()
        await self.memory.sync_with_triton(ready, busy=working)
        return plan_reconcile(view, in_triton, working, lambda name: self.memory.last_request(name) or 0.0)
