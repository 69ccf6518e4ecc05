"""Bringing a package's files into the cache, hashing every byte in the same pass that brings it.

A file the source can show as a path on the cache's own filesystem is hard-linked into the staging
directory and hashed in place, through a memory map of the linked file: no byte is copied, and
the bytes hashed are the very bytes the cache keeps. Any other file (another filesystem, S3, HTTP)
is written as it streams in; each chunk is hashed on one thread while it is written on another, and
the source reads the next chunk meanwhile. Each byte is read from the source once, hashed once and
written at most once; nothing reads the cache's copy back to verify it.

Files are brought `concurrency` at a time, so a package of many small files does not wait on one
round trip after another and a package of several large local files is hashed on several cores.
Large streamed files go one at a time: each already reads ranged parts in parallel, and memory
stays at one window of parts, whatever the package's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import mmap
import os
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from modelplane.common.types import FileDigest
from modelplane.loader.sources import PackageSource, SourceFile

T = TypeVar("T")
ProgressCallback = Callable[[int, int, str], None]  # (bytes_done, files_done, current_file)

# A hard link is impossible across filesystems (EXDEV), for a user who may not link another's file
# (EPERM under fs.protected_hardlinks), past a file's link limit, or on filesystems without links.
_CANNOT_LINK = frozenset({errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP})
# How much of a linked file is mapped at once: the loader's resident memory grows by this much at
# most while it hashes, whatever the file's size.
HASH_WINDOW_BYTES = 16 * 1024 * 1024


@dataclass(frozen=True)
class LinkedFile:
    """A package file that shares its inode with the source's file, and what it was when hashed:
    a write to the source's file in place changes the cache's too, and this is how that is noticed."""

    path: str
    inode: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str, status: os.stat_result) -> LinkedFile:
        return cls(path, status.st_ino, status.st_size, status.st_mtime_ns)

    def unchanged(self, status: os.stat_result) -> bool:
        return (status.st_ino, status.st_size, status.st_mtime_ns) == (self.inode, self.size, self.mtime_ns)


@dataclass
class FetchResult:
    digests: list[FileDigest] = field(default_factory=list)
    linked: list[LinkedFile] = field(default_factory=list)


class _Progress:
    """Sums the bytes of files brought concurrently for one progress callback."""

    def __init__(self, callback: ProgressCallback) -> None:
        self.callback = callback
        self.bytes_done = 0
        self.files_done = 0

    def advance(self, path: str, size: int) -> None:
        self.bytes_done += size
        self.callback(self.bytes_done, self.files_done, path)

    def finish(self, path: str) -> None:
        self.files_done += 1
        self.callback(self.bytes_done, self.files_done, path)


async def bring_files(
    source: PackageSource,
    files: list[SourceFile],
    staging: Path,
    on_progress: ProgressCallback,
    *,
    link_local: bool,
    concurrency: int,
    large_bytes: int,
) -> FetchResult:
    """Every file of `files` into `staging`, with its digest; all or nothing (the first failure
    cancels the rest, and the caller discards `staging`)."""
    result = FetchResult()
    progress = _Progress(on_progress)
    slots = asyncio.Semaphore(max(1, concurrency))
    one_large_stream = asyncio.Lock()

    async def bring(file: SourceFile) -> None:
        async with slots:
            target = staging / file.path
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            local = source.local_path(file) if link_local else None
            linked = await _link_and_hash(local, target, file, progress) if local is not None else None
            if linked is not None:
                digest, status = linked
                result.linked.append(LinkedFile.of(file.path, status))
            elif file.size < 0 or file.size > large_bytes:
                async with one_large_stream:
                    digest = await _stream_and_hash(source, file, target, progress)
            else:
                digest = await _stream_and_hash(source, file, target, progress)
            result.digests.append(digest)
            progress.finish(file.path)

    await all_or_nothing(bring(file) for file in files)
    return result


async def all_or_nothing(work: Iterable[Awaitable[T]]) -> list[T]:
    """Runs every awaitable at once; on the first failure cancels the others and raises it."""
    tasks = [asyncio.ensure_future(item) for item in work]
    try:
        if tasks:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
        return [task.result() for task in tasks]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _link_and_hash(
    local: Path, target: Path, file: SourceFile, progress: _Progress
) -> tuple[FileDigest, os.stat_result] | None:
    """Links the source's file into the staging directory and hashes the linked inode; None when
    the file cannot be linked there (then it is copied)."""
    try:
        await asyncio.to_thread(os.link, local, target)
    except OSError as error:
        if error.errno in _CANNOT_LINK:
            return None
        raise
    fd = await asyncio.to_thread(os.open, target, os.O_RDONLY)
    try:
        status = os.fstat(fd)
        hasher = hashlib.sha256()
        for offset in range(0, status.st_size, HASH_WINDOW_BYTES):
            length = min(HASH_WINDOW_BYTES, status.st_size - offset)
            await asyncio.to_thread(_hash_window, fd, offset, length, hasher)
            progress.advance(file.path, length)
    finally:
        os.close(fd)
    return FileDigest(path=file.path, size_bytes=status.st_size, sha256=hasher.hexdigest()), status


def _hash_window(fd: int, offset: int, length: int, hasher: hashlib._Hash) -> None:
    with mmap.mmap(fd, length, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ, offset=offset) as window:
        window.madvise(mmap.MADV_SEQUENTIAL)
        hasher.update(window)


async def _stream_and_hash(source: PackageSource, file: SourceFile, target: Path, progress: _Progress) -> FileDigest:
    """Writes the file's bytes into `<target>.partial` as they arrive, hashing each chunk on one
    thread while another writes it; fsynced, then renamed to `target`."""
    partial = target.with_name(target.name + ".partial")
    hasher = hashlib.sha256()
    written = 0
    handle = await asyncio.to_thread(open, partial, "wb", buffering=0)
    in_flight: asyncio.Future[list[None]] | None = None
    try:
        async for chunk in source.read(file):
            if in_flight is not None:
                await in_flight  # in order: a chunk is hashed only after the one before it
            in_flight = asyncio.gather(
                asyncio.to_thread(hasher.update, chunk), asyncio.to_thread(_write_all, handle, chunk)
            )
            written += len(chunk)
            progress.advance(file.path, len(chunk))
        if in_flight is not None:
            await in_flight
            in_flight = None
        await asyncio.to_thread(os.fsync, handle.fileno())
    finally:
        if in_flight is not None:  # a failure or a cancel: let the threads finish with the handle
            with contextlib.suppress(BaseException):
                await asyncio.shield(in_flight)
        handle.close()
    await asyncio.to_thread(partial.rename, target)
    return FileDigest(path=file.path, size_bytes=written, sha256=hasher.hexdigest())


def _write_all(handle: object, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view) :]  # type: ignore[attr-defined]
