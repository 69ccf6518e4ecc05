"""Bringing a package's files into the cache, hashing every byte in the same pass that brings it.

A file the source can show as a path on the cache's own filesystem is hard-linked into the staging
directory and hashed in place, through a memory map of the linked file: no byte is copied, and
the bytes hashed are the very bytes the cache keeps. Any other file is written as it comes: a file
the loader can open (another filesystem, or linking switched off) is read into a few buffers used
in turn, a file from S3 or HTTP arrives in chunks; each buffer or chunk is hashed on one thread
while another writes it to the cache, and the next one is read or received meanwhile. Hash and
write take the same buffer, so the bytes kept are the bytes hashed (a kernel copy beside a hash of
the source would read the source twice, and a file changing at the source could then be kept
unhashed). Each byte is read from the source once, hashed once and written at most once; nothing
reads the cache's copy back to verify it. The kernel starts putting each written chunk on the disk
at once, so the fsync before a file counts as fetched waits for its last chunks only.

Files are brought `concurrency` at a time, so a package of many small files does not wait on one
round trip after another and a package of several large local files is hashed on several cores.
Large copied or streamed files go one at a time: a copy already keeps two cores busy, a stream
reads ranged parts in parallel, and memory stays at one window of buffers or parts, whatever the
package's size.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import hashlib
import mmap
import os
import queue
import threading
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
    one_large_file = asyncio.Lock()

    async def bring(file: SourceFile) -> None:
        async with slots:
            target = staging / file.path
            await asyncio.to_thread(target.parent.mkdir, parents=True, exist_ok=True)
            local = source.local_path(file)
            linked = await _link_and_hash(local, target, file, progress) if local is not None and link_local else None
            if linked is not None:
                digest, status = linked
                result.linked.append(LinkedFile.of(file.path, status))
            elif file.size < 0 or file.size > large_bytes:
                async with one_large_file:
                    digest = await _copy_or_stream(source, local, file, target, progress)
            else:
                digest = await _copy_or_stream(source, local, file, target, progress)
            result.digests.append(digest)
            progress.finish(file.path)

    # The largest first: small files fill the other slots meanwhile, instead of a large file starting last.
    await all_or_nothing(bring(file) for file in sorted(files, key=_largest_first))
    return result


def _largest_first(file: SourceFile) -> int:
    return -file.size if file.size >= 0 else -(2**62)  # a size the source cannot tell may be large


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


async def _copy_or_stream(
    source: PackageSource, local: Path | None, file: SourceFile, target: Path, progress: _Progress
) -> FileDigest:
    if local is not None:
        return await _copy_and_hash(local, target, file, progress)
    return await _stream_and_hash(source, file, target, progress)


async def _stream_and_hash(source: PackageSource, file: SourceFile, target: Path, progress: _Progress) -> FileDigest:
    """Writes the file's bytes into `<target>.partial` as they arrive, hashed on one thread while
    written on another; fsynced, then renamed to `target`."""
    partial = target.with_name(target.name + ".partial")
    handle = await _opened(lambda: open(partial, "wb", buffering=0), lambda opened: opened.close())  # noqa: SIM115
    sink = _HashAndWrite(handle, STREAM_DEPTH)
    try:
        async for chunk in source.read(file):
            if not sink.reserve(wait=False):
                await asyncio.to_thread(sink.reserve)
            sink.put(chunk)
            progress.advance(file.path, len(chunk))
        await asyncio.to_thread(sink.finish)
        await asyncio.to_thread(os.fsync, handle.fileno())
    finally:
        await _quietly(asyncio.to_thread(sink.abandon))  # a failure or a cancel: stop the threads first
        handle.close()
    await asyncio.to_thread(partial.rename, target)
    return FileDigest(path=file.path, size_bytes=sink.size, sha256=sink.hasher.hexdigest())


async def _copy_and_hash(local: Path, target: Path, file: SourceFile, progress: _Progress) -> FileDigest:
    """Copies a file the loader can open (a local disk, an NFS mount) into `<target>.partial`:
    read once into a few reused buffers, each buffer hashed on one thread while written on
    another and the next one read; fsynced, then renamed to `target`."""
    partial = target.with_name(target.name + ".partial")
    copy = await _opened(lambda: _LocalCopy(local, partial), _LocalCopy.close)
    step: asyncio.Future[int] | None = None
    try:
        while True:
            step = asyncio.ensure_future(asyncio.to_thread(copy.step))
            read = await step
            if not read:
                break
            progress.advance(file.path, read)
        await asyncio.to_thread(copy.finish)
    finally:
        if step is not None:  # a cancel: let the reading thread finish with the buffers first
            await _quietly(asyncio.shield(step))
        await _quietly(asyncio.to_thread(copy.close))
    await asyncio.to_thread(partial.rename, target)
    return FileDigest(path=file.path, size_bytes=copy.sink.size, sha256=copy.sink.hasher.hexdigest())


async def _opened(opening: Callable[[], T], close: Callable[[T], object]) -> T:
    """What `opening` opens, in a worker thread; closed again when the caller is cancelled meanwhile
    (a file or a thread no one would close otherwise)."""
    future = asyncio.ensure_future(asyncio.to_thread(opening))
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        with contextlib.suppress(BaseException):
            close(await future)
        raise


async def _quietly(work: Awaitable[object]) -> None:
    """Awaits cleaning-up work; what it raises is not the failure being reported."""
    with contextlib.suppress(BaseException):
        await work


# Chunks of a streamed file hashed or written while the next is received (each up to one
# download part): a slow disk or a slow hash holds back the source by this many chunks at most.
STREAM_DEPTH = 2
# A copied file is read into COPY_DEPTH buffers of COPY_CHUNK_BYTES, reused in turn: the memory a
# copy adds, whatever the file's size. One step of a copy reads COPY_STEP_BYTES before it reports
# progress (and before a cancel is noticed).
COPY_CHUNK_BYTES = 4 * 1024 * 1024
COPY_DEPTH = 4
COPY_STEP_BYTES = 64 * 1024 * 1024


class _Lane:
    """A thread that applies `work` to each chunk given to it, in order. At most `depth` chunks
    wait or are in work at once: `reserve` takes a place for one more, the thread frees it once
    the chunk is done. After a failure (kept in `failure`) the rest are skipped."""

    def __init__(self, work: Callable[[memoryview], object], depth: int, name: str) -> None:
        self.failure: BaseException | None = None
        self._work = work
        self._room = threading.Semaphore(depth)
        self._chunks: queue.SimpleQueue[memoryview | None] = queue.SimpleQueue()
        self._skip = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (chunk := self._chunks.get()) is not None:
            if not self._skip:
                try:
                    self._work(chunk)
                except BaseException as error:  # noqa: BLE001 - handed to the caller by `finish`
                    self.failure, self._skip = error, True
            self._room.release()

    def reserve(self, wait: bool = True) -> bool:
        return self._room.acquire(wait)

    def unreserve(self) -> None:
        self._room.release()

    def put(self, chunk: memoryview) -> None:
        self._chunks.put(chunk)

    def finish(self, skip_rest: bool = False) -> None:
        """Waits until every chunk given is done (or, with `skip_rest`, dropped)."""
        self._skip = self._skip or skip_rest
        self._chunks.put(None)
        self._thread.join()


class _HashAndWrite:
    """Hashes each chunk given to it on one thread and writes it to `out` on another, in order:
    the two run side by side (both release the GIL), while the caller gets the next chunk. Each
    chunk is hashed and written from the same buffer, so the bytes kept are the bytes hashed. At
    most `depth` chunks are unfinished, so a buffer may be reused `depth` chunks later."""

    def __init__(self, out: object, depth: int) -> None:
        self.hasher = hashlib.sha256()
        self.size = 0
        self._lanes = (
            _Lane(self.hasher.update, depth, "fetch-hash"),
            _Lane(_DiskWriter(out), depth, "fetch-write"),
        )
        self._finished = False

    def reserve(self, wait: bool = True) -> bool:
        """A place for one more chunk on both threads; False when `wait` is False and there is none now."""
        hashing, writing = self._lanes
        if not hashing.reserve(wait):
            return False
        if not writing.reserve(wait):
            hashing.unreserve()
            return False
        return True

    def unreserve(self) -> None:
        for lane in self._lanes:
            lane.unreserve()

    def put(self, chunk: bytes | bytearray | memoryview) -> None:
        """Hands a chunk to both threads (after `reserve`); raises what either failed with so far."""
        self._raise_failure()
        view = memoryview(chunk)
        for lane in self._lanes:
            lane.put(view)
        self.size += view.nbytes

    def finish(self) -> None:
        """Waits until every chunk is hashed and written; raises what either thread failed with."""
        for lane in self._lanes:
            lane.finish()
        self._finished = True
        self._raise_failure()

    def abandon(self) -> None:
        """Stops both threads, dropping what they have not done (after a failure or a cancel)."""
        if not self._finished:
            for lane in self._lanes:
                lane.finish(skip_rest=True)
            self._finished = True

    def _raise_failure(self) -> None:
        for lane in self._lanes:
            if lane.failure is not None:
                raise lane.failure


class _LocalCopy:
    """One copy of a local file into the cache, in steps (see `_copy_and_hash`); its methods run
    in worker threads, one at a time."""

    def __init__(self, local: Path, partial: Path) -> None:
        self.source = open(local, "rb", buffering=0)  # noqa: SIM115 - closed by close()
        try:
            self.out = open(partial, "wb", buffering=0)  # noqa: SIM115
        except BaseException:
            self.source.close()
            raise
        size = os.fstat(self.source.fileno()).st_size
        chunk = max(1, min(COPY_CHUNK_BYTES, size))
        self.buffers = [memoryview(bytearray(chunk)) for _ in range(COPY_DEPTH if size > chunk else 1)]
        self.sink = _HashAndWrite(self.out, len(self.buffers))
        self.turn = 0

    def step(self) -> int:
        """Reads up to COPY_STEP_BYTES on, handing each buffer to be hashed and written; 0 at the end."""
        read = 0
        while read < COPY_STEP_BYTES:
            self.sink.reserve()
            buffer = self.buffers[self.turn % len(self.buffers)]
            got = _read_into(self.source, buffer)
            if not got:
                self.sink.unreserve()
                break
            self.sink.put(buffer[:got])
            self.turn += 1
            read += got
        return read

    def finish(self) -> None:
        self.sink.finish()
        os.fsync(self.out.fileno())

    def close(self) -> None:
        self.sink.abandon()
        self.out.close()
        self.source.close()


class _DiskWriter:
    """Writes chunks one after another to `out`, and has the kernel start putting each on the disk
    at once, so the fsync at the end waits for the last chunks only, not for the whole file."""

    def __init__(self, out: object) -> None:
        self.out = out
        self.offset = 0

    def __call__(self, chunk: memoryview) -> None:
        _write_all(self.out, chunk)
        _start_writeback(self.out.fileno(), self.offset, chunk.nbytes)  # type: ignore[attr-defined]
        self.offset += chunk.nbytes


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range(2) from the C library (Python's os module lacks it); None elsewhere."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2  # start writing the range's dirty pages out; do not wait for them


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Starts writing these bytes of the file to its disk without waiting (PostgreSQL's
    `backend_flush_after` does the same). Only a head start: the fsync at the end is what makes
    the file durable, so a filesystem that refuses the call loses nothing."""
    if _SYNC_FILE_RANGE is not None:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


def _read_into(handle: object, buffer: memoryview) -> int:
    return handle.readinto(buffer) or 0  # type: ignore[attr-defined]


def _write_all(handle: object, data: memoryview) -> None:
    view = memoryview(data)
    while view:
        view = view[handle.write(view) :]  # type: ignore[attr-defined]
