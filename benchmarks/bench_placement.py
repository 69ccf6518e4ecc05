"""Placement at scale: the placer against per-node LRU with random placement, at equal memory.

    .venv/bin/python benchmarks/bench_placement.py            # 100 nodes, 1,000 models, a day
    .venv/bin/python benchmarks/bench_placement.py --quick    # a small fleet for minutes: the harness

A fleet of 100 nodes and a catalogue of 1,000 models replays a virtual day of requests. Model
sizes are log-normal (median 1 GiB: encoders of a few hundred MiB, LLMs of several GiB, a tail
up to the largest node), half the nodes have twice the budget of the other half, and the fleet's
memory is --memory-fraction of the catalogue's bytes (default 35%): most models fit somewhere,
not all at once. Requests (as benchmarks/bench_preload.py draws them): sessions of about 3
requests 8 s apart; 45% of sessions go to a model drawn by a fixed popularity (Zipf), 45% by the
popularity of the 6-hour shift of the day (the same shifts each day), 10% to any model; the
overall rate follows the time of day (peak in the afternoon, 3x the night); now and then a burst
(a batch job) sends a model 1.5-4x what one copy serves for a few minutes. 5 nodes are lost at
14:24 and come back empty an hour later. `--days 2` adds a second day, on which the forecast's
time-of-day profile has a day of history.

Systems, on the same trace, fleet and memory:
- *placer*: modelplane's placer (registry/placement.py, its real code) every 30 s and on a miss,
  fed the registry's request statistics (registry/statistics.py) through the loader's forecast
  (loader/preload.py), with its default policy. Each node's loader makes its placements true
  within its budget (loader/budget.py: the loader's own admission and eviction order). A lost
  node is noticed when its lease (15 s) expires.
- *random + LRU* (the issue's baseline, ModelMesh-like): a miss loads the model on a random node
  that can hold it, whose loader evicts the least recently used models to make room. It learns
  of a lost node at once.
- *emptiest/oldest + LRU* (closer to ModelMesh's own placement order, for context): a miss loads
  the model on the node with the most free memory, or, when none has room, on the node holding
  the least recently used model.

The simulator is honest about what costs: a load takes 2 s + 2 s per GiB (fetch from the node's
cache and copy to the device), at most 2 loads run at once per node (the loader's default), an
evicted model is unloaded after the loader's grace, a node never holds more than its budget, and
a request for a model with no READY copy is a cold start: it waits until a copy is READY. Copies
serve `capacity` requests/s each (encoders 10, LLMs 2, big LLMs 0.5); a request beyond what the
READY copies serve in its second is counted as over capacity (it would queue).
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import json
import math
import random
import statistics as stats
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelplane.common.types import ModelState, Priority
from modelplane.loader.budget import BudgetExceeded, Claim, Holder, MemoryBudget
from modelplane.loader.preload import forecast
from modelplane.loader.settings import LoaderSettings
from modelplane.registry.placement import (
    Action,
    DeviceView,
    ModelView,
    NodeView,
    PlacementPlan,
    PlacementPolicy,
    PlacementView,
    plan,
)
from modelplane.registry.statistics import StatisticsState

GIB = 2**30
DEVICE = "gpu:0"
START = datetime(2025, 3, 3, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC
LOADER = LoaderSettings()


# The scenario --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    nodes: int = 100
    models: int = 1000
    days: float = 1.0
    rate: float = 4.0  # mean requests/s over the day, bursts aside
    memory_fraction: float = 0.35
    seed: int = 7
    placer_interval: float = 30.0
    lost_nodes: int = 5
    lose_at_day: float = 0.6  # 14:24
    rejoin_after: float = 3600.0
    lease_seconds: float = 15.0
    burst_every: float = 2700.0  # mean seconds between bursts


QUICK = Scenario(nodes=8, models=60, days=0.25, rate=1.0, lost_nodes=1, lose_at_day=0.15, burst_every=1800.0)


@dataclass(frozen=True)
class Spec:
    name: str
    bytes: int
    kind: str  # encoder, llm, big-llm
    capacity_rps: float

    @property
    def load_seconds(self) -> float:
        return 2.0 + 2.0 * self.bytes / GIB


def make_catalogue(rng: random.Random, count: int) -> list[Spec]:
    specs = []
    for i in range(count):
        size = min(math.exp(rng.gauss(math.log(GIB), 1.0)), 12 * GIB)
        size = max(size, 50 * 2**20)
        kind, capacity = ("encoder", 10.0) if size < GIB else ("llm", 2.0) if size < 4 * GIB else ("big-llm", 0.5)
        specs.append(Spec(f"model-{i:04d}", int(size), kind, capacity))
    return specs


def make_fleet(catalogue: list[Spec], nodes: int, fraction: float) -> tuple[list[int], list[Spec]]:
    """Node budgets (half of them twice the other half) holding `fraction` of the catalogue, and
    the catalogue with no model larger than the large nodes' budget."""
    total = sum(s.bytes for s in catalogue)
    small = int(fraction * total / (1.5 * nodes))
    budgets = [small if i % 2 else 2 * small for i in range(nodes)]
    largest = int(0.9 * 2 * small)
    return budgets, [replace(s, bytes=min(s.bytes, largest)) for s in catalogue]


def make_trace(rng: random.Random, catalogue: list[Spec], scenario: Scenario) -> list[tuple[float, str]]:
    """(time, model) requests: see the module's docstring."""
    names = [s.name for s in catalogue]
    count = len(names)
    zipf = [1 / (rank + 1) ** 1.1 for rank in range(count)]
    fixed = rng.sample(names, count)
    shifts = [rng.sample(names, count) for _ in range(4)]
    seconds = scenario.days * 86400
    peak = 1.65  # the diurnal multiplier's maximum (15:00); its mean over a day is 1
    trace: list[tuple[float, str]] = []
    t = 0.0
    session_rate = scenario.rate / 3.0
    while True:
        t += rng.expovariate(session_rate * peak)
        if t >= seconds:
            break
        hour = (t % 86400) / 3600
        if rng.random() > (0.35 + 1.3 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour - 3) / 24))) / peak:
            continue  # thinning: the time-of-day curve
        draw = rng.random()
        if draw < 0.1:
            name = rng.choice(names)
        elif draw < 0.55:
            name = fixed[_zipf_index(rng, zipf)]
        else:
            name = shifts[int(hour // 6)][_zipf_index(rng, zipf)]
        at = t
        for _ in range(1 + int(rng.expovariate(1 / 2.0))):
            trace.append((START + at, name))
            at += rng.expovariate(1 / 8)
    by_name = {s.name: s for s in catalogue}
    t = 0.0
    while True:  # bursts: a batch job on a popular model
        t += rng.expovariate(1 / scenario.burst_every)
        if t >= seconds:
            break
        name = fixed[_zipf_index(rng, zipf[:100])]
        rate = rng.uniform(1.5, 4.0) * by_name[name].capacity_rps
        duration = rng.uniform(60, 300)
        at = t
        while at < t + duration and at < seconds:
            trace.append((START + at, name))
            at += rng.expovariate(rate)
    trace.sort()
    return trace


def _zipf_index(rng: random.Random, weights: list[float]) -> int:
    return rng.choices(range(len(weights)), weights)[0]


# The fleet's nodes ---------------------------------------------------------------------------


class SimNode:
    """One node's loader on a virtual clock: its budget (the loader's MemoryBudget), at most
    `max_concurrent_loads` loads at once, evictions unloaded after the loader's grace."""

    def __init__(self, fleet: Fleet, index: int, capacity: int) -> None:
        self.fleet = fleet
        self.id = f"node-{index:03d}"
        self.index = index
        self.capacity = capacity
        self.budget = MemoryBudget()
        self.budget.set_device(DEVICE, capacity, capacity)
        self.queue: list[str] = []
        self.jobs: set[str] = set()
        self.cancelled: set[str] = set()
        self.running = 0
        self.live = True
        self.epoch = 0  # bumped when the node is lost: its pending events are void
        self.lost_at = -math.inf
        self.used_cache: int | None = None  # see used(); cleared by every change of the budget

    def load(self, now: float, name: str) -> None:
        holder = self.budget.holders.get(name)
        self.cancelled.discard(name)
        if name in self.jobs or (holder is not None and holder.state == ModelState.READY):
            return
        self.jobs.add(name)
        self.queue.append(name)
        self.admit(now)

    def admit(self, now: float) -> None:
        for name in list(self.queue):
            if self.running >= LOADER.max_concurrent_loads:
                return
            holder = self.budget.holders.get(name)
            if holder is not None and holder.state == ModelState.UNLOADING:
                continue
            spec = self.fleet.specs[name]
            if name not in self.budget.claims:
                try:
                    planned = self.budget.plan(name, spec.bytes, Priority.NORMAL, [DEVICE])
                except BudgetExceeded:
                    self.queue.remove(name)
                    self.jobs.discard(name)
                    continue
                if planned.must_wait:
                    continue
                victims = [v.name for v in planned.victims]
                self.budget.claim(Claim(name, spec.bytes, Priority.NORMAL, (DEVICE,), victims))
                for victim in planned.victims:
                    self.evict(now, victim.name)
                    self.fleet.on_evicted(now, self, victim.name)
            if not self.budget.fits_physically(spec.bytes, [DEVICE]):
                continue
            self.budget.drop_claim(name)
            self.queue.remove(name)
            self.running += 1
            self.used_cache = None
            self.budget.hold(Holder(name, spec.bytes, Priority.NORMAL, (DEVICE,), ModelState.LOADING, now))
            self.fleet.outcome.loads += 1
            self.fleet.at(now + spec.load_seconds, "loaded", self, name)

    def evict(self, now: float, name: str) -> None:
        holder = self.budget.holders[name]
        if holder.state != ModelState.READY:
            return
        self.used_cache = None
        holder.state = ModelState.UNLOADING
        self.fleet.not_ready(self, name)
        self.fleet.at(now + LOADER.eviction_grace_seconds + 0.5, "unloaded", self, name)

    def unload(self, now: float, name: str) -> None:
        """The placement is gone: cancel a queued load, unload after a running one, or unload."""
        if name in self.queue:
            self.queue.remove(name)
            self.jobs.discard(name)
            self.budget.drop_claim(name)
            self.admit(now)
        elif name in self.jobs:
            self.cancelled.add(name)
        elif name in self.budget.holders:
            self.evict(now, name)

    def on_loaded(self, now: float, name: str) -> None:
        self.running -= 1
        self.jobs.discard(name)
        holder = self.budget.holders[name]
        holder.state = ModelState.READY
        holder.last_used = now
        if name in self.cancelled:
            self.cancelled.discard(name)
            self.evict(now, name)
        else:
            self.fleet.on_ready(now, self, name)
        self.admit(now)

    def on_unloaded(self, now: float, name: str) -> None:
        self.used_cache = None
        self.budget.release(name)
        self.admit(now)

    def lose(self, now: float) -> list[str]:
        held = [h.name for h in self.budget.holders.values()]
        for name in held:
            self.fleet.not_ready(self, name)
        lost_jobs = sorted(self.jobs)
        self.used_cache = None
        self.budget = MemoryBudget()
        self.budget.set_device(DEVICE, self.capacity, self.capacity)
        self.queue, self.jobs, self.cancelled, self.running = [], set(), set(), 0
        self.live, self.epoch, self.lost_at = False, self.epoch + 1, now
        return lost_jobs

    def used(self) -> int:
        """The budget's physical use, recomputed only after the budget changed."""
        if self.used_cache is None:
            self.used_cache = self.budget.used(DEVICE)
        return self.used_cache


# What every system shares: requests, routing, cold starts and the clock -----------------------


@dataclass
class Outcome:
    requests: int = 0
    cold_starts: int = 0
    cold_by_day: list[int] = field(default_factory=list)
    cold_after_loss: int = 0
    refused: int = 0
    over_capacity: int = 0
    waits: list[float] = field(default_factory=list)
    loads: int = 0
    memory_samples: list[float] = field(default_factory=list)
    ready_samples: list[float] = field(default_factory=list)
    hot_copies: list[float] = field(default_factory=list)
    plan_seconds: list[float] = field(default_factory=list)

    def figures(self) -> dict:
        waits = sorted(self.waits)
        return {
            "requests": self.requests,
            "cold_starts": self.cold_starts,
            "cold_start_share": self.cold_starts / max(1, self.requests),
            "cold_starts_by_day": self.cold_by_day,
            "cold_starts_after_loss": self.cold_after_loss,
            "refused": self.refused,
            "over_capacity": self.over_capacity,
            "mean_wait_s": stats.mean(waits) if waits else 0.0,
            "p99_wait_s": waits[int(0.99 * (len(waits) - 1))] if waits else 0.0,
            "loads": self.loads,
            "memory_used": stats.mean(self.memory_samples) if self.memory_samples else 0.0,
            "memory_ready": stats.mean(self.ready_samples) if self.ready_samples else 0.0,
            "hot_copies": stats.mean(self.hot_copies) if self.hot_copies else 0.0,
            "plan_ms_p50": 1000 * stats.median(self.plan_seconds) if self.plan_seconds else 0.0,
            "plans": len(self.plan_seconds),
        }


class Fleet:
    label = ""

    def __init__(self, scenario: Scenario, catalogue: list[Spec], budgets: list[int], hot: list[str]) -> None:
        self.scenario = scenario
        self.specs = {s.name: s for s in catalogue}
        self.nodes = [SimNode(self, i, b) for i, b in enumerate(budgets)]
        self.rng = random.Random(scenario.seed + 1)
        self.events: list[tuple[float, int, str, SimNode | None, int, str]] = []
        self.sequence = itertools.count()
        self.ready: dict[str, set[SimNode]] = defaultdict(set)
        self.waiting: dict[str, list[float]] = defaultdict(list)
        self.second: dict[str, list[float]] = {}
        self.hot = hot
        self.loss_window = (-math.inf, -math.inf)
        self.outcome = Outcome(cold_by_day=[0] * math.ceil(scenario.days))

    def at(self, when: float, kind: str, node: SimNode | None = None, name: str = "") -> None:
        epoch = node.epoch if node is not None else 0
        heapq.heappush(self.events, (when, next(self.sequence), kind, node, epoch, name))

    def run(self, trace: list[tuple[float, str]]) -> Outcome:
        end = START + self.scenario.days * 86400
        for t in itertools.takewhile(lambda t: t < end, itertools.count(START, 60.0)):
            self.at(t, "sample")
        self.schedule(end)
        lose = START + self.scenario.lose_at_day * 86400
        if self.scenario.lost_nodes and lose < end:
            self.at(lose, "lose")
        requests = iter(trace)
        upcoming = next(requests, None)
        while self.events or upcoming is not None:
            if upcoming is not None and (not self.events or upcoming[0] <= self.events[0][0]):
                self.request(*upcoming)
                upcoming = next(requests, None)
                continue
            now, _, kind, node, epoch, name = heapq.heappop(self.events)
            if node is not None and node.epoch != epoch:
                continue  # an event of a node that was lost since
            getattr(self, f"on_{kind}")(now, node, name)
        return self.outcome

    def schedule(self, end: float) -> None:
        """Periodic work of the system (the placer's ticks)."""

    # Requests -------------------------------------------------------------------------------

    def request(self, now: float, name: str) -> None:
        o = self.outcome
        o.requests += 1
        self.count(now, name)
        copies = self.ready.get(name)
        if copies:
            node = min(copies, key=lambda n: n.index) if len(copies) == 1 else self.route(name, copies, now)
            node.budget.holders[name].last_used = now
            self.served(now, node, name)
            window = self.second.get(name)
            if window is None or window[0] != int(now):
                window = self.second[name] = [int(now), 0]
            window[1] += 1
            if window[1] > len(copies) * self.specs[name].capacity_rps:
                o.over_capacity += 1
            return
        o.cold_starts += 1
        o.cold_by_day[min(len(o.cold_by_day) - 1, int((now - START) // 86400))] += 1
        if self.loss_window[0] <= now < self.loss_window[1]:
            o.cold_after_loss += 1
        self.waiting[name].append(now)
        self.miss(now, name)

    def route(self, name: str, copies: set[SimNode], now: float) -> SimNode:
        """Power of two choices by the requests each copy served lately (its recency here)."""
        first, second = self.rng.sample(sorted(copies, key=lambda n: n.index), 2)
        return min(first, second, key=lambda n: n.budget.holders[name].last_used)

    def count(self, now: float, name: str) -> None:
        """Statistics the system keeps of each request."""

    def served(self, now: float, node: SimNode, name: str) -> None:
        """A request served by a READY copy."""

    def miss(self, now: float, name: str) -> None:
        raise NotImplementedError

    # Loader events --------------------------------------------------------------------------

    def on_ready(self, now: float, node: SimNode, name: str) -> None:
        self.ready[name].add(node)
        for arrival in self.waiting.pop(name, []):
            self.outcome.waits.append(now - arrival)

    def not_ready(self, node: SimNode, name: str) -> None:
        copies = self.ready.get(name)
        if copies is not None:
            copies.discard(node)
            if not copies:
                del self.ready[name]

    def on_evicted(self, now: float, node: SimNode, name: str) -> None:
        """The node's loader evicted a model to admit another."""

    def on_loaded(self, now: float, node: SimNode | None, name: str) -> None:
        assert node is not None
        node.on_loaded(now, name)

    def on_unloaded(self, now: float, node: SimNode | None, name: str) -> None:
        assert node is not None
        node.on_unloaded(now, name)

    def on_sample(self, now: float, _: SimNode | None, __: str) -> None:
        capacity = sum(n.capacity for n in self.nodes)
        self.outcome.memory_samples.append(sum(n.used() for n in self.nodes if n.live) / capacity)
        ready = sum(self.specs[name].bytes * len(copies) for name, copies in self.ready.items())
        self.outcome.ready_samples.append(ready / capacity)
        self.outcome.hot_copies.append(stats.mean(len(self.ready.get(name, ())) for name in self.hot))

    def on_lose(self, now: float, _: SimNode | None, __: str) -> None:
        lost = self.rng.sample(self.nodes, self.scenario.lost_nodes)
        self.loss_window = (now, now + 1800.0)
        for node in lost:
            jobs = node.lose(now)
            self.lost(now, node, jobs)
            self.at(now + self.scenario.rejoin_after, "rejoin", None, node.id)

    def lost(self, now: float, node: SimNode, jobs: list[str]) -> None:
        """The system's reaction to a lost node."""

    def on_rejoin(self, now: float, _: SimNode | None, node_id: str) -> None:
        node = next(n for n in self.nodes if n.id == node_id)
        node.live = True


# The baselines -------------------------------------------------------------------------------


class RandomLru(Fleet):
    """ModelMesh-like: a miss loads the model on a random node that can hold it; each node's
    loader evicts its least recently used models (the loader's eviction order) to make room."""

    label = "random + LRU"

    def miss(self, now: float, name: str) -> None:
        if any(name in n.jobs for n in self.nodes if n.live):
            return  # a copy is already on its way: wait for it
        self.choose(name).load(now, name)

    def choose(self, name: str) -> SimNode:
        size = self.specs[name].bytes
        return self.rng.choice([n for n in self.nodes if n.live and n.capacity >= size])

    def lost(self, now: float, node: SimNode, jobs: list[str]) -> None:
        for name in jobs:  # loads that requests wait for start again elsewhere at once
            if self.waiting.get(name):
                self.miss(now, name)


class OldestLru(RandomLru):
    """Closer to ModelMesh's own placement order: the node with the most free memory, or, when
    none has room, the one holding the least recently used model."""

    label = "emptiest/oldest + LRU"

    def choose(self, name: str) -> SimNode:
        size = self.specs[name].bytes
        candidates = [n for n in self.nodes if n.live and n.capacity >= size]
        free = [(n.capacity - n.budget.committed(DEVICE), -n.index, n) for n in candidates]
        roomy = [entry for entry in free if entry[0] >= size]
        if roomy:
            return max(roomy, key=lambda entry: entry[:2])[2]

        def oldest(n: SimNode) -> float:
            ready = [h.last_used for h in n.budget.holders.values() if h.state == ModelState.READY]
            return min(ready, default=math.inf)

        return min(candidates, key=lambda n: (oldest(n), n.index))


# The placer ----------------------------------------------------------------------------------


class Placed(Fleet):
    """The registry's placer loop and on-demand path around registry/placement.plan, the
    registry's statistics and the loader's forecast; nodes make their placements true."""

    label = "placer"

    def __init__(self, scenario: Scenario, catalogue: list[Spec], budgets: list[int], hot: list[str]) -> None:
        super().__init__(scenario, catalogue, budgets, hot)
        self.policy = PlacementPolicy()
        self.views = {
            s.name: ModelView(s.name, s.bytes, device_kind="gpu", copy_capacity_rps=s.capacity_rps) for s in catalogue
        }
        self.placements: dict[tuple[str, str], PlacementView] = {}
        self.statistics: dict[str, StatisticsState] = {}
        self.unreported: dict[str, list[float]] = {}
        self.used_since: dict[tuple[str, str], float] = {}
        self.rates: dict[str, float] = {}
        self.by_id = {n.id: n for n in self.nodes}
        self.node_view: dict[str, NodeView] = {}

    def schedule(self, end: float) -> None:
        for t in itertools.takewhile(lambda t: t < end, itertools.count(START, self.scenario.placer_interval)):
            self.at(t, "tick")

    def count(self, now: float, name: str) -> None:
        entry = self.unreported.get(name)
        if entry is None:
            self.unreported[name] = [1, now]
        else:
            entry[0] += 1
            entry[1] = now

    def served(self, now: float, node: SimNode, name: str) -> None:
        self.used_since[(name, node.id)] = now

    def report(self, now: float) -> None:
        """The inference service's report of request counts to the registry, and the loaders' of
        their placements' last use."""
        for name, (count, last) in self.unreported.items():
            state = self.statistics.get(name) or StatisticsState()
            self.statistics[name] = state.record(int(count), 0, datetime.fromtimestamp(last, UTC), now)
            self.views[name] = replace(self.views[name], last_request_time=last)
        self.unreported.clear()
        for key, last in self.used_since.items():
            placement = self.placements.get(key)
            if placement is not None:
                self.placements[key] = replace(placement, last_used=last)
        self.used_since.clear()

    def node_views(self, now: float) -> list[NodeView]:
        """The nodes as their rows say: a lost node stays live until its lease expires."""
        views = []
        for n in self.nodes:
            used, live = n.used(), n.live or now < n.lost_at + self.scenario.lease_seconds
            view = self.node_view.get(n.id)
            if view is None or view.live != live or view.devices[0].used_bytes != used:
                view = self.node_view[n.id] = NodeView(n.id, (DeviceView(DEVICE, n.capacity, used),), live=live)
            views.append(view)
        return views

    def model_views(self, focus: str | None = None) -> list[ModelView]:
        """The models as the registry sees them: a model a request waits for, with no copy, is on
        demand. For an on-demand plan, only the asked model and those holding placements: all that
        a plan for one model reads."""
        asked = {name for name, arrivals in self.waiting.items() if arrivals and name not in self.ready}
        if focus is None:
            views = dict(self.views)
        else:
            asked.add(focus)
            views = {name: self.views[name] for name, _ in self.placements}
            views[focus] = self.views[focus]
        for name in asked:
            if name in views:
                views[name] = replace(views[name], on_demand=True)
        return list(views.values())

    def decide(self, now: float, only: set[str] | None) -> None:
        nodes, models = self.node_views(now), self.model_views(next(iter(only)) if only else None)
        started = time.perf_counter()
        result = plan(nodes, models, list(self.placements.values()), self.rates, now, self.policy, only=only)
        self.outcome.plan_seconds.append(time.perf_counter() - started)
        self.apply(now, result)

    def on_tick(self, now: float, _: SimNode | None, __: str) -> None:
        self.report(now)
        snapshots = {name: state.snapshot(name, now) for name, state in self.statistics.items()}
        self.rates = forecast(snapshots, datetime.fromtimestamp(now, UTC), LOADER.preload_horizon_seconds)
        self.decide(now, None)

    def miss(self, now: float, name: str) -> None:
        if any(name in n.jobs for n in self.nodes if n.live):
            return  # its placement is loading: wait for it
        self.report(now)
        self.decide(now, {name})

    def apply(self, now: float, result: PlacementPlan) -> None:
        for change in result.changes:
            key, node = (change.model, change.node), self.by_id[change.node]
            if change.action == Action.REMOVE:
                del self.placements[key]
                if node.live:
                    node.unload(now, change.model)
                continue
            if change.action == Action.ADD:
                self.placements[key] = PlacementView(change.model, change.node, change.version, placed_time=now)
            else:
                old = self.placements[key]
                self.placements[key] = replace(old, generation=old.generation + 1, placed_time=now)
            if node.live:
                node.load(now, change.model)
        for pending in result.pending:
            if pending.placed == 0 and self.waiting.get(pending.model):
                self.outcome.refused += len(self.waiting.pop(pending.model))  # 503 + Retry-After

    def on_ready(self, now: float, node: SimNode, name: str) -> None:
        key = (name, node.id)
        placement = self.placements.get(key)
        if placement is None:
            node.unload(now, name)  # its placement was removed while it loaded
            return
        self.placements[key] = replace(
            placement,
            observed_generation=placement.generation,
            state=ModelState.READY,
            footprint_bytes=self.specs[name].bytes,
            observed_time=now,
            last_used=now,
        )
        super().on_ready(now, node, name)

    def on_evicted(self, now: float, node: SimNode, name: str) -> None:
        key = (name, node.id)
        placement = self.placements.get(key)
        if placement is not None:
            self.placements[key] = replace(
                placement,
                observed_generation=placement.generation,
                state=ModelState.STAGED,
                reason="evicted: over budget",
                observed_time=now,
            )


# The report ----------------------------------------------------------------------------------


def table(rows: list[tuple[str, Outcome]]) -> str:
    base = dict(rows)[RandomLru.label].cold_starts
    lines = [
        f"{'system':<24}{'requests':>9}{'cold starts':>12}{'vs random':>10}{'after loss':>11}{'wait s':>8}"
        f"{'p99 s':>7}{'loads':>8}{'memory':>8}{'READY':>7}{'hot copies':>11}{'over cap.':>10}"
    ]
    for label, o in rows:
        f = o.figures()
        lines.append(
            f"{label:<24}{f['requests']:>9}{f['cold_starts']:>12}{f['cold_starts'] / max(1, base):>9.2f}x"
            f"{f['cold_starts_after_loss']:>11}{f['mean_wait_s']:>8.1f}{f['p99_wait_s']:>7.1f}{f['loads']:>8}"
            f"{f['memory_used']:>7.0%}{f['memory_ready']:>7.0%}{f['hot_copies']:>11.2f}{f['over_capacity']:>10}"
        )
    return "\n".join(lines)


def run(scenario: Scenario) -> tuple[str, dict]:
    rng = random.Random(scenario.seed)
    catalogue = make_catalogue(rng, scenario.models)
    budgets, catalogue = make_fleet(catalogue, scenario.nodes, scenario.memory_fraction)
    trace = make_trace(rng, catalogue, scenario)
    counts: dict[str, int] = defaultdict(int)
    for _, name in trace:
        counts[name] += 1
    hot = sorted(counts, key=lambda n: (-counts[n], n))[:10]
    sizes = sorted(s.bytes for s in catalogue)
    total = sum(sizes)
    header = [
        f"{scenario.nodes} nodes ({budgets[0] / GIB:.1f} and {budgets[1] / GIB:.1f} GiB budgets, "
        f"{sum(budgets) / GIB:.0f} GiB in all = {sum(budgets) / total:.0%} of the catalogue); "
        f"{scenario.models} models of {sizes[0] / 2**20:.0f} MiB to {sizes[-1] / GIB:.1f} GiB "
        f"(median {sizes[len(sizes) // 2] / GIB:.2f} GiB, {total / GIB:.0f} GiB in all)",
        f"{len(trace)} requests over {scenario.days:g} days; {scenario.lost_nodes} nodes lost at day "
        f"{scenario.lose_at_day:g} for {scenario.rejoin_after / 60:.0f} min; placer every "
        f"{scenario.placer_interval:g} s and on a miss",
    ]
    rows: list[tuple[str, Outcome]] = []
    elapsed: dict[str, float] = {}
    for system in (RandomLru, OldestLru, Placed):
        started = time.perf_counter()
        rows.append((system.label, system(scenario, catalogue, budgets, hot).run(trace)))
        elapsed[system.label] = time.perf_counter() - started
    placer, base = dict(rows)[Placed.label], dict(rows)[RandomLru.label]
    ratio = placer.cold_starts / max(1, base.cold_starts)
    plans = placer.figures()
    footer = [
        f"placer: {1 - ratio:.0%} fewer cold starts than random + LRU (target: at least 30%); "
        f"{plans['plans']} plans, median {plans['plan_ms_p50']:.1f} ms each; "
        f"refused (503, nothing could make room): {placer.refused}",
        "columns: cold starts = requests that found no READY copy; after loss = in the 30 min after the "
        "nodes were lost; wait = seconds a cold start waited (mean, p99); loads = loads started (moves); "
        "memory = share of the fleet's budget held (mean), READY = held by READY copies; hot copies = "
        "READY copies of the 10 most requested models (mean); over cap. = requests beyond what the "
        "READY copies serve in their second",
        "simulated in " + ", ".join(f"{label} {seconds:.0f} s" for label, seconds in elapsed.items()),
    ]
    output = "\n".join([*header, "", table(rows), "", *footer])
    figures = {
        "scenario": scenario.__dict__,
        "trace_requests": len(trace),
        "fleet_gib": sum(budgets) / GIB,
        "catalogue_gib": total / GIB,
        "systems": {label: o.figures() for label, o in rows},
        "cold_start_ratio": ratio,
    }
    return output, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small fleet for minutes: proves the harness")
    parser.add_argument("--days", type=float, help="virtual days of trace")
    parser.add_argument("--rate", type=float, help="mean requests/s, bursts aside")
    parser.add_argument("--memory-fraction", type=float, help="fleet memory / catalogue bytes")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--json", type=Path, help="also write the figures to this file (make bench reads it)")
    args = parser.parse_args()
    scenario = QUICK if args.quick else Scenario()
    given = {"days": args.days, "rate": args.rate, "memory_fraction": args.memory_fraction, "seed": args.seed}
    scenario = replace(scenario, **{k: v for k, v in given.items() if v is not None})
    output, figures = run(scenario)
    print(output)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()
