"""Triton's gRPC port under mutual TLS, for real: a tritonserver started with its SSL options and
certificates made in the test (`modelplane certs init`); the loader's channel loads a model and
the inference service's channel runs it, and clients without the right certificates are refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelplane.certs import init_certificates
from modelplane.common.settings import TritonSettings
from modelplane.inference.errors import NodeUnreachable
from modelplane.inference.triton import TritonInferer
from modelplane.loader.triton_control import TritonControl
from modelplane.triton.client import TritonTls, TritonTlsError
from modelplane.triton.embedded import EmbeddedTriton
from tests.triton.conftest import triton_settings, write_python_model

_MODEL = """import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return answers
"""


def _tls(certs: Path, identity: str, *, ca: Path | None = None) -> TritonTls:
    settings = TritonSettings(
        tls_ca_file=(ca or certs) / "ca.crt",
        tls_cert_file=certs / f"{identity}.crt",
        tls_key_file=certs / f"{identity}.key",
    )
    tls = TritonTls.from_settings(settings)
    assert tls is not None
    return tls


async def test_the_loader_and_the_inference_service_reach_triton_under_mutual_tls(tmp_path: Path) -> None:
    certs, stranger = tmp_path / "certs", tmp_path / "other-ca"
    init_certificates(certs)
    init_certificates(stranger)
    write_python_model(tmp_path / "models", "doubler", _MODEL)
    # The embedded Triton serves with the certificate it is given; any service's `certs init`
    # certificate serves both ends and names 127.0.0.1.
    server = triton_settings(
        tmp_path / "models",
        tls_ca_file=certs / "ca.crt",
        tls_cert_file=certs / "loader.crt",
        tls_key_file=certs / "loader.key",
    )
    address = server.grpc_address
    triton = EmbeddedTriton(server, workdir=tmp_path / "triton")
    assert {"--grpc-use-ssl=true", "--grpc-use-ssl-mutual=true"} <= set(triton.command())
    await triton.start()
    control = TritonControl(address, _tls(certs, "loader"))
    inference = TritonInferer(address, _tls(certs, "inference"))
    plain = TritonInferer(address)
    foreign = TritonInferer(address, _tls(stranger, "inference", ca=certs))
    try:
        await control.load("doubler", timeout_seconds=120)
        assert await control.is_ready("doubler")
        answer = await inference.infer("doubler", {"x": np.array([1.5, -2.0], np.float32)}, "y", timeout_seconds=30)
        assert answer.tolist() == [3.0, -4.0]
        # Without TLS, or with a certificate another CA signed, the handshake is refused.
        for refused in (plain, foreign):
            with pytest.raises(NodeUnreachable, match="Triton is not reachable"):
                await refused.infer("doubler", {"x": np.array([1.0], np.float32)}, "y", timeout_seconds=10)
    finally:
        for client in (control, inference, plain, foreign):
            await client.close()
        await triton.stop()


def test_half_a_triton_tls_configuration_is_refused_with_what_to_set(tmp_path: Path) -> None:
    assert TritonTls.from_settings(TritonSettings()) is None
    with pytest.raises(TritonTlsError, match="MODELPLANE_TRITON_TLS_KEY_FILE not set"):
        TritonTls.from_settings(TritonSettings(tls_ca_file=tmp_path / "ca.crt", tls_cert_file=tmp_path / "a.crt"))
    absent = TritonSettings(
        tls_ca_file=tmp_path / "ca.crt", tls_cert_file=tmp_path / "a.crt", tls_key_file=tmp_path / "a.key"
    )
    with pytest.raises(TritonTlsError, match=r"MODELPLANE_TRITON_TLS_CA_FILE names .*ca.crt, which cannot be read"):
        TritonTls.from_settings(absent)
