"""Properties of the placer over random fleets (hypothesis): what must hold whatever the fleet.

- a plan written and planned again changes nothing (the placer does not flap on its own output);
- the order of the inputs does not change the plan (it is deterministic);
- with loaders acting on each plan, the fleet settles in a few rounds;
- it never adds a copy where the model cannot go, nor beyond a node's memory as it accounts it,
  and never displaces a pinned copy or a copy of a higher class.

About 180 fleets in all, in a few seconds; a failure prints the smallest fleet that breaks it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from modelplane.common.types import ModelState, Priority
from modelplane.registry.placement import (
    EVICTED_REASON,
    DeviceView,
    ModelView,
    NodeView,
    PlacementView,
    apply_plan,
    plan,
)
from tests.registry.test_placement import GIB, NOW, loaders_act, settle

ZONE = "topology.kubernetes.io/zone"
PRIORITIES = [Priority.PINNED, Priority.HIGH, Priority.NORMAL, Priority.LOW]
RATES = [0.0, 0.001, 0.004, 0.5, 3.0, 40.0]


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[NodeView], list[ModelView], list[PlacementView], dict[str, float]]:
    nodes = []
    for i in range(draw(st.integers(1, 6))):
        devices = [DeviceView("cpu", draw(st.integers(4, 24)) * GIB)]
        devices += [DeviceView(f"gpu:{g}", draw(st.integers(8, 24)) * GIB) for g in range(draw(st.integers(0, 2)))]
        labels = {ZONE: draw(st.sampled_from(["z1", "z2"])), "tier": draw(st.sampled_from(["fast", "slow"]))}
        live, draining = draw(st.booleans()) or i == 0, draw(st.integers(0, 4)) == 0
        nodes.append(NodeView(f"n{i}", tuple(devices), live=live, draining=draining, labels=labels))
    models = []
    for i in range(draw(st.integers(1, 8))):
        low = draw(st.integers(0, 2))
        models.append(
            ModelView(
                f"m{i}",
                draw(st.integers(1, 10)) * GIB,
                version=draw(st.integers(1, 2)),
                device_kind=draw(st.sampled_from(["cpu", "cpu", "gpu"])),
                priority=draw(st.sampled_from(PRIORITIES)),
                desired_loaded=draw(st.booleans()),
                min_copies=low,
                max_copies=draw(st.sampled_from([0, max(1, low), 3])),
                node_selector=draw(st.sampled_from([{}, {}, {"tier": "fast"}])),
                on_demand=draw(st.integers(0, 3)) == 0,
                copy_capacity_rps=draw(st.sampled_from([0.0, 1.0, 10.0])),
                last_request_time=draw(st.sampled_from([None, NOW - 30, NOW - 7200])),
            )
        )
    placements = []
    for m in models:
        for n in nodes:
            if draw(st.integers(0, 3)):
                continue
            kind = draw(st.sampled_from(["ready", "ready", "loading", "failed", "evicted"]))
            observed = {
                "ready": {"observed_generation": 1, "state": ModelState.READY, "footprint_bytes": m.footprint_bytes},
                "loading": {"state": ModelState.LOADING},
                "failed": {"observed_generation": 1, "state": ModelState.FAILED, "reason": "broken"},
                "evicted": {"observed_generation": 1, "state": ModelState.STAGED, "reason": EVICTED_REASON},
            }[kind]
            age = draw(st.sampled_from([10.0, 3600.0]))
            version = draw(st.sampled_from([1, m.version]))
            placements.append(
                PlacementView(m.name, n.id, version=version, placed_time=NOW - age, observed_time=NOW - age, **observed)
            )
    # Each node reports what its READY copies hold, plus some memory no placement explains.
    sizes = {m.name: m for m in models}
    reported = []
    for n in nodes:
        devices = []
        for d in n.devices:
            kind = d.name.partition(":")[0]
            held = sum(
                p.footprint_bytes
                for p in placements
                if p.node == n.id and p.ready and sizes[p.model].device_kind == kind
            )
            devices.append(replace(d, used_bytes=held + draw(st.integers(0, 2)) * GIB))
        reported.append(replace(n, devices=tuple(devices)))
    rates = {m.name: draw(st.sampled_from(RATES)) for m in models}
    return reported, models, placements, rates


# No example database: nothing is written into the checkout; a failure prints its example.
FAST = settings(max_examples=40, deadline=None, database=None)


@FAST
@given(fleets())
def test_a_written_plan_planned_again_changes_nothing(fleet: tuple) -> None:
    nodes, models, placements, rates = fleet
    first = plan(nodes, models, placements, rates, NOW)
    written = apply_plan(placements, first, NOW)
    again = plan(nodes, models, written, rates, NOW)
    assert again.changes == (), (first.changes, again.changes)


@FAST
@given(fleets())
def test_the_order_of_the_inputs_does_not_change_the_plan(fleet: tuple) -> None:
    nodes, models, placements, rates = fleet
    forward = plan(nodes, models, placements, rates, NOW)
    backward = plan(nodes[::-1], models[::-1], placements[::-1], dict(reversed(rates.items())), NOW)
    assert forward == backward


@FAST
@given(fleets())
def test_with_loaders_acting_the_fleet_settles(fleet: tuple) -> None:
    nodes, models, placements, rates = fleet
    nodes, placements = loaders_act(nodes, models, placements, NOW)
    settle(nodes, models, placements, rates, rounds=8)


@settings(max_examples=60, deadline=None, database=None)
@given(fleets())
def test_copies_go_only_where_they_fit_and_displace_only_colder_lower_unpinned_ones(fleet: tuple) -> None:
    nodes, models, placements, rates = fleet
    result = plan(nodes, models, placements, rates, NOW)
    by_node, by_model = {n.id: n for n in nodes}, {m.name: m for m in models}
    written = apply_plan(placements, result, NOW)
    for change in result.adds:
        n, m = by_node[change.node], by_model[change.model]
        assert n.live and not n.draining
        assert any(d.name.partition(":")[0] == m.device_kind for d in n.devices)
        assert all(n.labels.get(k) == v for k, v in m.node_selector.items())

    def staying(p: PlacementView) -> bool:
        n, m = by_node.get(p.node), by_model[p.model]
        return (
            n is not None
            and n.live
            and not n.draining
            and all(n.labels.get(k) == v for k, v in m.node_selector.items())
        )

    for m in models:
        copies = [p for p in written if p.model == m.name and not (p.failed or p.given_up)]
        assert len({p.node for p in copies}) == len(copies)
        if m.max_copies and any(c.model == m.name for c in result.adds):
            # A copy on a draining node stays until its replacement is READY: not counted.
            assert len([p for p in copies if staying(p)]) <= m.max_copies
    # The placer's own account after the plan: what the node reported that no copy explains, plus
    # the copies it keeps; a device that received a copy is within its budget on that account.
    received = {(c.node, by_model[c.model].device_kind) for c in result.adds}
    for n in nodes:
        for d in n.devices:
            kind = d.name.partition(":")[0]
            if (n.id, kind) not in received:
                continue
            resident = [p for p in placements if p.node == n.id and p.acted and p.state in (ModelState.READY,)]
            other = max(
                0,
                d.used_bytes
                - sum(by_model[p.model].footprint_bytes for p in resident if by_model[p.model].device_kind == kind),
            )
            kept = [p for p in written if p.node == n.id and not (p.failed or p.given_up) and p.model in by_model]
            total = other + sum(
                by_model[p.model].footprint_bytes for p in kept if by_model[p.model].device_kind == kind
            )
            assert total <= d.capacity_bytes, (n.id, d.name)
    # Displacement: never a pinned copy, never one of a higher class than the copy that took its place.
    added_class: dict[str, list[Priority]] = defaultdict(list)
    for c in result.adds + result.retries:
        added_class[c.node].append(by_model[c.model].priority)
    for c in result.removes:
        if not c.reason.startswith("displaced by"):
            continue
        victim = by_model[c.model]
        assert victim.priority != Priority.PINNED
        assert any(victim.priority >= mine for mine in added_class[c.node])
