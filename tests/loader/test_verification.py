"""Fetch and verify through the loader's pipeline and handler, with a real registry: manifests,
signatures, quarantine, the registry's record, and bad input that must load nothing."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from modelplane.common.errors import ModelplaneError
from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.loader.signing import load_trusted_key
from tests.loader.conftest import LoaderCore, loader_settings
from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, FileServer, S3Server, write_random_file


def _package(root: Path) -> dict[str, str]:
    """A small package directory; returns its files' digests."""
    digests = {
        "model.safetensors": write_random_file(root / "model.safetensors", 300_000),
        "config.json": write_random_file(root / "config.json", 100),
        "1_Pooling/config.json": write_random_file(root / "1_Pooling" / "config.json", 50),
    }
    return digests


def _sums(digests: dict[str, str]) -> str:
    return "".join(f"{d}  {p}\n" for p, d in sorted(digests.items()))


async def _refused(core: LoaderCore, name: str) -> ModelplaneError:
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load(name, reason="test"):
            pass
    model = await core.registry.get_model(name)
    assert model.state == ModelState.FAILED and model.status.reason == refused.value.message
    assert not list(core.cache.packages.iterdir()), "nothing unverified may reach the cache"
    assert not list(core.cache.partial.iterdir()), "no fetch leftovers"
    assert not core.repository.entry_path(name).exists(), "nothing may reach Triton's repository"
    return refused.value


@pytest.fixture
async def core(tmp_path: Path, make_core: Callable[..., LoaderCore]) -> LoaderCore:
    # Async, so its gRPC channels are made inside the test session's running loop.
    return make_core(loader_settings(tmp_path))


async def test_sha256sums_beside_the_package_is_checked_and_the_manifest_recorded(
    core: LoaderCore, tmp_path: Path
) -> None:
    digests = _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(digests))
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    model = await core.prepare("m")
    assert {f.path: f.sha256 for f in model.status.manifest.files} == digests  # SHA256SUMS is no package file
    events = await core.registry.events("m")
    assert "verified 3 files against SHA256SUMS" in events[-1].message
    package = core.cache.package_path(model.status.manifest.sha256)
    assert package is not None and sorted(p.name for p in package.iterdir()) == [
        "1_Pooling",
        "config.json",
        "model.safetensors",
    ]


async def test_a_wrong_digest_names_the_file_and_both_digests_and_quarantines_the_bytes(
    core: LoaderCore, tmp_path: Path
) -> None:
    digests = _package(tmp_path / "pkg")
    wrong = dict(digests, **{"model.safetensors": "ab" * 32})
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(wrong))
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and error.reason == "CHECKSUM_MISMATCH"
    assert (
        f"File model.safetensors: expected SHA-256 {'ab' * 32} (from SHA256SUMS), got {digests['model.safetensors']}"
        in error.message
    )
    [quarantined] = core.cache.quarantine_dir.iterdir()
    assert (quarantined / "model.safetensors").stat().st_size == 300_000


async def test_a_truncated_file_is_named_as_truncated(core: LoaderCore, tmp_path: Path) -> None:
    digests = _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(digests))
    (tmp_path / "pkg" / "model.safetensors").write_bytes((tmp_path / "pkg" / "model.safetensors").read_bytes()[:1000])
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg"), manifest=None))
    error = await _refused(core, "m")
    assert error.reason == "CHECKSUM_MISMATCH" and "File model.safetensors: expected SHA-256" in error.message
    assert any(core.cache.quarantine_dir.iterdir())


async def test_a_file_missing_from_the_package_is_refused_before_any_fetch(core: LoaderCore, tmp_path: Path) -> None:
    digests = _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(digests))
    (tmp_path / "pkg" / "config.json").unlink()
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert error.reason == "MANIFEST_MISMATCH"
    assert error.message.startswith("File config.json is listed in SHA256SUMS but missing from the package")
    assert not any(core.cache.quarantine_dir.iterdir())


async def test_a_manifest_path_that_escapes_the_package(core: LoaderCore, tmp_path: Path) -> None:
    _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text(f"{'0' * 64}  ../../etc/passwd\n")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert error.reason == "PACKAGE_REFUSED" and "escapes the package directory" in error.message


async def test_a_symlink_out_of_the_package(core: LoaderCore, tmp_path: Path) -> None:
    _package(tmp_path / "pkg")
    (tmp_path / "secret.txt").write_text("not for Triton")
    (tmp_path / "pkg" / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert "tokenizer.json is a symbolic link" in error.message and "outside the package" in error.message


# Signatures -------------------------------------------------------------------------------------


def _keypair() -> tuple[Ed25519PrivateKey, str]:
    private = Ed25519PrivateKey.generate()
    raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return private, base64.b64encode(raw).decode()


def _signed_package(root: Path, private: Ed25519PrivateKey) -> dict[str, str]:
    digests = _package(root)
    sums = _sums(digests).encode()
    (root / "SHA256SUMS").write_bytes(sums)
    (root / "SHA256SUMS.sig").write_bytes(base64.b64encode(private.sign(sums)))
    return digests


async def test_a_signed_manifest_from_a_trusted_key_is_accepted(
    tmp_path: Path, make_core: Callable[..., LoaderCore]
) -> None:
    private, public = _keypair()
    core = make_core(loader_settings(tmp_path, trusted_signing_keys=[public], require_signed_manifests=True))
    _signed_package(tmp_path / "pkg", private)
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    await core.prepare("m")
    key_id = load_trusted_key(public).key_id
    assert f"SHA256SUMS (signed by key {key_id})" in (await core.registry.events("m"))[-1].message


async def test_a_signature_by_an_untrusted_key_is_refused(tmp_path: Path, make_core: Callable[..., LoaderCore]) -> None:
    _, trusted = _keypair()
    stranger, _ = _keypair()
    core = make_core(loader_settings(tmp_path, trusted_signing_keys=[trusted]))
    _signed_package(tmp_path / "pkg", stranger)
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert (
        error.reason == "SIGNATURE_REFUSED" and "does not match its SHA256SUMS under any trusted key" in error.message
    )


async def test_an_altered_signed_manifest_is_refused(tmp_path: Path, make_core: Callable[..., LoaderCore]) -> None:
    private, public = _keypair()
    core = make_core(loader_settings(tmp_path, trusted_signing_keys=[public]))
    digests = _signed_package(tmp_path / "pkg", private)
    altered = dict(digests, **{"config.json": "cd" * 32})
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(altered))
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    assert (await _refused(core, "m")).reason == "SIGNATURE_REFUSED"


async def test_an_extra_file_not_in_the_signed_manifest_is_refused(
    tmp_path: Path, make_core: Callable[..., LoaderCore]
) -> None:
    private, public = _keypair()
    core = make_core(loader_settings(tmp_path, trusted_signing_keys=[public], require_signed_manifests=True))
    _signed_package(tmp_path / "pkg", private)
    (tmp_path / "pkg" / "backdoor.py").write_text("import os")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert error.reason == "MANIFEST_MISMATCH"
    assert "File backdoor.py is in the package" in error.message and "sign it again" in error.message


async def test_signing_required_refuses_an_unsigned_package(
    tmp_path: Path, make_core: Callable[..., LoaderCore]
) -> None:
    _, public = _keypair()
    core = make_core(loader_settings(tmp_path, trusted_signing_keys=[public], require_signed_manifests=True))
    digests = _package(tmp_path / "pkg")
    (tmp_path / "pkg" / "SHA256SUMS").write_text(_sums(digests))
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    error = await _refused(core, "m")
    assert error.reason == "SIGNATURE_REFUSED" and "is not signed (SHA256SUMS.sig is missing)" in error.message


# The recorded manifest, warm reloads, shared downloads -------------------------------------------


async def test_a_source_that_changes_after_the_first_fetch_is_refused(core: LoaderCore, tmp_path: Path) -> None:
    _package(tmp_path / "pkg")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    model = await core.prepare("m")  # no digest given: computed now and recorded in the registry
    await core.registry.transition(model, ModelState.STAGED, "staged (this test stops before conversion)")
    write_random_file(tmp_path / "pkg" / "config.json", 100)
    with pytest.raises(ModelplaneError) as refused:
        async for _ in core.handler.load("m", reason="test", refresh=True):
            pass
    assert refused.value.reason == "CHECKSUM_MISMATCH"
    assert "(from the manifest recorded at the first fetch of version 1)" in refused.value.message


async def test_a_warm_reload_reads_and_hashes_nothing(core: LoaderCore, tmp_path: Path) -> None:
    _package(tmp_path / "pkg")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri=str(tmp_path / "pkg")))
    first = await core.prepare("m")
    shutil.rmtree(tmp_path / "pkg")  # were the source read again, this reload would fail
    events_before = len(await core.registry.events("m"))
    again = await core.prepare("m")
    assert again.status.manifest == first.status.manifest
    assert len(await core.registry.events("m")) == events_before  # no FETCHING, no VERIFYING


async def test_concurrent_loads_of_one_package_share_one_download(
    core: LoaderCore, file_server: FileServer, tmp_path: Path
) -> None:
    root = file_server.state.root / "minilm"
    digests = _package(root)
    (root / "SHA256SUMS").write_text(_sums(digests))
    for name in ("a", "b", "c"):
        await core.register(ModelSpec(name=name, task=Task.EMBEDDING, source_uri=f"{file_server.url}/minilm/"))
    models = await asyncio.gather(*(core.prepare(name) for name in ("a", "b", "c")))
    assert len({m.status.manifest.sha256 for m in models}) == 1
    package_gets = {p: n for p, n in file_server.state.gets.items() if not p.endswith("SHA256SUMS")}
    assert package_gets == {f"minilm/{path}": 1 for path in digests}  # each file once, for three models


async def test_an_s3_package_end_to_end_into_the_cache_with_no_credential_in_any_log_or_event(
    s3_server: S3Server, tmp_path: Path, make_core: Callable[..., LoaderCore], capfd: pytest.CaptureFixture[str]
) -> None:
    core = make_core(loader_settings(tmp_path, s3_server))
    digests = _package(tmp_path / "pkg")
    write_random_file(tmp_path / "pkg" / "model.safetensors", 3 * 1024 * 1024)
    digests["model.safetensors"] = hashlib.sha256((tmp_path / "pkg" / "model.safetensors").read_bytes()).hexdigest()
    s3_server.upload_tree("s3-e2e", "models/minilm", tmp_path / "pkg")
    await core.register(ModelSpec(name="m", task=Task.EMBEDDING, source_uri="s3://s3-e2e/models/minilm"))
    s3_server.fail_ranged_gets = 2
    progress = []
    model = await core.prepare("m", progress)
    assert {f.path: f.sha256 for f in model.status.manifest.files} == digests
    fetching = [p for p in progress if p.phase == ModelState.FETCHING and p.bytes_total]
    assert fetching[-1].bytes_done == fetching[-1].bytes_total == 3 * 1024 * 1024 + 150
    assert fetching[-1].files_done == fetching[-1].files_total == 3
    events = await core.registry.events("m")
    logs = capfd.readouterr()
    assert s3_server.fail_ranged_gets == 0  # the injected 500s were met and retried
    assert "fetching from s3://s3-e2e/models/minilm" in logs.out + logs.err
    for secret in (S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY):
        assert secret not in logs.out + logs.err
        assert all(secret not in e.message for e in events)
