"""The placer's decisions (registry/placement.py), rule by rule, and their stability.

Pure function, so no services: each test builds a small fleet, asks for a plan, and checks the
changes and their reasons as an operator reading `modelplane` output would. `settle` plays the
loaders: it applies a plan, marks every placement READY on its node (memory used as the copies
hold), and plans again until nothing changes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace

import pytest

from modelplane.common.types import ModelState, Priority
from modelplane.registry.placement import (
    Action,
    DeviceView,
    ModelView,
    NodeView,
    PlacementPlan,
    PlacementPolicy,
    PlacementView,
    apply_plan,
    plan,
)

GIB = 2**30
NOW = 1_000_000.0
HOUR = 3600.0


def node(
    name: str, gib: float = 16, *, gpus: int = 0, gpu_gib: float = 24, used_gib: float = 0, **kw: object
) -> NodeView:
    devices = [DeviceView("cpu", int(gib * GIB), int(used_gib * GIB))]
    devices += [DeviceView(f"gpu:{i}", int(gpu_gib * GIB)) for i in range(gpus)]
    return NodeView(name, tuple(devices), **kw)  # type: ignore[arg-type]


def model(name: str, gib: float = 2, **kw: object) -> ModelView:
    return ModelView(name, int(gib * GIB), **kw)  # type: ignore[arg-type]


def held(m: ModelView, node_id: str, *, ready: bool = True, age: float = HOUR, **kw: object) -> PlacementView:
    """A placement the placer made `age` seconds ago and the node's loader made READY."""
    observed = {"observed_generation": 1, "state": ModelState.READY, "footprint_bytes": m.footprint_bytes}
    return PlacementView(m.name, node_id, version=m.version, placed_time=NOW - age, **(observed if ready else {}) | kw)  # type: ignore[arg-type]


def where(placements: Iterable[PlacementView], name: str) -> list[str]:
    return sorted(p.node for p in placements if p.model == name)


def changes(result: PlacementPlan) -> list[tuple[str, str, str]]:
    return [(c.action.value, c.model, c.node) for c in result.changes]


def loaders_act(
    nodes: list[NodeView], models: list[ModelView], placements: list[PlacementView], now: float
) -> tuple[list[NodeView], list[PlacementView]]:
    """Every node's loader makes its placements READY; each node reports the memory they hold."""
    sizes = {m.name: m for m in models}
    acted = [
        p
        if p.acted
        else replace(
            p,
            observed_generation=p.generation,
            state=ModelState.READY,
            footprint_bytes=sizes[p.model].footprint_bytes,
            observed_time=now,
        )
        for p in placements
    ]
    reported = []
    for n in nodes:
        devices = []
        for d in n.devices:
            kind = d.name.partition(":")[0]
            used = sum(p.footprint_bytes for p in acted if p.node == n.id and sizes[p.model].device_kind == kind)
            devices.append(replace(d, used_bytes=used))
        reported.append(replace(n, devices=tuple(devices)))
    return reported, acted


def settle(
    nodes: list[NodeView],
    models: list[ModelView],
    placements: list[PlacementView],
    rates: Mapping[str, float],
    *,
    now: float = NOW,
    policy: PlacementPolicy | None = None,
    rounds: int = 6,
) -> tuple[list[NodeView], list[PlacementView], PlacementPlan]:
    """Plans, applies and lets the loaders act until a plan changes nothing; fails if it never does."""
    for _ in range(rounds):
        result = plan(nodes, models, placements, rates, now, policy)
        if result.empty:
            return nodes, placements, result
        placements = apply_plan(placements, result, now)
        nodes, placements = loaders_act(nodes, models, placements, now)
    raise AssertionError(f"no fixed point after {rounds} rounds: {changes(result)}")


# Filters ------------------------------------------------------------------------------------


def test_a_gpu_model_goes_only_to_a_node_with_gpus_and_says_so_when_there_is_none() -> None:
    llm = model("llm", 8, device_kind="gpu", desired_loaded=True)
    result = plan([node("cpu-0"), node("gpu-0", gpus=2)], [llm], [], {}, NOW)
    assert changes(result) == [("add", "llm", "gpu-0")]

    result = plan([node("cpu-0"), node("cpu-1")], [llm], [], {}, NOW)
    assert result.empty
    assert result.pending[0].model == "llm"
    assert result.pending[0].reason == "no live node has a gpu device (they have: cpu)"


def test_a_gpu_model_held_by_a_node_without_a_gpu_is_removed_at_once_never_kept() -> None:
    # The node re-registered without its GPU (a failed card): the placement can never be a copy.
    llm = model("llm", 8, device_kind="gpu", desired_loaded=True)
    result = plan([node("cpu-0"), node("gpu-0", gpus=1)], [llm], [held(llm, "cpu-0")], {}, NOW)
    assert changes(result) == [("remove", "llm", "cpu-0"), ("add", "llm", "gpu-0")]
    assert result.removes[0].reason == "cpu-0 has no gpu device; the copy is placed again elsewhere"

    result = plan([node("cpu-0")], [llm], [held(llm, "cpu-0")], {}, NOW)
    assert changes(result) == [("remove", "llm", "cpu-0")]
    assert result.pending[0].reason == "no live node has a gpu device (they have: cpu)"


def test_a_node_selector_picks_nodes_by_their_labels_and_names_the_missing_ones() -> None:
    fleet = [node("a", labels={"gpu": "l4"}), node("b", labels={"gpu": "a100", "zone": "x"})]
    big = model("big", node_selector={"gpu": "a100"}, desired_loaded=True)
    assert changes(plan(fleet, [big], [], {}, NOW)) == [("add", "big", "b")]

    nowhere = model("nowhere", node_selector={"gpu": "h100"}, desired_loaded=True)
    result = plan(fleet, [nowhere], [], {}, NOW)
    assert result.empty
    assert (
        result.pending[0].reason
        == "no live node with a cpu device carries the labels gpu=h100 (the model's node_selector)"
    )


def test_a_model_bigger_than_every_budget_is_pending_with_the_sizes() -> None:
    huge = model("huge", 40, desired_loaded=True)
    result = plan([node("a", 16), node("b", 32)], [huge], [], {}, NOW)
    assert result.empty
    assert result.pending[0].reason == (
        "the largest cpu budget of a matching live node is 32.0 GiB (b), below its footprint 40.0 GiB"
    )
    assert not result.pending[0].room_may_come


def test_lost_and_draining_nodes_take_no_new_copies() -> None:
    fleet = [node("a", live=False), node("b", draining=True), node("c")]
    m = model("m", desired_loaded=True)
    assert changes(plan(fleet, [m], [], {}, NOW)) == [("add", "m", "c")]
    result = plan(fleet[:2], [m], [], {}, NOW)
    assert result.empty
    assert result.pending[0].reason == "no live node can take a copy of 'm' (cpu, 2.0 GiB): b is draining"


def test_memory_the_node_reports_beyond_its_placements_is_not_free() -> None:
    # a reports 12 GiB used by nothing the placer placed (the runtime, copies still unloading).
    fleet = [node("a", 16, used_gib=12), node("b", 8)]
    m = model("m", 5, desired_loaded=True)
    assert changes(plan(fleet, [m], [], {}, NOW)) == [("add", "m", "b")]


# Scores -------------------------------------------------------------------------------------


def test_spread_picks_the_emptiest_node_and_binpack_the_fullest_that_fits() -> None:
    small, medium = model("small", 2), model("medium", 6)
    fleet = [node("a", 16), node("b", 16), node("c", 16)]
    held_now = [held(small, "a"), held(medium, "b")]
    fleet = [node("a", 16, used_gib=2), node("b", 16, used_gib=6), node("c", 16)]
    new = model("new", 4, desired_loaded=True)
    spread = plan(fleet, [small, medium, new], held_now, {"small": 1, "medium": 1}, NOW)
    assert changes(spread) == [("add", "new", "c")]
    assert spread.adds[0].reason.endswith("c has 16.0 GiB free (spread)")
    packed = plan(fleet, [small, medium, new], held_now, {"small": 1, "medium": 1}, NOW, PlacementPolicy("binpack"))
    assert changes(packed) == [("add", "new", "b")]


def test_copies_of_one_model_prefer_different_zones() -> None:
    zone = "topology.kubernetes.io/zone"
    fleet = [node("a", 32, labels={zone: "z1"}), node("b", 30, labels={zone: "z1"}), node("c", 8, labels={zone: "z2"})]
    m = model("m", desired_loaded=True, min_copies=2)
    _, placements, _ = settle(fleet, [m], [], {})
    assert where(placements, "m") == ["a", "c"]


# Copies -------------------------------------------------------------------------------------


def test_min_copies_go_to_distinct_nodes_and_max_copies_caps_the_rate() -> None:
    fleet = [node(f"n{i}") for i in range(4)]
    m = model("m", desired_loaded=True, min_copies=2, max_copies=3)
    _, placements, _ = settle(fleet, [m], [], {})
    assert len(where(placements, "m")) == 2
    _, placements, result = settle(fleet, [m], [], {"m": 500.0})
    assert len(where(placements, "m")) == 3
    assert result.empty


def test_copies_rise_with_the_rate_and_fall_back_with_hysteresis_and_age() -> None:
    fleet = [node(f"n{i}") for i in range(5)]
    m = model("m", copy_capacity_rps=10.0)
    nodes, placements, _ = settle(fleet, [m], [], {"m": 25.0})
    assert len(where(placements, "m")) == 3  # ceil(25 / 10)
    first = plan(fleet, [m], [], {"m": 25.0}, NOW)
    assert [c.reason.split(";")[0] for c in first.adds] == ["copy 1: expected 25 requests/s"] + [
        f"copy {k}: expected 25 requests/s" for k in (2, 3)
    ]
    assert "; 3 copies of 10 requests/s each serve it; " in first.adds[0].reason

    # 18 requests/s: 2 copies would run at 90%, above the 70% scale-down mark: all 3 stay.
    assert plan(nodes, [m], placements, {"m": 18.0}, NOW + HOUR).empty
    # 13 requests/s: 2 copies at 65% will do; but copies younger than min_copy_age stay.
    assert plan(nodes, [m], placements, {"m": 13.0}, NOW + 10).empty
    down = plan(nodes, [m], placements, {"m": 13.0}, NOW + HOUR)
    assert [c.action for c in down.changes] == [Action.REMOVE]
    assert down.changes[0].reason == "fewer copies: 2 copies serve its 13 requests/s"
    # Once removed, the same rate neither adds nor removes (rate 13 needs 2, keeps up to 2).
    after = apply_plan(placements, down, NOW + HOUR)
    assert plan(nodes, [m], after, {"m": 13.0}, NOW + HOUR).empty


def test_the_last_copy_goes_when_the_model_is_idle_past_its_ttl_unless_kept_loaded() -> None:
    fleet = [node("a")]
    on_demand, kept = model("on-demand"), model("kept", desired_loaded=True)
    placements = [held(on_demand, "a"), held(kept, "a")]
    recent = [replace(on_demand, last_request_time=NOW - 60), replace(kept, last_request_time=NOW - 60)]
    assert plan(fleet, recent, placements, {}, NOW).empty

    idle = [replace(on_demand, last_request_time=NOW - 2 * HOUR), replace(kept, last_request_time=NOW - 2 * HOUR)]
    result = plan(fleet, idle, placements, {}, NOW)
    assert changes(result) == [("remove", "on-demand", "a")]
    assert "not wanted: not kept loaded, unused for 1800 s and no requests expected" in result.changes[0].reason
    # Its own TTL wins over the policy's: 3 hours keeps it, and 0 means never idle.
    for ttl in (3 * HOUR, 0.0):
        longer = [replace(idle[0], idle_ttl_seconds=ttl), idle[1]]
        assert plan(fleet, longer, placements, {}, NOW).empty
    # A pinned model is never unloaded for idleness, as the loader never unloads one.
    pinned = [replace(idle[0], priority=Priority.PINNED), idle[1]]
    assert plan(fleet, pinned, placements, {}, NOW).empty


def test_an_expected_rate_places_a_copy_ahead_of_requests_and_a_hovering_rate_does_not_flap() -> None:
    fleet = [node("a")]
    m = model("m")
    warm = 1 / 300
    result = plan(fleet, [m], [], {"m": warm}, NOW)
    assert changes(result) == [("add", "m", "a")]
    assert "expected 0.2 requests/min" in result.adds[0].reason
    placed = [held(m, "a")]
    # Between half the warm rate and the warm rate: neither placed anew nor removed.
    assert plan(fleet, [m], [], {"m": 0.7 * warm}, NOW).empty
    assert plan(fleet, [m], placed, {"m": 0.7 * warm}, NOW).empty
    assert changes(plan(fleet, [m], placed, {"m": 0.4 * warm}, NOW)) == [("remove", "m", "a")]


# On demand, priorities and displacement -------------------------------------------------------


def test_a_request_for_a_model_without_a_copy_displaces_the_coldest_copy_in_the_fleet() -> None:
    cold, warm, hot = model("cold", 6), model("warm", 6), model("hot", 6)
    fleet = [node("a", 12, used_gib=12), node("b", 12, used_gib=6)]
    # a: hot + warm (full); b: cold, 6 GiB free but the new model needs 8.
    placements = [held(hot, "a"), held(warm, "a"), held(cold, "b")]
    asked = model("asked", 8, on_demand=True)
    rates = {"hot": 5.0, "warm": 0.5, "cold": 0.01}
    result = plan(fleet, [cold, warm, hot, asked], placements, rates, NOW, only={"asked"})
    assert changes(result) == [("remove", "cold", "b"), ("add", "asked", "b")]
    assert result.removes[0].reason == (
        "displaced by 'asked' (normal), which waits for a request (normal, 0.6 requests/min)"
    )
    assert result.adds[0].reason.startswith("copy 1: a request waits for it; displaces 'cold'")


def test_a_hotter_model_displaces_a_colder_one_only_by_the_margin() -> None:
    fleet = [node("a", 8, used_gib=6)]
    old = model("old", 6)
    placements = [held(old, "a")]
    new = model("new", 6)
    assert plan(fleet, [old, new], placements, {"old": 1.0, "new": 1.4}, NOW).adds == ()
    result = plan(fleet, [old, new], placements, {"old": 1.0, "new": 1.6}, NOW)
    assert changes(result) == [("remove", "old", "a"), ("add", "new", "a")]
    assert result.pending[0].model == "old"  # it is still wanted, and nothing colder is left


def test_copies_displaced_together_must_be_worth_less_than_the_copy_together() -> None:
    # Two copies of 3 GiB at 1 request/s each; the new model needs both places (6 GiB).
    fleet = [node("a", 6, used_gib=6)]
    one, two = model("one", 3), model("two", 3)
    placements = [held(one, "a"), held(two, "a")]
    new = model("new", 6)
    # Each is colder than 1.6 by the margin, but together (2.0) they serve more than it: no.
    assert plan(fleet, [one, two, new], placements, {"one": 1.0, "two": 1.0, "new": 1.6}, NOW).adds == ()
    result = plan(fleet, [one, two, new], placements, {"one": 1.0, "two": 1.0, "new": 3.1}, NOW)
    assert changes(result) == [("remove", "one", "a"), ("remove", "two", "a"), ("add", "new", "a")]
    assert result.adds[0].reason.endswith("displaces 'one', 'two' (of its class together 2 requests/s)")


def test_the_coldest_bytes_go_first_a_big_cold_copy_before_several_small_warm_ones() -> None:
    fleet = [node("a", 8, used_gib=8)]
    big, small = model("big", 4), [model(f"small-{i}", 1) for i in range(4)]
    placements = [held(big, "a")] + [held(m, "a") for m in small]
    rates = {"big": 0.2, **{m.name: 0.1 for m in small}}  # 0.05 per GiB against 0.1 per GiB
    result = plan(fleet, [big, *small, model("new", 3, on_demand=True)], placements, rates, NOW, only={"new"})
    assert changes(result) == [("remove", "big", "a"), ("add", "new", "a")]


def test_a_higher_class_displaces_a_lower_one_never_the_reverse_and_never_a_pinned_one() -> None:
    fleet = [node("a", 8, used_gib=6)]
    low = model("low", 6, priority=Priority.LOW)
    high = model("high", 6, priority=Priority.HIGH)
    # HIGH with almost no traffic displaces LOW with a lot.
    result = plan(fleet, [low, high], [held(low, "a")], {"low": 50.0, "high": 0.01}, NOW)
    assert changes(result) == [("remove", "low", "a"), ("add", "high", "a")]
    # LOW with a lot of traffic never displaces HIGH.
    result = plan(fleet, [low, high], [held(high, "a")], {"low": 50.0, "high": 0.01}, NOW)
    assert result.changes == ()
    assert "pinned, of a higher class, or not colder" in result.pending[0].reason
    # Nothing displaces a pinned model, not even a request waiting for a high one.
    pinned = model("pinned", 6, priority=Priority.PINNED)
    asked = model("asked", 6, priority=Priority.HIGH, on_demand=True)
    result = plan(fleet, [pinned, asked], [held(pinned, "a")], {"asked": 100.0}, NOW)
    assert result.changes == ()
    assert result.pending[0].model == "asked"


def test_a_model_the_operator_keeps_loaded_is_not_displaced_within_its_class() -> None:
    fleet = [node("a", 8, used_gib=6)]
    kept = model("kept", 6, desired_loaded=True)
    asked = model("asked", 6, on_demand=True)
    result = plan(fleet, [kept, asked], [held(kept, "a")], {"asked": 9.0}, NOW)
    assert result.changes == ()
    assert result.pending[0].reason.startswith(
        "the largest free cpu memory of a matching node is 2.0 GiB (a), below its footprint 6.0 GiB, "
        "and a request waits for it"
    )
    assert result.pending[0].room_may_come


def test_a_displaced_model_that_is_still_wanted_moves_to_a_node_with_room() -> None:
    fleet = [node("a", 8, used_gib=6), node("b", 8, used_gib=4)]
    kept_b = model("kept-b", 4, desired_loaded=True)
    old = model("old", 6)
    new = model("new", 6, priority=Priority.HIGH, node_selector={"only": "a"}, desired_loaded=True)
    fleet = [replace(fleet[0], labels={"only": "a"}), fleet[1]]
    # b has 4 GiB free: too little for old (6) until ... nothing: old is pending, with why.
    result = plan(fleet, [kept_b, old, new], [held(old, "a"), held(kept_b, "b")], {"old": 1.0}, NOW)
    assert changes(result) == [("remove", "old", "a"), ("add", "new", "a")]
    assert result.pending[0].model == "old"
    # With room on b, old moves there in the same plan.
    roomy = [fleet[0], node("b", 12, used_gib=4)]
    result = plan(roomy, [kept_b, old, new], [held(old, "a"), held(kept_b, "b")], {"old": 1.0}, NOW)
    assert changes(result) == [("remove", "old", "a"), ("add", "new", "a"), ("add", "old", "b")]
    assert result.pending == ()


# Moves --------------------------------------------------------------------------------------


def test_copies_on_a_lost_node_are_removed_and_placed_again_at_once() -> None:
    m = model("m", desired_loaded=True)
    fleet = [node("a", live=False), node("b")]
    result = plan(fleet, [m], [held(m, "a")], {}, NOW)
    assert changes(result) == [("remove", "m", "a"), ("add", "m", "b")]
    assert result.removes[0].reason == "node a is lost (its lease expired); the copy is placed again elsewhere"
    gone = plan([node("b")], [m], [held(m, "a")], {}, NOW)
    assert gone.removes[0].reason == "node a is lost (it is no longer registered); the copy is placed again elsewhere"


def test_a_draining_node_keeps_its_copy_until_the_replacement_is_ready() -> None:
    m = model("m", desired_loaded=True)
    fleet = [node("a", draining=True), node("b")]
    placements = [held(m, "a")]
    first = plan(fleet, [m], placements, {}, NOW)
    assert changes(first) == [("add", "m", "b")]
    placements = apply_plan(placements, first, NOW)
    assert plan(fleet, [m], placements, {}, NOW).empty  # b is still loading: a keeps serving
    fleet, placements = loaders_act(fleet, [m], placements, NOW)
    last = plan(fleet, [m], placements, {}, NOW)
    assert changes(last) == [("remove", "m", "a")]
    assert last.removes[0].reason == "moved: a is draining, and 1 READY copies are elsewhere"


def test_a_node_that_no_longer_matches_the_selector_hands_its_copy_over() -> None:
    m = model("m", desired_loaded=True, node_selector={"tier": "fast"})
    fleet = [node("a", labels={"tier": "slow"}), node("b", labels={"tier": "fast"})]
    _, placements, _ = settle(fleet, [m], [held(m, "a")], {})
    assert where(placements, "m") == ["b"]


def test_an_evicted_placement_bars_its_node_then_is_redone_there_in_one_decision() -> None:
    m = model("m", desired_loaded=True)
    evicted = held(m, "a", ready=False, observed_generation=1, state=ModelState.STAGED, reason="evicted: over budget")
    evicted = replace(evicted, observed_time=NOW - 60)
    # The copy goes elsewhere; the record stays and keeps a from being asked again.
    result = plan([node("a"), node("b", 8)], [m], [evicted], {}, NOW)
    assert changes(result) == [("add", "m", "b")]
    # With no other node, the eviction is respected: nothing changes, and the operator sees why.
    alone = plan([node("a")], [m], [evicted], {}, NOW)
    assert alone.changes == ()
    assert alone.pending[0].reason.endswith("a a's loader evicted it 60 s ago")
    # After the backoff, one decision: the record is redone on a (a new generation), not removed
    # in one plan and added back in the next.
    later = plan([node("a")], [m], [evicted], {}, NOW + HOUR)
    assert changes(later) == [("retry", "m", "a")]
    assert later.retries[0].reason.endswith("(was: a's loader evicted it 3660 s ago; it may be placed there again)")
    assert apply_plan([evicted], later, NOW + HOUR)[0].generation == 2


def test_a_failed_load_bars_its_node_for_the_backoff_then_is_retried_there() -> None:
    m = model("m", desired_loaded=True)
    failed = held(m, "a", ready=False, observed_generation=1, state=ModelState.FAILED, reason="checksum mismatch")
    failed = replace(failed, observed_time=NOW - 60)
    result = plan([node("a"), node("b")], [m], [failed], {}, NOW)
    assert changes(result) == [("add", "m", "b")]  # the record stays: it bars a
    alone = plan([node("a")], [m], [failed], {}, NOW)
    assert alone.changes == ()
    assert alone.pending[0].reason.endswith("a its load failed on a 60 s ago (checksum mismatch)")
    later = plan([node("a")], [m], [failed], {}, NOW + HOUR)
    assert changes(later) == [("retry", "m", "a")]
    assert "was: its load failed on a 3660 s ago (checksum mismatch); it may be placed there again" in (
        later.retries[0].reason
    )
    # A record whose model has its copies elsewhere simply goes after the backoff.
    elsewhere = plan([node("a"), node("b")], [m], [failed, held(m, "b")], {}, NOW + HOUR)
    assert changes(elsewhere) == [("remove", "m", "a")]


def test_a_new_version_redoes_each_placement_with_a_new_generation() -> None:
    m = model("m", desired_loaded=True, min_copies=2)
    placements = [held(m, "a"), held(m, "b")]
    v2 = replace(m, version=2)
    result = plan([node("a"), node("b")], [v2], placements, {}, NOW)
    assert changes(result) == [("retry", "m", "a"), ("retry", "m", "b")]
    assert {c.version for c in result.changes} == {2}
    assert result.retries[0].reason == "version 2 replaces version 1"
    after = apply_plan(placements, result, NOW)
    assert [(p.version, p.generation) for p in after] == [(2, 2), (2, 2)]
    assert plan([node("a"), node("b")], [v2], after, {}, NOW).empty


def test_placements_of_an_unregistered_model_are_removed() -> None:
    gone = model("gone")
    result = plan([node("a")], [], [held(gone, "a")], {}, NOW)
    assert changes(result) == [("remove", "gone", "a")]
    assert result.removes[0].reason == "model 'gone' is no longer registered"


def test_an_on_demand_plan_decides_for_its_model_alone() -> None:
    lost_copy = model("other", desired_loaded=True)
    asked = model("asked", on_demand=True)
    fleet = [node("a", live=False), node("b")]
    result = plan(fleet, [lost_copy, asked], [held(lost_copy, "a")], {}, NOW, only={"asked"})
    assert changes(result) == [("add", "asked", "b")]


def test_a_negative_or_missing_rate_counts_as_no_requests() -> None:
    fleet, m = [node("a")], model("m")
    for rates in ({"m": -5.0}, {"m": math.nan}, {}):
        assert plan(fleet, [m], [], rates, NOW).empty
        assert plan(fleet, [m], [held(m, "a")], rates, NOW).removes[0].reason.startswith("fewer copies: not wanted")


def test_a_bad_policy_is_refused_with_every_mistake_named() -> None:
    with pytest.raises(ValueError, match="invalid placement policy") as error:
        PlacementPolicy(strategy="fill", copy_capacity_rps=0)  # type: ignore[arg-type]
    assert str(error.value) == (
        "invalid placement policy: strategy must be 'spread' or 'binpack'; copy_capacity_rps must be above 0"
    )


# Stability ----------------------------------------------------------------------------------


def test_a_settled_fleet_plans_nothing_and_the_input_order_does_not_matter() -> None:
    fleet = [node(f"n{i}", 16 + 4 * (i % 3), labels={"topology.kubernetes.io/zone": f"z{i % 2}"}) for i in range(6)]
    models = [model(f"m{i}", 1 + i % 5, copy_capacity_rps=5.0) for i in range(14)]
    rates = {f"m{i}": 0.5 * i for i in range(14)}
    nodes, placements, _ = settle(fleet, models, [], rates)
    again = plan(nodes, models, placements, rates, NOW)
    assert again.empty
    shuffled = plan(nodes[::-1], models[::-1], placements[::-1], rates, NOW)
    assert shuffled == again
    assert plan(fleet, models, [], rates, NOW) == plan(fleet[::-1], models[::-1], [], rates, NOW)
    # Spread: every node holds something; no copy is waiting for room.
    assert {p.node for p in placements} == {n.id for n in fleet}


def test_an_extra_copy_is_worth_its_share_of_the_rate_and_is_displaced_first() -> None:
    # 'busy' has 2 copies at 9 requests/s: its second copy is worth 4.5. 'new' at 7 (> 1.5 x 4.5)
    # takes that copy's place, not the only copy of 'steady' (worth 6, which 7 does not beat by 1.5x).
    fleet = [node("a", 8, used_gib=8), node("b", 8, used_gib=8)]
    busy, steady = model("busy", 8, copy_capacity_rps=5.0), model("steady", 8)
    placements = [held(busy, "a"), held(busy, "b")]
    new = model("new", 8)
    rates = {"busy": 9.0, "new": 7.0, "steady": 6.0}
    result = plan(fleet, [busy, new], placements, rates, NOW)
    assert changes(result) == [("remove", "busy", "a"), ("add", "new", "a")]
    assert (
        result.removes[0].reason == "displaced by 'new' (normal), which is worth 7 requests/s (normal, 4.5 requests/s)"
    )
    assert result.pending[0].model == "busy"  # it still wants 2 copies: the autoscaler's signal
    only_copies = [held(busy, "a"), held(steady, "b")]
    assert plan(fleet, [busy, steady, new], only_copies, rates, NOW).adds == ()
