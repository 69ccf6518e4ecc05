"""What every service's server provides: Prometheus metrics on their own port, stopped with it."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest
import structlog.testing
from prometheus_client.parser import text_string_to_metric_families

from modelplane.common.errors import NotFound
from modelplane.registry.client import RegistryClient
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from tests.conftest import free_port


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    }


async def test_metrics_count_requests_by_method_and_status(tmp_path: Path) -> None:
    metrics_port = free_port()
    service = RegistryService(
        RegistrySettings(
            host="127.0.0.1",
            port=0,
            metrics_port=metrics_port,
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
        )
    )
    await service.start()
    try:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with httpx.AsyncClient(timeout=5) as http:
            before = _samples((await http.get(url)).text, "modelplane_grpc_requests_total")
        async with RegistryClient(f"127.0.0.1:{service.port}") as client:
            await client.list_models()
            with pytest.raises(NotFound):
                await client.get_model("ghost")
        async with httpx.AsyncClient(timeout=5) as http:
            text = (await http.get(url)).text
    finally:
        await service.stop()

    counts = _samples(text, "modelplane_grpc_requests_total")
    listed = (("code", "OK"), ("method", "/modelplane.registry.v1.RegistryService/ListModels"))
    missing = (("code", "NOT_FOUND"), ("method", "/modelplane.registry.v1.RegistryService/GetModel"))
    assert counts[listed] - before.get(listed, 0) == 1
    assert counts[missing] - before.get(missing, 0) == 1
    latency = _samples(text, "modelplane_grpc_request_duration_seconds_count")
    assert latency[(("method", "/modelplane.registry.v1.RegistryService/ListModels"),)] >= 1
    assert (("method", "/modelplane.registry.v1.RegistryService/ListModels"),) in _samples(
        text, "modelplane_grpc_requests_in_flight"
    )
    # Stopping the service frees its metrics port (no listener is left on it).
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", metrics_port))


async def test_routine_calls_log_at_debug_and_their_failures_at_info(tmp_path: Path) -> None:
    """The loader and inference poll the registry every few seconds: those calls must not fill
    the log, but a failed one, and every other call, must still be in it."""
    service = RegistryService(
        RegistrySettings(host="127.0.0.1", port=0, database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}")
    )
    await service.start()
    try:
        with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
            async with RegistryClient(f"127.0.0.1:{service.port}") as client:
                await client.list_models()
                with pytest.raises(NotFound):
                    await client.get_model("ghost")
    finally:
        await service.stop()

    levels = {line["rpc"].rsplit("/", 1)[1]: line["log_level"] for line in logs if line["event"] == "rpc"}
    assert levels == {"ListModels": "debug", "GetModel": "info"}
