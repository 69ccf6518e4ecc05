"""Encoder calls as messages of one ModelStreamInfer stream per Triton (inference/triton_stream.py),
against a real tritonserver: each call gets its own answer or its own error, a caller that gives
up leaves the stream working, and a Triton that goes away fails the calls it held and is reached
again on a new stream once it is back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from modelplane.common.errors import Internal
from modelplane.common.settings import TritonSettings
from modelplane.inference.errors import ModelNotOnNode, NodeUnreachable
from modelplane.inference.triton import TritonInferer
from modelplane.loader.triton_control import TritonControl
from modelplane.triton.embedded import EmbeddedTriton
from tests.triton.conftest import triton_settings, write_python_model

# Doubles x; refuses a vector that starts below zero; sleeps x[1] seconds first when x[0] is 7 or -7.
_MODEL = """import time

import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
            if abs(x[0]) == 7:
                time.sleep(float(x[1]))
            if x[0] < 0:
                answers.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"refused {x[0]:g}")))
                continue
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("y", x * 2)]))
        return answers
"""


@dataclass
class Node:
    settings: TritonSettings
    triton: EmbeddedTriton
    inferer: TritonInferer

    async def load_models(self, *, within_seconds: float = 120) -> None:
        """Loads both models, trying again while Triton is (re)starting."""
        deadline = asyncio.get_running_loop().time() + within_seconds
        control = TritonControl(self.settings.grpc_address)
        try:
            for name in ("doubler", "sleeper"):
                while True:
                    try:
                        await control.load(name, timeout_seconds=120)
                        break
                    except Exception:
                        if asyncio.get_running_loop().time() > deadline:
                            raise
                        await asyncio.sleep(0.5)
        finally:
            await control.close()


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    for name in ("doubler", "sleeper"):
        write_python_model(tmp_path / "models", name, _MODEL)
    settings = triton_settings(tmp_path / "models")
    running = Node(
        settings, EmbeddedTriton(settings, workdir=tmp_path / "triton"), TritonInferer(settings.grpc_address)
    )
    await running.triton.start()
    await running.load_models()
    try:
        yield running
    finally:
        await running.inferer.close()
        await running.triton.stop()


def _x(*values: float) -> dict[str, np.ndarray]:
    return {"x": np.array(values, np.float32)}


async def test_concurrent_calls_share_the_stream_and_each_gets_its_own_answer(node: Node) -> None:
    inferer = node.inferer
    answers = await asyncio.gather(
        *(inferer.encode("doubler", _x(n, n + 0.5), "y", request_id=f"r{n}") for n in range(40))
    )
    assert [answer.tolist() for answer in answers] == [[2.0 * n, 2.0 * n + 1] for n in range(40)]
    # The same bytes as a unary call.
    unary = await inferer.infer("doubler", _x(3.25, 1e-7), "y")
    assert (await inferer.encode("doubler", _x(3.25, 1e-7), "y")).tobytes() == unary.tobytes()


async def test_a_refused_call_fails_alone_and_the_stream_goes_on(node: Node) -> None:
    inferer = node.inferer
    calls = [inferer.encode("doubler", _x(-n if n == 5 else n, 1), "y") for n in range(10)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    failed = results.pop(5)
    assert isinstance(failed, Internal)
    assert "refused -5" in failed.message and "doubler" in failed.message
    assert [result.tolist() for result in results] == [[2.0 * n, 2.0] for n in range(10) if n != 5]  # type: ignore[union-attr]
    assert (await inferer.encode("doubler", _x(1), "y")).tolist() == [2.0]


async def test_a_model_triton_does_not_hold_is_model_not_on_node_beside_calls_that_succeed(node: Node) -> None:
    inferer = node.inferer
    with pytest.raises(ModelNotOnNode, match="not loaded in Triton"):
        await inferer.encode("absent", _x(1), "y")
    # Among others under way: the missing model's call gets its error, the rest their answers.
    results = await asyncio.gather(
        inferer.encode("sleeper", _x(7, 0.3), "y"),
        inferer.encode("absent", _x(1), "y"),
        inferer.encode("doubler", _x(2), "y"),
        return_exceptions=True,
    )
    assert results[0].tolist() == [14.0, 0.6000000238418579]  # type: ignore[union-attr]
    assert isinstance(results[1], ModelNotOnNode)
    assert results[2].tolist() == [4.0]  # type: ignore[union-attr]


async def test_a_caller_that_gives_up_leaves_the_stream_to_the_others(node: Node) -> None:
    inferer = node.inferer
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(inferer.encode("sleeper", _x(7, 0.5), "y"), timeout=0.05)
    # Its late answer is dropped; the next calls are answered on the same stream.
    assert (await inferer.encode("doubler", _x(1), "y")).tolist() == [2.0]
    await asyncio.sleep(0.6)
    assert (await inferer.encode("sleeper", _x(2), "y")).tolist() == [4.0]


async def test_the_late_error_of_a_call_given_up_goes_to_no_one_else(node: Node) -> None:
    inferer = node.inferer
    with pytest.raises(TimeoutError):  # refused after 0.4 s, by when its caller has gone
        await asyncio.wait_for(inferer.encode("sleeper", _x(-7, 0.4), "y"), timeout=0.05)
    # The one call waiting when that error arrives gets its own answer, not the error.
    assert (await inferer.encode("doubler", _x(7, 1.0), "y")).tolist() == [14.0, 2.0]


async def test_calls_held_by_a_triton_that_dies_fail_as_unreachable_and_a_new_stream_serves_it_back(
    node: Node,
) -> None:
    inferer = node.inferer
    assert (await inferer.encode("doubler", _x(1), "y")).tolist() == [2.0]
    held = asyncio.create_task(inferer.encode("sleeper", _x(7, 30), "y"))
    await asyncio.sleep(0.5)
    assert node.triton.process is not None
    node.triton.process.kill()
    with pytest.raises(NodeUnreachable, match="Triton is not reachable"):
        await asyncio.wait_for(held, timeout=20)
    # The supervisor starts Triton again; the models are loaded back as the loader would.
    await node.load_models()
    assert (await inferer.encode("doubler", _x(3), "y")).tolist() == [6.0]


async def test_streams_off_sends_unary_calls_with_the_same_answers_and_errors(node: Node) -> None:
    unary = TritonInferer(node.settings.grpc_address, streams=False)
    try:
        assert (await unary.encode("doubler", _x(1, 2), "y")).tolist() == [2.0, 4.0]
        with pytest.raises(Internal, match="refused -1"):
            await unary.encode("doubler", _x(-1), "y")
        with pytest.raises(ModelNotOnNode):
            await unary.encode("absent", _x(1), "y")
    finally:
        await unary.close()
