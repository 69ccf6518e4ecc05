"""The embedded Triton: the real `tritonserver` binary shipped in the nvidia-pytriton wheel.

The supervisor starts it in explicit model-control mode with the python backend, waits until it
is live, restarts it (with backoff) when it dies, and stops it cleanly. Each model of the python
backend runs in a stub process that tritonserver starts; a stub leaves when it notices that its
server has gone, unless it cannot: after a SIGKILLed Triton, a llama.cpp model's stub was seen hung
on its way out for 50 minutes, holding 365 MiB. So Triton runs in a process group of its own,
recorded in a file beside its log, and once it exits its group's remaining processes are killed:
at once by the supervisor, or at the next start when the supervisor died with it. Nothing here imitates
Triton; when `MODELPLANE_TRITON_EMBEDDED=false` none of this runs and the services talk to an
external Triton (NVIDIA's container) at the configured address.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import sys
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import structlog

from modelplane.common.process import die_with_parent
from modelplane.common.settings import TritonSettings, modelplane_home

log = structlog.get_logger()
_START_ATTEMPTS = 3


class TritonStartError(RuntimeError):
    pass


@dataclass(frozen=True)
class TritonDistribution:
    """Where the wheel keeps the server, its python backend and its shared libraries."""

    binary: Path
    python_backend: Path
    stub: Path
    libraries: Path

    @classmethod
    def locate(cls) -> TritonDistribution:
        try:
            import pytriton  # noqa: PLC0415 - only the embedded mode needs the wheel
        except ImportError as error:
            raise TritonStartError(
                "The embedded Triton needs the nvidia-pytriton wheel; install modelplane's dependencies "
                "(`make run` does) or set MODELPLANE_TRITON_EMBEDDED=false and point "
                "MODELPLANE_TRITON_GRPC_ADDRESS at an external Triton."
            ) from error
        root = Path(pytriton.__file__).parent / "tritonserver"
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        distribution = cls(
            binary=root / "bin" / "tritonserver",
            python_backend=root / "backends" / "python",
            stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
            libraries=root.parent.parent / "nvidia_pytriton.libs",
        )
        for path in (distribution.binary, distribution.python_backend, distribution.stub, distribution.libraries):
            if not path.exists():
                raise TritonStartError(f"The nvidia-pytriton wheel lacks {path}; reinstall it (Python {version}).")
        return distribution


def missing_libraries(ldd_output: str) -> list[str]:
    """The libraries `ldd` could not find ("libfoo.so.1 => not found"), in its order."""
    return [line.split()[0] for line in ldd_output.splitlines() if line.strip().endswith("=> not found")]


class EmbeddedTriton:
    def __init__(self, settings: TritonSettings | None = None, *, workdir: Path | None = None) -> None:
        self.settings = settings or TritonSettings()
        self.workdir = workdir or modelplane_home() / "triton"
        self.distribution = TritonDistribution.locate()
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self._stopping = False
        self._supervisor: asyncio.Task[None] | None = None
        self._log_file: object | None = None

    @property
    def grpc_port(self) -> int:
        return int(self.settings.grpc_address.rsplit(":", 1)[1])

    @property
    def log_path(self) -> Path:
        return self.workdir / "tritonserver.log"

    @property
    def group_path(self) -> Path:
        """The process group of the tritonserver last started here (its pid), until it is ended."""
        return self.workdir / "tritonserver.pgid"

    @property
    def _programs(self) -> frozenset[str]:
        """The executables of this Triton's processes: the server, and the stub copied for it."""
        stub = self.workdir / "backends" / "python" / "triton_python_backend_stub"
        return frozenset(str(path.resolve()) for path in (self.distribution.binary, stub))

    def _backend_directory(self) -> Path:
        """Triton wants <dir>/python/ holding the backend library, its utils module and the stub
        built for the running Python; the wheel keeps the stubs apart, so link them together. The
        stub is copied, not linked: the python backend chmods it before each start, which fails for
        a user who does not own the wheel's file (the image runs as uid 10001, the wheel is root's)."""
        backend = self.workdir / "backends" / "python"
        backend.mkdir(parents=True, exist_ok=True)
        links = {
            "libtriton_python.so": self.distribution.python_backend / "libtriton_python.so",
            "triton_python_backend_utils.py": self.distribution.python_backend / "triton_python_backend_utils.py",
            "triton_python_backend_stub": self.distribution.stub,
        }
        for name, target in links.items():
            link = backend / name
            if link.is_symlink() or link.exists():
                link.unlink()
            if name == "triton_python_backend_stub":
                shutil.copy2(target, link)
            else:
                link.symlink_to(target)
        return backend.parent

    def command(self) -> list[str]:
        return [*self._base_command(), *self._tls_options()]

    def _tls_options(self) -> list[str]:
        """With Triton TLS configured, the gRPC port serves TLS with the certificate its clients
        present (a `modelplane certs init` certificate serves both ends) and asks for theirs."""
        s = self.settings
        if s.tls_cert_file is None or s.tls_key_file is None:
            return []
        options = [
            "--grpc-use-ssl=true",
            f"--grpc-server-cert={s.tls_cert_file}",
            f"--grpc-server-key={s.tls_key_file}",
        ]
        if s.tls_ca_file is not None:
            options += [f"--grpc-root-cert={s.tls_ca_file}", "--grpc-use-ssl-mutual=true"]
        return options

    def _base_command(self) -> list[str]:
        s = self.settings
        return [
            str(self.distribution.binary),
            f"--model-repository={s.model_repository}",
            "--model-control-mode=explicit",
            f"--backend-directory={self._backend_directory()}",
            "--grpc-address=127.0.0.1",
            f"--grpc-port={self.grpc_port}",
            "--http-address=127.0.0.1",
            f"--http-port={s.http_port}",
            "--metrics-address=127.0.0.1",
            f"--metrics-port={s.metrics_port}",
            # Per-request queue and compute time as quantiles per model (nv_inference_queue_summary_us):
            # how long requests wait for a batch (docs/BATCHING.md).
            "--metrics-config=summary_latencies=true",
            "--allow-gpu-metrics=false",
            "--exit-on-error=false",
            "--exit-timeout-secs=10",
            f"--log-verbose={s.log_verbose}",
        ]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # The server and the python-backend stub need the wheel's bundled libraries, and the stub
        # needs a libpython of the running version (prefer this interpreter's own).
        library_dirs = [str(self.distribution.libraries)]
        libdir = sysconfig.get_config_var("LIBDIR")
        if libdir and any(Path(libdir).glob("libpython3*.so*")):
            library_dirs.append(libdir)
        if env.get("LD_LIBRARY_PATH"):
            library_dirs.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(library_dirs)
        # The stub runs model.py with the first Python environment on PATH: make it this one.
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    async def start(self) -> None:
        """Starts Triton, trying again a few times: it has been seen to abort at start once
        (status -6, `epoll_wait` error) and to exit while a port it needs is still held by a
        process going away; a persistent fault still fails after the last attempt."""
        self._stopping = False
        await self._check_stub_libraries()
        self._end_previous_group()
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                await self._spawn()
                break
            except TritonStartError as error:
                if attempt == _START_ATTEMPTS:
                    raise
                log.error("triton did not start; trying again", attempt=attempt, error=str(error)[:500])
                await asyncio.sleep(attempt)
        self._supervisor = asyncio.create_task(self._supervise(), name="triton-supervisor")

    async def _check_stub_libraries(self) -> None:
        """Every model runs in a python-backend stub process. A stub that cannot find a shared
        library it needs dies at once, and Triton goes on waiting for it: the loads then hang with
        nothing said. This was seen with a Debian Python whose libpython3.11.so.1.0 is a package of
        its own. Asks the dynamic linker first (`ldd`, with the stub's environment) and refuses to
        start with what is missing and how to get it."""
        ldd = shutil.which("ldd")
        if ldd is None:
            return
        process = await asyncio.create_subprocess_exec(
            ldd,
            str(self.distribution.stub),
            env=self.environment(),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        out, _ = await process.communicate()
        missing = missing_libraries(out.decode(errors="replace"))
        if not missing:
            return
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        hint = "Install the packages that provide them."
        if any(name.startswith("libpython") for name in missing):
            hint = (
                f"The python backend runs the models with this Python ({sys.executable}), which must come with its "
                f"shared library: install it (Debian and Ubuntu: `apt-get install libpython{version}`), or use a "
                "Python built with --enable-shared (pyenv's with PYTHON_CONFIGURE_OPTS=--enable-shared, and the "
                "official python container images, are)."
            )
        raise TritonStartError(
            f"Triton's python backend cannot start: {', '.join(missing)} not found for "
            f"{self.distribution.stub.name}. {hint}"
        )

    async def _spawn(self) -> None:
        self.settings.model_repository.mkdir(parents=True, exist_ok=True)
        self.workdir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path.open("ab")
        self.process = await asyncio.create_subprocess_exec(
            *self.command(),
            env=self.environment(),
            stdout=log_file,
            stderr=asyncio.subprocess.STDOUT,
            stdin=asyncio.subprocess.DEVNULL,
            # Ctrl-C reaches the supervisor only, which stops Triton last, after the services that
            # use it; in the terminal's process group Triton would die first and be taken for a crash.
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        log_file.close()
        self.group_path.write_text(f"{self.process.pid}\n")  # its process group's id: the session it leads
        log.info("triton starting", pid=self.process.pid, grpc_port=self.grpc_port, log=str(self.log_path))
        await self._wait_live()
        log.info("triton live", pid=self.process.pid)

    async def _wait_live(self) -> None:
        assert self.process is not None
        url = f"http://127.0.0.1:{self.settings.http_port}/v2/health/live"
        deadline = time.monotonic() + self.settings.startup_timeout_seconds
        async with httpx.AsyncClient(timeout=2.0) as client:
            while time.monotonic() < deadline:
                if self.process.returncode is not None:
                    raise TritonStartError(
                        f"tritonserver exited with status {self.process.returncode} while starting:\n{self.log_tail()}"
                    )
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get(url)).status_code == 200:
                        return
                await asyncio.sleep(0.2)
        await self._terminate()
        raise TritonStartError(
            f"tritonserver was not live within {self.settings.startup_timeout_seconds:.0f} s:\n{self.log_tail()}"
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    async def _supervise(self) -> None:
        backoff = 1.0
        while not self._stopping:
            assert self.process is not None
            returncode = await self.process.wait()
            if self._stopping:
                return
            self._end_group(self.process.pid)
            self.restarts += 1
            log.error("triton died; restarting", returncode=returncode, restarts=self.restarts, in_seconds=backoff)
            await asyncio.sleep(backoff)
            try:
                await self._spawn()
                backoff = 1.0
            except TritonStartError as error:
                log.error("triton restart failed", error=str(error))
                backoff = min(backoff * 2, self.settings.restart_backoff_max_seconds)

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._supervisor
        await self._terminate()
        log.info("triton stopped")

    async def _terminate(self) -> None:
        if self.process is None:
            return
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout=20)
            except TimeoutError:
                log.warning("triton did not stop within 20 s; killing it")
                self.process.kill()
                await self.process.wait()
        self._end_group(self.process.pid)

    def _end_previous_group(self) -> None:
        """Kills what a Triton started here before left running, when it died with its supervisor
        (its group file remains). A group whose server still runs is another live Triton's: left
        alone (it holds the ports, so this start fails and says so)."""
        try:
            group = int(self.group_path.read_text())
        except (OSError, ValueError):
            return
        members = group_members(group, self._programs)
        if group in members:
            return
        self._end_group(group)

    def _end_group(self, group: int) -> None:
        """Kills the processes left in a Triton's process group once its server has exited (its
        python-backend stubs), and forgets the group."""
        left = group_members(group, self._programs)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            log.warning("killed the processes a dead tritonserver left running", group=group, pids=left)
        with contextlib.suppress(OSError):
            if self.group_path.read_text().strip() == str(group):
                self.group_path.unlink()


def group_members(group: int, programs: frozenset[str]) -> list[int]:
    """The live processes of a process group that run one of `programs` (resolved paths), by pid:
    the group id alone could name another program's group once every one of its own has gone."""
    members = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # The fields after the command name, which may hold spaces: state, ppid, pgrp, …
            state, _ppid, pgrp = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:3]
            program = os.readlink(entry / "exe").removesuffix(" (deleted)")
        except (OSError, ValueError):
            continue  # gone meanwhile, or not ours to read
        if int(pgrp) == group and state != "Z" and program in programs:
            members.append(int(entry.name))
    return sorted(members)
