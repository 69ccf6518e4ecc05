"""The registry's gRPC edge, against a real in-process server on a free port."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import grpc
import pytest

from modelplane.common.errors import InvalidArgument, NotFound
from modelplane.common.types import ModelSpec, ModelState, RequestCount, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from tests.grpc_reflection_client import describe_methods, list_services


@pytest.fixture
async def registry(database_url: str) -> AsyncIterator[RegistryService]:
    service = RegistryService(RegistrySettings(host="127.0.0.1", port=0, database_url=database_url))
    await service.start()
    yield service
    await service.stop()


@pytest.fixture
async def client(registry: RegistryService) -> AsyncIterator[RegistryClient]:
    async with RegistryClient(f"127.0.0.1:{registry.port}") as client:
        yield client


async def test_register_and_read_back_over_grpc(client: RegistryClient) -> None:
    spec = ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/models/minilm", labels={"team": "search"})
    model, created = await client.register(spec, load=True)
    assert created
    fetched = await client.get_model("minilm")
    assert fetched.spec == model.spec and fetched.spec.labels == {"team": "search"}
    assert [m.name for m in await client.list_models(task=Task.EMBEDDING)] == ["minilm"]


async def test_errors_carry_code_reason_and_message(client: RegistryClient) -> None:
    with pytest.raises(NotFound) as missing:
        await client.get_model("ghost")
    assert missing.value.code == grpc.StatusCode.NOT_FOUND
    assert missing.value.reason == "MODEL_NOT_FOUND"
    assert "Model 'ghost' is not registered" in missing.value.message
    with pytest.raises(InvalidArgument) as invalid:
        await client.register(ModelSpec(name="Bad Name", task=Task.EMBEDDING, source_uri="/m"))
    assert invalid.value.reason == "INVALID_MODEL_SPEC" and "is not valid" in invalid.value.message


async def test_watch_streams_transitions(client: RegistryClient) -> None:
    model, _ = await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"))
    seen: list[ModelState] = []

    async def follow() -> None:
        async for change in client.watch(names=["minilm"], include_initial=True):
            seen.append(change.model.state)
            if change.model.state == ModelState.FETCHING:
                return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    await client.transition(model, ModelState.FETCHING, "fetching")
    await asyncio.wait_for(follower, timeout=5)
    assert seen == [ModelState.REGISTERED, ModelState.FETCHING]


async def test_reflection_lists_and_describes_the_service(registry: RegistryService) -> None:
    address = f"127.0.0.1:{registry.port}"
    services = await asyncio.to_thread(list_services, address)
    assert "modelplane.registry.v1.RegistryService" in services
    assert "grpc.health.v1.Health" in services
    methods = await asyncio.to_thread(describe_methods, address, "modelplane.registry.v1.RegistryService")
    assert methods["RegisterModel"][:2] == (
        "modelplane.registry.v1.RegisterModelRequest",
        "modelplane.registry.v1.RegisterModelResponse",
    )
    assert methods["WatchModels"][2] is True


async def test_request_statistics_round_trip_with_every_rate(client: RegistryClient) -> None:
    now = datetime.now(UTC)
    await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"))
    await client.record_requests([RequestCount(model_name="minilm", count=60, last_request_time=now, cold_starts=2)])
    [stats] = await client.statistics(["minilm"])
    assert (stats.model_name, stats.total_requests, stats.cold_starts) == ("minilm", 60, 2)
    # One batch of 60 adds 60/tau to each rate: the 1-minute rate reacts five times more than the 5-minute one.
    assert stats.rate_1m == pytest.approx(1.0, rel=0.05)
    assert stats.rate_5m == pytest.approx(0.2, rel=0.05)
    assert stats.rate_1h == pytest.approx(60 / 3600, rel=0.05)
    assert stats.hour_of_day_counts[now.hour] == 60
    assert stats.last_request_time is not None and abs((stats.last_request_time - now).total_seconds()) < 0.001
    assert await client.statistics(["ghost"]) == []
