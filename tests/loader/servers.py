"""Real servers on loopback for the sources' tests: moto's S3 server (with injected faults) and a
small HTTP file server that can drop a connection half-way, as a flaky network would."""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import logging
import os
import threading
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Access keys the tests give the loader; the credential tests grep logs and errors for them.
S3_ACCESS_KEY_ID = "AKIAMODELPLANETEST42"
S3_SECRET_ACCESS_KEY = "mp-secret-do-not-log-7f3c9a"


class S3Server:
    """moto's S3 wire protocol on a free loopback port. `fail_ranged_gets` answers that many
    ranged GETs with 500 InternalError before letting requests through (a fault moto cannot be
    asked for, injected in front of it as WSGI middleware); everything else is moto itself."""

    def __init__(self) -> None:
        from moto.moto_server.werkzeug_app import (
            DomainDispatcherApplication,
            MotoRequestHandler,
            create_backend_app,
        )
        from werkzeug.serving import make_server

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._app = DomainDispatcherApplication(create_backend_app)
        self.fail_ranged_gets = 0
        self.ranged_gets = 0
        self.full_gets = 0
        self.bytes_sent: Counter[str] = Counter()  # bodies of GETs, by path (/bucket/key)
        self._lock = threading.Lock()
        self._server = make_server("127.0.0.1", 0, self._wsgi, threaded=True, request_handler=MotoRequestHandler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def _wsgi(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ["REQUEST_METHOD"] == "GET" and "HTTP_RANGE" in environ:
            with self._lock:
                self.ranged_gets += 1
                fail = self.fail_ranged_gets > 0
                self.fail_ranged_gets -= 1 if fail else 0
            if fail:
                start_response("500 Internal Server Error", [("Content-Type", "application/xml")])
                return [b"<Error><Code>InternalError</Code><Message>injected by the test</Message></Error>"]
        body = self._app(environ, start_response)
        return self._counted(environ["PATH_INFO"], body) if environ["REQUEST_METHOD"] == "GET" else body

    def _counted(self, path: str, body: Any) -> Any:
        for piece in body:
            with self._lock:
                self.bytes_sent[path] += len(piece)
            yield piece

    def start(self) -> S3Server:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._thread.join()

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_ACCESS_KEY_ID,
            aws_secret_access_key=S3_SECRET_ACCESS_KEY,
        )

    def upload_tree(self, bucket: str, prefix: str, root: Path) -> None:
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=bucket)
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root).as_posix()}")


@dataclass
class FileServerState:
    root: Path
    cut_first_get_at: dict[str, int] = field(default_factory=dict)  # path → byte where the 1st GET drops
    chunked: bool = False  # no Content-Length anywhere, as some streaming servers do
    ignore_range: bool = False
    announce_ranges: bool = True  # Accept-Ranges: bytes
    gets: Counter[str] = field(default_factory=Counter)
    range_headers: list[str] = field(default_factory=list)
    bytes_sent: Counter[str] = field(default_factory=Counter)  # body bytes, by path
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves files as nginx does: an ETag from the file's mtime and size, byte ranges (`a-b` and
    `a-`), bodies read from the file as they are sent."""

    protocol_version = "HTTP/1.1"
    state: FileServerState

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _file(self) -> Path | None:
        path = (self.state.root / self.path.lstrip("/").split("?")[0]).resolve()
        return path if path.is_file() and path.is_relative_to(self.state.root.resolve()) else None

    def do_HEAD(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        self.send_response(200)
        self._headers(path, path.stat().st_size)
        self.end_headers()

    def _headers(self, path: Path, length: int) -> None:
        status = path.stat()
        self.send_header("ETag", f'"{status.st_mtime_ns:x}-{status.st_size:x}"')
        if self.state.announce_ranges:
            self.send_header("Accept-Ranges", "bytes")
        if self.state.chunked:
            self.send_header("Connection", "close")
        else:
            self.send_header("Content-Length", str(length))

    def do_GET(self) -> None:
        path = self._file()
        if path is None:
            self.send_error(404)
            return
        relative = path.relative_to(self.state.root.resolve()).as_posix()
        with self.state.lock:
            self.state.gets[relative] += 1
        size = path.stat().st_size
        start, end = 0, size  # [start, end)
        range_header = self.headers.get("Range")
        if range_header:
            with self.state.lock:
                self.state.range_headers.append(range_header)
        if range_header and not self.state.ignore_range:
            first, _, last = range_header.removeprefix("bytes=").partition("-")
            start, end = int(first), min(size, int(last) + 1) if last else size
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
        else:
            self.send_response(200)
        self._headers(path, end - start)
        self.end_headers()
        cut = self.state.cut_first_get_at.pop(relative, None)
        if cut is not None:
            self._send(path, relative, start, cut)
            self.wfile.flush()
            self.connection.shutdown(2)  # the network drops: the client sees a short body
            self.close_connection = True
            return
        self._send(path, relative, start, end)
        if self.state.chunked:
            self.close_connection = True

    def _send(self, path: Path, relative: str, start: int, end: int) -> None:
        with path.open("rb") as handle:
            handle.seek(start)
            remaining = end - start
            while remaining > 0:
                piece = handle.read(min(remaining, 1024 * 1024))
                if not piece:
                    break
                self.wfile.write(piece)
                remaining -= len(piece)
                with self.state.lock:
                    self.state.bytes_sent[relative] += len(piece)


class FileServer:
    def __init__(self, root: Path) -> None:
        self.state = FileServerState(root)
        handler = type("Handler", (_Handler,), {"state": self.state})
        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> FileServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


def write_random_file(path: Path, size: int) -> str:
    """Writes `size` random bytes (incompressible, so no layer can cheat) and returns their SHA-256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    hasher = hashlib.sha256()
    with path.open("wb") as handle:
        remaining = size
        while remaining:
            piece = os.urandom(min(remaining, 16 * 1024 * 1024))
            handle.write(piece)
            hasher.update(piece)
            remaining -= len(piece)
    return hasher.hexdigest()
