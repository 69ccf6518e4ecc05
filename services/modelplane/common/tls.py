"""Mutual TLS between the services: which certificate this process presents, and which CA it trusts.

mTLS is on when certificates are configured (TlsSettings), and then on every gRPC channel this
process opens and every gRPC port it serves: a server accepts only clients whose certificate the
CA signed, and a client accepts only servers whose certificate the CA signed for the name it
dialled. Each process presents the certificate of its own identity (`registry`, `loader`,
`inference`, `gateway`, or `cli` for the command line and the `up` supervisor), set once at start
with `set_identity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc

from modelplane.common.settings import TlsSettings

_identity = "cli"


def set_identity(service: str) -> None:
    """Names the certificate this process presents (`<service>.crt` in a `certs init` directory)."""
    global _identity  # one identity per process, like its logging configuration
    _identity = service


class TlsConfigurationError(ValueError):
    pass


@dataclass(frozen=True)
class TlsFiles:
    ca: Path
    cert: Path
    key: Path

    def _read(self) -> tuple[bytes, bytes, bytes]:
        try:
            return self.ca.read_bytes(), self.cert.read_bytes(), self.key.read_bytes()
        except OSError as error:
            raise TlsConfigurationError(
                f"Cannot read a TLS file ({error}). Check MODELPLANE_TLS_* or create the files with "
                "`modelplane certs init`."
            ) from error

    def server_credentials(self) -> grpc.ServerCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        ca, cert, key = self._read()
        return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def resolve(settings: TlsSettings, identity: str) -> TlsFiles | None:
    """The files `identity` uses, or None when TLS is not configured; refuses half a configuration."""
    ca, cert, key = settings.ca_file, settings.cert_file, settings.key_file
    if settings.dir is not None:
        ca = ca or settings.dir / "ca.crt"
        cert = cert or settings.dir / f"{identity}.crt"
        key = key or settings.dir / f"{identity}.key"
    given = {"MODELPLANE_TLS_CA_FILE": ca, "MODELPLANE_TLS_CERT_FILE": cert, "MODELPLANE_TLS_KEY_FILE": key}
    if not any(given.values()):
        return None
    missing = [name for name, value in given.items() if value is None]
    if missing:
        raise TlsConfigurationError(
            f"mTLS is half configured: {', '.join(missing)} not set. Set all three (or MODELPLANE_TLS_DIR to a "
            "directory made by `modelplane certs init`), or none to run without TLS."
        )
    files = TlsFiles(ca=ca, cert=cert, key=key)  # type: ignore[arg-type]
    absent = [str(path) for path in (files.ca, files.cert, files.key) if not path.is_file()]
    if absent:
        raise TlsConfigurationError(
            f"mTLS is configured but {', '.join(absent)} does not exist. Create the certificates with "
            "`modelplane certs init` or fix MODELPLANE_TLS_*."
        )
    return files


def process_tls() -> TlsFiles | None:
    """The TLS files of this process's identity, read from the environment."""
    return resolve(TlsSettings(), _identity)
