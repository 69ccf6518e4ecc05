"""POST /v1/embeddings as the gateway serves it: directly, outside FastAPI's routing
(gateway/direct.py), with everything else a route gets — the key check, the access log, the HTTP
metrics, the application's error answers — and FastAPI's own answers for what it does not serve.

Behind the gateway is a scripted inference service (a real gRPC server on a free port) whose
vectors the test knows to the bit; the real model is exercised in tests/integration/test_embeddings.py."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import structlog
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from modelplane.common.v1 import usage_pb2
from modelplane.gateway.app import create_app
from modelplane.gateway.backends import Backends
from modelplane.gateway.settings import GatewaySettings
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway.scripted import serving

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def vector_of(text: str) -> np.ndarray:
    """The scripted model's embedding of `text`: float32 values of every magnitude JSON must carry."""
    rng = np.random.default_rng(sum(text.encode()))
    return (rng.standard_normal(384) * 10.0 ** rng.integers(-8, 3, 384)).astype(np.float32)


class ScriptedEmbeddings(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[pb.EmbedRequest] = []

    def Embed(self, request: pb.EmbedRequest, context: grpc.ServicerContext) -> pb.EmbedResponse:
        self.requests.append(request)
        packed = request.vector_encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32
        embeddings = []
        tokens = 0
        for index, item in enumerate(request.inputs):
            content = item.text or " ".join(map(str, item.token_ids.ids))
            vector = vector_of(content)
            embeddings.append(
                pb.Embedding(index=index, packed_values=vector.astype("<f4").tobytes(), num_tokens=len(content))
                if packed
                else pb.Embedding(index=index, values=vector.tolist(), num_tokens=len(content))
            )
            tokens += len(content)
        return pb.EmbedResponse(model="scripted", embeddings=embeddings, usage=usage_pb2.Usage(prompt_tokens=tokens))


@pytest.fixture
def inference() -> Iterator[tuple[ScriptedEmbeddings, str]]:
    servicer = ScriptedEmbeddings()
    with serving(servicer) as address:
        yield servicer, address


def _client(address: str, *, direct_routes: bool) -> TestClient:
    settings = GatewaySettings(
        inference_address=address, registry_address=address, api_keys=KEY, direct_routes=direct_routes
    )
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture(params=[True, False], ids=["direct", "through-fastapi"])
def client(request: pytest.FixtureRequest, inference: tuple[ScriptedEmbeddings, str]) -> Iterator[TestClient]:
    """The gateway as it serves by default, and with MODELPLANE_GATEWAY_DIRECT_ROUTES=false."""
    with _client(inference[1], direct_routes=request.param) as client:
        yield client


TEXTS = ["first", "a second, longer text", "3", "the fourth"]


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings"])
def test_float_vectors_are_the_models_float32_numbers_exactly(
    client: TestClient, inference: tuple[ScriptedEmbeddings, str], path: str
) -> None:
    response = client.post(path, json={"model": "m", "input": TEXTS}, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "list" and body["model"] == "scripted"
    assert [item["index"] for item in body["data"]] == [0, 1, 2, 3]
    assert {item["object"] for item in body["data"]} == {"embedding"}
    for text, item in zip(TEXTS, body["data"], strict=True):
        # Written in the fewest digits that read back as the same float32: nothing is lost.
        np.testing.assert_array_equal(np.array(item["embedding"], dtype=np.float32), vector_of(text))
    tokens = sum(len(text) for text in TEXTS)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    assert inference[0].requests[-1].vector_encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32


def test_base64_vectors_are_the_models_float32_bytes(client: TestClient) -> None:
    response = client.post(
        "/v1/embeddings", json={"model": "m", "input": "first", "encoding_format": "base64"}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    vector = np.frombuffer(base64.b64decode(response.json()["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_array_equal(vector, vector_of("first"))


def test_both_paths_answer_every_request_with_the_same_bytes(inference: tuple[ScriptedEmbeddings, str]) -> None:
    bodies = [
        {"model": "m", "input": TEXTS},
        {"model": "m", "input": "first", "encoding_format": "base64", "user": "ignored"},
        {"model": "m", "input": [[101, 2023], [7]]},
        {"model": "m", "input": []},
        {"model": "m", "input": "x", "encoding_format": "hex"},
        {"model": "", "input": "x"},
    ]
    answers = {}
    for direct_routes in (True, False):
        with _client(inference[1], direct_routes=direct_routes) as client:
            answers[direct_routes] = [
                (response.status_code, response.content)
                for response in (client.post("/v1/embeddings", json=body, headers=AUTH) for body in bodies)
            ]
    assert [status for status, _ in answers[True]] == [200, 200, 200, 422, 422, 422]
    assert answers[True] == answers[False]


def _requests_counted(route: str, status: str) -> float:
    return REGISTRY.get_sample_value("modelplane_http_requests_total", {"route": route, "status": status}) or 0.0


def test_a_direct_request_is_logged_and_counted_like_any_route(client: TestClient) -> None:
    before = _requests_counted("/embeddings", "200")  # a route's label is its path without /v1
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        response = client.post(
            "/v1/embeddings", json={"model": "m", "input": "first"}, headers={**AUTH, "X-Request-Id": "req-9"}
        )
    assert response.status_code == 200 and response.headers["x-request-id"] == "req-9"
    assert _requests_counted("/embeddings", "200") == before + 1
    (line,) = [entry for entry in logs if entry["event"] == "http"]
    assert line["path"] == "/v1/embeddings" and line["status"] == 200
    assert line["request_id"] == "req-9" and line["model"] == "m" and line["caller"].startswith("key-")


def test_what_the_direct_path_does_not_serve_gets_fastapis_answers(client: TestClient) -> None:
    assert client.post("/v1/embeddings", json={"model": "m", "input": "x"}).status_code == 401
    wrong_method = client.get("/v1/embeddings", headers=AUTH)
    assert wrong_method.status_code == 405 and "POST" in wrong_method.json()["error"]["message"]
    not_an_object = client.post("/v1/embeddings", json=["model", "input"], headers=AUTH)
    assert not_an_object.status_code == 422 and not_an_object.json()["error"]["code"] == "invalid_body"
    no_input = client.post("/v1/embeddings", json={"model": "m"}, headers=AUTH)
    assert no_input.status_code == 422 and no_input.json()["error"]["param"] == "input"
    # After those refusals the endpoint still serves.
    assert client.post("/v1/embeddings", json={"model": "m", "input": "x"}, headers=AUTH).status_code == 200


def test_errors_in_the_endpoint_get_the_applications_answers(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    too_many = client.post("/v1/embeddings", json={"model": "m", "input": ["x"] * 20000}, headers=AUTH)
    assert too_many.status_code == 400 and too_many.json()["error"]["code"] == "too_many_inputs"

    async def explode(*args: object, **kwargs: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Backends, "embed", explode)
    with structlog.testing.capture_logs() as logs:
        crashed = client.post(
            "/v1/embeddings", json={"model": "m", "input": "x"}, headers={**AUTH, "X-Request-Id": "r-5"}
        )
    assert crashed.status_code == 500
    assert crashed.json()["error"]["message"] == "Internal error (request id r-5); the service logs have the details."
    assert "secret" not in crashed.text
    assert any(entry["event"] == "request crashed" and entry.get("exc_info") for entry in logs)
