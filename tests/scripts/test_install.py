"""`make install` and the script it runs: a step that fails stops the install and says why.

The Makefile runs in a scratch copy of the repository's declarations with a stand-in virtual
environment (a `pip` that only records its arguments), so these tests take a second and never
install anything; the wheel script runs for real against this machine's wheel cache.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WHEEL_SCRIPT = ROOT / "scripts" / "ensure_llama_wheel.sh"
RUNS = 50


def _llama_version() -> str:
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.startswith("llama_cpp_python=="):
            return line.split("==", 1)[1]
    raise AssertionError("constraints.txt pins no llama_cpp_python")


def test_the_wheel_script_names_the_cached_wheel_on_every_run() -> None:
    """The script once died of SIGPIPE one run in two, silently; `make install` then compiled
    llama.cpp for ten minutes. `make install` has built the wheel before the tests run, so every
    run must find it (LLAMA_WHEEL_BUILD=no: a run that does not find it fails, never compiles)."""
    env = {**os.environ, "LLAMA_CPP_VERSION": _llama_version(), "LLAMA_WHEEL_BUILD": "no"}
    wheels = set()
    for run in range(RUNS):
        result = subprocess.run(
            ["bash", str(WHEEL_SCRIPT), sys.executable], env=env, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, f"run {run + 1} of {RUNS} failed ({result.returncode}): {result.stderr}"
        wheel = Path(result.stdout.splitlines()[-1])
        assert wheel.is_file() and wheel.name.startswith(f"llama_cpp_python-{_llama_version()}-"), result.stdout
        wheels.add(wheel)
    assert len(wheels) == 1


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The Makefile and the files it reads, a venv whose pip records its arguments in pip.log."""
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy(ROOT / name, tmp_path / name)
    (tmp_path / "scripts").mkdir()
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    _executable(bin_dir / "pip", f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\n')
    return tmp_path


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _make_install(scratch: Path, wheel_script: str) -> subprocess.CompletedProcess[str]:
    _executable(scratch / "scripts" / "ensure_llama_wheel.sh", "#!/bin/sh\n" + wheel_script)
    return subprocess.run(
        ["make", "--no-print-directory", "install", f"PYTHON={sys.executable}", f"WHEEL_CACHE={scratch / 'wheels'}"],
        cwd=scratch,
        capture_output=True,
        text=True,
        check=False,
    )


def _installed(scratch: Path) -> bool:
    return (scratch / "pip.log").exists() or any((scratch / ".venv").glob(".installed-*"))


def test_make_install_stops_when_the_wheel_script_fails(scratch: Path) -> None:
    result = _make_install(scratch, "echo 'compiler crashed' >&2\nexit 7\n")
    assert result.returncode != 0
    assert "scripts/ensure_llama_wheel.sh failed (exit 7)" in result.stderr
    assert not _installed(scratch)


def test_make_install_stops_when_the_wheel_script_names_no_wheel(scratch: Path) -> None:
    result = _make_install(scratch, f"echo {scratch}/nowhere/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl\n")
    assert result.returncode != 0
    assert "scripts/ensure_llama_wheel.sh named no wheel that exists" in result.stderr
    assert "nowhere/llama_cpp_python" in result.stderr
    assert not _installed(scratch)


def test_make_install_finds_the_wheel_the_script_names(scratch: Path) -> None:
    wheel = scratch / "built" / "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"a wheel")
    result = _make_install(scratch, f"echo 'a line of log on stdout'\necho {wheel}\n")
    assert result.returncode == 0, result.stderr
    assert f"--find-links {wheel.parent} " in (scratch / "pip.log").read_text()
    assert list((scratch / ".venv").glob(".installed-*"))


def test_make_stops_when_a_value_it_computes_cannot_be_computed(scratch: Path) -> None:
    (scratch / "constraints.txt").unlink()  # the install stamp is a hash of it
    result = subprocess.run(["make", "-n", "install"], cwd=scratch, capture_output=True, text=True, check=False)
    assert result.returncode != 0
    assert "hashing the dependency declarations failed" in result.stderr
