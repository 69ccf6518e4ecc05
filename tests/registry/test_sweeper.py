"""Which node changes wake the sweep of lost nodes early: only a lease that ends before the sweep
would wake anyway. On a fleet of a hundred nodes renewals arrive many times a second; each would
otherwise cost two queries."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from modelplane.registry.fleet import Node, NodeState
from modelplane.registry.sweeper import NodeSweeper

NOW = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)


def _node(expires_in: float | None, state: NodeState = NodeState.LIVE) -> Node:
    expiry = None if expires_in is None else NOW + timedelta(seconds=expires_in)
    return Node(node_id="node-0", lease_expire_time=expiry, state=state)


def _sleeping_until(seconds: float) -> NodeSweeper:
    sweeper = NodeSweeper(store=None, fleet=None, interval_seconds=60.0)  # type: ignore[arg-type]
    sweeper._wakes_at = NOW + timedelta(seconds=seconds)  # the sleep under way
    return sweeper


def test_a_renewal_that_moves_a_lease_past_the_next_sweep_does_not_wake_it() -> None:
    assert not _sleeping_until(5).expires_sooner(_node(10))


def test_a_node_whose_lease_ends_before_the_next_sweep_wakes_it() -> None:
    assert _sleeping_until(30).expires_sooner(_node(10))


def test_a_lost_node_or_one_without_a_lease_does_not() -> None:
    assert not _sleeping_until(30).expires_sooner(_node(10, NodeState.LOST))
    assert not _sleeping_until(30).expires_sooner(_node(None))


def test_during_a_sweep_every_change_counts() -> None:
    sweeper = NodeSweeper(store=None, fleet=None, interval_seconds=60.0)  # type: ignore[arg-type]
    assert sweeper.expires_sooner(_node(100))
