"""The node's residency against a real registry, without Triton (nothing listens at its address):
an operator's unload holds against the predictive preloader, and a refresh never rides on a
preload. The loads into the real Triton are tested under tests/integration (test_refresh.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import DesiredState, ModelSpec, ModelState, RequestCount, Task
from modelplane.loader.decisions import Preload
from modelplane.loader.handlers import LoaderHandler
from tests.loader.conftest import LoaderCore, loader_settings
from tests.loader.servers import write_random_file

MIB = 2**20


@pytest.fixture
async def core(tmp_path: Path, make_core: Callable[..., LoaderCore]) -> LoaderCore:
    # Copied into the cache, not linked: the tests change the source behind a verified package, and a
    # linked copy would change with it (and be fetched again by the preload, see test_fetching.py).
    settings = loader_settings(
        tmp_path, host_memory_bytes=1024 * MIB, preload=True, eviction_grace_seconds=0.0, link_local_sources=False
    )
    return make_core(settings)


async def _staged_and_used(core: LoaderCore, tmp_path: Path) -> None:
    """Model 'm': verified into the cache, STAGED with a measured footprint, and just requested:
    what the preloader looks for. Its files are no model, so a load that gets past fetching and
    verifying fails at once (NOT_A_MODEL)."""
    write_random_file(tmp_path / "pkg" / "notes.txt", 300_000)
    write_random_file(tmp_path / "pkg" / "data.csv", 100)
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    model = await core.prepare("m")
    await core.registry.transition(model, ModelState.STAGED, "staged (this test stops before conversion)")
    model = await core.registry.get_model("m")
    await core.registry.transition(model, ModelState.STAGED, footprint_bytes=10 * MIB)
    await core.registry.record_requests([RequestCount(model_name="m", count=3, last_request_time=datetime.now(UTC))])


async def _maintenance_round(handler: LoaderHandler) -> list[object]:
    return await handler.maintenance.decide(
        await handler.registry.statistics(),
        await handler.registry.list_models(),
        loads_running=len(handler.residency.jobs),
        preloading=handler.residency.preloading(),
    )


async def _settled(handler: LoaderHandler) -> None:
    """Returns once the residency has nothing in flight."""
    for _ in range(200):
        await asyncio.sleep(0.05)
        if not handler.residency.busy():
            return
    raise AssertionError(f"still busy: {handler.residency.busy()}")


async def test_an_operator_unload_holds_against_the_preloader(core: LoaderCore, tmp_path: Path) -> None:
    await _staged_and_used(core, tmp_path)
    assert Preload("m") in await _maintenance_round(core.handler)  # hot and not loaded: a preload
    await core.handler.memory.drop_claim("m")  # that decision is not carried out here

    unloaded = await core.handler.unload("m")  # the operator's word
    events_after_unload = len(await core.registry.events("m"))
    assert unloaded.state == ModelState.STAGED

    assert Preload("m") not in await _maintenance_round(core.handler)
    # A preload decided just before the unload, carried out after it, stands down too.
    await core.handler.residency.carry_out([Preload("m")])
    await _settled(core.handler)
    model = await core.registry.get_model("m")
    assert model.desired_state == DesiredState.HELD_UNLOADED
    assert model.state == ModelState.STAGED
    assert len(await core.registry.events("m")) == events_after_unload  # nothing was loaded or reset
    assert not core.handler.memory.budget.claims  # the preload's claim was given back
    await core.registry.delete("m")  # unload, then delete: nothing races it


async def test_an_operator_load_lifts_the_hold(core: LoaderCore, tmp_path: Path) -> None:
    await _staged_and_used(core, tmp_path)
    await core.handler.unload("m")
    with pytest.raises(ModelplaneError):  # no Triton here: the load itself cannot finish
        async for _ in core.handler.load("m", reason="operator"):
            pass
    assert (await core.registry.get_model("m")).desired_state == DesiredState.LOADED


async def test_a_refresh_never_joins_a_preload(core: LoaderCore, tmp_path: Path) -> None:
    await _staged_and_used(core, tmp_path)
    write_random_file(tmp_path / "pkg" / "data.csv", 100)  # the source changed since it was verified
    await core.handler.residency.carry_out([Preload("m")])
    for _ in range(100):  # the preload's job is under way before the operator's refresh arrives
        if "m" in core.handler.residency.jobs:
            break
        await asyncio.sleep(0.01)
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("m", reason="operator", refresh=True):
            pass
    # The preload (from the cache, no fetch) ends with NOT_A_MODEL; the refresh fetched again.
    assert refused.value.reason == "CHECKSUM_MISMATCH", refused.value.message
    events = await core.registry.events("m")
    assert [e.to_state for e in events].count(ModelState.FETCHING) == 2  # the first fetch and the refresh
