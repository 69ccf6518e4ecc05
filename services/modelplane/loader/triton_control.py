"""The loader's view of Triton: load, unload and list models over the KServe v2 gRPC protocol."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

import structlog
from tritonclient.utils import InferenceServerException

from modelplane.common.redact import without_server_paths
from modelplane.loader.errors import LoadTimedOut, TritonLoadFailed, TritonUnavailable
from modelplane.triton.client import TritonTls, open_triton

log = structlog.get_logger()
# Unloading frees a model's backend processes; it takes seconds, even for large models.
UNLOAD_TIMEOUT_SECONDS = 120.0
# Undoing a load that failed or timed out: best effort, and short, since the failure is what counts.
UNDO_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True)
class TritonModelState:
    name: str
    version: str
    state: str  # READY, UNAVAILABLE, LOADING, UNLOADING
    reason: str


class TritonControl:
    def __init__(self, address: str, tls: TritonTls | None = None) -> None:
        self.address = address
        self.client = open_triton(address, tls)

    async def close(self) -> None:
        await self.client.close()

    async def is_live(self) -> bool:
        try:
            return bool(await self.client.is_server_live(client_timeout=2.0))
        except InferenceServerException:
            return False

    async def load(self, name: str, *, timeout_seconds: float) -> None:
        try:
            await asyncio.wait_for(self.client.load_model(name), timeout=timeout_seconds)
        except TimeoutError:
            raise LoadTimedOut(
                f"Triton did not finish loading '{name}' within {timeout_seconds:.0f} s "
                "(MODELPLANE_LOADER_TRITON_LOAD_TIMEOUT_SECONDS). A model whose backend process cannot start "
                "never finishes loading: Triton's log (tritonserver.log) says why.",
                metadata={"model": name},
            ) from None
        except InferenceServerException as error:
            message = error.message() or str(error)
            if _is_connection_error(error):
                raise self._unreachable(message, retry_after_seconds=2.0) from None
            log.warning("triton refused a load", model=name, detail=message)
            raise TritonLoadFailed(
                f"Triton refused to load '{name}': {without_server_paths(_without_traceback(message))}"
            ) from None

    async def unload(self, name: str, *, timeout_seconds: float = UNLOAD_TIMEOUT_SECONDS) -> None:
        """Bounded: Triton answers an unload only once the model's load has ended, which for a load
        that never ends (a backend process that died at start) is never."""
        try:
            await asyncio.wait_for(self.client.unload_model(name), timeout=timeout_seconds)
        except TimeoutError:
            raise TritonUnavailable(
                f"Triton did not unload '{name}' within {timeout_seconds:.0f} s; it may still be loading it. "
                "Triton's log (tritonserver.log) says what its backend is doing; restarting Triton clears it."
            ) from None
        except InferenceServerException as error:
            raise TritonUnavailable(f"Triton could not unload '{name}': {error.message()}") from None

    async def is_ready(self, name: str) -> bool:
        try:
            return bool(await self.client.is_model_ready(name))
        except InferenceServerException:
            return False

    async def index(self) -> list[TritonModelState]:
        """Every model in the repository, loaded or not, as Triton reports it."""
        try:
            response = await self.client.get_model_repository_index()
        except InferenceServerException as error:
            raise self._unreachable(error.message() or str(error)) from None
        return [TritonModelState(m.name, m.version, m.state, m.reason) for m in response.models]

    def _unreachable(self, detail: str, retry_after_seconds: float | None = None) -> TritonUnavailable:
        # gRPC's words name Triton's address; callers of the loader (and through an on-demand
        # load, HTTP clients) get the meaning, the log keeps the detail.
        # Debug level: reconciliation and tests poll the index while Triton restarts.
        log.debug("triton unreachable", address=self.address, detail=detail)
        message = "Triton is not reachable; it may be restarting."
        return TritonUnavailable(message, retry_after_seconds=retry_after_seconds)


def _is_connection_error(error: InferenceServerException) -> bool:
    # The status, not the message: a model that fails to load is reported as "version 1 is at
    # UNAVAILABLE state: <why>", which is Triton's answer, not a lost connection.
    status = str(error.status() or "").upper()
    if status:
        return "UNAVAILABLE" in status
    lowered = (error.message() or str(error)).lower()
    return any(hint in lowered for hint in ("connection refused", "failed to connect", "socket closed"))


def _without_traceback(message: str) -> str:
    """Triton's reason without the python backend's stack trace ("At:" and the frames after it):
    the reason reaches API clients through the model's state; the trace stays in the log."""
    return message.split("\n\nAt:\n", 1)[0].strip()
