"""The gateway serves HTTPS when given a certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx
import pytest

from modelplane.certs import init_certificates
from modelplane.gateway.server import GatewayService
from modelplane.gateway.settings import GatewaySettings


async def test_the_gateway_serves_https_with_its_certificate(tmp_path: Path) -> None:
    init_certificates(tmp_path)
    service = GatewayService(
        GatewaySettings(
            host="127.0.0.1",
            port=0,
            tls_cert_file=tmp_path / "gateway.crt",
            tls_key_file=tmp_path / "gateway.key",
        )
    )
    await service.start()
    try:
        trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
        async with httpx.AsyncClient(verify=trusted, timeout=5) as client:
            response = await client.get(f"https://localhost:{service.port}/healthz")
            assert response.status_code == 200 and response.json() == {"status": "ok"}
        # A client that does not trust the CA refuses the connection; plain HTTP gets no answer.
        async with httpx.AsyncClient(timeout=5) as client:
            with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.get(f"https://localhost:{service.port}/healthz")
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"http://localhost:{service.port}/healthz")
    finally:
        await service.stop()


def test_a_certificate_without_its_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="MODELPLANE_GATEWAY_TLS_KEY_FILE; one is unset"):
        GatewayService(GatewaySettings(tls_cert_file=tmp_path / "gateway.crt"))
