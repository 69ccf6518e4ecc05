"""/healthz and /readyz through the real gateway, in front of a real registry (SQLite) and a gRPC
health service standing in for the inference service (whose own readiness is not what is tested)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from modelplane.common.types import LoadProgress, ModelSpec, ModelState, Task
from modelplane.gateway.server import GatewayService
from modelplane.gateway.settings import GatewaySettings
from modelplane.registry.client import RegistryClient
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings


@pytest.fixture
async def registry(tmp_path: Path) -> AsyncIterator[RegistryClient]:
    service = RegistryService(
        RegistrySettings(host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    )
    await service.start()
    async with RegistryClient(f"127.0.0.1:{service.port}") as client:
        yield client
    await service.stop()


@pytest.fixture
async def inference() -> AsyncIterator[str]:
    server = grpc.aio.server()
    servicer = health.aio.HealthServicer()
    await servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield f"127.0.0.1:{port}"
    await server.stop(0)


@pytest.fixture
async def gateway(registry: RegistryClient, inference: str) -> AsyncIterator[httpx.AsyncClient]:
    settings = GatewaySettings(
        host="127.0.0.1", port=0, inference_address=inference, registry_address=registry.address, api_keys="k"
    )
    service = GatewayService(settings)
    await service.start()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}", timeout=10) as client:
        yield client
    await service.stop()


async def _walk(registry: RegistryClient, name: str, *states: ModelState, progress: LoadProgress | None = None) -> None:
    for state in states:
        model = await registry.get_model(name)
        await registry.transition(model, state, state.name.lower(), progress=progress)


async def test_readiness_waits_for_every_model_the_node_must_serve(
    registry: RegistryClient, gateway: httpx.AsyncClient
) -> None:
    await registry.register(ModelSpec(name="idle", task=Task.EMBEDDING, source_uri="/m/idle"), load=False)
    assert (await gateway.get("/readyz")).json() == {
        "status": "ready",
        "backends": {"inference": True, "registry": True},
        "models": {"wanted": 0, "ready": 0, "not_ready": []},
    }

    await registry.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m/minilm"), load=True)
    await registry.register(ModelSpec(name="gemma", task=Task.GENERATION, source_uri="/m/gemma.gguf"), load=True)
    fetching = LoadProgress(phase=ModelState.FETCHING, bytes_done=100, bytes_total=400, files_done=1, files_total=4)
    await _walk(registry, "gemma", ModelState.FETCHING, progress=fetching)

    response = await gateway.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "not ready" and body["backends"] == {"inference": True, "registry": True}
    assert (body["models"]["wanted"], body["models"]["ready"]) == (2, 0)
    gemma, minilm = body["models"]["not_ready"]
    assert (gemma["model"], gemma["state"]) == ("gemma", "FETCHING")
    assert gemma["progress"] == {"bytes_done": 100, "bytes_total": 400, "files_done": 1, "files_total": 4}
    assert (minilm["model"], minilm["state"]) == ("minilm", "REGISTERED") and "progress" not in minilm
    assert "since" in gemma
    assert (await gateway.get("/healthz")).status_code == 200  # liveness never waits for models
    # A probe that leaves the models out (the Helm chart's gateway) answers for the backends alone.
    excluded = await gateway.get("/readyz", params={"exclude": "models"})
    assert excluded.status_code == 200 and "models" not in excluded.json()

    for name in ("minilm", "gemma"):
        if name == "minilm":
            await _walk(registry, name, ModelState.FETCHING)
        await _walk(registry, name, ModelState.VERIFYING, ModelState.STAGED, ModelState.LOADING, ModelState.READY)
    response = await gateway.get("/readyz")
    assert response.status_code == 200
    assert response.json()["models"] == {"wanted": 2, "ready": 2, "not_ready": []}


async def test_a_failed_model_keeps_the_node_unready_and_says_where_to_look(
    registry: RegistryClient, gateway: httpx.AsyncClient
) -> None:
    model, _ = await registry.register(ModelSpec(name="broken", task=Task.EMBEDDING, source_uri="/m/broken"), load=True)
    await registry.transition(model, ModelState.FAILED, "Source path /srv/private/broken does not exist.")
    response = await gateway.get("/readyz")
    assert response.status_code == 503
    [broken] = response.json()["models"]["not_ready"]
    assert (broken["state"], broken["why"]) == ("FAILED", "modelplane models events broken")
    assert "/srv/private" not in response.text  # the probe needs no key: reasons stay with the operator


async def test_an_unknown_check_is_refused_not_ignored(gateway: httpx.AsyncClient) -> None:
    response = await gateway.get("/readyz", params={"exclude": "model"})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "exclude"
    assert error["message"] == "Unknown readiness check 'model' in exclude; the checks are inference, registry, models."


async def test_an_unreachable_backend_is_named(registry: RegistryClient, tmp_path: Path) -> None:
    nowhere = "127.0.0.1:1"
    settings = GatewaySettings(host="127.0.0.1", port=0, inference_address=nowhere, registry_address=registry.address)
    service = GatewayService(settings)
    await service.start()
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{service.port}", timeout=10) as client:
            response = await client.get("/readyz")
    finally:
        await service.stop()
    assert response.status_code == 503
    assert response.json()["backends"] == {"inference": False, "registry": True}
