"""The memory budget against the real stack: several copies of a small real-architecture BERT, a
host budget that holds two of them, and the real Triton, loader, inference service and gateway.

The stack runs without the bundled model, without preloading (so what is resident is what the
tests did), with request statistics read every second and a short gateway deadline, so an
on-demand load that cannot finish in time shows as 503 with Retry-After.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import grpc
import httpx
import numpy as np
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from modelplane.common.errors import Cancelled, DeadlineExceeded, ModelplaneError, ResourceExhausted
from modelplane.common.types import DesiredState, ModelSpec, ModelState, Priority, Task
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelplane.loader.client import LoaderClient
from modelplane.loader.devices import GpuMemoryReader
from modelplane.loader.errors import TritonUnavailable
from modelplane.loader.triton_control import TritonControl
from modelplane.registry.client import RegistryClient
from tests.encoders import save_tiny_bert
from tests.integration.conftest import RunningStack, running_stack

MIB = 2**20
T = TypeVar("T")
# Each copy holds about 34 MiB of its own once loaded, and the copies share about 25 MiB of
# runtime: 112 MiB less the 10% margin (101 MiB) holds two (93), never three (129).
HOST_BUDGET = 112 * MIB


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    return {f"enc-{i}": save_tiny_bert(root / f"enc-{i}", minilm_path, seed=i) for i in range(9)}


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    env = {
        "MODELPLANE_LOADER_HOST_MEMORY_BYTES": str(HOST_BUDGET),
        "MODELPLANE_LOADER_PRELOAD": "false",
        "MODELPLANE_LOADER_STATISTICS_INTERVAL_SECONDS": "1",
        "MODELPLANE_LOADER_EVICTION_GRACE_SECONDS": "0.5",
        "MODELPLANE_LOADER_MEMORY_WAIT_SECONDS": "120",
        "MODELPLANE_INFERENCE_STATS_REPORT_INTERVAL_SECONDS": "0.5",
        "MODELPLANE_GATEWAY_REQUEST_TIMEOUT_SECONDS": "60",
    }
    with running_stack(tmp_path_factory.mktemp("tight-home"), extra_env=env, bundled=False) as running:
        yield running


async def register(stack: RunningStack, name: str, source: Path, **spec: object) -> None:
    async with RegistryClient(stack.registry) as registry:
        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(source), **spec))


async def load(stack: RunningStack, name: str) -> None:
    async with LoaderClient(stack.loader) as loader:
        await loader.ensure_loaded(name, reason="test", timeout_seconds=300)


async def states(stack: RunningStack) -> dict[str, ModelState]:
    async with RegistryClient(stack.registry) as registry:
        return {m.name: m.state for m in await registry.list_models()}


async def model_state(stack: RunningStack, name: str) -> ModelState:
    return (await states(stack))[name]


async def until(read: Callable[[], Awaitable[T]], done: Callable[[T], bool], limit_seconds: float) -> T:
    """Polls another process's state until `done` holds; fails after `limit_seconds`."""
    deadline = time.monotonic() + limit_seconds
    while True:
        value = await read()
        if done(value):
            return value
        assert time.monotonic() < deadline, f"still {value!r} after {limit_seconds:.0f} s"
        await asyncio.sleep(0.2)


async def triton_ready(stack: RunningStack) -> set[str]:
    control = TritonControl(stack.triton_grpc)
    try:
        return {m.name for m in await control.index() if m.state == "READY"}
    except TritonUnavailable:
        return set()  # Triton is restarting: nothing is ready in it
    finally:
        await control.close()


async def unload_all(stack: RunningStack) -> None:
    async with LoaderClient(stack.loader) as loader:
        for name, state in (await states(stack)).items():
            if state == ModelState.READY:
                await loader.unload(name)


def embed(stack: RunningStack, name: str, text: str = "the budget holds two") -> httpx.Response:
    return httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": name, "input": [text]}, timeout=90)


async def test_a_third_model_evicts_the_least_recently_used(tight: RunningStack, encoders: dict[str, Path]) -> None:
    for name in ("enc-0", "enc-1", "enc-2"):
        await register(tight, name, encoders[name])
    await load(tight, "enc-0")
    await load(tight, "enc-1")
    assert embed(tight, "enc-0").status_code == 200  # enc-0 used after enc-1 was loaded
    await asyncio.sleep(2.5)  # the request reaches the registry's statistics, then the loader
    await load(tight, "enc-2")

    assert (await states(tight))["enc-1"] == ModelState.STAGED
    assert await triton_ready(tight) == {"enc-0", "enc-2"}
    async with RegistryClient(tight.registry) as registry:
        evicted = await registry.get_model("enc-1")
        events = await registry.events("enc-1")
        loaded = await registry.get_model("enc-2")
    assert evicted.desired_state == DesiredState.UNLOADED  # reconciliation must not bring it back
    assert "evicted to make room for 'enc-2'" in events[-1].message
    assert 20 * MIB < evicted.status.footprint_bytes < HOST_BUDGET  # measured, kept for next time
    assert 20 * MIB < loaded.status.footprint_bytes < HOST_BUDGET
    async with LoaderClient(tight.loader) as loader:
        budget = await loader.budget()
    [cpu] = budget.devices
    assert cpu.device == "cpu" and cpu.capacity_bytes == int(HOST_BUDGET * 0.9)
    assert [h.model_name for h in cpu.holders] == ["enc-0", "enc-2"]  # least recently used first
    assert all(h.measured for h in cpu.holders)
    # The runtime the stubs share (libpython, onnxruntime) is counted once, not once per model:
    # each model's own bytes stay the same whatever else is loaded. It is about 10 MiB (9.8 since
    # each onnxruntime run keeps one thread on two cores, docs/BATCHING.md section 11).
    assert 6 * MIB < cpu.shared_bytes < sum(h.bytes for h in cpu.holders)
    assert cpu.used_bytes == sum(h.bytes for h in cpu.holders) + cpu.shared_bytes <= cpu.capacity_bytes

    listing = await models_ls(tight)
    rows = {line.split("│")[1].strip(): line for line in listing.splitlines() if line.count("│") > 3}
    assert "READY" in rows["enc-0"] and "MiB" in rows["enc-0"] and "ago" in rows["enc-0"]
    assert "STAGED" in rows["enc-1"] and "MiB" in rows["enc-1"]  # its measured footprint, kept
    assert rows["enc-1"].split("│")[6].strip() == "never"  # loaded, never requested
    # Footprints are re-measured every second, so the used figure may have moved a little.
    assert re.search(rf"budget cpu: \d+ MiB used of {cpu.capacity_bytes / MIB:.0f} MiB \(\d+ MiB free", listing)
    assert re.search(r"; \d+ MiB of it the runtime the models share", listing)
    await unload_all(tight)


async def models_ls(stack: RunningStack) -> str:
    """`modelplane models ls` as an operator runs it."""
    env = {**os.environ, "MODELPLANE_CLI_REGISTRY": stack.registry, "MODELPLANE_CLI_LOADER": stack.loader}
    env["COLUMNS"] = "200"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "modelplane.cli", "models", "ls", env=env, stdout=asyncio.subprocess.PIPE
    )
    output, _ = await process.communicate()
    assert process.returncode == 0
    return output.decode()


async def test_a_load_that_would_evict_a_higher_class_is_refused(
    tight: RunningStack, encoders: dict[str, Path]
) -> None:
    await register(tight, "enc-3", encoders["enc-3"], priority=Priority.HIGH)
    await register(tight, "enc-4", encoders["enc-4"], priority=Priority.PINNED)
    await load(tight, "enc-3")
    await load(tight, "enc-4")
    async with LoaderClient(tight.loader) as loader:
        with pytest.raises(ResourceExhausted) as refused:
            await loader.ensure_loaded("enc-0", reason="test", timeout_seconds=60)
    error = refused.value
    assert error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.reason == "BUDGET_EXCEEDED"
    assert "Model 'enc-0' (normal) needs" in error.message
    assert "'enc-4' (pinned," in error.message and "'enc-3' (high," in error.message
    assert (await states(tight))["enc-0"] == ModelState.STAGED  # refused, not failed
    assert await triton_ready(tight) == {"enc-3", "enc-4"}  # nothing was evicted

    response = embed(tight, "enc-0")  # on demand, the same refusal reaches the HTTP caller
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert "'enc-4' (pinned," in response.json()["error"]["message"]
    await unload_all(tight)


async def test_a_model_over_its_quota_is_unloaded_and_failed_with_the_numbers(
    tight: RunningStack, encoders: dict[str, Path]
) -> None:
    await register(tight, "enc-5", encoders["enc-5"], memory_quota_bytes=8 * MIB)
    async with LoaderClient(tight.loader) as loader:
        with pytest.raises(ResourceExhausted) as refused:
            await loader.ensure_loaded("enc-5", reason="test", timeout_seconds=300)
    assert refused.value.reason == "MEMORY_QUOTA_EXCEEDED"
    measured = int(refused.value.metadata["measured_bytes"])
    assert measured > 8 * MIB
    assert f"({measured} bytes) once loaded, over its memory quota of 8 MiB ({8 * MIB} bytes)" in refused.value.message
    async with RegistryClient(tight.registry) as registry:
        model = await registry.get_model("enc-5")
    assert model.state == ModelState.FAILED and model.status.footprint_bytes == measured
    assert "enc-5" not in await triton_ready(tight)
    async with LoaderClient(tight.loader) as loader:
        assert "enc-5" not in {h.model_name for d in (await loader.budget()).devices for h in d.holders}


async def test_requests_racing_loads_and_evictions_are_all_served_by_the_right_model(
    tight: RunningStack, encoders: dict[str, Path]
) -> None:
    names = ["enc-0", "enc-1", "enc-2"]
    references = {}
    for name in names:  # one at a time: each model's own output for the probe text
        await load(tight, name)
        response = embed(tight, name, "probe")
        assert response.status_code == 200
        references[name] = np.array(response.json()["data"][0]["embedding"])

    async with httpx.AsyncClient(base_url=tight.gateway_url, timeout=120) as client:

        async def call(index: int) -> tuple[str, httpx.Response]:
            name = names[index % 3]
            return name, await client.post("/v1/embeddings", json={"model": name, "input": ["probe"]})

        results = await asyncio.gather(*(call(i) for i in range(24)))
    for name, response in results:
        assert response.status_code == 200, response.text
        assert np.allclose(np.array(response.json()["data"][0]["embedding"]), references[name], atol=1e-5)

    async def budget_and_triton() -> tuple[set[str], set[str]]:
        async with LoaderClient(tight.loader) as loader:
            [cpu] = (await loader.budget()).devices
        assert cpu.used_bytes <= cpu.capacity_bytes and len(cpu.holders) <= 2
        return {h.model_name for h in cpu.holders}, await triton_ready(tight)

    # The last eviction may still be under way: its model's memory counts until its backend
    # process has exited. Once it has, the budget holds exactly what Triton holds.
    await until(budget_and_triton, lambda pair: pair[0] == pair[1], 30)
    await unload_all(tight)


async def test_the_loader_exports_what_it_decided(tight: RunningStack) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(tight.metrics["loader"])).text
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    assert samples[("modelplane_loader_budget_bytes", (("device", "cpu"), ("kind", "capacity")))] == int(
        HOST_BUDGET * 0.9
    )
    assert samples[("modelplane_loader_evictions_total", (("reason", "load"),))] >= 1
    assert samples[("modelplane_loader_unloads_total", (("reason", "eviction"),))] >= 1
    assert samples[("modelplane_loader_loads_total", (("reason", "on-demand"), ("result", "loaded")))] >= 1
    assert samples[("modelplane_loader_phase_duration_seconds_count", (("phase", "loading"),))] >= 1
    assert samples[("modelplane_loader_cache_lookups_total", (("kind", "artifact"), ("result", "hit")))] >= 1
    assert samples[("modelplane_loader_eviction_age_seconds_count", ())] >= 1
    assert ("modelplane_loader_loads_waiting", ()) in samples


async def test_an_on_demand_load_past_the_deadline_is_503_with_retry_after_and_continues(
    tight: RunningStack, encoders: dict[str, Path]
) -> None:
    await register(tight, "enc-6", encoders["enc-6"])  # never loaded: it must be converted first
    channel = grpc.aio.insecure_channel(tight.inference)
    stub = pb_grpc.InferenceServiceStub(channel)
    request = pb.EmbedRequest(model="enc-6", inputs=[pb.EmbedInput(text="late")])
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as late:
        await stub.Embed(request, timeout=3.0)
    assert late.value.code() == grpc.StatusCode.UNAVAILABLE  # answered before the deadline
    assert time.monotonic() - started < 3.0
    assert "is loading and was not ready within this request's deadline" in late.value.details()
    # The load went on without the request.
    await until(lambda: model_state(tight, "enc-6"), lambda state: state == ModelState.READY, 120)
    assert (await stub.Embed(request, timeout=10.0)).embeddings
    await channel.close()
    await unload_all(tight)


async def test_cancel_load_leaves_the_model_as_its_files_allow(tight: RunningStack, encoders: dict[str, Path]) -> None:
    await register(tight, "enc-7", encoders["enc-7"])
    async with LoaderClient(tight.loader) as loader:
        stream = asyncio.create_task(loader.ensure_loaded("enc-7", reason="test", timeout_seconds=300))
        await until(lambda: model_state(tight, "enc-7"), lambda state: state != ModelState.REGISTERED, 60)
        assert await loader.cancel("enc-7") is True
        with pytest.raises(Cancelled):
            await stream
        assert await loader.cancel("enc-7") is False
    await asyncio.sleep(2.0)  # nothing starts it again: not the registry watch, not reconciliation
    async with RegistryClient(tight.registry) as registry:
        model = await registry.get_model("enc-7")
    assert model.state in (ModelState.REGISTERED, ModelState.STAGED)
    assert model.desired_state == DesiredState.UNLOADED
    assert "enc-7" not in await triton_ready(tight)


async def test_a_caller_that_joins_a_superseded_load_gets_the_new_version_loaded(
    tight: RunningStack, minilm_path: Path, tmp_path: Path
) -> None:
    """`modelplane up` from a checkout at another path registers the bundled model anew (a new
    version) while reconciliation is still loading the old one; its load request must end with
    the new version loaded, not with the old load's stale transition."""
    first = save_tiny_bert(tmp_path / "here", minilm_path, seed=21)  # new weights: a cold conversion
    moved = tmp_path / "moved"
    shutil.copytree(first, moved)
    await register(tight, "enc-moved", first)
    async with LoaderClient(tight.loader) as loader:
        old = asyncio.create_task(loader.ensure_loaded("enc-moved", reason="test", timeout_seconds=300))
        # Converting, which takes seconds: the old load is still running when the caller below joins it.
        await until(lambda: model_state(tight, "enc-moved"), lambda state: state == ModelState.CONVERTING, 60)
        await register(tight, "enc-moved", moved)
        loaded = await loader.ensure_loaded("enc-moved", reason="test", timeout_seconds=300)
        with pytest.raises(ModelplaneError) as superseded:
            await old
    assert superseded.value.reason == "STALE_TRANSITION"
    assert (loaded.version, loaded.state) == (2, ModelState.READY)
    assert loaded.spec.source_uri == str(moved)
    assert embed(tight, "enc-moved").status_code == 200
    await unload_all(tight)
    async with LoaderClient(tight.loader) as loader:
        [cpu] = (await loader.budget()).devices
    assert (cpu.used_bytes, [h.model_name for h in cpu.holders]) == (0, [])  # the superseded load holds nothing


async def test_a_load_past_its_timeout_is_undone_and_failed(tight: RunningStack, encoders: dict[str, Path]) -> None:
    await register(tight, "enc-8", encoders["enc-8"])  # its conversion alone takes longer than 2 s
    async with LoaderClient(tight.loader) as loader:
        with pytest.raises(DeadlineExceeded) as late:
            await loader.ensure_loaded("enc-8", reason="test", timeout_seconds=2)
    assert late.value.reason == "LOAD_TIMED_OUT"
    assert "took longer than 2 s and was stopped; the partial load was undone" in late.value.message
    async with RegistryClient(tight.registry) as registry:
        model = await registry.get_model("enc-8")
    assert model.state == ModelState.FAILED and "MODELPLANE_LOADER_LOAD_TIMEOUT_SECONDS" in model.status.reason
    assert "enc-8" not in await triton_ready(tight)


async def test_an_idle_model_is_unloaded_after_its_ttl(tight: RunningStack, encoders: dict[str, Path]) -> None:
    await register(tight, "enc-idle", encoders["enc-1"], idle_ttl=timedelta(seconds=3))
    await load(tight, "enc-idle")
    await until(lambda: model_state(tight, "enc-idle"), lambda state: state == ModelState.STAGED, 30)
    async with RegistryClient(tight.registry) as registry:
        events = await registry.events("enc-idle")
    assert "unloaded after its idle TTL" in events[-1].message


async def test_the_embedded_tritons_real_metrics_report_no_gpu_here(tight: RunningStack) -> None:
    # CPU-only machine: Triton serves metrics but no nv_gpu_memory_* series, so only host memory
    # is budgeted. (The GPU path is tested on a real GPU server's metrics text in tests/loader.)
    async with httpx.AsyncClient(timeout=5) as client:
        assert (await client.get(tight.triton_metrics_url)).status_code == 200
    assert await GpuMemoryReader(tight.triton_metrics_url).read() == []


async def test_every_ready_model_is_restored_after_triton_is_killed(
    tight: RunningStack, encoders: dict[str, Path]
) -> None:
    await load(tight, "enc-0")
    await load(tight, "enc-2")
    repository = str(tight.home / "triton" / "models")
    [server] = [
        p
        for p in psutil.process_iter(["name", "cmdline"])
        if p.info["name"] == "tritonserver" and f"--model-repository={repository}" in (p.info["cmdline"] or [])
    ]
    statuses: list[int] = []
    stop = asyncio.Event()

    async def traffic() -> None:
        async with httpx.AsyncClient(base_url=tight.gateway_url, timeout=60) as client:
            while not stop.is_set():
                for name in ("enc-0", "enc-2"):
                    response = await client.post("/v1/embeddings", json={"model": name, "input": ["still there?"]})
                    statuses.append(response.status_code)
                    if response.status_code == 503:
                        assert "Retry-After" in response.headers
                await asyncio.sleep(0.1)

    load_traffic = asyncio.create_task(traffic())
    await asyncio.sleep(1.0)
    os.kill(server.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    while True:
        restored = await states(tight)
        if restored["enc-0"] == restored["enc-2"] == ModelState.READY and {"enc-0", "enc-2"} <= await triton_ready(
            tight
        ):
            break
        assert time.monotonic() - killed_at < 120, f"not restored: {restored}"
        await asyncio.sleep(0.5)
    recovered = time.monotonic() - killed_at
    served_after = len(statuses)
    await asyncio.sleep(3.0)
    stop.set()
    await load_traffic
    assert set(statuses) <= {200, 503}, statuses  # refused honestly while down, never a 500
    assert statuses[served_after:] and set(statuses[served_after:]) == {200}
    print(f"restored {recovered:.1f} s after SIGKILL; {statuses.count(503)} requests got 503 meanwhile")
