"""`modelplane certs init`: a development CA and one certificate per service, for mTLS.

Each certificate serves both ends of a connection (server and client authentication), so a
service presents the same one to its callers and to the services it calls. The names in each
certificate cover every way the service is reached: loopback (`modelplane up`), its Compose
service name, and its Kubernetes Service names. Production deployments that have their own PKI
(cert-manager, a corporate CA) set MODELPLANE_TLS_* to those files instead.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("registry", "loader", "inference", "gateway")
# The command line and the `up` supervisor are clients only.
CLIENT_IDENTITIES = ("cli",)
_CA_VALIDITY = timedelta(days=5 * 365)
_LEAF_VALIDITY = timedelta(days=825)


@dataclass(frozen=True)
class IssuedFiles:
    directory: Path
    created: list[str]
    kept: list[str]


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def service_names(service: str, *, namespace: str, extra_dns: list[str]) -> list[str]:
    """The DNS names a service is dialled by, on one machine, in Compose and in Kubernetes."""
    names = ["localhost", service, f"modelplane-{service}"]
    if namespace:
        for host in (service, f"modelplane-{service}"):
            names += [f"{host}.{namespace}", f"{host}.{namespace}.svc", f"{host}.{namespace}.svc.cluster.local"]
    return list(dict.fromkeys([*names, *extra_dns]))


def _create_ca(directory: Path, now: datetime) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "modelplane development CA")])
    public = key.public_key()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + _CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(directory / "ca.key", _key_pem(key))
    (directory / "ca.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert, key


def _load_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{directory / 'ca.key'} is not a CA key made by `modelplane certs init`")
    return cert, key


def _issue(
    directory: Path,
    identity: str,
    dns_names: list[str],
    ca: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    now: datetime,
) -> None:
    ca_cert, ca_key = ca
    key = ec.generate_private_key(ec.SECP256R1())
    alternative_names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names]
    alternative_names += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ("127.0.0.1", "::1")]
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"modelplane-{identity}")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(min(now + _LEAF_VALIDITY, ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    _write_private(directory / f"{identity}.key", _key_pem(key))
    (directory / f"{identity}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def init_certificates(
    directory: Path, *, namespace: str = "", extra_dns: list[str] | None = None, force: bool = False
) -> IssuedFiles:
    """Creates the CA (or reuses the one in `directory`) and the certificates that are missing;
    with `force`, replaces all of them."""
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.now(UTC)
    created: list[str] = []
    kept: list[str] = []
    if force or not (directory / "ca.crt").exists() or not (directory / "ca.key").exists():
        ca = _create_ca(directory, now)
        created.append("ca")
        force = True  # certificates of an old CA would no longer verify
    else:
        ca = _load_ca(directory)
        kept.append("ca")
    for identity in (*SERVICES, *CLIENT_IDENTITIES):
        if not force and (directory / f"{identity}.crt").exists() and (directory / f"{identity}.key").exists():
            kept.append(identity)
            continue
        names = service_names(identity, namespace=namespace, extra_dns=list(extra_dns or []))
        _issue(directory, identity, names, ca, now)
        created.append(identity)
    return IssuedFiles(directory=directory, created=created, kept=kept)
