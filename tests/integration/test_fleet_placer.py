"""The fleet with the registry's placer on (tests/integration/fleet.py): two nodes, each a real
tritonserver and a real loader in fleet mode, one registry (SQLite) whose placer decides where
copies go, an inference service that routes to the nodes, and small real-architecture BERT
encoders as the models. Nothing here places a copy by hand.

A hot model gets a second copy while it is under load and loses it when the load stops; a node
SIGKILLed under 32 clients loses its lease, the placer moves its copies, and the clients of a
model with another copy see no error while those of a model with none see only UNAVAILABLE with
a retry delay until it is READY elsewhere. The figures are printed (run with -s to see them).
What a restarted node does is test_fleet.py's.

The placer here counts 1.5 requests/s per copy and keeps a copy at least 10 s, so that the request
rates' one-minute smoothing (registry/statistics.py) adds and removes a copy within a minute or
two rather than the production defaults' five minutes.

What costs time: two tritonservers started, four tiny encoders loaded and one loaded again after
the kill, a hot model's rate rising and then decaying (about 1.5 minutes of it), one lease expiry
of 10 s; about 3-4 minutes on a quiet 2-core machine.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modelplane.common.types import DesiredState, PlacementPolicy
from modelplane.registry.client import RegistryClient
from tests.encoders import save_tiny_bert
from tests.integration.fleet import (
    LEASE_SECONDS,
    EmbedTraffic,
    Fleet,
    all_ready,
    copies,
    fleet_inference,
    kill_under_traffic,
    other_node,
    placed,
    ready_copies,
    register,
    running_fleet,
    until,
)

pytestmark = pytest.mark.slow

COPY_CAPACITY_RPS = 1.5
REGISTRY_ENV = {
    "MODELPLANE_REGISTRY_PLACER": "true",
    "MODELPLANE_REGISTRY_PLACER_INTERVAL_SECONDS": "1",
    "MODELPLANE_REGISTRY_PLACER_LEASE_SECONDS": "5",
    "MODELPLANE_REGISTRY_PLACER_COPY_CAPACITY_RPS": str(COPY_CAPACITY_RPS),
    "MODELPLANE_REGISTRY_PLACER_MIN_COPY_AGE_SECONDS": "10",
}
NODE_ENV = {
    "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "1",
    "MODELPLANE_LOADER_EVICTION_GRACE_SECONDS": "0.2",
    "MODELPLANE_LOADER_RECONCILE_INTERVAL_SECONDS": "5",
}
# The hot model's load: about seven times one copy's capacity, so the forecast (mostly the
# one-minute rate) passes one copy's capacity some 20 s in.
HOT_RATE = 10.0
CLIENTS = 32


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("placer-encoders")
    names = ("hot", "shared", "solo")
    return {name: save_tiny_bert(root / name, minilm_path, seed=200 + i) for i, name in enumerate(names)}


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    home = tmp_path_factory.mktemp("fleet-placer")
    with running_fleet(home, 2, registry_env=REGISTRY_ENV, **NODE_ENV) as running:
        yield running


@pytest.fixture(scope="module")
def inference(fleet: Fleet) -> Iterator[str]:
    with fleet_inference(fleet) as address:
        yield address


async def test_a_hot_model_gets_a_second_copy_under_load_and_loses_it_when_idle(
    fleet: Fleet, inference: str, encoders: dict[str, Path]
) -> None:
    async with RegistryClient(fleet.registry) as registry:
        await register(registry, "hot", encoders["hot"])
        [first] = await until(lambda: ready_copies(registry, "hot", 1), "hot READY on one node", fleet)

        started = time.monotonic()
        async with EmbedTraffic(inference, {"hot": 1}, rate=HOT_RATE) as traffic:
            two = await until(lambda: placed(registry, "hot", 2), "a second copy of hot placed", fleet, limit=180)
            placed_after = time.monotonic() - started
            both = await until(lambda: ready_copies(registry, "hot", 2), "two READY copies of hot", fleet)
            ready_after = time.monotonic() - started
        stopped = time.monotonic()
        sent = len(traffic.outcomes)
        [kept] = await until(lambda: ready_copies(registry, "hot", 1), "hot back to one copy", fleet, limit=300)
        fell_after = time.monotonic() - stopped
        [statistics] = await registry.statistics(["hot"])
        removals = [e for e in await registry.events("hot") if e.message.startswith("removed from node")]

        print(
            f"\nhot model: {sent} requests at {sent / (stopped - started):.1f}/s (one copy serves "
            f"{COPY_CAPACITY_RPS:g}/s): a second copy placed {placed_after:.1f} s into the load, both READY at "
            f"{ready_after:.1f} s; back to one copy {fell_after:.1f} s after the load stopped "
            f"(1-minute rate then {statistics.rate_1m:.2f}/s)\n  {removals[-1].message if removals else 'no removal'}"
        )
        second = next(p for p in two if p.node_id != first.node_id)
        assert f"2 copies of {COPY_CAPACITY_RPS:g} requests/s each serve it" in second.decision, second.decision
        assert sorted(p.node_id for p in both) == ["node-0", "node-1"]
        assert traffic.errors("hot") == []
        assert [e.node_id for e in removals] == [other_node(kept.node_id)]
        assert "fewer copies: 1 copies serve its" in removals[0].message, removals[0].message

        # Let it go (an operator's unload), so the next test's models have the fleet to themselves.
        await registry.set_desired_state("hot", DesiredState.HELD_UNLOADED)
        await until(lambda: _unplaced(registry, "hot"), "hot unloaded", fleet)


async def test_a_node_killed_under_32_clients_costs_errors_only_where_no_other_copy_is(
    fleet: Fleet, inference: str, encoders: dict[str, Path]
) -> None:
    async with RegistryClient(fleet.registry) as registry:
        await register(registry, "shared", encoders["shared"], placement=PlacementPolicy(min_copies=2))
        await register(registry, "solo", encoders["solo"], placement=PlacementPolicy(max_copies=1))
        failover = await kill_under_traffic(fleet, inference, shared="shared", solo="solo", clients=CLIENTS)
        traffic = failover.traffic
        everywhere = await all_ready(registry, ["shared", "solo"])
        where = copies(await registry.list_placements(["shared", "solo"]))

    t = failover.timeline
    print(
        f"\n{CLIENTS} clients, {len(traffic.outcomes)} requests; shared (a copy on each node): "
        f"{traffic.tally('shared')}; solo (its one copy on {failover.victim}): {traffic.tally('solo')}\n"
        f"{failover.victim} LOST {failover.lost_after:.1f} s after SIGKILL (lease {LEASE_SECONDS:g} s); solo READY "
        f"on {failover.survivor} {failover.ready_after:.1f} s after SIGKILL, against lease + its measured load "
        f"({failover.load_seconds:.1f} s) = {failover.first_bound:.1f} s\n"
        f"steps after SIGKILL: lease ran out {t.lease_expired:.2f}, LOST announced {t.lost:.2f}, "
        f"placed {t.placed:.2f}, load started {t.load_started:.2f}, READY {t.ready:.2f} s; "
        f"the replacement's load {t.load:.1f} s ({', '.join(f'{s} {seconds:.1f}' for s, seconds in t.phases)}); "
        f"control plane {t.control_plane:.2f} s"
    )
    assert traffic.errors("shared") == []
    errors = traffic.errors("solo")
    assert {(e.code, e.retry_after is not None) for e in errors} <= {("UNAVAILABLE", True)}, errors[:5]
    # Each error came of the kill (answered after it), for a request sent before solo was READY elsewhere.
    outside = [e for e in errors if not (e.answered >= failover.killed and e.sent < failover.ready_seen)]
    assert outside == [], outside[:5]
    assert failover.load_seconds > 0
    # The registry's records are in the order of what happened (each from a clock of this machine).
    assert t.lease_expired <= t.lost and t.placed <= t.load_started < t.ready
    assert everywhere is not None
    assert where == {"shared": [failover.survivor], "solo": [failover.survivor]}


async def _unplaced(registry: RegistryClient, name: str) -> bool:
    return not await registry.list_placements([name])
