"""Workload: routing. What routing across nodes adds to each request (issue 17, item 4).

The inference service's encoder path is measured two ways against the stack's Triton, taking
turns request by request with the same one-text chunk: one node direct (the encoder calls on one
Triton client, as before the fleet) and routed (a routing table with two nodes holding READY copies
of MiniLM, both at the stack's Triton: the choice between them, the in-flight count and metrics,
the per-node encoder calls and the retry wrapper). The routing decision alone is also timed
without Triton (a call that does nothing), averaged over many calls.
"""

from __future__ import annotations

import time
from statistics import median

from benchmarks.suite.context import Context
from benchmarks.suite.measure import percentile

MINILM = "all-minilm-l6-v2"
TARGET_P50_MS = 0.3
_DECISIONS = 20_000


async def run(ctx: Context) -> dict:
    from modelplane.common.types import ModelState  # noqa: PLC0415 - the suite imports workloads lazily
    from modelplane.inference.coalescing import EncoderCalls, EncoderModel, RoutedEncoderCalls  # noqa: PLC0415
    from modelplane.inference.routing import Router, RoutingTable  # noqa: PLC0415
    from modelplane.inference.tokenization import EncoderTokenizer  # noqa: PLC0415
    from modelplane.inference.triton import TritonInferer  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415
    from modelplane.registry.fleet import Node, NodeState, Placement, PlacementStatus  # noqa: PLC0415

    assert ctx.stack is not None
    address = ctx.stack.triton_grpc
    async with RegistryClient(ctx.stack.registry) as registry:
        model = await registry.get_model(MINILM)
        profile, assets = await registry.get_assets(MINILM)
    content = next(a.content for a in assets if a.sha256 == profile.tokenizer_sha256)
    tokenizer = EncoderTokenizer(
        content, max_tokens=profile.max_input_tokens, pad_token=profile.special_tokens.get("pad_token")
    )
    encoding = tokenizer.encode_texts(["How far does a request travel before a node answers it?"])[0]
    arrays = tokenizer.batch([(encoding.ids, encoding.type_ids)], profile.input_names).arrays
    rows = profile.max_batch_size or 32
    encoder = EncoderModel(profile.triton_model_name, profile.output_name, rows, tokenizer.pad_id)

    table = RoutingTable(address)
    table.remember(model.model_copy(update={"status": model.status.model_copy(update={"state": ModelState.READY})}))
    for node_id in ("node-a", "node-b"):
        table.nodes[node_id] = Node(node_id=node_id, triton_address=address, state=NodeState.LIVE, incarnation=1)
        table.remember_placement(
            Placement(
                model_name=MINILM,
                node_id=node_id,
                version=model.version,
                status=PlacementStatus(state=ModelState.READY, incarnation=1, version=model.version),
            )
        )
    one_node = TritonInferer(address)
    direct = EncoderCalls(one_node, 1)
    router = Router(table)
    routed = RoutedEncoderCalls(router, 1)
    paths = {"one node direct": direct, "routed (2 copies)": routed}
    samples: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for calls in paths.values():  # connections open, first-call costs paid
            for _ in range(10):
                await calls.run(encoder, arrays)
        for i in range(ctx.sizes.overhead_requests):
            order = list(paths.items()) if i % 2 == 0 else list(paths.items())[::-1]
            for name, calls in order:
                started = time.perf_counter()
                await calls.run(encoder, arrays)
                samples[name].append(1000 * (time.perf_counter() - started))

        async def nothing(_: object) -> None:
            return None

        started = time.perf_counter()
        for _ in range(_DECISIONS):
            await router.call(MINILM, nothing)
        decision_us = 1e6 * (time.perf_counter() - started) / _DECISIONS
        used = {node_id: link.in_flight for node_id, link in router.links.items()}
    finally:
        await direct.close()
        await routed.close()
        await one_node.close()
        await router.close()
    summary = {name: {"p50_ms": percentile(v, 50), "p99_ms": percentile(v, 99)} for name, v in samples.items()}
    return {
        "status": "ran",
        "samples_ms": samples,
        "summary": summary,
        "requests": ctx.sizes.overhead_requests,
        "decision_us": decision_us,
        "nodes_used": sorted(used),
        "paired_added_ms": median(
            r - d for r, d in zip(samples["routed (2 copies)"], samples["one node direct"], strict=True)
        ),
    }


def render(data: dict) -> str:
    s = data["summary"]
    direct, routed = s["one node direct"], s["routed (2 copies)"]
    added50, added99 = routed["p50_ms"] - direct["p50_ms"], routed["p99_ms"] - direct["p99_ms"]
    return "\n".join(
        [
            "| path | p50 ms | p99 ms | added at p50, ms | added at p99, ms | ratio at p50 |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
            f"| one node direct (encoder calls on one Triton client) | {direct['p50_ms']:.3f} | "
            f"{direct['p99_ms']:.3f} | – | – | 1.00× |",
            f"| routed: two READY copies, power of two choices | {routed['p50_ms']:.3f} | {routed['p99_ms']:.3f} | "
            f"**{added50:+.3f}** | {added99:+.3f} | {routed['p50_ms'] / direct['p50_ms']:.3f}× |",
            "",
            f"Median of the paired differences (routed minus direct, request by request): "
            f"{data['paired_added_ms']:+.3f} ms. The routing decision alone, without Triton: "
            f"{data['decision_us']:.1f} µs per call (nodes used: {', '.join(data['nodes_used'])}).",
        ]
    )


def target(data: dict) -> tuple[str, str, str]:
    s = data["summary"]
    added = s["routed (2 copies)"]["p50_ms"] - s["one node direct"]["p50_ms"]
    return (
        f"routing adds < {TARGET_P50_MS} ms per request at p50 (routed vs one node direct)",
        f"{added:+.3f} ms (decision alone {data['decision_us']:.1f} µs)",
        "met" if added < TARGET_P50_MS else "**missed**",
    )


def summary_line(data: dict) -> str:
    s = data["summary"]
    direct, routed = s["one node direct"], s["routed (2 copies)"]
    return (
        f"routing overhead: p50 {routed['p50_ms'] - direct['p50_ms']:+.3f} ms, p99 "
        f"{routed['p99_ms'] - direct['p99_ms']:+.3f} ms, ratio {routed['p50_ms'] / direct['p50_ms']:.3f}× at p50 "
        f"(direct p50 {direct['p50_ms']:.3f} ms); decision alone {data['decision_us']:.1f} µs"
    )
