"""The `modelplane` command's local work: `modelplane digest` (the rest is exercised against the
running stack in tests/integration)."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from modelplane.cli import app
from modelplane.loader.cache import PackageCache
from modelplane.loader.manifest import package_digest
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.sources import open_source

README = Path(__file__).parents[1] / "README.md"


def _digest(path: Path) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["digest", str(path)])
    # The error is printed by rich, which wraps long lines at the terminal's width.
    return result.exit_code, result.stdout.strip(), " ".join(result.stderr.split())


async def _loader_digest(path: Path, cache: Path) -> str:
    """What the loader computes when it fetches the package: the digest it compares with the registered one."""
    source = open_source(str(path), LoaderSettings())
    files = await source.list_files()
    _, manifest = await PackageCache(cache).fetch(source, files, lambda *_: None)
    return package_digest(manifest)


def _readme_recipe() -> str:
    """The shell recipe the README gives, as it stands there."""
    text = README.read_text()
    start = text.index("cd package && find")
    return text[start : text.index("\n```", start)].replace("\\\n", "").removeprefix("cd package && ")


@pytest.fixture
def package(tmp_path: Path) -> Path:
    """A package that ships its SHA256SUMS and signature beside its files, with a subfolder."""
    root = tmp_path / "package"
    (root / "1_Pooling").mkdir(parents=True)
    (root / "config.json").write_text("{}")
    (root / "1_Pooling" / "config.json").write_text('{"pooling_mode_mean_tokens": true}')
    (root / "model.safetensors").write_bytes(b"\x01" * 1000)
    sums = "".join(
        f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.relative_to(root).as_posix()}\n"
        for p in sorted(root.rglob("*"))
        if p.is_file()
    )
    (root / "SHA256SUMS").write_text(sums)
    (root / "SHA256SUMS.sig").write_bytes(b"\x02" * 64)
    return root


def test_digest_is_the_loaders_and_the_readme_recipes(package: Path, tmp_path: Path) -> None:
    code, printed, _ = _digest(package)
    assert code == 0
    assert printed == asyncio.run(_loader_digest(package, tmp_path / "cache"))
    shell = subprocess.run(["bash", "-c", _readme_recipe()], cwd=package, capture_output=True, text=True, check=True)
    assert printed == shell.stdout.split()[0]


def test_digest_of_a_single_file_is_its_sha256(package: Path) -> None:
    code, printed, _ = _digest(package / "model.safetensors")
    assert (code, printed) == (0, hashlib.sha256(b"\x01" * 1000).hexdigest())


def test_missing_path_is_an_error_not_a_digest(tmp_path: Path) -> None:
    code, printed, error = _digest(tmp_path / "no" / "such" / "path")
    assert code == 1 and printed == ""
    assert f"{tmp_path / 'no' / 'such' / 'path'} does not exist" in error


@pytest.mark.parametrize("sidecars", [[], ["SHA256SUMS"]], ids=["empty", "only-sha256sums"])
def test_folder_without_model_files_is_an_error(tmp_path: Path, sidecars: list[str]) -> None:
    for name in sidecars:
        (tmp_path / name).write_text("")
    code, printed, error = _digest(tmp_path)
    assert code == 1 and printed == ""
    assert "is empty; it holds no model files" in error


def test_link_out_of_the_package_is_an_error(package: Path, tmp_path: Path) -> None:
    (tmp_path / "outside").mkdir()
    (package / "extra").symlink_to(tmp_path / "outside")
    code, printed, error = _digest(package)
    assert code == 1 and printed == ""
    assert "extra is a symbolic link to a directory outside the package" in error
