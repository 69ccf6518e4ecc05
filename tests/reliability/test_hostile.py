"""Hostile input against the full running stack: each refused with a clear error (status AND
message), no process crashes, nothing written where it should not be.

Unit-level versions live beside the code they test (tests/gateway/test_app.py: 413, 422 and the
500 without a trace; tests/loader/test_sources.py and test_verification.py: symlinks out of a
package; tests/loader/test_conversion.py: a malicious pickle converted in-process;
tests/integration/test_schemathesis.py: the OpenAPI document fuzzed). Here the same attacks go
through the gateway, the registry and the loader as deployed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import grpc
import httpx
import pytest

from modelplane.common.errors import ModelplaneError
from modelplane.common.request_context import accept_request_id
from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.integration.conftest import RunningStack
from tests.reliability.conftest import AUTH, ENCODERS, SlowFileServer, record, registry_models, service_processes

MODEL = ENCODERS[0]


@pytest.fixture(scope="module")
def pids(rel: RunningStack, models: object) -> Iterator[dict[str, int]]:
    """Every process of the stack before the attacks; after them, the same processes must stand."""
    before = {role: process.pid for role, process in service_processes(rel).items()}
    yield before
    after = {role: process.pid for role, process in service_processes(rel).items()}
    record(f"hostile input: no process restarted ({sorted(before)})" if after == before else f"RESTARTED: {after}")
    assert after == before


@pytest.fixture
def client(rel: RunningStack, pids: dict[str, int]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=rel.gateway_url, headers=AUTH, timeout=60) as http:
        yield http


def error(response: httpx.Response, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text
    return response.json()["error"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "a/../../b", "%2e%2e%2fetc", "model\x00.onnx"])
def test_traversal_in_a_model_name_is_an_unknown_model(client: httpx.Client, name: str) -> None:
    body = error(client.post("/v1/embeddings", json={"model": name, "input": ["x"]}), 404)
    assert body["code"] == "model_not_found" and "GET /v1/models" in body["message"]


@pytest.mark.parametrize("name", ["../evil", "a/b", "..", "x" * 65, "UPPER", "evil\nname"])
async def test_a_registration_with_an_unsafe_name_is_refused(
    rel: RunningStack, pids: dict[str, int], name: str
) -> None:
    async with RegistryClient(rel.registry) as registry:
        with pytest.raises(ModelplaneError) as refused:
            await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri="/tmp"))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "name" in refused.value.message.lower()
    assert name not in await registry_models(rel)


async def test_a_package_listing_paths_outside_itself_is_refused(
    rel: RunningStack, pids: dict[str, int], slow_http: SlowFileServer, tmp_path: Path
) -> None:
    """An HTTP package whose SHA256SUMS names ../ paths: the loader must not write outside its cache."""
    package = slow_http.root / "evil-sums"
    package.mkdir(exist_ok=True)
    (package / "config.json").write_text("{}")
    escape = "../../../../../../../../tmp/modelplane-escaped"
    digest = hashlib.sha256(b"{}").hexdigest()
    (package / "SHA256SUMS").write_text(f"{digest}  config.json\n{digest}  {escape}\n")
    name = "rel-evil-sums"
    async with RegistryClient(rel.registry) as registry:
        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"{slow_http.url}/evil-sums/"))
    async with LoaderClient(rel.loader) as loader:
        with pytest.raises(ModelplaneError) as refused:
            await loader.ensure_loaded(name, reason="test", timeout_seconds=60)
    assert "../" in refused.value.message or "outside" in refused.value.message, refused.value.message
    assert not Path("/tmp/modelplane-escaped").exists()
    assert (await registry_models(rel))[name].state == ModelState.FAILED


async def test_a_package_with_a_symlink_out_of_it_is_refused(
    rel: RunningStack, pids: dict[str, int], encoder_paths: dict[str, Path], tmp_path: Path
) -> None:
    package = tmp_path / "symlinked"
    shutil.copytree(encoder_paths[ENCODERS[0]], package)
    secret = tmp_path / "secret.txt"
    secret.write_text("the operator's secret")
    (package / "vocab.txt").unlink()
    (package / "vocab.txt").symlink_to(secret)
    name = "rel-symlink"
    async with RegistryClient(rel.registry) as registry:
        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(package)))
    async with LoaderClient(rel.loader) as loader:
        with pytest.raises(ModelplaneError) as refused:
            await loader.ensure_loaded(name, reason="test", timeout_seconds=60)
    message = refused.value.message
    assert "vocab.txt is a symbolic link to a file outside the package" in message, message
    assert str(tmp_path) not in message  # where the link points is the server's business
    cached = [p for p in (rel.home / "cache").rglob("vocab.txt") if p.read_bytes() == secret.read_bytes()]
    assert cached == []  # the secret was not copied into the cache


async def test_a_symlinked_directory_out_of_the_package_is_refused_and_the_client_sees_no_internals(
    rel: RunningStack, pids: dict[str, int], encoder_paths: dict[str, Path], tmp_path: Path
) -> None:
    """A directory link was once skipped silently: the converter then crashed, and the client's
    409 carried its Python traceback and the cache's paths."""
    package = tmp_path / "dir-linked"
    shutil.copytree(encoder_paths[ENCODERS[0]], package)
    elsewhere = tmp_path / "private-weights"
    elsewhere.mkdir()
    for weights in package.glob("*.safetensors"):
        weights.rename(elsewhere / weights.name)
    (package / "weights").symlink_to(elsewhere)
    name = "rel-dir-symlink"
    async with RegistryClient(rel.registry) as registry:
        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(package)))
    async with httpx.AsyncClient(base_url=rel.gateway_url, headers=AUTH, timeout=120) as client:
        answer = error(await client.post("/v1/embeddings", json={"model": name, "input": ["x"]}), 409)
    assert "weights is a symbolic link to a directory outside the package" in answer["message"], answer
    for internal in ("Traceback", 'File "', str(tmp_path), str(rel.home)):
        assert internal not in answer["message"]
    assert (await registry_models(rel))[name].state == ModelState.FAILED


class _Payload:
    """A pickle whose loading would create `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


async def test_a_malicious_pickle_is_refused_and_never_runs_in_the_loader(
    rel: RunningStack, pids: dict[str, int], encoder_paths: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    package = tmp_path / "pickled"
    shutil.copytree(encoder_paths[ENCODERS[0]], package)
    (package / "model.safetensors").unlink()
    marker = tmp_path / "payload-ran"
    torch.save({"embeddings.word_embeddings.weight": _Payload(marker)}, package / "pytorch_model.bin")
    name = "rel-pickle"
    async with RegistryClient(rel.registry) as registry:
        await registry.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(package)))
    async with LoaderClient(rel.loader) as loader:
        with pytest.raises(ModelplaneError) as refused:
            await loader.ensure_loaded(name, reason="test", timeout_seconds=120)
    assert "pytorch_model.bin is not plain weights" in refused.value.message, refused.value.message
    assert not marker.exists()
    model = (await registry_models(rel))[name]
    assert model.state == ModelState.FAILED and "weights_only" in model.status.reason


def test_an_oversized_body_is_413(client: httpx.Client) -> None:
    big = b'{"model": "x", "input": ["' + b"a" * (33 * 2**20) + b'"]}'
    body = error(client.post("/v1/embeddings", content=big, headers={"Content-Type": "application/json"}), 413)
    assert "MODELPLANE_GATEWAY_MAX_BODY_BYTES" in body["message"] or "larger than" in body["message"]


def test_deeply_nested_json_is_422_not_a_crash(client: httpx.Client) -> None:
    depth = 100_000
    nested = '{"model": "' + MODEL + '", "input": ' + "[" * depth + "]" * depth + "}"
    body = error(client.post("/v1/embeddings", content=nested, headers={"Content-Type": "application/json"}), 422)
    assert body["code"] == "invalid_body" and "nested too deeply" in body["message"], body


def test_invalid_utf8_is_422(client: httpx.Client) -> None:
    raw = b'{"model": "' + MODEL.encode() + b'", "input": ["\xff\xfe\xc3\x28"]}'
    body = error(client.post("/v1/embeddings", content=raw, headers={"Content-Type": "application/json"}), 422)
    assert body["code"] == "invalid_body" and "not UTF-8 (byte 0xff at position" in body["message"], body


def test_a_million_item_embedding_batch_is_400_before_any_work(client: httpx.Client) -> None:
    body = error(client.post("/v1/embeddings", json={"model": MODEL, "input": ["a"] * 1_000_000}), 400)
    assert body["code"] == "too_many_inputs" and "1000000" in body["message"].replace(",", ""), body
    assert "MODELPLANE_GATEWAY_MAX_BATCH_INPUTS" in body["message"]


@pytest.mark.parametrize(
    "injected",
    ["abc\r\nX-Injected: 1", "abc\nSet-Cookie: a=b", "a" * 10_000, "<script>", "id\x1b[31m", 'a", "level": "x'],
)
def test_header_injection_in_the_request_id_is_replaced(rel: RunningStack, pids: dict[str, int], injected: str) -> None:
    """Sent over a raw socket (HTTP clients refuse to send such headers). The server must either
    refuse the request or answer under a request id of its own, never echo the injected one."""
    url = urlsplit(rel.gateway_url)
    body = json.dumps({"model": MODEL, "input": ["x"]}).encode()
    request = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: {url.netloc}\r\nAuthorization: Bearer {AUTH['Authorization'][7:]}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nX-Request-Id: {injected}\r\n"
        "Connection: close\r\n\r\n"
    ).encode() + body
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    head = answer.split(b"\r\n\r\n", 1)[0].decode(errors="replace")
    status = int(head.split()[1])
    assert status in (200, 400), head
    assert "X-Injected" not in head and "Set-Cookie" not in head and "<script>" not in head
    if status == 200:
        [echoed] = [line for line in head.split("\r\n") if line.lower().startswith("x-request-id:")]
        # What the parser kept of the header (CR/LF end it) is used only if it is a safe id.
        kept = echoed.split(":", 1)[1].strip()
        assert accept_request_id(kept) == kept, echoed


async def test_a_grpc_message_over_the_size_limit_is_refused(rel: RunningStack, pids: dict[str, int]) -> None:
    request = pb.EmbedRequest(model=MODEL, inputs=[pb.EmbedInput(text="a" * (65 * 2**20))])
    async with grpc.aio.insecure_channel(rel.inference, options=[("grpc.max_send_message_length", -1)]) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await pb_grpc.InferenceServiceStub(channel).Embed(request, timeout=30)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "larger than max" in (refused.value.details() or ""), refused.value.details()
    await asyncio.sleep(0)
