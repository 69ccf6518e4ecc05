"""Calls into Triton over gRPC (KServe v2), with Triton's failures turned into this service's errors."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import structlog
from tritonclient.grpc import InferInput, InferRequestedOutput
from tritonclient.grpc import aio as triton_aio
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from modelplane.common.errors import Internal
from modelplane.inference.errors import ModelLoading, TritonUnavailable

log = structlog.get_logger()


class TritonInferer:
    def __init__(self, address: str) -> None:
        self.address = address
        self.client = triton_aio.InferenceServerClient(address)

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


def _translate(model: str, error: InferenceServerException) -> Exception:
    message = error.message() or str(error)
    status = (error.status() or "").upper()
    lowered = message.lower()
    if "UNAVAILABLE" in status or "connect" in lowered or "socket closed" in lowered:
        # gRPC's words name Triton's internal address: the log keeps them, the caller does not need them.
        log.warning("triton unreachable", model=model, detail=message)
        return TritonUnavailable(
            "Triton is not reachable; it may be restarting. Retry shortly.", retry_after_seconds=2.0
        )
    if "DEADLINE" in status:
        return TritonUnavailable(f"Triton did not answer in time for model '{model}'.", retry_after_seconds=1.0)
    if "unknown model" in lowered or "not ready" in lowered or "is not found" in lowered:
        return ModelLoading(
            f"Model '{model}' is not loaded in Triton right now (Triton may have restarted); the loader is "
            "restoring it. Retry shortly.",
            retry_after_seconds=2.0,
            metadata={"model": model},
        )
    return Internal(f"Triton failed to run model '{model}': {message}")
