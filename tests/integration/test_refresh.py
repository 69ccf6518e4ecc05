"""An operator's commands on a serving model, against the running stack (real Triton, preloading
on): `models load --refresh` fetches and verifies beside the served copy and switches only to a
READY new one, and `models unload` holds against the predictive preloader.

A stack of its own (no bundled model, preloading on, the loader's budget work every second) and
one small real-architecture encoder, converted once (about 15 s on two cores); the refreshes then
take a few seconds each, and the unload test waits three rounds of the budget work.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from google.protobuf import field_mask_pb2
from tritonclient.grpc import aio as triton_aio

from modelplane.common.converters import to_proto
from modelplane.common.errors import FailedPrecondition
from modelplane.common.types import DesiredState, ModelSpec, ModelState, RuntimeHints, Task
from modelplane.common.v1 import model_pb2
from modelplane.loader.client import LoaderClient
from modelplane.loader.triton_control import TritonControl
from modelplane.loader.types import LoadUpdate
from modelplane.registry.client import RegistryClient
from modelplane.registry.v1 import registry_service_pb2 as registry_pb
from tests.encoders import save_tiny_bert
from tests.integration.conftest import RunningStack, running_stack

MODEL = "refresh-enc"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    env = {
        "MODELPLANE_LOADER_PRELOAD": "true",
        "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "1",
        "MODELPLANE_LOADER_EVICTION_GRACE_SECONDS": "0.5",
        "MODELPLANE_INFERENCE_STATS_REPORT_INTERVAL_SECONDS": "0.5",
    }
    with running_stack(tmp_path_factory.mktemp("refresh-home"), extra_env=env, bundled=False) as running:
        yield running


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    return save_tiny_bert(tmp_path_factory.mktemp("refresh") / MODEL, minilm_path, seed=31)


@pytest.fixture(scope="module")
async def serving(stack: RunningStack, package: Path) -> str:
    async with RegistryClient(stack.registry) as registry:
        await registry.register(ModelSpec(name=MODEL, task=Task.EMBEDDING, source_uri=str(package)))
    async with LoaderClient(stack.loader) as loader:
        await loader.ensure_loaded(MODEL, reason="test", timeout_seconds=300)
    return MODEL


async def _refresh(stack: RunningStack) -> list[LoadUpdate]:
    async with LoaderClient(stack.loader) as loader:
        return [update async for update in loader.load(MODEL, refresh=True, timeout_seconds=300)]


async def _served(stack: RunningStack) -> tuple[ModelState, bool, int]:
    """What a user sees: the registry's state, Triton's readiness and an embeddings request's status."""
    async with RegistryClient(stack.registry) as registry:
        state = (await registry.get_model(MODEL)).state
    control = TritonControl(stack.triton_grpc)
    try:
        ready = await control.is_ready(MODEL)
    finally:
        await control.close()
    async with httpx.AsyncClient(base_url=stack.gateway_url, timeout=30) as client:
        response = await client.post("/v1/embeddings", json={"model": MODEL, "input": ["still serving"]})
    return state, ready, response.status_code


async def _watch_while(stack: RunningStack, work: asyncio.Task[object]) -> list[tuple[ModelState, bool, int]]:
    """Samples what a user sees until `work` ends, then once more."""
    seen = []
    while not work.done():
        seen.append(await _served(stack))
        await asyncio.sleep(0.1)
    seen.append(await _served(stack))
    return seen


async def _events(stack: RunningStack) -> list[str]:
    async with RegistryClient(stack.registry) as registry:
        return [e.message for e in await registry.events(MODEL)]


async def test_a_refresh_fetches_beside_the_served_copy_and_it_serves_throughout(
    stack: RunningStack, serving: str
) -> None:
    events_before = len(await _events(stack))
    refresh = asyncio.create_task(_refresh(stack))
    seen = await _watch_while(stack, refresh)
    updates = refresh.result()
    assert set(seen) == {(ModelState.READY, True, 200)}, seen
    final = updates[-1]
    assert final.done and final.model is not None and final.model.state == ModelState.READY
    assert ModelState.FETCHING in {u.progress.phase for u in updates}  # it did fetch again
    assert ModelState.FETCHING in {d.phase for d in final.phase_durations}
    messages = (await _events(stack))[events_before:]
    assert messages[0].startswith("refreshing: fetching and verifying a new copy beside the served one"), messages
    assert messages[-1].startswith("refreshed: "), messages


async def test_a_refresh_whose_source_changed_leaves_the_served_copy_untouched(
    stack: RunningStack, serving: str, package: Path, tmp_path: Path
) -> None:
    original = tmp_path / "config.json"
    shutil.copy(package / "config.json", original)
    (package / "config.json").write_text((package / "config.json").read_text() + "\n")
    try:
        with pytest.raises(FailedPrecondition) as refused:
            await _refresh(stack)
    finally:
        shutil.copy(original, package / "config.json")
    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert "the served copy is untouched and still serving" in refused.value.message
    assert await _served(stack) == (ModelState.READY, True, 200)
    assert (await _events(stack))[-1].startswith("refresh not applied: ")


async def test_a_refresh_switches_triton_to_the_new_copy(stack: RunningStack, serving: str) -> None:
    """A changed serving setting (mutable in place) reaches Triton through a refresh."""
    async with RegistryClient(stack.registry) as registry:
        spec = (await registry.get_model(MODEL)).spec.model_copy(
            update={"runtime_hints": RuntimeHints(max_queue_delay_microseconds=4321)}
        )
        await registry.stub.UpdateModel(
            registry_pb.UpdateModelRequest(
                spec=to_proto(spec, model_pb2.ModelSpec), update_mask=field_mask_pb2.FieldMask(paths=["runtime_hints"])
            )
        )
    refresh = asyncio.create_task(_refresh(stack))
    seen = await _watch_while(stack, refresh)
    assert set(seen) == {(ModelState.READY, True, 200)}, seen
    client = triton_aio.InferenceServerClient(stack.triton_grpc)
    try:
        config = (await client.get_model_config(MODEL)).config
    finally:
        await client.close()
    assert config.dynamic_batching.max_queue_delay_microseconds == 4321


async def test_an_operator_unload_holds_against_the_preloader_and_delete_follows(
    stack: RunningStack, serving: str
) -> None:
    assert await _served(stack) == (ModelState.READY, True, 200)  # just used: the preloader wants it
    async with LoaderClient(stack.loader) as loader:
        unloaded = await loader.unload(MODEL)
    assert unloaded.state == ModelState.STAGED
    events_after_unload = len(await _events(stack))
    await asyncio.sleep(3.5)  # three rounds of the loader's budget work, with fresh statistics
    async with RegistryClient(stack.registry) as registry:
        model = await registry.get_model(MODEL)
        assert (model.state, model.desired_state) == (ModelState.STAGED, DesiredState.HELD_UNLOADED)
        assert len(await registry.events(MODEL)) == events_after_unload  # no preload, no reset
        await registry.delete(MODEL)
