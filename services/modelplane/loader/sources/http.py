"""HTTP(S) servers: http(s)://host/path/file (a single-file package) or http(s)://host/path/ (a
package directory, whose files are listed by the SHA256SUMS beside them or by an operator-given
manifest, since HTTP cannot list a directory).

A download that breaks off is resumed where it stopped with a `Range` request; `If-Range` with
the file's ETag (or Last-Modified) makes sure the rest belongs to the same file, so a file
replaced on the server mid-download fails cleanly instead of mixing two versions. A file larger
than one part, on a server that announces `Accept-Ranges: bytes`, is downloaded as parallel
ranged parts (a bounded window in flight, as for S3) and handed on in order.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import httpx
import structlog

from modelplane.loader.errors import SourceUnavailable
from modelplane.loader.manifest import SUMS_FILE, parse_sha256sums, safe_relative_path
from modelplane.loader.sources import CHUNK_BYTES, PackageSource, SourceFile
from modelplane.loader.sources.retry import backoff_delay

if TYPE_CHECKING:
    from modelplane.loader.settings import LoaderSettings

log = structlog.get_logger()

_RETRYABLE_STATUS = {408, 425, 429, 500, 502, 503, 504}


class HttpSource(PackageSource):
    def __init__(self, uri: str, settings: LoaderSettings, known_paths: Sequence[str] = ()) -> None:
        super().__init__(uri)
        self.settings = settings
        self.known_paths = list(known_paths)
        parts = urlsplit(uri)
        self.is_directory = parts.path.endswith("/") or not parts.path
        directory_path = parts.path if self.is_directory else parts.path.rsplit("/", 1)[0] + "/"
        self.base = urlunsplit((parts.scheme, parts.netloc, directory_path, "", ""))
        self.single_name = "" if self.is_directory else unquote(parts.path.rsplit("/", 1)[-1])
        self.single_file = not self.is_directory
        self._sidecars: dict[str, bytes | None] = {}
        self._ranged: set[str] = set()  # files whose server announced byte ranges
        headers = {"Accept-Encoding": "identity"}  # ranges and digests are over the file's own bytes
        if settings.http_bearer_token is not None:
            headers["Authorization"] = f"Bearer {settings.http_bearer_token.get_secret_value()}"
        self.client = httpx.AsyncClient(
            headers=headers,
            timeout=httpx.Timeout(settings.http_timeout_seconds),
            verify=str(settings.http_ca_bundle) if settings.http_ca_bundle else True,
            follow_redirects=True,
        )

    def _url(self, path: str) -> str:
        if not self.is_directory and path == self.single_name:
            return self.uri
        return self.base + quote(path)

    def _where(self, path: str) -> str:
        return self.display_uri if path == self.single_name else f"{self.display_uri.rstrip('/')}/{path}"

    async def list_files(self) -> list[SourceFile]:
        if not self.is_directory:
            paths = [self.single_name]
        elif self.known_paths:
            paths = [safe_relative_path(p) for p in self.known_paths]
        else:
            sums = await self.read_sidecar(SUMS_FILE)
            if sums is None:
                raise SourceUnavailable(
                    f"{self.display_uri} is a directory on an HTTP server, which cannot list its files. Publish a "
                    f"{SUMS_FILE} file beside the package (sha256sum of every file) or register the model with a "
                    "manifest."
                )
            paths = sorted(parse_sha256sums(sums.decode(errors="replace")))
        return list(await asyncio.gather(*(self._describe(path) for path in paths)))

    async def _describe(self, path: str) -> SourceFile:
        response = await self._request("HEAD", path)
        size = (
            int(response.headers.get("Content-Length", -1))
            if "chunked" not in response.headers.get("Transfer-Encoding", "")
            else -1
        )
        if response.headers.get("Accept-Ranges", "").strip().lower() == "bytes":
            self._ranged.add(path)
        return SourceFile(path, size, _version(response))

    async def _request(self, method: str, path: str) -> httpx.Response:
        attempt = 1
        while True:
            try:
                response = await self.client.request(method, self._url(path))
                if response.status_code not in _RETRYABLE_STATUS:
                    _raise_for_status(response, self._where(path))
                    return response
                failure = f"HTTP {response.status_code}"
            except httpx.TransportError as error:
                failure = type(error).__name__
            if attempt >= self.settings.fetch_retries:
                raise SourceUnavailable(
                    f"{self._where(path)} kept failing ({failure}) after {attempt} attempts; check the server."
                )
            await asyncio.sleep(backoff_delay(attempt, self.settings.fetch_retry_backoff_seconds))
            attempt += 1

    async def read(self, file: SourceFile) -> AsyncIterator[bytes]:
        position = 0  # bytes handed to the caller
        if file.path in self._ranged and file.size > self.settings.download_part_bytes:
            async for chunk in self._read_parts(file):
                position += len(chunk)
                yield chunk
            if position >= file.size:
                return
            log.info("the server ignored a byte range; downloading the rest in one stream", file=file.path)
        async for chunk in self._read_stream(file, position):
            yield chunk

    async def _read_parts(self, file: SourceFile) -> AsyncIterator[bytes]:
        """Parts of `download_part_bytes`, up to `download_concurrency` in flight, yielded in order;
        ends early when the server answers a part with the whole file (it does not honour ranges)."""
        part = max(1, self.settings.download_part_bytes)
        ranges = collections.deque((start, min(start + part, file.size) - 1) for start in range(0, file.size, part))
        window: collections.deque[asyncio.Task[bytearray | None]] = collections.deque()
        try:
            while ranges or window:
                while ranges and len(window) < max(1, self.settings.download_concurrency):
                    first, last = ranges.popleft()
                    window.append(asyncio.create_task(self._get_part(file, first, last)))
                body = await window.popleft()
                if body is None:
                    return
                yield body
        finally:
            for task in window:
                task.cancel()
            await asyncio.gather(*window, return_exceptions=True)

    async def _get_part(self, file: SourceFile, first: int, last: int) -> bytearray | None:
        """One ranged GET, read to its end and retried with backoff; None when the server sent the
        whole file instead (its body is not read)."""
        headers = {"Range": f"bytes={first}-{last}"}
        if file.version:
            headers["If-Range"] = file.version
        failures = 0
        while True:
            try:
                async with self.client.stream("GET", self._url(file.path), headers=headers) as response:
                    if response.status_code in _RETRYABLE_STATUS:
                        raise _Retry(f"HTTP {response.status_code}")
                    _raise_for_status(response, self._where(file.path))
                    if response.status_code == 200:
                        if file.version and _version(response) != file.version:
                            raise SourceUnavailable(_changed(self._where(file.path)))
                        return None
                    start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
                    if start != str(first):
                        raise SourceUnavailable(f"{self._where(file.path)} answered a part with the wrong byte range.")
                    body, received = bytearray(last - first + 1), 0  # one buffer: memory is one part
                    async for piece in response.aiter_bytes():
                        if received + len(piece) > len(body):
                            raise SourceUnavailable(
                                f"{self._where(file.path)} sent more than the part it was asked for."
                            )
                        body[received : received + len(piece)] = piece
                        received += len(piece)
                if received != len(body):
                    raise _Retry(f"a part ended after {received} of {len(body)} bytes")
                return body
            except (httpx.TransportError, _Retry) as error:
                failures += 1
                if failures >= self.settings.fetch_retries:
                    raise SourceUnavailable(
                        f"Downloading {self._where(file.path)} failed {failures} times in a row at byte {first} "
                        f"({_reason(error)}); check the server and the network. Nothing partial was kept."
                    ) from None
                await asyncio.sleep(backoff_delay(failures, self.settings.fetch_retry_backoff_seconds))

    async def _read_stream(self, file: SourceFile, position: int) -> AsyncIterator[bytes]:
        """The file from byte `position` on in one GET, resumed with Range where it breaks off."""
        failures = 0
        buffer = bytearray()  # received, not yet handed over: handed over even when the connection drops
        while True:
            headers = {}
            if position:
                headers["Range"] = f"bytes={position}-"
                if file.version:
                    headers["If-Range"] = file.version
            try:
                async with self.client.stream("GET", self._url(file.path), headers=headers) as response:
                    if response.status_code in _RETRYABLE_STATUS:
                        raise _Retry(f"HTTP {response.status_code}")
                    _raise_for_status(response, self._where(file.path))
                    skip = self._resume_offset(response, position, file)
                    async for received in response.aiter_bytes():
                        if skip:
                            dropped = min(skip, len(received))
                            received, skip = received[dropped:], skip - dropped
                        buffer += received
                        if len(buffer) >= CHUNK_BYTES:
                            position += len(buffer)
                            failures = 0
                            yield bytes(buffer)
                            buffer.clear()
                if buffer:
                    position += len(buffer)
                    yield bytes(buffer)
                    buffer.clear()
                if file.size < 0 or position >= file.size:
                    return
                raise _Retry(f"the response ended after {position} of {file.size} bytes")
            except (httpx.TransportError, _Retry) as error:
                if buffer:
                    position += len(buffer)
                    failures = 0
                    yield bytes(buffer)
                    buffer.clear()
                failures += 1
                if failures >= self.settings.fetch_retries:
                    raise SourceUnavailable(
                        f"Downloading {self._where(file.path)} failed {failures} times in a row at byte {position} "
                        f"({_reason(error)}); check the server and the network. Nothing partial was kept."
                    ) from None
                delay = backoff_delay(failures, self.settings.fetch_retry_backoff_seconds)
                log.warning(
                    "download interrupted; resuming",
                    file=file.path,
                    at_byte=position,
                    attempt=failures,
                    error=_reason(error),
                    in_seconds=round(delay, 2),
                )
                await asyncio.sleep(delay)

    def _resume_offset(self, response: httpx.Response, position: int, file: SourceFile) -> int:
        """How many bytes of this response were already received (a server that ignores Range)."""
        if not position:
            return 0
        if response.status_code == 206:
            start = response.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
            if start != str(position):
                raise SourceUnavailable(f"{self._where(file.path)} answered a resume with the wrong byte range.")
            return 0
        if file.version and _version(response) != file.version:
            raise SourceUnavailable(_changed(self._where(file.path)))
        return position  # the same file from a server that ignores Range: skip what we already have

    async def read_sidecar(self, name: str) -> bytes | None:
        if name not in self._sidecars:
            self._sidecars[name] = await self._get_sidecar(name)
        return self._sidecars[name]

    async def _get_sidecar(self, name: str) -> bytes | None:
        try:
            response = await self.client.get(self.base + quote(name))
        except httpx.TransportError:
            return None
        return response.content if response.status_code == 200 else None

    async def close(self) -> None:
        await self.client.aclose()


class _Retry(Exception):
    pass


def _version(response: httpx.Response) -> str:
    return response.headers.get("ETag") or response.headers.get("Last-Modified", "")


def _changed(where: str) -> str:
    return f"{where} changed on the server while it was being downloaded; load again once it is replaced completely."


def _reason(error: Exception) -> str:
    return str(error) if isinstance(error, _Retry) else f"{type(error).__name__}: {error}"[:200]


def _raise_for_status(response: httpx.Response, where: str) -> None:
    if response.status_code in (200, 206):
        return
    if response.status_code == 404:
        raise SourceUnavailable(f"{where} does not exist on the server (HTTP 404). Check the model's source URI.")
    if response.status_code in (401, 403):
        raise SourceUnavailable(
            f"The server refused {where} (HTTP {response.status_code}). Check MODELPLANE_LOADER_HTTP_BEARER_TOKEN "
            "and the server's access rules."
        )
    raise SourceUnavailable(f"The server answered HTTP {response.status_code} for {where}.")
