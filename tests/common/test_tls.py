"""mTLS between the services, for real: certificates from `modelplane certs init`, real gRPC servers."""

from __future__ import annotations

import stat
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from modelplane.certs import init_certificates
from modelplane.common import tls
from modelplane.common.tls import TlsConfigurationError, TlsFiles
from modelplane.common.types import ModelSpec, Task
from modelplane.registry.client import RegistryClient
from modelplane.registry.server import RegistryService
from modelplane.registry.settings import RegistrySettings
from modelplane.registry.v1 import registry_service_pb2 as pb
from modelplane.registry.v1 import registry_service_pb2_grpc as pb_grpc
from tests.conftest import free_port


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tls")
    init_certificates(directory, namespace="modelplane")
    return directory


@pytest.fixture(scope="module")
def other_ca_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("other-tls")
    init_certificates(directory)
    return directory


@pytest.fixture
async def registry(certs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[RegistryService]:
    monkeypatch.setenv("MODELPLANE_TLS_DIR", str(certs))
    monkeypatch.setattr(tls, "_identity", "registry")
    service = RegistryService(
        RegistrySettings(
            host="127.0.0.1",
            port=0,
            health_port=free_port(),
            database_url=f"sqlite+aiosqlite:///{tmp_path / 'registry.db'}",
        )
    )
    await service.start()
    monkeypatch.setattr(tls, "_identity", "cli")
    yield service
    await service.stop()


def _files(directory: Path, identity: str) -> TlsFiles:
    return TlsFiles(ca=directory / "ca.crt", cert=directory / f"{identity}.crt", key=directory / f"{identity}.key")


async def _get_model(channel: grpc.aio.Channel) -> None:
    await pb_grpc.RegistryServiceStub(channel).GetModel(pb.GetModelRequest(name="minilm"), timeout=5)


def test_certs_init_makes_a_ca_and_one_certificate_per_service(certs: Path) -> None:
    for identity in ("registry", "loader", "inference", "gateway", "cli"):
        cert = x509.load_pem_x509_certificate((certs / f"{identity}.crt").read_bytes())
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = names.get_values_for_type(x509.DNSName)
        assert {"localhost", identity, f"modelplane-{identity}.modelplane.svc"} <= set(dns)
        assert stat.S_IMODE((certs / f"{identity}.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((certs / "ca.key").stat().st_mode) == 0o600


def test_certs_init_keeps_what_exists_unless_forced(tmp_path: Path) -> None:
    first = init_certificates(tmp_path)
    ca = (tmp_path / "ca.crt").read_bytes()
    (tmp_path / "loader.crt").unlink()
    again = init_certificates(tmp_path)
    assert again.created == ["loader"] and "ca" in again.kept and "ca" in first.created
    assert (tmp_path / "ca.crt").read_bytes() == ca
    forced = init_certificates(tmp_path, force=True)
    assert forced.created[0] == "ca" and (tmp_path / "ca.crt").read_bytes() != ca


async def test_a_client_with_a_certificate_of_the_ca_is_served(registry: RegistryService, certs: Path) -> None:
    assert registry.server.tls is not None
    async with RegistryClient(f"localhost:{registry.port}") as client:  # presents cli.crt from MODELPLANE_TLS_DIR
        model, created = await client.register(ModelSpec(name="minilm", task=Task.EMBEDDING, source_uri="/m"))
        assert created and (await client.get_model("minilm")).spec == model.spec


@pytest.mark.parametrize(
    "credentials",
    [
        pytest.param(lambda certs, other: None, id="plaintext"),
        pytest.param(
            lambda certs, other: grpc.ssl_channel_credentials(root_certificates=(certs / "ca.crt").read_bytes()),
            id="tls-without-client-certificate",
        ),
        pytest.param(
            lambda certs, other: grpc.ssl_channel_credentials(
                root_certificates=(certs / "ca.crt").read_bytes(),
                private_key=(other / "cli.key").read_bytes(),
                certificate_chain=(other / "cli.crt").read_bytes(),
            ),
            id="certificate-of-another-ca",
        ),
    ],
)
async def test_clients_without_a_certificate_of_the_ca_are_refused(
    registry: RegistryService, certs: Path, other_ca_certs: Path, credentials: object
) -> None:
    made = credentials(certs, other_ca_certs)  # type: ignore[operator]
    address = f"localhost:{registry.port}"
    channel = grpc.aio.secure_channel(address, made) if made else grpc.aio.insecure_channel(address)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _get_model(channel)
    # The handshake fails, so the request never reaches the registry (it would answer NOT_FOUND).
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in (refused.value.details() or "")


async def test_a_client_refuses_a_server_whose_certificate_it_cannot_verify(
    registry: RegistryService, certs: Path, other_ca_certs: Path
) -> None:
    # The client's certificate is fine, but it trusts another CA, so it refuses the registry.
    mistrusting = TlsFiles(ca=other_ca_certs / "ca.crt", cert=certs / "cli.crt", key=certs / "cli.key")
    channel = grpc.aio.secure_channel(f"localhost:{registry.port}", mistrusting.channel_credentials())
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _get_model(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "failed to connect" in (refused.value.details() or "")


async def test_the_plaintext_health_port_serves_health_and_nothing_else(registry: RegistryService) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{registry.settings.health_port}") as channel:
        response = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await _get_model(channel)
    assert refused.value.code() == grpc.StatusCode.UNIMPLEMENTED


def test_half_a_configuration_is_refused_with_what_to_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPLANE_TLS_CERT_FILE", str(tmp_path / "registry.crt"))
    with pytest.raises(TlsConfigurationError, match="MODELPLANE_TLS_CA_FILE, MODELPLANE_TLS_KEY_FILE not set"):
        tls.process_tls()


def test_missing_files_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPLANE_TLS_DIR", str(tmp_path))
    with pytest.raises(TlsConfigurationError, match=r"ca\.crt.* does not exist.*modelplane certs init"):
        tls.process_tls()
