"""The stack with mTLS on (certificates from `modelplane certs init`) and the gateway on HTTPS."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.common.channels import open_channel
from modelplane.common.tls import TlsFiles
from tests.integration.conftest import RunningStack, running_stack


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    subprocess.run(
        [sys.executable, "-m", "modelplane.cli", "certs", "init", "--dir", str(directory)], check=True, timeout=60
    )
    return directory


@pytest.fixture(scope="module")
def mtls_stack(certs: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    env = {
        "MODELPLANE_TLS_DIR": str(certs),
        "MODELPLANE_GATEWAY_TLS_CERT_FILE": str(certs / "gateway.crt"),
        "MODELPLANE_GATEWAY_TLS_KEY_FILE": str(certs / "gateway.key"),
    }
    with running_stack(tmp_path_factory.mktemp("mtls-home"), extra_env=env, bundled=False) as running:
        yield running


def _cli(stack: RunningStack, certs: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODELPLANE_TLS_DIR": str(certs), "MODELPLANE_CLI_REGISTRY": stack.registry}
    return subprocess.run(
        [sys.executable, "-m", "modelplane.cli", *args], env=env, capture_output=True, text=True, timeout=120
    )


def test_every_service_serves_mtls_and_the_stack_is_ready(mtls_stack: RunningStack) -> None:
    started = [json.loads(line) for line in mtls_stack.log_text().splitlines() if '"grpc server started"' in line]
    assert {(record["service"], record["mtls"]) for record in started} == {
        ("registry", True),
        ("loader", True),
        ("inference", True),
    }
    # The gateway reached the registry and inference over mTLS to answer this.
    response = httpx.get(f"{mtls_stack.gateway_url}/readyz", verify=mtls_stack.verify, timeout=10)
    assert response.status_code == 200, response.text


def test_the_cli_and_the_gateway_work_over_mtls(mtls_stack: RunningStack, certs: Path) -> None:
    registered = _cli(mtls_stack, certs, "models", "register", "tiny", "--task", "embedding", "--source", "/m/tiny")
    assert registered.returncode == 0, registered.stderr
    assert "tiny: registered (version 1, REGISTERED)" in registered.stderr
    with httpx.Client(verify=mtls_stack.verify, timeout=30) as client:
        listed = client.get(f"{mtls_stack.gateway_url}/v1/models").json()
        assert "tiny" in {card["id"] for card in listed["data"]}
        missing = client.post(f"{mtls_stack.gateway_url}/v1/embeddings", json={"model": "ghost", "input": "x"})
    assert missing.status_code == 404
    assert "Model 'ghost' is not registered" in missing.json()["error"]["message"]


def test_the_cli_without_certificates_is_refused_with_a_connection_error(mtls_stack: RunningStack) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELPLANE_TLS_")}
    result = subprocess.run(
        [sys.executable, "-m", "modelplane.cli", "models", "ls", "--registry", mtls_stack.registry],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "registry" in result.stderr


@pytest.mark.parametrize("service", ["registry", "loader", "inference"])
async def test_each_service_refuses_plaintext_and_serves_the_right_certificate(
    mtls_stack: RunningStack, certs: Path, service: str
) -> None:
    address = getattr(mtls_stack, service)
    request = health_pb2.HealthCheckRequest()
    async with grpc.aio.insecure_channel(address) as plaintext:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await health_pb2_grpc.HealthStub(plaintext).Check(request, timeout=5)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    cli = TlsFiles(ca=certs / "ca.crt", cert=certs / "cli.crt", key=certs / "cli.key")
    async with open_channel(address, tls=cli) as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(request, timeout=5)
    assert response.status == health_pb2.HealthCheckResponse.SERVING
