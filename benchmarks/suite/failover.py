"""Workload: failover. How long a lost node's models take to be READY elsewhere (issue 17, item 5).

A fleet of two nodes on this machine (tests/integration/fleet.py): one registry with its placer on,
two real tritonservers each with its loader in fleet mode, and an inference service that routes to
them. MiniLM is kept loaded with one copy, a second encoder with a copy on each node. Clients embed
through the inference service, half on each model, while the node holding MiniLM's copy is
SIGKILLed (Triton and loader together). Measured: the seconds until the registry says the node is
LOST, and until MiniLM is READY on the other node, against the node lease plus MiniLM's load time
measured in the same run (its first load, on the node that died: the other node's cache is as
cold); the requests and errors of both models.
"""

from __future__ import annotations

from benchmarks.suite.context import Context

LONE = "lone"
SHARED = "shared"
CLIENTS = 16


async def run(ctx: Context) -> dict:
    import pytest  # noqa: PLC0415 - the fleet's helpers report a wait that ran out as pytest's failure

    from modelplane.common.types import ModelSpec, PlacementPolicy, Task  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415
    from tests.encoders import save_tiny_bert  # noqa: PLC0415
    from tests.integration.fleet import LEASE_SECONDS, fleet_inference, kill_under_traffic, running_fleet  # noqa: PLC0415

    home = ctx.work / "failover"
    shared = save_tiny_bert(home / "shared-encoder", ctx.minilm, seed=17)
    # Another package than the shared one, whose converted files the other node already holds.
    lone = ctx.minilm if ctx.sizes.failover_minilm else save_tiny_bert(home / "lone-encoder", ctx.minilm, seed=18)
    registry_env = {
        "MODELPLANE_REGISTRY_PLACER": "true",
        "MODELPLANE_REGISTRY_PLACER_INTERVAL_SECONDS": "1",
        "MODELPLANE_REGISTRY_PLACER_LEASE_SECONDS": "5",
    }
    ctx.say("starting a fleet of two nodes (registry with its placer, two tritonservers and loaders)")
    try:
        with running_fleet(home, 2, registry_env=registry_env) as fleet, fleet_inference(fleet) as inference:
            async with RegistryClient(fleet.registry) as registry:
                for name, source, policy in (
                    (LONE, lone, PlacementPolicy(max_copies=1)),
                    (SHARED, shared, PlacementPolicy(min_copies=2)),
                ):
                    spec = ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(source), placement=policy)
                    await registry.register(spec, load=True)
            ctx.say(f"killing the node that holds {LONE} under {CLIENTS} clients")
            failover = await kill_under_traffic(fleet, inference, shared=SHARED, solo=LONE, clients=CLIENTS)
    except pytest.fail.Exception as error:  # a wait that ran out: the fleet's logs are in the message
        raise RuntimeError(str(error)[-3000:]) from None
    traffic = failover.traffic
    return {
        "status": "ran",
        "model": LONE,
        "package": "MiniLM" if lone == ctx.minilm else "a tiny BERT (--quick)",
        "clients": CLIENTS,
        "lease_s": LEASE_SECONDS,
        "load_s": failover.load_seconds,
        "lost_s": failover.lost_after,
        "ready_s": failover.ready_after,
        "bound_s": failover.bound,
        "requests": {name: len(traffic.of(name)) for name in (LONE, SHARED)},
        "outcomes": {name: traffic.tally(name) for name in (LONE, SHARED)},
    }


def render(data: dict) -> str:
    errors = {name: sum(n for key, n in tally.items() if key != "OK") for name, tally in data["outcomes"].items()}
    lone, shared = data["model"], next(name for name in data["outcomes"] if name != data["model"])
    return "\n".join(
        [
            "| from the SIGKILL until | seconds |",
            "| --- | ---: |",
            f"| the node is LOST (lease {data['lease_s']:g} s) | {data['lost_s']:.1f} |",
            f"| {lone} ({data['package']}) is READY on the other node | **{data['ready_s']:.1f}** |",
            f"| the target: lease + its load measured in this run ({data['load_s']:.1f} s) | {data['bound_s']:.1f} |",
            "",
            f"{data['clients']} clients: {lone} (one copy) {data['requests'][lone]} requests, {errors[lone]} errors "
            f"({_outcomes(data['outcomes'][lone])}); {shared} (a copy on each node) {data['requests'][shared]} "
            f"requests, {errors[shared]} errors ({_outcomes(data['outcomes'][shared])}).",
        ]
    )


def _outcomes(tally: dict[str, int]) -> str:
    return ", ".join(f"{key} {count}" for key, count in sorted(tally.items(), key=lambda item: -item[1]))


def target(data: dict) -> tuple[str, str, str]:
    return (
        "a lost node's models READY elsewhere within lease + load time",
        f"{data['ready_s']:.1f} s vs {data['bound_s']:.1f} s (lease {data['lease_s']:g} + load {data['load_s']:.1f})",
        "met" if data["ready_s"] <= data["bound_s"] else "**missed**",
    )


def summary_line(data: dict) -> str:
    return (
        f"failover: node LOST {data['lost_s']:.1f} s after SIGKILL (lease {data['lease_s']:g} s), "
        f"{data['model']} READY elsewhere at {data['ready_s']:.1f} s against lease + load {data['bound_s']:.1f} s"
    )
