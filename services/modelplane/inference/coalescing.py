"""Encoder calls to Triton that go together when they arrive together (common/coalescing.py).

Triton's dynamic batcher already runs concurrent requests as one execution, but every request is
still a call of its own: tritonclient builds and parses it here, Triton handles it, and the python
model unpacks it. Here the chunks of concurrent requests for one model are padded together into
one call, and each gets back exactly its own rows. With several nodes, each node's Triton has its
own calls (`RoutedEncoderCalls`): a chunk is routed first, then coalesced with others bound there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from modelplane.common.coalescing import Coalescer, coalescing_metrics
from modelplane.inference.triton import TritonInferer

if TYPE_CHECKING:
    from modelplane.inference.routing import NodeLink, Router

METRICS = coalescing_metrics("modelplane_inference_encoder", "request chunks for an encoder model in Triton")


@dataclass(frozen=True)
class EncoderModel:
    """What a call to one encoder model needs: its Triton name, output, largest batch and padding."""

    triton_name: str
    output: str
    max_rows: int
    pad_id: int


@dataclass(frozen=True)
class _Chunk:
    arrays: Mapping[str, np.ndarray]
    request_id: str


class EncoderCalls:
    def __init__(self, triton: TritonInferer, calls_in_flight: int) -> None:
        self.triton = triton
        self._coalescer = Coalescer[EncoderModel, _Chunk, np.ndarray](
            self._send, calls_in_flight=calls_in_flight, metrics=METRICS, label=lambda model: model.triton_name
        )

    async def run(self, model: EncoderModel, arrays: Mapping[str, np.ndarray], *, request_id: str = "") -> np.ndarray:
        """The model's output for these rows (at most `model.max_rows`), in their order."""
        rows = arrays["input_ids"].shape[0]
        return await self._coalescer.run(model, _Chunk(arrays, request_id), size=rows, limit=model.max_rows)

    async def close(self) -> None:
        await self._coalescer.close()

    async def _send(self, model: EncoderModel, chunks: list[_Chunk]) -> list[np.ndarray | BaseException]:
        if len(chunks) == 1:
            arrays, request_id = chunks[0].arrays, chunks[0].request_id
        else:
            arrays = _joined([chunk.arrays for chunk in chunks], model.pad_id)
            request_id = f"{chunks[0].request_id}+{len(chunks) - 1}"
        output = await self.triton.infer(model.triton_name, arrays, model.output, request_id=request_id)
        results: list[np.ndarray | BaseException] = []
        offset = 0
        for chunk in chunks:
            rows = chunk.arrays["input_ids"].shape[0]
            results.append(output[offset : offset + rows])
            offset += rows
        return results


class RoutedEncoderCalls:
    """Encoder calls to the nodes holding the model: each node its own `EncoderCalls` (so
    `calls_in_flight` is per node's Triton), and a chunk whose node fails is sent once to another."""

    def __init__(self, router: Router, calls_in_flight: int) -> None:
        self.router = router
        self.calls_in_flight = calls_in_flight
        self._nodes: dict[NodeLink, EncoderCalls] = {}

    async def run(self, model: EncoderModel, arrays: Mapping[str, np.ndarray], *, request_id: str = "") -> np.ndarray:
        return await self.router.call(
            model.triton_name, lambda link: self._calls(link).run(model, arrays, request_id=request_id)
        )

    def _calls(self, link: NodeLink) -> EncoderCalls:
        calls = self._nodes.get(link)
        if calls is None:
            for gone in [node for node in self._nodes if node.retired]:
                self._nodes.pop(gone)
            calls = self._nodes[link] = EncoderCalls(link.triton, self.calls_in_flight)
        return calls

    async def close(self) -> None:
        for calls in self._nodes.values():
            await calls.close()
        self._nodes.clear()


def _joined(parts: list[Mapping[str, np.ndarray]], pad_id: int) -> dict[str, np.ndarray]:
    """The parts' rows as one batch, each padded on the right to the widest part (with the pad
    token for input ids and zeros, i.e. masked, for the rest)."""
    width = max(part["input_ids"].shape[1] for part in parts)
    joined = {}
    for name in parts[0]:
        pad = pad_id if name == "input_ids" else 0
        rows = sum(part[name].shape[0] for part in parts)
        array = np.full((rows, width), pad, dtype=parts[0][name].dtype)
        offset = 0
        for part in parts:
            height, length = part[name].shape
            array[offset : offset + height, :length] = part[name]
            offset += height
        joined[name] = array
    return joined
