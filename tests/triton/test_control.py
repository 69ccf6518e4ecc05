"""The loader's calls to Triton are bounded, for real: a tritonserver and a python-backend model
whose start never ends (as when its backend process cannot start: the image once lacked
libpython, and every load hung in LOADING with nothing said)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from modelplane.loader.errors import LoadTimedOut, TritonUnavailable
from modelplane.loader.triton_control import TritonControl
from modelplane.triton.embedded import EmbeddedTriton
from tests.triton.conftest import triton_settings, write_python_model

_MODEL = """import time


class TritonPythonModel:
    def initialize(self, args):
        time.sleep(3600)

    def execute(self, requests):
        return []
"""


@pytest.fixture
async def control(tmp_path: Path) -> AsyncIterator[TritonControl]:
    write_python_model(tmp_path / "models", "stuck", _MODEL)
    settings = triton_settings(tmp_path / "models")
    triton = EmbeddedTriton(settings, workdir=tmp_path / "triton")
    await triton.start()
    control = TritonControl(settings.grpc_address)
    try:
        yield control
    finally:
        await control.close()
        await triton.stop()


async def test_a_load_that_never_ends_times_out_and_its_undo_is_bounded(control: TritonControl) -> None:
    with pytest.raises(LoadTimedOut, match=r"did not finish loading 'stuck' within 2 s") as timed_out:
        await control.load("stuck", timeout_seconds=2)
    assert "tritonserver.log" in timed_out.value.message
    # Triton answers an unload only once the load has ended: without a bound the loader's undo of
    # the partial load waited for ever, and the model stayed LOADING in the registry.
    started = time.monotonic()
    with pytest.raises(TritonUnavailable, match=r"did not unload 'stuck' within 2 s; it may still be loading it"):
        await control.unload("stuck", timeout_seconds=2)
    assert time.monotonic() - started < 30
    assert [(m.name, m.state) for m in await control.index()] == [("stuck", "LOADING")]
