"""The loader's Prometheus metrics: what operators watch to see the budget and the policy work."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

PHASE_SECONDS = Histogram(
    "modelplane_loader_phase_duration_seconds",
    "Time a load spent in each phase: waiting (for a slot or memory), fetching, verifying, converting, loading.",
    ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900),
)
LOADS = Counter(
    "modelplane_loader_loads_total",
    "Loads finished, by why they were asked for (operator, on-demand, preload, reconcile, registered) and result.",
    ["reason", "result"],
)
UNLOADS = Counter(
    "modelplane_loader_unloads_total",
    "Models unloaded, by reason (operator, eviction, idle, quota, over-budget, reconcile).",
    ["reason"],
)
EVICTIONS = Counter(
    "modelplane_loader_evictions_total",
    "Models evicted to make room, by what the room was for (load, preload, over-budget).",
    ["reason"],
)
EVICTION_AGE = Histogram(
    "modelplane_loader_eviction_age_seconds",
    "Time since an evicted model was last used, at its eviction.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600, 24 * 3600),
)
CACHE_LOOKUPS = Counter(
    "modelplane_loader_cache_lookups_total",
    "Loads that found their package (kind=package) or converted artifact (kind=artifact) in the local cache.",
    ["kind", "result"],
)
BUDGET_BYTES = Gauge(
    "modelplane_loader_budget_bytes",
    "Memory budget per device: capacity (after the safety margin), used (loaded, loading and unloading "
    "models, and the runtime they share), free, claimed (by loads waiting for memory), and shared (the backend "
    "runtime's shared libraries, which every model maps and the budget counts once).",
    ["device", "kind"],
)
MODEL_FOOTPRINT_BYTES = Gauge(
    "modelplane_loader_model_footprint_bytes",
    "Memory each resident model holds in the budget (measured, or estimated until measured).",
    ["model"],
)
LOADS_WAITING = Gauge("modelplane_loader_loads_waiting", "Loads waiting for a load slot or for memory.")
