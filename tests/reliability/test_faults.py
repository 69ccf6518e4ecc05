"""Faults against the running stack: each process of `modelplane up` killed with SIGKILL at the
worst moment, and a model file broken after verification. What is checked is what an operator
would check afterwards: every request got an answer it was promised (200, or 503 with
Retry-After), the registry tells the truth about Triton, nothing half-written is visible, and no
acknowledged write is lost. Recovery times are printed, never asserted."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import DesiredState, Model, ModelSpec, ModelState, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.integration.conftest import RunningStack
from tests.reliability.conftest import (
    AUTH,
    ENCODERS,
    HTTP_MODEL,
    SlowFileServer,
    consistent,
    record,
    registry_models,
    service_processes,
    states,
    triton_ready,
    until,
    wait_gateway,
)

LOADED = [ENCODERS[0], ENCODERS[1]]


def kill(stack: RunningStack, role: str) -> int:
    """SIGKILL to one process of the stack; returns its pid."""
    process = service_processes(stack)[role]
    os.kill(process.pid, signal.SIGKILL)
    return process.pid


async def restarted(stack: RunningStack, role: str, old_pid: int, address: str = "") -> float:
    """Waits until the supervisor has started `role` again and it answers; returns when (monotonic)."""

    async def serving() -> bool:
        process = service_processes(stack).get(role)
        if process is None or process.pid == old_pid:
            return False
        if not address:
            return True
        async with grpc.aio.insecure_channel(address) as channel:
            answer = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1)
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    await until(serving, bool, 120)
    return time.monotonic()


class Traffic:
    """Clients embedding through the gateway until stopped; every answer is kept."""

    def __init__(self, stack: RunningStack, models: list[str], clients: int = 8) -> None:
        self.stack = stack
        self.models = models
        self.clients = clients
        self.answers: list[tuple[float, int, str]] = []  # (when, status or -1 for no answer, message)
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Traffic:
        self._tasks = [asyncio.create_task(self._client(i)) for i in range(self.clients)]
        await asyncio.sleep(1.0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    async def _client(self, index: int) -> None:
        async with httpx.AsyncClient(base_url=self.stack.gateway_url, headers=AUTH, timeout=60) as client:
            while not self._stop.is_set():
                model = self.models[index % len(self.models)]
                try:
                    response = await client.post("/v1/embeddings", json={"model": model, "input": [f"client {index}"]})
                except httpx.TransportError as error:  # the gateway itself is down: no HTTP answer
                    self.answers.append((time.monotonic(), -1, type(error).__name__))
                    await asyncio.sleep(0.2)
                    continue
                message = response.json()["error"]["message"] if response.status_code != 200 else ""
                if response.status_code == 503:
                    assert int(response.headers["Retry-After"]) >= 1
                self.answers.append((time.monotonic(), response.status_code, message))
                await asyncio.sleep(0.05)

    def statuses(self) -> Counter[int]:
        return Counter(status for _, status, _ in self.answers)

    def after(self, moment: float) -> list[int]:
        return [status for when, status, _ in self.answers if when > moment]

    def last_refusal_after(self, moment: float) -> float:
        """Seconds from `moment` to the last answer that was not a 200 (0 when there was none)."""
        return max((when - moment for when, status, _ in self.answers if when > moment and status != 200), default=0.0)


def no_internal_address(message: str) -> bool:
    return "127.0.0.1" not in message and "ipv4:" not in message and "localhost" not in message


async def test_triton_killed_under_traffic(rel: RunningStack, models: object) -> None:
    async with Traffic(rel, LOADED) as traffic:
        killed = time.monotonic()
        kill(rel, "tritonserver")
        await until(
            lambda: _ready_everywhere(rel, LOADED), bool, 120
        )  # the supervisor restarted it and the loader restored both models
        restored = time.monotonic()
        await asyncio.sleep(2.0)
    statuses = traffic.statuses()
    record(
        f"triton SIGKILL under traffic: {sum(statuses.values())} requests {dict(statuses)}; "
        f"models restored {restored - killed:.1f} s after the kill, "
        f"last 503 {traffic.last_refusal_after(killed):.1f} s after the kill"
    )
    assert set(statuses) <= {200, 503}, traffic.answers  # refused honestly while down: never 500 or 504
    for _, status, message in traffic.answers:
        if status == 503:
            assert "Retry shortly" in message or "retry" in message.lower(), message
            assert no_internal_address(message), message
    assert set(traffic.after(restored)) == {200}
    await consistent(rel)


async def _ready_everywhere(stack: RunningStack, names: list[str]) -> bool:
    registry = await states(stack)
    return all(registry[n] == ModelState.READY for n in names) and set(names) <= await triton_ready(stack)


async def test_inference_killed_under_traffic(rel: RunningStack, models: object) -> None:
    async with Traffic(rel, LOADED) as traffic:
        killed = time.monotonic()
        old = kill(rel, "inference")
        back = await restarted(rel, "inference", old, rel.inference)
        await asyncio.sleep(5.0)
    statuses = traffic.statuses()
    record(
        f"inference SIGKILL under traffic: {sum(statuses.values())} requests {dict(statuses)}; "
        f"serving again {back - killed:.1f} s after the kill, "
        f"last 503 {traffic.last_refusal_after(killed):.1f} s after the kill"
    )
    assert set(statuses) <= {200, 503}, traffic.answers
    gap = [message for _, status, message in traffic.answers if status == 503]
    assert all("inference service is unavailable" in m and no_internal_address(m) for m in gap), gap
    # The gateway's channel finds the new process within its reconnect backoff (at most 2 s).
    late = [(round(when - back, 1), status, message) for when, status, message in traffic.answers if when > back + 2.5]
    assert late and {status for _, status, _ in late} == {200}, late
    await consistent(rel)


async def test_gateway_killed_under_traffic(rel: RunningStack, models: object) -> None:
    async with Traffic(rel, LOADED) as traffic:
        killed = time.monotonic()
        old = kill(rel, "gateway")
        await restarted(rel, "gateway", old)
        await wait_gateway(rel)
        back = time.monotonic()
        await asyncio.sleep(2.0)
    statuses = traffic.statuses()
    record(
        f"gateway SIGKILL under traffic: {sum(statuses.values())} requests {dict(statuses)} (-1: connection "
        f"refused or reset while no gateway listened); ready again {back - killed:.1f} s after the kill"
    )
    # While no gateway process exists nothing can answer over HTTP; a load balancer in front of
    # several replicas hides that. What is checked: no wrong answer, and service resumes.
    assert set(statuses) <= {200, 503, -1}, traffic.answers
    assert set(traffic.after(back)) == {200}


async def test_registry_killed_during_writes_loses_no_acknowledged_write(rel: RunningStack, models: object) -> None:
    acknowledged: list[str] = []
    refused: Counter[str] = Counter()
    stop = asyncio.Event()

    async def writer(index: int) -> None:
        async with RegistryClient(rel.registry, timeout_seconds=5) as registry:
            n = 0
            while not stop.is_set():
                name = f"rel-write-{index}-{n}"
                spec = ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"/nonexistent/{name}")
                try:
                    await registry.register(spec)
                except ModelplaneError as error:
                    refused[error.code.name] += 1
                    await asyncio.sleep(0.1)
                    continue  # not acknowledged; the next write is a new model
                acknowledged.append(name)
                n += 1

    writers = [asyncio.create_task(writer(i)) for i in range(4)]
    await asyncio.sleep(1.5)
    killed = time.monotonic()
    before_kill = len(acknowledged)
    old = kill(rel, "registry")
    back = await restarted(rel, "registry", old, rel.registry)
    # Writes resume once each writer's channel reconnects: within its reconnect backoff
    # (common/channels.py: at most 2 s, with jitter), which a downtime of a few seconds reaches.
    await until(lambda: _value(len(acknowledged)), lambda count: count > before_kill, 15)
    resumed = time.monotonic()
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*writers)
    stored = await registry_models(rel)
    lost = [name for name in acknowledged if name not in stored]
    record(
        f"registry SIGKILL during writes: {len(acknowledged)} registrations acknowledged ({before_kill} before the "
        f"kill), refused meanwhile {dict(refused)}, lost {len(lost)}; serving again {back - killed:.1f} s after, "
        f"writes acknowledged again {resumed - killed:.1f} s after"
    )
    assert before_kill > 0 and len(acknowledged) > before_kill
    assert lost == []
    assert set(refused) <= {"UNAVAILABLE", "DEADLINE_EXCEEDED"}
    # The watchers (loader, inference) follow the new registry: a change made now reaches them.
    async with RegistryClient(rel.registry) as registry:
        for name in acknowledged:
            await registry.delete(name)
    async with httpx.AsyncClient(base_url=rel.gateway_url, headers=AUTH, timeout=30) as client:
        response = await client.post("/v1/embeddings", json={"model": LOADED[0], "input": ["after the registry"]})
    assert response.status_code == 200, response.text
    await consistent(rel)


async def test_loader_killed_mid_fetch_restarts_the_fetch_cleanly(
    rel: RunningStack, models: object, slow_http: SlowFileServer
) -> None:
    async with RegistryClient(rel.registry) as registry:
        await registry.register(
            ModelSpec(name=HTTP_MODEL, task=Task.EMBEDDING, source_uri=f"{slow_http.url}/{HTTP_MODEL}/")
        )
    cache = rel.home / "cache"
    big = f"{HTTP_MODEL}/model.safetensors"
    load = asyncio.create_task(_load(rel, HTTP_MODEL))
    await until(lambda: _value(slow_http.bytes_sent[big]), lambda sent: sent > 256 * 1024, 60)
    assert (await states(rel))[HTTP_MODEL] == ModelState.FETCHING
    killed = time.monotonic()
    old = kill(rel, "loader")
    with pytest.raises(ModelplaneError) as cut:
        await load
    assert cut.value.code == grpc.StatusCode.UNAVAILABLE  # the caller is told, not left waiting
    # Half a file is only ever a `.partial` under partial/: never in packages/, never in Triton.
    assert not _package_holding(cache, "model.safetensors", slow_http.root / big)
    assert not (rel.home / "triton" / "models" / HTTP_MODEL).exists()
    await restarted(rel, "loader", old, rel.loader)
    # The registry still wanted it loaded: the new loader's reconciliation starts over cleanly.
    model = await until(lambda: _model(rel, HTTP_MODEL), _settled, 180)
    recovered = time.monotonic() - killed
    record(
        f"loader SIGKILL mid-fetch: {HTTP_MODEL} READY {recovered:.1f} s after the kill; "
        f"GETs of the large file {slow_http.gets[big]}"
    )
    assert model.state == ModelState.READY, model.status.reason
    assert slow_http.gets[big] >= 2  # fetched again, not taken from a half-written file
    assert list((cache / "partial").iterdir()) == []  # the crash's leftovers were discarded
    assert _package_holding(cache, "model.safetensors", slow_http.root / big)
    async with LoaderClient(rel.loader) as loader:
        await loader.unload(HTTP_MODEL)
    await consistent(rel)


async def test_loader_killed_mid_conversion_converts_again_cleanly(rel: RunningStack, models: object) -> None:
    name = ENCODERS[5]
    load = asyncio.create_task(_load(rel, name))
    await until(lambda: _model(rel, name), lambda m: m.state == ModelState.CONVERTING, 120)
    await asyncio.sleep(0.5)  # the converter process is running
    loader_process = service_processes(rel)["loader"]
    converters = [p for p in loader_process.children(recursive=True) if "convert" in " ".join(p.cmdline())]
    killed = time.monotonic()
    old = kill(rel, "loader")
    with pytest.raises(ModelplaneError):
        await load
    # The converter dies with the loader: an orphan would keep converting and race the next one.
    _, alive = psutil.wait_procs(converters, timeout=10)
    assert alive == [], [p.cmdline() for p in alive]
    assert not (rel.home / "triton" / "models" / name).exists()
    await restarted(rel, "loader", old, rel.loader)
    model = await until(lambda: _model(rel, name), _settled, 180)
    record(f"loader SIGKILL mid-conversion: {name} READY {time.monotonic() - killed:.1f} s after the kill")
    assert model.state == ModelState.READY, model.status.reason
    async with httpx.AsyncClient(base_url=rel.gateway_url, headers=AUTH, timeout=30) as client:
        response = await client.post("/v1/embeddings", json={"model": name, "input": ["converted again"]})
    assert response.status_code == 200, response.text
    async with LoaderClient(rel.loader) as loader:
        await loader.unload(name)
    await consistent(rel)


async def test_a_model_file_broken_after_verification_fails_with_tritons_reason(
    rel: RunningStack, models: object
) -> None:
    name = ENCODERS[6]
    async with LoaderClient(rel.loader) as loader:
        await loader.ensure_loaded(name, reason="test", timeout_seconds=300)
        await loader.unload(name)
        # Verified, converted and staged; now a disk error (or a person) breaks the model file.
        [onnx] = (rel.home / "triton" / "models" / name).rglob("*.onnx")
        onnx.write_bytes(b"this is not an ONNX model")
        with pytest.raises(ModelplaneError) as failed:
            await loader.ensure_loaded(name, reason="test", timeout_seconds=300)
    model = (await registry_models(rel))[name]
    record(f"model broken after verification: {failed.value.code.name}: {model.status.reason[:200]}")
    assert model.state == ModelState.FAILED
    assert "Triton refused to load 'rel-enc-6'" in model.status.reason
    assert "Protobuf parsing failed" in model.status.reason  # Triton's own words for what is wrong
    assert "At:" not in model.status.reason and ".py(" not in model.status.reason  # no stack trace
    assert model.desired_state in (DesiredState.LOADED, DesiredState.UNLOADED)
    assert name not in await triton_ready(rel)
    async with httpx.AsyncClient(base_url=rel.gateway_url, headers=AUTH, timeout=30) as client:
        broken = await client.post("/v1/embeddings", json={"model": name, "input": ["x"]})
        others = [await client.post("/v1/embeddings", json={"model": m, "input": ["x"]}) for m in LOADED]
    assert broken.status_code == 409 and broken.json()["error"]["state"] == "FAILED", broken.text
    assert "Protobuf parsing failed" in broken.json()["error"]["message"]
    assert "Fix the cause, then load it again" in broken.json()["error"]["message"]
    assert [r.status_code for r in others] == [200, 200]  # the other models never noticed
    await consistent(rel)


async def _load(stack: RunningStack, name: str) -> None:
    async with LoaderClient(stack.loader) as loader:
        await loader.ensure_loaded(name, reason="test", timeout_seconds=300)


async def _model(stack: RunningStack, name: str) -> Model:
    return (await registry_models(stack))[name]


async def _value(value: int) -> int:
    return value


def _package_holding(cache: Path, file_name: str, original: Path) -> bool:
    """Whether a package in the cache holds a complete copy of `original`."""
    expected = original.read_bytes()
    return any(p.read_bytes() == expected for p in (cache / "packages").rglob(file_name))


def _settled(model: Model) -> bool:
    return model.state in (ModelState.READY, ModelState.FAILED)
