"""The S3 source against moto's real S3 server on loopback: listing, the parallel ranged path,
retries when the server fails mid-download, and errors that name no credential."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path

import pytest

from modelplane.loader.errors import SourceUnavailable
from modelplane.loader.sources import open_source
from tests.loader.conftest import loader_settings
from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY, S3Server, write_random_file


def _bucket() -> str:
    return f"models-{uuid.uuid4().hex[:12]}"


async def _read_all(source, file) -> bytes:
    return b"".join([chunk async for chunk in source.read(file)])


async def test_directory_package_is_listed_and_large_objects_take_the_ranged_path(
    s3_server: S3Server, tmp_path: Path
) -> None:
    package = tmp_path / "package"
    digest = write_random_file(package / "model.safetensors", 5 * 1024 * 1024 + 12345)
    (package / "1_Pooling").mkdir()
    (package / "1_Pooling" / "config.json").write_text("{}")
    (package / "SHA256SUMS").write_text(f"{digest}  model.safetensors\n")
    bucket = _bucket()
    s3_server.upload_tree(bucket, "team/minilm", package)
    source = open_source(f"s3://{bucket}/team/minilm", loader_settings(tmp_path, s3_server))
    files = await source.list_files()
    assert [(f.path, f.size) for f in files] == [
        ("1_Pooling/config.json", 2),
        ("model.safetensors", 5 * 1024 * 1024 + 12345),
    ]
    before = s3_server.ranged_gets
    data = await _read_all(source, files[1])
    assert hashlib.sha256(data).hexdigest() == digest
    assert s3_server.ranged_gets - before == 6  # 1 MiB parts, read in parallel, handed over in order
    assert (await source.read_sidecar("SHA256SUMS")).decode().startswith(digest)
    await source.close()


async def test_single_object_package(s3_server: S3Server, tmp_path: Path) -> None:
    digest = write_random_file(tmp_path / "gemma.gguf", 300_000)
    bucket = _bucket()
    s3_server.client().create_bucket(Bucket=bucket)
    s3_server.client().upload_file(str(tmp_path / "gemma.gguf"), bucket, "llm/gemma.gguf")
    source = open_source(f"s3://{bucket}/llm/gemma.gguf", loader_settings(tmp_path, s3_server))
    [file] = await source.list_files()
    assert source.single_file and file.path == "gemma.gguf"
    assert hashlib.sha256(await _read_all(source, file)).hexdigest() == digest
    await source.close()


async def test_server_errors_mid_download_are_retried_and_the_bytes_still_match(
    s3_server: S3Server, tmp_path: Path
) -> None:
    digest = write_random_file(tmp_path / "package" / "weights.bin", 4 * 1024 * 1024)
    bucket = _bucket()
    s3_server.upload_tree(bucket, "p", tmp_path / "package")
    source = open_source(f"s3://{bucket}/p", loader_settings(tmp_path, s3_server, fetch_retries=6))
    [file] = await source.list_files()
    s3_server.fail_ranged_gets = 3
    assert hashlib.sha256(await _read_all(source, file)).hexdigest() == digest
    assert s3_server.fail_ranged_gets == 0
    await source.close()


async def test_a_server_that_keeps_failing_gives_a_clear_error_without_credentials(
    s3_server: S3Server, tmp_path: Path
) -> None:
    write_random_file(tmp_path / "package" / "weights.bin", 2 * 1024 * 1024)
    bucket = _bucket()
    s3_server.upload_tree(bucket, "p", tmp_path / "package")
    source = open_source(f"s3://{bucket}/p", loader_settings(tmp_path, s3_server, fetch_retries=2))
    [file] = await source.list_files()
    s3_server.fail_ranged_gets = 1000
    try:
        with pytest.raises(SourceUnavailable) as failed:
            await _read_all(source, file)
    finally:
        s3_server.fail_ranged_gets = 0
    message = failed.value.message
    assert f"s3://{bucket}/p" in message and "InternalError" in message and "2 attempts" in message
    assert S3_ACCESS_KEY_ID not in message and S3_SECRET_ACCESS_KEY not in message
    await source.close()


async def test_an_empty_prefix_says_what_to_check(s3_server: S3Server, tmp_path: Path) -> None:
    bucket = _bucket()
    s3_server.client().create_bucket(Bucket=bucket)
    source = open_source(f"s3://{bucket}/nothing-here", loader_settings(tmp_path, s3_server))
    with pytest.raises(SourceUnavailable, match=rf"No objects under s3://{bucket}/nothing-here"):
        await source.list_files()
    await source.close()


async def test_a_bucket_that_does_not_exist(s3_server: S3Server, tmp_path: Path) -> None:
    source = open_source("s3://no-such-bucket-here/minilm", loader_settings(tmp_path, s3_server))
    with pytest.raises(SourceUnavailable, match=r"does not exist \(NoSuchBucket\)"):
        await source.list_files()
    await source.close()
