"""The HTTP source against a real local HTTP server that drops connections half-way."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from modelplane.loader.errors import SourceUnavailable, UnsupportedSource
from modelplane.loader.sources import open_source
from tests.loader.conftest import loader_settings
from tests.loader.servers import FileServer, write_random_file


async def _read_all(source, file) -> bytes:
    return b"".join([chunk async for chunk in source.read(file)])


async def test_a_dropped_connection_resumes_with_range_and_the_digest_matches(
    file_server: FileServer, tmp_path: Path
) -> None:
    size = 3 * 1024 * 1024 + 7
    digest = write_random_file(file_server.state.root / "models" / "model.gguf", size)
    file_server.state.cut_first_get_at["models/model.gguf"] = size // 2
    file_server.state.announce_ranges = False  # one stream (a server that does is read in parallel parts)
    source = open_source(f"{file_server.url}/models/model.gguf", loader_settings(tmp_path))
    [file] = await source.list_files()
    assert (file.path, file.size) == ("model.gguf", size) and file.version
    data = await _read_all(source, file)
    assert len(data) == size and hashlib.sha256(data).hexdigest() == digest
    assert file_server.state.gets["models/model.gguf"] == 2
    assert file_server.state.range_headers == [f"bytes={size // 2}-"]
    await source.close()


async def test_a_server_that_ignores_range_still_yields_each_byte_once(file_server: FileServer, tmp_path: Path) -> None:
    digest = write_random_file(file_server.state.root / "m.onnx", 1_000_000)
    file_server.state.cut_first_get_at["m.onnx"] = 400_000
    file_server.state.ignore_range = True
    source = open_source(f"{file_server.url}/m.onnx", loader_settings(tmp_path))
    [file] = await source.list_files()
    assert hashlib.sha256(await _read_all(source, file)).hexdigest() == digest
    await source.close()


async def test_a_file_replaced_during_the_download_fails_instead_of_mixing(
    file_server: FileServer, tmp_path: Path
) -> None:
    path = file_server.state.root / "m.onnx"
    write_random_file(path, 1_000_000)
    file_server.state.cut_first_get_at["m.onnx"] = 500_000
    file_server.state.ignore_range = True  # what a server does when If-Range no longer matches
    source = open_source(f"{file_server.url}/m.onnx", loader_settings(tmp_path))
    [file] = await source.list_files()
    write_random_file(path, 1_000_000)  # a new upload: another ETag
    with pytest.raises(SourceUnavailable, match="changed on the server while it was being downloaded"):
        await _read_all(source, file)
    await source.close()


async def test_a_directory_is_listed_by_its_sha256sums(file_server: FileServer, tmp_path: Path) -> None:
    root = file_server.state.root / "minilm"
    first = write_random_file(root / "model.safetensors", 1000)
    second = write_random_file(root / "1_Pooling" / "config.json", 10)
    (root / "SHA256SUMS").write_text(f"{first}  model.safetensors\n{second}  ./1_Pooling/config.json\n")
    source = open_source(f"{file_server.url}/minilm/", loader_settings(tmp_path))
    files = await source.list_files()
    assert [(f.path, f.size) for f in files] == [("1_Pooling/config.json", 10), ("model.safetensors", 1000)]
    await source.close()


async def test_a_directory_without_a_manifest_says_what_to_publish(file_server: FileServer, tmp_path: Path) -> None:
    (file_server.state.root / "minilm").mkdir()
    source = open_source(f"{file_server.url}/minilm/", loader_settings(tmp_path))
    with pytest.raises(SourceUnavailable, match=r"cannot list its files\. Publish a SHA256SUMS"):
        await source.list_files()
    await source.close()


async def test_a_missing_file(file_server: FileServer, tmp_path: Path) -> None:
    source = open_source(f"{file_server.url}/nope.gguf", loader_settings(tmp_path))
    with pytest.raises(SourceUnavailable, match=r"nope.gguf does not exist on the server \(HTTP 404\)"):
        await source.list_files()
    await source.close()


def test_credentials_in_the_uri_are_refused_and_not_repeated(tmp_path: Path) -> None:
    with pytest.raises(UnsupportedSource) as refused:
        open_source("https://admin:hunter2@models.internal/minilm/", loader_settings(tmp_path))
    assert "hunter2" not in refused.value.message and "MODELPLANE_LOADER_HTTP_BEARER_TOKEN" in refused.value.message
