"""Routing across nodes, for real: three tritonservers, a registry and an inference service of this
test's own, with the bundled models the session's stack converted.

The nodes and their placements are written through the real registry's RegisterNode,
SetPlacements and TransitionPlacement, as the placer and a node's loader write them (the registry's
own placer is off; the loaders' fleet mode is issue 17c's); each tritonserver loads its models
directly. node-a and node-b hold the embedding
model, node-b and node-c the chat model. Per-node counts come from the inference service's
/metrics. The tests run in order: the second kills node-a, the third node-b or node-c.

Cost: about a minute beyond the session's stack (three tritonservers, two model loads each).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import grpc
import httpx
import pytest

from modelplane.common.settings import TritonSettings
from modelplane.common.types import ModelState
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelplane.loader.client import LoaderClient
from modelplane.loader.triton_control import TritonControl
from modelplane.registry.client import RegistryClient
from modelplane.registry.fleet import Node, PlacementTarget
from modelplane.triton.embedded import EmbeddedTriton
from tests.conftest import free_port
from tests.integration.conftest import RunningStack
from tests.integration.services import _serve, grpc_serving

EMBED = "all-minilm-l6-v2"
CHAT = "smollm2-135m-instruct"
HOLDERS = {EMBED: ("node-a", "node-b"), CHAT: ("node-b", "node-c")}


@dataclass
class TritonNode:
    node_id: str
    address: str
    process: subprocess.Popen[bytes]

    def kill(self) -> None:
        """The node dies: tritonserver and its python-backend stubs, its process group (a stub
        whose server is SIGKILLed alone can outlive it: two held 550 MiB for 38 minutes after a run)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()


@dataclass
class Fleet:
    inference: str
    metrics_url: str
    nodes: dict[str, TritonNode]

    def requests(self) -> dict[str, float]:
        """modelplane_inference_node_requests_total by node, from the service's /metrics."""
        text = httpx.get(self.metrics_url, timeout=10).text
        found = re.findall(r'^modelplane_inference_node_requests_total\{node="([^"]+)"\} (\S+)$', text, re.M)
        return {node: float(value) for node, value in found}


def _start_triton(node_id: str, repository: Path, workdir: Path) -> TritonNode:
    settings = TritonSettings(
        grpc_address=f"127.0.0.1:{free_port()}",
        http_port=free_port(),
        metrics_port=free_port(),
        model_repository=repository,
    )
    embedded = EmbeddedTriton(settings, workdir=workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with (workdir / "tritonserver.log").open("wb") as log:
        process = subprocess.Popen(
            embedded.command(), env=embedded.environment(), stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while True:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{settings.http_port}/v2/health/live", timeout=1).status_code == 200:
                return TritonNode(node_id, settings.grpc_address, process)
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"tritonserver {node_id} did not start: {embedded.log_tail()}")
        time.sleep(0.2)


async def _copy_models_and_place(stack: RunningStack, registry: str, nodes: dict[str, TritonNode]) -> None:
    """Registers the stack's two models in the test's registry, each node, and the copies: each
    node's Triton loads its models, then its copies go REGISTERED → ... → READY as a loader would
    record them."""
    source = RegistryClient(stack.registry)
    loader = LoaderClient(stack.loader)
    target = RegistryClient(registry)
    try:
        models = {name: await loader.ensure_loaded(name, reason="test", timeout_seconds=600) for name in HOLDERS}
        registered = {}
        for node_id, node in nodes.items():
            registered[node_id] = await target.register_node(
                # No loader runs beside these tritonservers; the address is only recorded.
                Node(
                    node_id=node_id,
                    loader_address=f"127.0.0.1:{free_port()}",
                    triton_address=node.address,
                    holder=f"test {node_id}",
                ),
                lease_duration=timedelta(minutes=10),
            )
        for name, model in models.items():
            profile, assets = await source.get_assets(name)
            await target.register(model.spec)
            placements, _ = await target.set_placements(
                [PlacementTarget(model_name=name, node_id=node_id) for node_id in HOLDERS[name]]
            )
            for placement in placements:
                control = TritonControl(nodes[placement.node_id].address)
                try:
                    await control.load(name, timeout_seconds=300)
                finally:
                    await control.close()
                incarnation = registered[placement.node_id].incarnation
                for state in (ModelState.FETCHING, ModelState.VERIFYING):
                    placement, _ = await target.transition_placement(placement, incarnation, state)
                placement, _ = await target.transition_placement(
                    placement,
                    incarnation,
                    ModelState.STAGED,
                    manifest=model.status.manifest,
                    profile=profile,
                    assets=assets,
                )
                placement, _ = await target.transition_placement(placement, incarnation, ModelState.LOADING)
                await target.transition_placement(
                    placement, incarnation, ModelState.READY, observed_generation=placement.generation
                )
    finally:
        for client in (source, loader, target):
            await client.close()


@pytest.fixture(scope="module")
def fleet(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("fleet")
    repository = root / "models"
    # The session's Triton may unload its models while this runs: the nodes get copies of the entries.
    for name in HOLDERS:
        asyncio.run(_ensure_loaded(stack, name))
        shutil.copytree(stack.home / "triton" / "models" / name, repository / name, symlinks=True)
    nodes: dict[str, TritonNode] = {}
    with contextlib.ExitStack() as cleanup:
        for node_id in ("node-a", "node-b", "node-c"):
            nodes[node_id] = _start_triton(node_id, repository, root / node_id)
            cleanup.callback(nodes[node_id].kill)
        registry_port, inference_port, metrics_port = free_port(), free_port(), free_port()
        registry = f"127.0.0.1:{registry_port}"
        registry_env = {
            "MODELPLANE_REGISTRY_HOST": "127.0.0.1",
            "MODELPLANE_REGISTRY_PORT": str(registry_port),
            "MODELPLANE_REGISTRY_DATABASE_URL": f"sqlite+aiosqlite:///{root / 'registry.db'}",
            # The test writes the placements itself, as the placer would: its own would undo them.
            "MODELPLANE_REGISTRY_PLACER": "false",
        }
        cleanup.enter_context(_serve("registry", registry_env, root / "registry.log", lambda: grpc_serving(registry)))
        asyncio.run(_copy_models_and_place(stack, registry, nodes))
        inference = f"127.0.0.1:{inference_port}"
        inference_env = {
            "MODELPLANE_INFERENCE_HOST": "127.0.0.1",
            "MODELPLANE_INFERENCE_PORT": str(inference_port),
            "MODELPLANE_INFERENCE_METRICS_PORT": str(metrics_port),
            "MODELPLANE_INFERENCE_REGISTRY_ADDRESS": registry,
            # Nothing listens at the loader's or node-0's address: every request must be routed.
            "MODELPLANE_INFERENCE_LOADER_ADDRESS": f"127.0.0.1:{free_port()}",
            "MODELPLANE_TRITON_GRPC_ADDRESS": f"127.0.0.1:{free_port()}",
        }
        serving = _serve("inference", inference_env, root / "inference.log", lambda: grpc_serving(inference))
        cleanup.enter_context(serving)
        yield Fleet(inference, f"http://127.0.0.1:{metrics_port}/metrics", nodes)


async def _ensure_loaded(stack: RunningStack, name: str) -> None:
    loader = LoaderClient(stack.loader)
    try:
        await loader.ensure_loaded(name, reason="test", timeout_seconds=600)
    finally:
        await loader.close()


def _embed(stub: pb_grpc.InferenceServiceStub, text: str) -> pb.EmbedResponse:
    return stub.Embed(pb.EmbedRequest(model=EMBED, inputs=[pb.EmbedInput(text=text)]), timeout=60)


def _embed_from(fleet: Fleet, clients: int, seconds: float, during: threading.Event | None = None) -> list[object]:
    """`clients` threads embedding for `seconds`; every answer's outcome (a response or an error)."""
    outcomes: list[object] = []
    stop = time.monotonic() + seconds

    def client(index: int) -> None:
        with grpc.insecure_channel(fleet.inference) as channel:
            stub = pb_grpc.InferenceServiceStub(channel)
            count = 0
            while time.monotonic() < stop:
                try:
                    outcomes.append(_embed(stub, f"client {index} sentence {count}"))
                except grpc.RpcError as error:
                    outcomes.append(error)
                count += 1
                if during is not None and count == 3:
                    during.set()

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return outcomes


def test_requests_reach_only_the_nodes_holding_the_model_and_both_copies(fleet: Fleet) -> None:
    before = fleet.requests()
    outcomes = _embed_from(fleet, clients=8, seconds=3)
    after = fleet.requests()
    assert outcomes and all(isinstance(o, pb.EmbedResponse) and len(o.embeddings[0].values) == 384 for o in outcomes)
    sent = {node: after.get(node, 0) - before.get(node, 0) for node in ("node-a", "node-b", "node-c", "node-0")}
    print(f"\nembeddings per node: {sent} ({len(outcomes)} requests)")
    assert sent["node-a"] > 0 and sent["node-b"] > 0
    assert sent["node-c"] == 0 and sent["node-0"] == 0
    assert sent["node-a"] + sent["node-b"] == len(outcomes)


def test_a_node_killed_under_embeddings_traffic_costs_no_request(fleet: Fleet) -> None:
    started = threading.Event()
    killer = threading.Thread(target=lambda: (started.wait(60), fleet.nodes["node-a"].kill()))
    killer.start()
    before = fleet.requests()
    outcomes = _embed_from(fleet, clients=8, seconds=6, during=started)
    killer.join()
    after = fleet.requests()
    errors = [o for o in outcomes if not isinstance(o, pb.EmbedResponse)]
    print(f"\n{len(outcomes)} requests, {len(errors)} errors, node-b took {after['node-b'] - before['node-b']:.0f}")
    assert errors == []
    assert after["node-b"] > before.get("node-b", 0)


def test_a_streamed_chat_cut_mid_stream_is_not_replayed(fleet: Fleet) -> None:
    request = pb.ChatRequest(
        model=CHAT,
        messages=[pb.ChatMessage(role="user", content="Count from 1 to 300, one number per line.")],
        parameters=pb.SamplingParameters(max_tokens=600, temperature=0.0),
    )
    before = fleet.requests()
    with grpc.insecure_channel(fleet.inference) as channel:
        responses = pb_grpc.InferenceServiceStub(channel).Chat(request, timeout=120)
        first = next(responses)
        serving = next(n for n in HOLDERS[CHAT] if fleet.requests().get(n, 0) > before.get(n, 0))
        fleet.nodes[serving].kill()
        with pytest.raises(grpc.RpcError) as cut:
            for _ in responses:
                pass
    other = next(n for n in HOLDERS[CHAT] if n != serving)
    after = fleet.requests()
    assert first.text or first.reasoning_text
    assert cut.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed after the answer had started" in (cut.value.details() or "")
    # Not replayed: the other copy never got the request.
    assert after.get(other, 0) == before.get(other, 0)
