"""Operating the running stack: one request traced through every service's log, and the metrics
each process serves, Triton's included."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from modelplane.common.types import ModelSpec, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.integration.conftest import RunningStack

TRACED = "minilm-traced"


def _log_records(stack: RunningStack) -> list[dict]:
    records = []
    for line in stack.log_text().splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


async def test_one_request_id_is_in_the_log_lines_of_every_service_it_reaches(
    stack: RunningStack, minilm_path: Path
) -> None:
    """A request for a registered model that is not loaded goes gateway → inference → loader →
    registry (and Triton); every line any of them logs for it carries the caller's request id."""
    async with RegistryClient(stack.registry) as registry:
        await registry.register(ModelSpec(name=TRACED, task=Task.EMBEDDING, source_uri=str(minilm_path)))
    request_id = f"trace-{uuid.uuid4().hex}"
    try:
        async with httpx.AsyncClient(timeout=300) as client:
            response = await client.post(
                f"{stack.gateway_url}/v1/embeddings",
                json={"model": TRACED, "input": ["traced through every service"]},
                headers={"X-Request-Id": request_id},
            )
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id

        # Access lines are written once the response is sent; give them a moment to land.
        for _ in range(50):
            traced = [record for record in _log_records(stack) if request_id in json.dumps(record)]
            if {"gateway", "inference", "loader", "registry"} <= {record.get("service") for record in traced}:
                break
            await asyncio.sleep(0.1)
        assert {"gateway", "inference", "loader", "registry"} <= {record.get("service") for record in traced}
        # The id is each line's request_id field, not only text quoted in a message.
        assert all(record.get("request_id") == request_id for record in traced), traced
        # Every service's access line for the request's calls carries it.
        rpcs = {record["rpc"] for record in traced if record.get("event") == "rpc"}
        assert "/modelplane.inference.v1.InferenceService/Embed" in rpcs
        assert "/modelplane.loader.v1.LoaderService/LoadModel" in rpcs
        assert any(rpc.startswith("/modelplane.registry.v1.RegistryService/") for rpc in rpcs)
    finally:
        async with LoaderClient(stack.loader) as loader:
            await loader.unload(TRACED)
        async with RegistryClient(stack.registry) as registry:
            await registry.delete(TRACED)


def _samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    return [
        (sample.name, sample.labels, sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    ]


async def test_every_process_serves_prometheus_metrics(stack: RunningStack) -> None:
    async with httpx.AsyncClient(timeout=60, verify=stack.verify) as client:
        embedded = await client.post(
            f"{stack.gateway_url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": ["metered"]}
        )
        assert embedded.status_code == 200
        pages = {name: await client.get(url) for name, url in stack.metrics.items()}
    assert {name: page.status_code for name, page in pages.items()} == dict.fromkeys(stack.metrics, 200)
    samples = {name: _samples(page.text) for name, page in pages.items()}

    def has(name: str, metric: str, **labels: str) -> bool:
        return any(
            sample == metric and value > 0 and all(got.get(k) == v for k, v in labels.items())
            for sample, got, value in samples[name]
        )

    assert has(
        "inference",
        "modelplane_grpc_requests_total",
        method="/modelplane.inference.v1.InferenceService/Embed",
        code="OK",
    )
    assert has("registry", "modelplane_grpc_requests_total", code="OK")
    assert has("loader", "modelplane_grpc_requests_total", code="OK")
    assert has("gateway", "modelplane_http_requests_total", route="/embeddings", status="200")
    assert has("gateway", "modelplane_http_request_duration_seconds_count", route="/embeddings")
    # Triton's own endpoint, beside them: per-model request counts and queue time.
    # (Triton's model name is the loader's, derived from the registry's name and version.)
    served = {
        labels.get("model", ""): value
        for name, labels, value in samples["triton"]
        if name.startswith("nv_inference_request_success")
    }
    assert any("minilm" in model and count > 0 for model, count in served.items()), pages["triton"].text[:3000]
    assert any(name.startswith("nv_inference_queue_duration_us") for name, _, _ in samples["triton"])
