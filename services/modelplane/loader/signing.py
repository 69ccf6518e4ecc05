"""Signed manifests: an Ed25519 signature over the exact bytes of a package's SHA256SUMS.

A publisher signs the file it ships, with standard tools, e.g.

    openssl pkeyutl -sign -inkey publisher.pem -rawin -in SHA256SUMS -out SHA256SUMS.sig

and the platform engineer lists the publisher's public key in MODELPLANE_LOADER_TRUSTED_SIGNING_KEYS.
The signature file holds the 64 raw signature bytes or their base64 text.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

if TYPE_CHECKING:
    from modelplane.loader.settings import LoaderSettings


class InvalidKey(ValueError):
    pass


@dataclass(frozen=True)
class TrustedKey:
    key: Ed25519PublicKey
    key_id: str  # first 16 hex digits of the SHA-256 of the raw public key, for messages


def load_trusted_key(text: str) -> TrustedKey:
    """Reads an OpenSSH line, a PEM public key, base64 of the 32 raw bytes, or a file of one of them."""
    text = text.strip()
    candidate = Path(text).expanduser() if len(text) < 4096 and "\n" not in text else None
    if candidate is not None and candidate.is_file():
        text = candidate.read_text().strip()
    try:
        if text.startswith("ssh-ed25519"):
            key = serialization.load_ssh_public_key(text.encode())
        elif text.startswith("-----BEGIN"):
            key = serialization.load_pem_public_key(text.encode())
        else:
            key = Ed25519PublicKey.from_public_bytes(base64.b64decode(text, validate=True))
    except (ValueError, binascii.Error, TypeError) as error:
        raise InvalidKey(f"not an Ed25519 public key ({error})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidKey(f"a {type(key).__name__}, not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return TrustedKey(key, hashlib.sha256(raw).hexdigest()[:16])


def decode_signature(data: bytes) -> bytes:
    if len(data) == 64:
        return data
    try:
        return base64.b64decode(data.strip(), validate=True)
    except binascii.Error:
        return b""


def signed_by(signed: bytes, signature: bytes, keys: list[TrustedKey]) -> TrustedKey | None:
    """The trusted key that made `signature` over `signed`, or None."""
    raw = decode_signature(signature)
    for trusted in keys:
        try:
            trusted.key.verify(raw, signed)
        except InvalidSignature:
            continue
        return trusted
    return None


def trusted_keys(settings: LoaderSettings) -> list[TrustedKey]:
    """The keys of the settings; a key that cannot be read stops the loader at start, since running
    without it would refuse (or, worse, not check) the packages it signs."""
    keys = []
    for number, text in enumerate(settings.trusted_signing_keys, start=1):
        try:
            keys.append(load_trusted_key(text))
        except InvalidKey as error:
            raise ValueError(f"MODELPLANE_LOADER_TRUSTED_SIGNING_KEYS entry {number} is {error}.") from None
    if settings.require_signed_manifests and not keys:
        raise ValueError(
            "MODELPLANE_LOADER_REQUIRE_SIGNED_MANIFESTS is on but MODELPLANE_LOADER_TRUSTED_SIGNING_KEYS lists no key; "
            "every package would be refused. Add the publishers' Ed25519 public keys."
        )
    return keys
