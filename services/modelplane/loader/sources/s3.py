"""S3 and MinIO: s3://bucket/prefix (a package directory) or s3://bucket/key (a single file).

boto3 runs in worker threads rather than aiobotocore on the event loop: it is the reference
client (credential chain, signing, the `standard` retry mode) and moto is tested against it;
aiobotocore pins botocore to narrow ranges that lag boto3 and would fight the constraints file.
The threads cost nothing that matters here: socket reads and SHA-256 both release the GIL, and a
large object is read as parallel ranged GETs (a bounded window of parts in flight) that are
handed to the cache in order, so it still hashes in one pass.

Credentials come from the loader's settings or the standard AWS chain and never appear in a log
line, an event, an error or a metric label: botocore logs request headers (the Authorization
header names the access key) only at DEBUG, which this module keeps off.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog

from modelplane.common.redact import redact_uri
from modelplane.loader.errors import SourceUnavailable
from modelplane.loader.manifest import SIDECAR_FILES, safe_relative_path
from modelplane.loader.sources import PackageSource, SourceFile
from modelplane.loader.sources.retry import backoff_delay

if TYPE_CHECKING:
    from modelplane.loader.settings import LoaderSettings

log = structlog.get_logger()

for _chatty in ("botocore", "boto3", "urllib3", "s3transfer"):
    logging.getLogger(_chatty).setLevel(logging.WARNING)

_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken"}
_CHANGED = {"412", "PreconditionFailed"}


class S3Source(PackageSource):
    def __init__(self, uri: str, settings: LoaderSettings) -> None:
        super().__init__(uri)
        parts = urlsplit(uri)
        self.bucket = parts.netloc
        self.key = parts.path.lstrip("/")
        self.settings = settings
        self._secrets = [s.get_secret_value() for s in _secrets(settings)]
        self._client = _make_client(settings)
        self._single: str | None = None  # the object key when the package is one object
        self._prefix = self.key.rstrip("/") + "/" if self.key else ""

    # Listing ------------------------------------------------------------------------------

    async def list_files(self) -> list[SourceFile]:
        return await asyncio.to_thread(self._list_files)

    def _list_files(self) -> list[SourceFile]:
        if self.key and not self.key.endswith("/"):
            head = self._call("head_object", missing_ok=True, Bucket=self.bucket, Key=self.key)
            if head is not None:
                self._single = self.key
                self.single_file = True
                name = self.key.rsplit("/", 1)[-1]
                return [SourceFile(name, int(head["ContentLength"]), head.get("ETag", ""))]
        files: list[SourceFile] = []
        token: str | None = None
        while True:
            page = self._call(
                "list_objects_v2",
                Bucket=self.bucket,
                Prefix=self._prefix,
                **({"ContinuationToken": token} if token else {}),
            )
            for item in page.get("Contents", []):
                relative = item["Key"][len(self._prefix) :]
                if not relative or relative.endswith("/"):
                    continue  # "directory" marker objects some tools create
                relative = safe_relative_path(relative)
                if relative not in SIDECAR_FILES:
                    files.append(SourceFile(relative, int(item["Size"]), item.get("ETag", "")))
            if not page.get("IsTruncated"):
                break
            token = page["NextContinuationToken"]
        if not files:
            raise SourceUnavailable(
                f"No objects under {self.display_uri}. Check the bucket and prefix of the model's source URI, "
                "and that the loader's credentials may list them."
            )
        return sorted(files, key=lambda f: f.path.encode())

    # Reading ------------------------------------------------------------------------------

    def _object_key(self, path: str) -> str:
        return self._single if self._single is not None else self._prefix + path

    async def read(self, file: SourceFile) -> AsyncIterator[bytes]:
        """Parts of `download_part_bytes`, up to `download_concurrency` in flight, yielded in order."""
        key = self._object_key(file.path)
        part = max(1, self.settings.download_part_bytes)
        ranges = collections.deque((start, min(start + part, file.size) - 1) for start in range(0, file.size, part))
        window: collections.deque[asyncio.Task[bytes]] = collections.deque()
        try:
            while ranges or window:
                while ranges and len(window) < max(1, self.settings.download_concurrency):
                    first, last = ranges.popleft()
                    window.append(asyncio.create_task(asyncio.to_thread(self._get_range, key, first, last, file)))
                yield await window.popleft()
        finally:
            for task in window:
                task.cancel()

    def _get_range(self, key: str, first: int, last: int, file: SourceFile) -> bytes:
        """One ranged GET, read to the end; a dropped or failed part is retried with backoff
        (botocore retries the request itself, not a body that breaks off half-way)."""
        expected = last - first + 1
        extra = {"IfMatch": file.version} if file.version else {}
        attempt = 1
        while True:
            try:
                response = self._call("get_object", Bucket=self.bucket, Key=key, Range=f"bytes={first}-{last}", **extra)
                body = response["Body"].read()
                if len(body) != expected:
                    raise _ShortRead(f"{len(body)} of {expected} bytes")
                return body
            except SourceUnavailable:
                raise
            except Exception as error:  # noqa: BLE001 - every transport failure of a part is retried alike
                if attempt >= self.settings.fetch_retries:
                    raise SourceUnavailable(
                        f"Reading {file.path} from {self.display_uri} failed {attempt} times "
                        f"({self._scrub(_describe(error))}); the S3 service may be overloaded or failing. "
                        "The load can be retried; nothing partial was kept."
                    ) from None
                delay = backoff_delay(attempt, self.settings.fetch_retry_backoff_seconds)
                log.warning(
                    "s3 part failed; retrying",
                    file=file.path,
                    offset=first,
                    attempt=attempt,
                    error=self._scrub(_describe(error)),
                    in_seconds=round(delay, 2),
                )
                time.sleep(delay)
                attempt += 1

    async def read_sidecar(self, name: str) -> bytes | None:
        if self._single is not None:
            directory = self._single.rsplit("/", 1)[0] + "/" if "/" in self._single else ""
        else:
            directory = self._prefix
        response = await asyncio.to_thread(
            self._call, "get_object", missing_ok=True, Bucket=self.bucket, Key=directory + name
        )
        return None if response is None else await asyncio.to_thread(response["Body"].read)

    async def close(self) -> None:
        self._client.close()

    # Errors -------------------------------------------------------------------------------

    def _call(self, operation: str, *, missing_ok: bool = False, **arguments: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError  # noqa: PLC0415

        where = f"s3://{self.bucket}/{arguments.get('Key') or arguments.get('Prefix', '')}"
        try:
            return getattr(self._client, operation)(**arguments)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = str(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if missing_ok and (code in _MISSING or status == "404"):
                return None
            if code in _MISSING or status == "404":
                raise SourceUnavailable(
                    f"{where} does not exist ({code}). Check the bucket and key of the model's source URI."
                ) from None
            if code in _DENIED or status == "403":
                raise SourceUnavailable(
                    f"S3 refused the loader access to {where} ({code}). Check the credentials given to the "
                    "loader (MODELPLANE_LOADER_S3_ACCESS_KEY_ID / _SECRET_ACCESS_KEY or AWS_ACCESS_KEY_ID) and "
                    "the bucket policy."
                ) from None
            if code in _CHANGED or status == "412":
                raise SourceUnavailable(
                    f"{where} changed while it was being downloaded; load again once the upload is finished."
                ) from None
            # botocore has already retried throttling and 5xx answers with backoff.
            raise SourceUnavailable(
                f"S3 kept answering {code or status} for {where} after {self.settings.fetch_retries} attempts; "
                "the service may be overloaded or failing. The load can be retried; nothing partial was kept."
            ) from None
        except BotoCoreError as error:
            if operation == "get_object" and not missing_ok:
                raise  # a ranged part: retried by _get_range, which can resume the body
            raise SourceUnavailable(
                f"Cannot reach the S3 endpoint {redact_uri(self.settings.s3_endpoint_url or 'of AWS')} "
                f"({self._scrub(type(error).__name__)}); check MODELPLANE_LOADER_S3_ENDPOINT_URL and the network."
            ) from None

    def _scrub(self, text: str) -> str:
        for secret in self._secrets:
            if secret:
                text = text.replace(secret, "***")
        return text


class _ShortRead(Exception):
    pass


def _describe(error: Exception) -> str:
    from botocore.exceptions import ClientError  # noqa: PLC0415

    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", "ClientError"))
    return f"{type(error).__name__}: {error}"[:200]


def _secrets(settings: LoaderSettings) -> list[Any]:
    return [s for s in (settings.s3_access_key_id, settings.s3_secret_access_key, settings.s3_session_token) if s]


def _make_client(settings: LoaderSettings) -> Any:
    import boto3  # noqa: PLC0415 - boto3 takes a second to import; only S3 sources need it
    from botocore.config import Config  # noqa: PLC0415

    config = Config(
        signature_version="s3v4",
        retries={"max_attempts": max(1, settings.fetch_retries), "mode": "standard"},
        max_pool_connections=max(10, settings.download_concurrency + 2),
        connect_timeout=settings.http_timeout_seconds,
        read_timeout=settings.http_timeout_seconds,
        s3={"addressing_style": settings.s3_addressing_style},
    )
    credentials: dict[str, str] = {}
    if settings.s3_access_key_id is not None and settings.s3_secret_access_key is not None:
        credentials = {
            "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
        if settings.s3_session_token is not None:
            credentials["aws_session_token"] = settings.s3_session_token.get_secret_value()
    session = boto3.session.Session(region_name=settings.s3_region or None, **credentials)
    return session.client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or session.region_name or "us-east-1",
        config=config,
    )
