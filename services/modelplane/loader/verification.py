"""What a package must be, and the proof that it is.

Expectations come from, in any combination: the digest registered with the model, a manifest the
operator registered, the SHA256SUMS shipped beside the package (signed or not), and the manifest
recorded in the registry when this version was first fetched (so a source that changes later is
noticed). Every one that is present must hold. Names are checked before a byte is fetched;
digests while the bytes are written (the cache hashes them), so verifying costs no second pass.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import structlog

from modelplane.common.types import Model, PackageManifest
from modelplane.loader.errors import ChecksumMismatch, ManifestMismatch, SignatureRefused
from modelplane.loader.manifest import SIGNATURE_FILE, SUMS_FILE, package_digest, parse_sha256sums
from modelplane.loader.signing import TrustedKey, signed_by
from modelplane.loader.sources import PackageSource, SourceFile

log = structlog.get_logger()


@dataclass(frozen=True)
class FileExpectation:
    """Per-file digests from one origin; the package must hold exactly these files."""

    origin: str
    digests: dict[str, str]


@dataclass(frozen=True)
class ExpectedPackage:
    digest: str = ""  # the registered package digest (see manifest.package_digest)
    files: list[FileExpectation] = field(default_factory=list)
    signed_by: str = ""  # key id of the trusted key that signed SHA256SUMS

    def fetch_key(self, source_uri: str) -> str:
        """Loads with the same source and the same expectations can share one download."""
        text = json.dumps([source_uri, self.digest, [(f.origin, sorted(f.digests.items())) for f in self.files]])
        return hashlib.sha256(text.encode()).hexdigest()

    def file_digests(self, files: list[SourceFile]) -> dict[str, str] | None:
        """Every listed file's digest, when the expectations name them all before a byte is fetched
        (a manifest, a SHA256SUMS, or the registered digest of a one-file package); None otherwise,
        or when two expectations disagree (the fetch then shows which file differs)."""
        listed = {f.path for f in files}
        named = [e.digests for e in self.files]
        if self.digest and len(files) == 1 and "/" not in files[0].path:
            named.append({files[0].path: self.digest})
        complete = [d for d in named if set(d) == listed]
        if not complete or any(d != complete[0] for d in complete[1:]):
            return None
        return complete[0]

    def describe(self) -> str:
        origins = [f.origin for f in self.files] + (["the registered digest"] if self.digest else [])
        return ", ".join(origins) if origins else "digests computed now and recorded in the registry"


async def expected_package(
    model: Model, source: PackageSource, files: list[SourceFile], keys: list[TrustedKey], require_signed: bool
) -> ExpectedPackage:
    spec = model.spec
    expectations: list[FileExpectation] = []
    if spec.manifest is not None and spec.manifest.files:
        expectations.append(
            FileExpectation("the registered manifest", {f.path: f.sha256.lower() for f in spec.manifest.files})
        )
    shipped, key_id = await _shipped_sums(source, files, keys, require_signed)
    if shipped is not None:
        expectations.append(shipped)
    recorded = model.status.manifest
    if recorded is not None and recorded.files:
        expectations.append(
            FileExpectation(
                f"the manifest recorded at the first fetch of version {model.version}",
                {f.path: f.sha256 for f in recorded.files},
            )
        )
    return ExpectedPackage(digest=spec.expected_sha256.lower(), files=expectations, signed_by=key_id)


async def _shipped_sums(
    source: PackageSource, files: list[SourceFile], keys: list[TrustedKey], require_signed: bool
) -> tuple[FileExpectation | None, str]:
    sums = await source.read_sidecar(SUMS_FILE)
    where = source.display_uri
    if sums is None:
        if require_signed:
            raise SignatureRefused(
                f"The package at {where} has no {SUMS_FILE} beside it, and this loader accepts only signed "
                f"packages. Ship {SUMS_FILE} and its Ed25519 signature {SIGNATURE_FILE} with the package."
            )
        return None, ""
    signature = await source.read_sidecar(SIGNATURE_FILE)
    key_id = ""
    if signature is None:
        if require_signed:
            raise SignatureRefused(
                f"The {SUMS_FILE} of the package at {where} is not signed ({SIGNATURE_FILE} is missing), and this "
                "loader accepts only signed packages. Sign it with the publisher's Ed25519 key."
            )
    elif keys:
        signer = signed_by(sums, signature, keys)
        if signer is None:
            raise SignatureRefused(
                f"The signature {SIGNATURE_FILE} of the package at {where} does not match its {SUMS_FILE} under any "
                "trusted key: the manifest was altered or signed by an untrusted key. Nothing was fetched. Check the "
                "package's origin, or add the publisher's key to MODELPLANE_LOADER_TRUSTED_SIGNING_KEYS."
            )
        key_id = signer.key_id
    else:
        log.warning("manifest signature not checked: no trusted signing keys are configured", source=where)
    digests = parse_sha256sums(sums.decode(errors="replace"))
    origin = f"{SUMS_FILE} (signed by key {key_id})" if key_id else SUMS_FILE
    if source.single_file:
        # A file in a directory of many, with one SHA256SUMS for all: only its own line applies.
        name = files[0].path
        if name not in digests:
            if require_signed:
                raise SignatureRefused(f"The signed {SUMS_FILE} beside {where} does not list {name}.")
            return None, ""
        return FileExpectation(origin, {name: digests[name]}), key_id
    return FileExpectation(origin, digests), key_id


def check_listing(expected: ExpectedPackage, files: list[SourceFile], where: str) -> None:
    """Missing and extra files, known from names alone: refused before anything is fetched."""
    listed = {f.path for f in files}
    for expectation in expected.files:
        missing = sorted(set(expectation.digests) - listed)
        if missing:
            raise ManifestMismatch(
                f"File {missing[0]} is listed in {expectation.origin} but missing from the package at {where}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                + ". Restore the file or fix the manifest."
            )
        extra = sorted(listed - set(expectation.digests))
        if extra:
            raise ManifestMismatch(
                f"File {extra[0]} is in the package at {where} but not in {expectation.origin}"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + "; every file must be listed. Remove the file, or add it to the manifest"
                + (" and sign it again." if "signed" in expectation.origin else ".")
            )


def verify(expected: ExpectedPackage, files: list[SourceFile], manifest: PackageManifest) -> None:
    """Compares what was fetched (hashed while written) with every expectation."""
    got = {f.path: f for f in manifest.files}
    sizes = {f.path: f.size for f in files}
    for expectation in expected.files:
        for path, digest in sorted(expectation.digests.items()):
            actual = got[path]
            if actual.sha256 != digest:
                listed = sizes.get(path, -1)
                truncated = (
                    f" The file is truncated: {actual.size_bytes} of {listed} bytes."
                    if 0 <= actual.size_bytes < listed
                    else ""
                )
                raise ChecksumMismatch(
                    f"File {path}: expected SHA-256 {digest} (from {expectation.origin}), got {actual.sha256}."
                    f"{truncated} The package at the source is not the one described; fix the package or its "
                    "manifest. The fetched bytes were moved to the cache's quarantine folder.",
                    metadata={"file": path, "expected": digest, "actual": actual.sha256},
                )
    for path, listed in sorted(sizes.items()):
        if listed >= 0 and got[path].size_bytes != listed:
            raise ChecksumMismatch(
                f"File {path} changed while it was fetched: listed with {listed} bytes, read {got[path].size_bytes}. "
                "Load again once the package is no longer being written.",
                metadata={"file": path},
            )
    actual_digest = package_digest(manifest)
    if expected.digest and expected.digest != actual_digest:
        what = manifest.files[0].path if len(manifest.files) == 1 else "the package manifest"
        raise ChecksumMismatch(
            f"SHA-256 mismatch for {what}: expected {expected.digest}, got {actual_digest}. The package at the "
            "source is not the one registered; check the source or register the right digest. The fetched "
            "bytes were moved to the cache's quarantine folder.",
            metadata={"expected": expected.digest, "actual": actual_digest},
        )
