"""API keys, allow-lists, rates, deadlines and the error model, against the running stack."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from modelplane.common.errors import FailedPrecondition
from modelplane.common.types import ModelSpec, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.integration.conftest import RunningStack
from tests.integration.services import serve_gateway, serve_inference

EMBEDDER = "all-minilm-l6-v2"
DIFY_KEY = "sk-dify-5b0c1e9a7f3d4e2b8c6a"
OPS_KEY = "sk-ops-0f4e2d9c8b7a6e5d4c3b"
SLOW_KEY = "sk-slow-1a2b3c4d5e6f7a8b9c0d"
LONG_TEXT = "The mitochondria is the powerhouse of the cell. " * 40  # over MiniLM's 256 tokens


@pytest.fixture(scope="module")
def keyed_gateway(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys = tmp_path_factory.mktemp("keys") / "keys.toml"
    keys.write_text(
        f"""
[[keys]]
name = "dify"
sha256 = "{hashlib.sha256(DIFY_KEY.encode()).hexdigest()}"
models = ["{EMBEDDER}"]

[[keys]]
name = "ops"
sha256 = "{hashlib.sha256(OPS_KEY.encode()).hexdigest()}"

[[keys]]
name = "slow"
key = "{SLOW_KEY}"
requests_per_minute = 2
"""
    )
    with serve_gateway(stack, api_keys_file=keys) as url:
        yield url


def _embed(url: str, key: str | None = None, body: dict | None = None, **headers: str) -> httpx.Response:
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(
        f"{url}/v1/embeddings", json=body or {"model": EMBEDDER, "input": "ping"}, headers=headers, timeout=120
    )


@pytest.mark.parametrize("authorization", [None, "", "Bearer None", "Bearer", "Bearer any-key-at-all"])
def test_an_open_gateway_accepts_whatever_dify_sends(stack: RunningStack, authorization: str | None) -> None:
    headers = {"Authorization": authorization} if authorization is not None else {}
    response = _embed(stack.gateway_url, **headers)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["total_tokens"] == 3  # [CLS] ping [SEP]


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "This gateway requires an API key"),
        ({"Authorization": "Bearer None"}, "This gateway requires an API key"),
        ({"Authorization": f"Bearer {DIFY_KEY}x"}, "The API key is not valid"),
    ],
)
def test_with_keys_missing_or_wrong_keys_get_401(keyed_gateway: str, headers: dict, message: str) -> None:
    response = _embed(keyed_gateway, **headers)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"
    assert message in response.json()["error"]["message"]


def test_with_keys_the_right_key_is_served_and_never_logged(stack: RunningStack, keyed_gateway: str) -> None:
    response = _embed(keyed_gateway, DIFY_KEY)
    assert response.status_code == 200, response.text
    # The request's log line is written as the response goes out: on a busy machine it can land
    # a moment after the client has the answer.
    deadline = time.monotonic() + 10
    while '"caller": "dify"' not in (log := "".join(p.read_text() for p in stack.home.glob("gateway-*.log"))):
        assert time.monotonic() < deadline, log[-2000:]
        time.sleep(0.1)
    for key in (DIFY_KEY, OPS_KEY, SLOW_KEY):
        assert key not in log


def test_allow_list_refuses_other_models_and_hides_them(keyed_gateway: str, cross_encoder: str) -> None:
    body = {"model": cross_encoder, "query": "q", "documents": ["a", "b"]}
    refused = httpx.post(
        f"{keyed_gateway}/v1/rerank", json=body, headers={"Authorization": f"Bearer {DIFY_KEY}"}, timeout=60
    )
    assert refused.status_code == 403
    error = refused.json()["error"]
    assert error["code"] == "model_not_allowed"
    assert f"API key 'dify' may not use model '{cross_encoder}'; it may use: {EMBEDDER}" in error["message"]
    allowed = httpx.post(
        f"{keyed_gateway}/v1/rerank", json=body, headers={"Authorization": f"Bearer {OPS_KEY}"}, timeout=60
    )
    assert allowed.status_code == 200, allowed.text

    def listed(key: str) -> set[str]:
        response = httpx.get(f"{keyed_gateway}/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=10)
        return {card["id"] for card in response.json()["data"]}

    assert listed(DIFY_KEY) == {EMBEDDER}
    assert {EMBEDDER, cross_encoder} <= listed(OPS_KEY)


def test_rate_limit_per_key_is_429_with_retry_after(keyed_gateway: str) -> None:
    statuses = [_embed(keyed_gateway, SLOW_KEY).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    response = _embed(keyed_gateway, SLOW_KEY)
    assert response.status_code == 429
    assert 1 <= int(response.headers["retry-after"]) <= 30
    assert "API key 'slow' is over its limit of 2 requests per minute" in response.json()["error"]["message"]
    # Other keys are not slowed by it.
    assert _embed(keyed_gateway, OPS_KEY).status_code == 200


def test_deadline_reaches_the_inference_call_and_is_a_504(stack: RunningStack) -> None:
    texts = [f"sentence number {i} about deadlines and slow batches. " * 6 for i in range(256)]
    body = {"model": EMBEDDER, "input": texts}
    # The deadline is a quarter of what this batch takes on this machine, so the test holds on any
    # machine, however fast: a fixed deadline once let a fast CI machine finish in time.
    durations = []
    for _ in range(2):
        started = time.monotonic()
        assert _embed(stack.gateway_url, body=body).status_code == 200
        durations.append(time.monotonic() - started)
    with serve_gateway(stack, request_timeout_seconds=round(min(durations) / 4, 3)) as url:
        started = time.monotonic()
        response = _embed(url, body=body, **{"X-Request-Id": "deadline-test"})
        elapsed = time.monotonic() - started
    assert response.status_code == 504, response.text
    error = response.json()["error"]
    assert error["code"] == "deadline_exceeded"
    assert "did not finish within its deadline" in error["message"]
    assert "MODELPLANE_GATEWAY_REQUEST_TIMEOUT_SECONDS" in error["message"]
    # Answered when the deadline passed, not when the batch would have finished: relative to this
    # machine's own time for the batch, never a fixed number of seconds.
    assert elapsed < min(durations), (elapsed, durations)
    # The inference service saw the request id, and so the call that the deadline cut short.
    rpc_lines = [json.loads(line) for line in stack.log_text().splitlines() if '"deadline-test"' in line]
    assert any(line.get("rpc", "").endswith("/Embed") for line in rpc_lines)


async def test_a_failed_model_is_409_with_its_state(stack: RunningStack, minilm_path: Path) -> None:
    name = "embedder-with-wrong-digest"
    spec = ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(minilm_path), expected_sha256="1" * 64)
    async with RegistryClient(stack.registry) as registry:
        await registry.register(spec)
    async with LoaderClient(stack.loader) as loader:
        with pytest.raises(FailedPrecondition):
            await loader.ensure_loaded(name, reason="test", timeout_seconds=120)
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(f"{stack.gateway_url}/v1/embeddings", json={"model": name, "input": "x"})
    assert response.status_code == 409
    error = response.json()["error"]
    assert error["state"] == "FAILED" and error["code"] == "model_not_servable"
    assert f"Model '{name}' failed to load" in error["message"] and "1111" in error["message"]
    assert f"modelplane models load {name}" in error["message"]


def test_any_batch_size_is_split_and_joined_in_order(stack: RunningStack) -> None:
    texts = [f"text {i}: {'alpha beta gamma ' * (i % 7)}" for i in range(2500)]  # over the inference's 2048
    response = _embed(stack.gateway_url, body={"model": EMBEDDER, "input": texts})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [item["index"] for item in body["data"]] == list(range(len(texts)))
    sample = [0, 511, 512, 1999, 2048, 2499]
    alone = _embed(stack.gateway_url, body={"model": EMBEDDER, "input": [texts[i] for i in sample]}).json()
    np.testing.assert_allclose(
        [body["data"][i]["embedding"] for i in sample], [item["embedding"] for item in alone["data"]], atol=1e-5
    )


@pytest.fixture(scope="module")
def strict_gateway(stack: RunningStack) -> Iterator[str]:
    """Truncation as an error (MODELPLANE_INFERENCE_TRUNCATION=error), and batches split by 4."""
    with (
        serve_inference(stack, truncation="error") as inference,
        serve_gateway(stack, inference=inference, inference_batch_inputs=4) as url,
    ):
        yield url


def test_truncation_setting_makes_long_input_an_error_named_by_its_position(strict_gateway: str) -> None:
    texts = [f"short text {i}" for i in range(9)] + [LONG_TEXT]
    response = _embed(strict_gateway, body={"model": EMBEDDER, "input": texts})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "input_too_long"
    assert error["message"].startswith("Input 9 has ") and f"model '{EMBEDDER}' accepts at most 256" in error["message"]


def test_split_batches_give_the_same_vectors_and_usage(stack: RunningStack, strict_gateway: str) -> None:
    texts = [f"short text number {i}" for i in range(10)]
    split = _embed(strict_gateway, body={"model": EMBEDDER, "input": texts}).json()
    whole = _embed(stack.gateway_url, body={"model": EMBEDDER, "input": texts}).json()
    assert [d["index"] for d in split["data"]] == list(range(10))
    np.testing.assert_allclose(
        [d["embedding"] for d in split["data"]], [d["embedding"] for d in whole["data"]], atol=1e-5
    )
    assert split["usage"] == whole["usage"]


def test_rerank_long_document_with_truncation_off_is_named(strict_gateway: str, cross_encoder: str) -> None:
    documents = ["short"] * 6 + [LONG_TEXT * 2]
    response = httpx.post(
        f"{strict_gateway}/v1/rerank", json={"model": cross_encoder, "query": "q", "documents": documents}, timeout=60
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("Document 6 with the query has")
