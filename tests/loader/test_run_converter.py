"""How the loader runs a converter process: what it sees of the loader's working directory."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from modelplane.loader.conversion import run_converter


async def test_a_folder_in_the_working_directory_does_not_shadow_a_module(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """In the image the loader's working directory is MODELPLANE_HOME, which holds Triton's folder
    `triton/`: a converter that imported it as the `triton` module (torch does, to look for the GPU
    compiler) died with "module 'triton' has no attribute 'language'"."""
    (tmp_path / "json").mkdir()  # a folder named like a module the converter needs
    (tmp_path / "json" / "__init__.py").write_text("raise ImportError('the working directory was imported')\n")
    monkeypatch.chdir(tmp_path)
    report = await run_converter(
        [sys.executable, "-c", "import json, sys; print(json.dumps({'path': sys.path}))"], timeout_seconds=60
    )
    assert "" not in report["path"] and str(tmp_path) not in report["path"]
