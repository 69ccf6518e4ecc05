"""The loader against the running stack: what READY records, and refusals that load nothing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import grpc
import pytest

from modelplane.bundled import bundled_models
from modelplane.common.errors import FailedPrecondition
from modelplane.common.types import ModelSpec, ModelState, Task
from modelplane.loader.client import LoaderClient
from modelplane.loader.triton_control import TritonControl
from modelplane.registry.client import RegistryClient
from tests.integration.conftest import RunningStack

MODEL = "all-minilm-l6-v2"


async def test_ready_model_records_every_file_digest_and_the_phases(stack: RunningStack, minilm_path: Path) -> None:
    async with RegistryClient(stack.registry) as registry:
        model = await registry.get_model(MODEL)
        events = await registry.events(MODEL)
    assert model.state == ModelState.READY
    assert model.status.manifest is not None
    recorded = {f.path: f.sha256 for f in model.status.manifest.files}
    on_disk = {
        p.relative_to(minilm_path).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in minilm_path.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert recorded == on_disk
    phases = [e.to_state for e in events]
    for phase in (
        ModelState.FETCHING,
        ModelState.VERIFYING,
        ModelState.CONVERTING,
        ModelState.STAGED,
        ModelState.LOADING,
        ModelState.READY,
    ):
        assert phase in phases
    assert [d.phase for d in model.status.phase_durations] == [
        ModelState.FETCHING,
        ModelState.VERIFYING,
        ModelState.CONVERTING,
        ModelState.LOADING,
    ]
    assert "parity max abs diff" in next(e.message for e in events if e.to_state == ModelState.STAGED)


async def _load_refused(stack: RunningStack, spec: ModelSpec) -> FailedPrecondition:
    async with RegistryClient(stack.registry) as registry:
        await registry.register(spec)
    async with LoaderClient(stack.loader) as loader:
        with pytest.raises(FailedPrecondition) as refused:
            await loader.ensure_loaded(spec.name, reason="test", timeout_seconds=120)
    assert refused.value.code == grpc.StatusCode.FAILED_PRECONDITION
    return refused.value


async def _assert_failed_and_absent_from_triton(stack: RunningStack, name: str) -> str:
    async with RegistryClient(stack.registry) as registry:
        model = await registry.get_model(name)
    assert model.state == ModelState.FAILED
    control = TritonControl(stack.triton_grpc)
    try:
        assert name not in {m.name for m in await control.index()}
    finally:
        await control.close()
    assert not (stack.home / "triton" / "models" / name).exists()
    return model.status.reason


async def test_wrong_expected_digest_fails_with_both_digests(stack: RunningStack, minilm_path: Path) -> None:
    wrong = "0" * 64
    error = await _load_refused(
        stack,
        ModelSpec(name="minilm-wrong-digest", task=Task.EMBEDDING, source_uri=str(minilm_path), expected_sha256=wrong),
    )
    assert error.reason == "CHECKSUM_MISMATCH"
    actual = error.metadata["actual"]
    assert len(actual) == 64 and actual != wrong
    reason = await _assert_failed_and_absent_from_triton(stack, "minilm-wrong-digest")
    assert wrong in reason and actual in reason
    assert any((stack.home / "cache" / "quarantine").iterdir())


async def test_source_path_that_does_not_exist(stack: RunningStack, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    error = await _load_refused(stack, ModelSpec(name="minilm-missing", task=Task.EMBEDDING, source_uri=str(missing)))
    assert error.reason == "SOURCE_UNAVAILABLE"
    assert f"Source path {missing} does not exist" in error.message
    await _assert_failed_and_absent_from_triton(stack, "minilm-missing")


async def test_directory_that_is_not_a_model(stack: RunningStack, tmp_path: Path) -> None:
    (tmp_path / "README.txt").write_text("quarterly report, not a model")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    error = await _load_refused(stack, ModelSpec(name="not-a-model", task=Task.EMBEDDING, source_uri=str(tmp_path)))
    assert error.reason == "NOT_A_MODEL"
    assert "holds no model" in error.message and "README.txt" in error.message
    await _assert_failed_and_absent_from_triton(stack, "not-a-model")


def test_the_stack_said_what_served_first_and_when_every_bundled_model_was_ready(stack: RunningStack) -> None:
    """`modelplane up` loads the bundled models at once: the URL and what serves are printed when the
    first is READY, the rest as they come, and the last line when all are."""
    log = stack.log_text()
    serving, up = log.index("modelplane is serving"), log.index("modelplane is up.")
    assert log.index("  ready:  ") < serving < up
    names = [spec.name for spec in bundled_models()]
    assert MODEL in names
    for name in names:
        assert f"  ready:  {name} (" in log
    assert f"Every bundled model is ready ({', '.join(names)})" in log[up:]


async def test_a_single_node_registers_no_node_and_its_models_are_placed_nowhere(stack: RunningStack) -> None:
    """`make run`'s single node holds its models itself. Registered as a node, the placer placed
    every model on it and the registry then refused its model-level transitions (every load FAILED)."""
    async with RegistryClient(stack.registry) as registry:
        assert await registry.list_nodes() == []
        assert await registry.list_placements() == []
        assert (await registry.get_model(MODEL)).state == ModelState.READY
