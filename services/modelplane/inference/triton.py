"""Calls into Triton over gRPC (KServe v2), with Triton's failures turned into this service's errors."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np
import structlog
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc._utils import get_error_grpc
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelplane.common.errors import Cancelled, Internal
from modelplane.inference.errors import InvalidRequest, ModelNotOnNode, NodeUnreachable, TritonUnavailable
from modelplane.triton.client import TritonTls, open_triton

# Over a gRPC stream Triton delivers a decoupled model's error as a message only; modelplane's LLM
# models lead it with the code ("[INVALID_ARG] the prompt has 5000 tokens; ...").
_CODED_MESSAGE = re.compile(r"^\[(?P<code>[A-Z_]+)\] (?P<message>.*)$", re.DOTALL)


@dataclass(frozen=True)
class GeneratedChunk:
    """One response of a decoupled LLM model: new text, the tokens it took, and on the last one
    why the generation ended."""

    text: str
    new_tokens: int
    prompt_tokens: int
    finish_reason: str
    final: bool


def _tensor(name: str, value: Any, datatype: str) -> InferInput:
    array = np.array([value], dtype=np.object_ if datatype == "BYTES" else bool)
    tensor = InferInput(name, [1], datatype)
    tensor.set_data_from_numpy(array)
    return tensor


log = structlog.get_logger()


class TritonInferer:
    """Calls into one node's Triton; routing.py picks the node."""

    def __init__(self, address: str, tls: TritonTls | None = None) -> None:
        self.address = address
        self.client = open_triton(address, tls)

    async def close(self) -> None:
        await self.client.close()

    async def infer(
        self,
        model: str,
        arrays: Mapping[str, np.ndarray],
        output: str,
        *,
        request_id: str = "",
        timeout_seconds: float | None = None,
    ) -> np.ndarray:
        inputs = []
        for name, array in arrays.items():
            tensor = InferInput(name, list(array.shape), np_to_triton_dtype(array.dtype))
            tensor.set_data_from_numpy(array)
            inputs.append(tensor)
        try:
            result = await self.client.infer(
                model,
                inputs,
                outputs=[InferRequestedOutput(output)],
                request_id=request_id,
                client_timeout=timeout_seconds,
            )
        except InferenceServerException as error:
            raise _translate(model, error) from None
        return result.as_numpy(output)

    async def generate(
        self, model: str, prompt: str, sampling: Mapping[str, Any], *, stream: bool, request_id: str = ""
    ) -> AsyncIterator[GeneratedChunk]:
        """Runs one generation on a decoupled LLM model (Triton's vLLM tensor convention) and yields
        its responses as they arrive. Closing the iterator early cancels the request inside Triton,
        which frees the model's engine slot."""
        inputs = [
            _tensor("text_input", prompt.encode(), "BYTES"),
            _tensor("stream", stream, "BOOL"),
            _tensor("sampling_parameters", json.dumps(dict(sampling)).encode(), "BYTES"),
            _tensor("exclude_input_in_output", True, "BOOL"),
            _tensor("return_finish_reason", True, "BOOL"),
            _tensor("return_num_input_tokens", True, "BOOL"),
            _tensor("return_num_output_tokens", True, "BOOL"),
        ]

        async with contextlib.aclosing(self._stream(model, inputs, request_id)) as results:
            async for result in results:
                chunk = _chunk(result)
                yield chunk
                if chunk.final:
                    return

    async def synthesize(
        self, model: str, text: str, *, speaker: str, speed: float, request_id: str = ""
    ) -> AsyncIterator[tuple[np.ndarray, int]]:
        """Streams (int16 samples, sample rate) per sentence from a decoupled text-to-speech model.
        Closing the iterator early cancels the request inside Triton."""
        inputs = [_tensor("text_input", text.encode(), "BYTES")]
        if speaker:
            inputs.append(_tensor("speaker", speaker.encode(), "BYTES"))
        speed_tensor = InferInput("speed", [1], "FP32")
        speed_tensor.set_data_from_numpy(np.array([speed], dtype=np.float32))
        inputs.append(speed_tensor)

        async with contextlib.aclosing(self._stream(model, inputs, request_id)) as results:
            async for result in results:
                samples = result.as_numpy("audio")
                if samples is not None and samples.size:
                    yield samples.reshape(-1), int(result.as_numpy("sample_rate").reshape(-1)[0])
                if _is_final(result):
                    return

    async def _stream(self, model: str, inputs: list[InferInput], request_id: str) -> AsyncIterator[Any]:
        """The responses of one request to a decoupled model, as they arrive, with its errors
        translated. Closing the iterator cancels the request inside Triton."""

        async def requests() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

        responses = self.client.stream_infer(requests())
        try:
            async for result, error in responses:
                if error is not None:
                    raise _translate_generation(model, error)
                yield result
        except InferenceServerException as error:
            raise _translate(model, error) from None
        except grpc.RpcError as error:
            # tritonclient wraps the errors of starting a stream, not those of reading it: a Triton
            # that dies mid-stream surfaces here as gRPC's own error.
            raise _translate(model, get_error_grpc(error)) from None
        finally:
            responses.cancel()


def _is_final(result: Any) -> bool:
    final = result.get_response().parameters.get("triton_final_response")
    return bool(final is not None and final.bool_param)


def _chunk(result: Any) -> GeneratedChunk:
    def first(name: str) -> Any:
        array = result.as_numpy(name)
        return None if array is None or array.size == 0 else array.reshape(-1)[0]

    text = first("text_output")
    reason = first("finish_reason")
    return GeneratedChunk(
        text=text.decode() if isinstance(text, bytes) else str(text or ""),
        new_tokens=int(first("num_output_tokens") or 0),
        prompt_tokens=int(first("num_input_tokens") or 0),
        finish_reason=reason.decode() if isinstance(reason, bytes) else "",
        final=_is_final(result),
    )


def _translate_generation(model: str, error: InferenceServerException) -> Exception:
    message = error.message() or str(error)
    coded = _CODED_MESSAGE.match(message)
    if coded is None:
        return _translate(model, error)
    code, text = coded["code"], coded["message"]
    if code == "INVALID_ARG":
        return InvalidRequest(f"Model '{model}' refused the request: {text}.", metadata={"model": model})
    if code == "UNAVAILABLE":
        return TritonUnavailable(f"Model '{model}' cannot take the request now: {text}.", retry_after_seconds=2.0)
    if code == "CANCELLED":
        return Cancelled(f"The generation on model '{model}' was cancelled.")
    return Internal(f"Model '{model}' failed: {text}")


def _translate(model: str, error: InferenceServerException) -> Exception:
    message = error.message() or str(error)
    status = (error.status() or "").upper()
    lowered = message.lower()
    if "UNAVAILABLE" in status or "connect" in lowered or "socket closed" in lowered:
        # gRPC's words name Triton's internal address: the log keeps them, the caller does not need them.
        log.warning("triton unreachable", model=model, detail=message)
        return NodeUnreachable("Triton is not reachable; it may be restarting. Retry shortly.", retry_after_seconds=2.0)
    if "DEADLINE" in status:
        return TritonUnavailable(f"Triton did not answer in time for model '{model}'.", retry_after_seconds=1.0)
    if "unknown model" in lowered or "not ready" in lowered or "is not found" in lowered:
        return ModelNotOnNode(
            f"Model '{model}' is not loaded in Triton right now (Triton may have restarted); the loader is "
            "restoring it. Retry shortly.",
            retry_after_seconds=2.0,
            metadata={"model": model},
        )
    return Internal(f"Triton failed to run model '{model}': {message}")
