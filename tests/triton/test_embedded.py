"""The embedded Triton: the real tritonserver binary, supervised."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from modelplane.common.settings import TritonSettings
from modelplane.loader.triton_control import TritonControl
from modelplane.triton.embedded import EmbeddedTriton, TritonStartError
from tests.conftest import free_port
from tests.triton.conftest import triton_settings, write_python_model


async def test_starts_restarts_after_sigkill_and_stops(tmp_path: Path) -> None:
    settings = triton_settings(tmp_path / "models")
    triton = EmbeddedTriton(settings, workdir=tmp_path / "triton")
    await triton.start()
    control = TritonControl(settings.grpc_address)
    try:
        assert await control.is_live()
        assert triton.process is not None
        first_pid = triton.process.pid
        os.kill(first_pid, signal.SIGKILL)
        for _ in range(200):
            if triton.restarts == 1 and triton.process.pid != first_pid and await control.is_live():
                break
            await asyncio.sleep(0.1)
        assert triton.restarts == 1 and await control.is_live()
    finally:
        await control.close()
        await triton.stop()
    assert triton.process.returncode is not None


_IDLE_MODEL = """class TritonPythonModel:
    def execute(self, requests):
        return []
"""


def _stubs_of(server: int) -> list[int]:
    """The live python-backend stubs tritonserver `server` started (its children, by /proc)."""
    stubs = []
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            if int(ppid) == server and state != "Z" and "stub" in os.readlink(entry / "exe"):
                stubs.append(int(entry.name))
    return stubs


def _alive(pids: list[int]) -> list[int]:
    """Those of `pids` still running (a zombie has ended)."""
    running = []
    for pid in pids:
        with contextlib.suppress(OSError):
            if (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                running.append(pid)
    return running


def _stop(pids: list[int]) -> None:
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


async def _until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    for _ in range(300):
        result = check()
        if await result if inspect.isawaitable(result) else result:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{what}: not so after 30 s")


async def test_a_killed_tritons_python_backend_stubs_do_not_outlive_it(tmp_path: Path) -> None:
    """A python-backend stub leaves when it notices that its tritonserver has gone, unless it
    cannot: one was seen hung on its way out for 50 minutes holding 365 MiB (a llama.cpp model's)
    after its Triton was SIGKILLed. Here the stubs are stopped (SIGSTOP) so that they cannot notice.
    The supervisor ends them when it sees Triton die; when the supervisor died with it, the next
    start does."""
    repository = tmp_path / "models"
    write_python_model(repository, "idle", _IDLE_MODEL)
    settings = triton_settings(repository)
    triton = EmbeddedTriton(settings, workdir=tmp_path / "triton")
    await triton.start()
    control = TritonControl(settings.grpc_address)
    try:
        assert triton.process is not None
        await control.load("idle", timeout_seconds=120)
        stubs = _stubs_of(triton.process.pid)
        assert stubs
        _stop(stubs)
        os.kill(triton.process.pid, signal.SIGKILL)
        await _until(lambda: triton.restarts == 1 and control.is_live(), "triton restarted")
        await _until(lambda: not _alive(stubs), "the dead triton's stubs gone")

        # Now the supervisor dies with Triton (`modelplane up` killed outright): nothing ends the stubs.
        await control.load("idle", timeout_seconds=120)
        server = triton.process.pid
        stubs = _stubs_of(server)
        assert stubs
        _stop(stubs)
        assert triton._supervisor is not None
        triton._supervisor.cancel()
        os.kill(server, signal.SIGKILL)
        await triton.process.wait()
        assert _alive(stubs) == stubs  # they outlive it
        again = EmbeddedTriton(settings, workdir=tmp_path / "triton")
        await again.start()
        try:
            await _until(lambda: not _alive(stubs), "the stubs of the triton before gone at the next start")
        finally:
            await again.stop()
    finally:
        await control.close()
        await triton.stop()


async def test_a_start_that_fails_is_tried_again(tmp_path: Path) -> None:
    """Triton exits at once when its HTTP port is taken; the port is freed 1 s later, as when the
    previous server is still going away, and the second attempt starts."""
    http_port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", http_port))
    holder.listen()
    settings = triton_settings(tmp_path / "models", http_port=http_port)
    triton = EmbeddedTriton(settings, workdir=tmp_path / "triton")
    loop = asyncio.get_running_loop()
    loop.call_later(1.0, holder.close)
    await triton.start()
    control = TritonControl(settings.grpc_address)
    try:
        assert await control.is_live()
        log = triton.log_path.read_text()
        assert log.count("failed to start HTTP service") == 1  # the first attempt, refused
        assert log.count("Started Metrics Service") == 1  # the second, which came up
    finally:
        await control.close()
        await triton.stop()


def test_the_python_backend_stub_is_a_file_of_the_running_user(tmp_path: Path) -> None:
    """Triton's python backend chmods the stub before it starts one; on a link to the wheel's file,
    owned by root in the image, that failed for the image's user ("Failed to give execute
    permission to triton_python_backend_stub") and no python-backend model loaded."""
    triton = EmbeddedTriton(TritonSettings(model_repository=tmp_path / "models"), workdir=tmp_path / "triton")
    stub = triton._backend_directory() / "python" / "triton_python_backend_stub"
    assert not stub.is_symlink()
    assert stub.stat().st_uid == os.getuid()
    assert os.access(stub, os.X_OK)
    assert stub.read_bytes() == triton.distribution.stub.read_bytes()


@pytest.fixture
def program_missing_a_library(tmp_path: Path) -> Path:
    """A real program linked against a shared library that is gone, as the dynamic linker sees it."""
    if shutil.which("cc") is None or shutil.which("ldd") is None:
        pytest.skip("needs a C compiler and ldd")
    (tmp_path / "dep.c").write_text("int modelplane_dep(void) { return 1; }\n")
    (tmp_path / "main.c").write_text("int modelplane_dep(void);\nint main(void) { return modelplane_dep(); }\n")
    subprocess.run(["cc", "-shared", "-fPIC", "-o", tmp_path / "libmodelplanegone.so", tmp_path / "dep.c"], check=True)
    program = tmp_path / "triton_python_backend_stub"
    subprocess.run(["cc", "-o", program, tmp_path / "main.c", f"-L{tmp_path}", "-lmodelplanegone"], check=True)
    (tmp_path / "libmodelplanegone.so").unlink()
    return program


async def test_a_stub_missing_a_shared_library_is_refused_before_triton_starts(
    tmp_path: Path, program_missing_a_library: Path
) -> None:
    """A stub that cannot load a library dies at once and Triton waits for it: every load then
    hung with nothing said (the image on Debian's python3.11 without libpython3.11)."""
    triton = EmbeddedTriton(TritonSettings(model_repository=tmp_path / "models"), workdir=tmp_path / "triton")
    assert await triton._check_stub_libraries() is None  # the wheel's own stub finds what it needs here
    triton.distribution = dataclasses.replace(triton.distribution, stub=program_missing_a_library)
    with pytest.raises(TritonStartError, match=r"libmodelplanegone\.so not found") as refused:
        await triton.start()
    assert "Install the packages that provide them" in str(refused.value)
    assert triton.process is None  # refused before anything started
