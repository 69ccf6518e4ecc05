"""A real PostgreSQL server for the tests, from Debian's packages, in a temporary directory.

Found under /usr/lib/postgresql/<version>/bin; when missing and the tests run as root on Debian
(CI), `apt-get install postgresql` provides it. PostgreSQL refuses to run as root, so as root the
server runs as the `postgres` system user that the package creates. One server serves the whole
test session (fsync off: the data is thrown away); each test gets a database of its own.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg

from tests.conftest import free_port

_USER = "modelplane"


class PostgresUnavailable(RuntimeError):
    pass


def _find_bindir() -> Path | None:
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return candidates[-1].parent if candidates else None


def _install() -> Path:
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PostgresUnavailable(
            "The registry tests need a PostgreSQL server and none is installed. Install Debian's "
            "package (`sudo apt-get install postgresql`) or run the tests as root so they install it."
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "postgresql"]
    if subprocess.run(command, env=env, capture_output=True, check=False).returncode != 0:
        subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, check=True)
        subprocess.run(command, env=env, capture_output=True, check=True)
    bindir = _find_bindir()
    if bindir is None:
        raise PostgresUnavailable("apt-get installed postgresql but no initdb is under /usr/lib/postgresql")
    return bindir


@dataclass
class PostgresServer:
    bindir: Path
    root: Path
    port: int
    _run_as: list[str]

    @property
    def data(self) -> Path:
        return self.root / "data"

    def _run(self, *command: str) -> None:
        result = subprocess.run([*self._run_as, *command], capture_output=True, text=True, check=False)
        if result.returncode != 0:
            log = (self.root / "server.log").read_text(errors="replace") if (self.root / "server.log").exists() else ""
            raise PostgresUnavailable(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}\n{log}")

    def start(self) -> None:
        self._run(str(self.bindir / "initdb"), "-D", str(self.data), "-U", _USER, "--auth=trust", "-E", "UTF8")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off"
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "server.log"), "-o", options,
            "-w", "start",
        )  # fmt: skip

    def stop(self) -> None:
        with contextlib.suppress(PostgresUnavailable):
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")

    def url(self, database: str) -> str:
        return f"postgresql+asyncpg://{_USER}@127.0.0.1:{self.port}/{database}"

    async def create_database(self) -> str:
        name = f"registry_{uuid.uuid4().hex[:12]}"
        connection = await asyncpg.connect(host="127.0.0.1", port=self.port, user=_USER, database="postgres")
        try:
            await connection.execute(f'CREATE DATABASE "{name}"')
        finally:
            await connection.close()
        return name

    async def drop_database(self, name: str) -> None:
        connection = await asyncpg.connect(host="127.0.0.1", port=self.port, user=_USER, database="postgres")
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


@contextlib.contextmanager
def running_postgres() -> Iterator[PostgresServer]:
    bindir = _find_bindir() or _install()
    # Not under pytest's tmp_path: its parents are private to root, and the server may run as postgres.
    root = Path(tempfile.mkdtemp(prefix="modelplane-pg-"))
    run_as: list[str] = []
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
        run_as = ["runuser", "-u", "postgres", "--"]
    server = PostgresServer(bindir=bindir, root=root, port=free_port(), _run_as=run_as)
    try:
        started = time.monotonic()
        server.start()
        print(f"PostgreSQL ({bindir}) started on port {server.port} in {time.monotonic() - started:.1f} s")
        yield server
    finally:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)
