"""The gateway's own refusals, through the real application, with no service behind it: nothing
listens at the backend addresses, so whatever reaches a service is answered 503."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import structlog
from fastapi.testclient import TestClient

from modelplane.gateway.app import create_app
from modelplane.gateway.settings import GatewaySettings
from tests.conftest import free_port

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def _client(**overrides: object) -> TestClient:
    nowhere = f"127.0.0.1:{free_port()}"
    settings = GatewaySettings(inference_address=nowhere, registry_address=nowhere, **overrides)  # type: ignore[arg-type]
    return TestClient(create_app(settings), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with _client(api_keys=KEY, max_body_bytes=4096, max_batch_inputs=3) as client:
        yield client


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) >= {"message", "type", "code", "param"}
    return error


def test_missing_key_is_401_before_anything_else(client: TestClient) -> None:
    # Even a malformed body to an unknown path: nothing is revealed without a key.
    error = _error(client.post("/v1/nope", content=b"{"), 401)
    assert error["code"] == "invalid_api_key" and "Authorization: Bearer <key>" in error["message"]


def test_probes_and_the_api_description_need_no_key(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200
    document = client.get("/openapi.json").json()
    assert document["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert document["paths"]["/v1/rerank"]["post"]["security"] == [{"apiKey": []}, {}]
    assert "security" not in document["paths"]["/healthz"]["get"]


def test_body_over_the_limit_is_413_by_content_length_and_when_chunked(client: TestClient) -> None:
    big = b'{"model": "m", "input": "' + b"x" * 5000 + b'"}'
    error = _error(client.post("/v1/embeddings", content=big, headers=AUTH), 413)
    assert error["code"] == "request_too_large"
    assert "larger than the 4096 bytes this gateway accepts" in error["message"]
    assert "MODELPLANE_GATEWAY_MAX_BODY_BYTES" in error["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the body arrives in pieces
        yield big[:3000]
        yield big[3000:]

    error = _error(client.post("/v1/embeddings", content=chunks(), headers=AUTH), 413)
    assert "larger than the 4096 bytes" in error["message"]


def test_invalid_json_is_422_with_where(client: TestClient) -> None:
    error = _error(client.post("/v1/embeddings", content=b'{"model": "m", "input": [1,}', headers=AUTH), 422)
    assert error["code"] == "invalid_body"
    assert error["message"].startswith("The request body is not valid JSON (Expecting value at character")


def test_a_body_json_cannot_read_is_422_saying_why(client: TestClient) -> None:
    """FastAPI answers both with a bare 400 "There was an error parsing the body"."""
    latin1 = b'{"model": "m", "input": ["caf\xe9"]}'
    error = _error(client.post("/v1/embeddings", content=latin1, headers=AUTH), 422)
    assert error["code"] == "invalid_body"
    assert error["message"] == (
        "The request body is not valid JSON: it is not UTF-8 (byte 0xe9 at position 29). "
        "Send the body encoded as UTF-8."
    )
    deep = b'{"model": "m", "input": ' + b"[" * 1500 + b"]" * 1500 + b"}"
    error = _error(client.post("/v1/embeddings", content=deep, headers=AUTH), 422)
    assert error["code"] == "invalid_body" and "nested too deeply" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "message"),
    [
        ({"input": "x"}, "model", "Invalid request body at 'model': Field required."),
        ({"model": "m", "input": 5}, "input", "Invalid request body at 'input': Input should be a valid string"),
        ({"model": "m", "input": [-1]}, "input.0", "greater than or equal to 0"),
        ({"model": "m", "input": "x", "encoding_format": "hex"}, "encoding_format", "'float' or 'base64'"),
    ],
)
def test_wrong_body_is_422_naming_the_field(client: TestClient, body: dict, param: str, message: str) -> None:
    error = _error(client.post("/v1/embeddings", json=body, headers=AUTH), 422)
    assert error["param"] == param and message in error["message"]


def test_rerank_body_errors_name_the_field(client: TestClient) -> None:
    error = _error(
        client.post("/v1/rerank", json={"model": "m", "query": "q", "documents": ["a"], "top_n": -1}, headers=AUTH), 422
    )
    assert error["param"] == "top_n" and "greater than or equal to 0" in error["message"]


def test_too_many_inputs_is_400_before_any_service_is_called(client: TestClient) -> None:
    error = _error(client.post("/v1/embeddings", json={"model": "m", "input": ["a"] * 4}, headers=AUTH), 400)
    assert error["code"] == "too_many_inputs" and error["param"] == "input"
    error = _error(
        client.post("/v1/rerank", json={"model": "m", "query": "q", "documents": ["a"] * 4}, headers=AUTH), 400
    )
    assert error["param"] == "documents" and "at most 3 per request" in error["message"]


def test_unreachable_inference_is_503_with_retry_after(client: TestClient) -> None:
    response = client.post("/v1/embeddings", json={"model": "m", "input": "a"}, headers=AUTH)
    error = _error(response, 503)
    assert error["code"] == "inference_unavailable"
    assert error["message"].startswith("The inference service is unavailable") and "retry shortly" in error["message"]
    assert int(response.headers["retry-after"]) >= 1


def test_unknown_path_and_wrong_method_say_what_exists(client: TestClient) -> None:
    error = _error(client.get("/v1/chat/nothing", headers=AUTH), 404)
    assert "There is no endpoint at '/v1/chat/nothing'" in error["message"] and "/v1/embeddings" in error["message"]
    response = client.get("/v1/embeddings", headers=AUTH)
    error = _error(response, 405)
    assert "'/v1/embeddings' does not take GET; use POST" in error["message"]
    assert response.headers["allow"] == "POST"


def test_rate_limit_is_429_with_retry_after() -> None:
    with _client(rate_limit_per_minute=2) as client:
        statuses = [client.get("/v1/nothing").status_code for _ in range(3)]
        assert statuses == [404, 404, 429]
        response = client.get("/v1/nothing")
        error = _error(response, 429)
        assert error["code"] == "rate_limit_exceeded"
        assert "over its limit of 2 requests per minute" in error["message"]
        assert 1 <= int(response.headers["retry-after"]) <= 30


def test_a_crash_is_a_500_naming_the_request_id_without_the_trace() -> None:
    with _client() as client:

        async def explode() -> None:
            raise RuntimeError("secret internal detail")

        client.app.add_api_route("/v1/explode", explode)
        response = client.get("/v1/explode", headers={"X-Request-Id": "req-42"})
    error = _error(response, 500)
    assert error["message"] == "Internal error (request id req-42); the service logs have the details."
    assert "secret" not in response.text and "Traceback" not in response.text


def test_every_error_is_logged_with_its_request_id(client: TestClient) -> None:
    with structlog.testing.capture_logs(processors=[structlog.contextvars.merge_contextvars]) as logs:
        client.post("/v1/embeddings", json={"model": "m", "input": "a"}, headers={**AUTH, "X-Request-Id": "req-7"})
        client.post("/v1/embeddings", json={}, headers={"X-Request-Id": "req-8"})
    refused = {(entry.get("request_id"), entry.get("status")) for entry in logs if "error" in entry}
    assert {("req-7", 503), ("req-8", 401)} <= refused
    assert not any(KEY in repr(entry) for entry in logs)
