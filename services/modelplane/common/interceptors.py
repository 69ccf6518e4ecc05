"""Cross-cutting work for every gRPC service, in one server interceptor.

For each RPC (health and reflection excepted) it takes or makes the request id, binds it to the
log context, counts and times the call, writes one log line (at debug for a service's routine
methods, the ones other services poll, unless they fail), and maps exceptions to statuses:
a `ModelplaneError` becomes its own code with ErrorInfo/RetryInfo details; anything else becomes
INTERNAL with a message that names the request id and never leaks internals.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog
from prometheus_client import Counter, Gauge, Histogram

from modelplane.common.errors import Internal, ModelplaneError
from modelplane.common.grpc_errors import to_status
from modelplane.common.request_context import REQUEST_ID_HEADER, accept_request_id, current_request_id

log = structlog.get_logger()

_UNOBSERVED_PREFIXES = ("/grpc.health.v1.", "/grpc.reflection.")

RPC_REQUESTS = Counter(
    "modelplane_grpc_requests_total", "gRPC requests handled, by method and status code.", ["method", "code"]
)
RPC_LATENCY = Histogram(
    "modelplane_grpc_request_duration_seconds",
    "Time from the start of a gRPC request to its last response.",
    ["method"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
RPC_IN_FLIGHT = Gauge("modelplane_grpc_requests_in_flight", "gRPC requests being handled.", ["method"])


class CallObservation:
    """The per-call bookkeeping: request id and log context, metrics, one log line. Used by the
    interceptor for every RPC, and by a stream that carries calls as messages for each of them."""

    def __init__(self, method: str, request_id: str | None, *, routine: bool) -> None:
        self.method = method
        self.routine = routine
        self.request_id = accept_request_id(request_id)
        self.start = time.perf_counter()
        self.code = grpc.StatusCode.OK

    def __enter__(self) -> CallObservation:
        current_request_id.set(self.request_id)
        structlog.contextvars.bind_contextvars(request_id=self.request_id, rpc=self.method)
        RPC_IN_FLIGHT.labels(self.method).inc()
        return self

    def failure(self, error: BaseException) -> ModelplaneError:
        """What the caller is told about `error`, logged: a `ModelplaneError` as it is, anything
        else as INTERNAL with a message that names the request id and never leaks internals."""
        if isinstance(error, ModelplaneError):
            self.code = error.code
            log.info("rpc refused", code=error.code.name, reason=error.reason, error=error.message)
            return error
        self.code = grpc.StatusCode.INTERNAL
        log.error("rpc failed", exc_info=error)
        return Internal(f"Internal error (request id {self.request_id}); the service log has the details.")

    def __exit__(self, *exc: object) -> None:
        elapsed = time.perf_counter() - self.start
        RPC_IN_FLIGHT.labels(self.method).dec()
        RPC_REQUESTS.labels(self.method, self.code.name).inc()
        RPC_LATENCY.labels(self.method).observe(elapsed)
        write = log.debug if self.routine and self.code == grpc.StatusCode.OK else log.info
        write("rpc", code=self.code.name, duration_ms=round(elapsed * 1000, 2))
        structlog.contextvars.unbind_contextvars("request_id", "rpc", "model")


class _Observation(CallObservation):
    """A whole RPC's observation; a failure aborts the RPC with its status."""

    def __init__(self, method: str, context: grpc.aio.ServicerContext, *, routine: bool) -> None:
        metadata = dict(context.invocation_metadata() or ())
        super().__init__(method, metadata.get(REQUEST_ID_HEADER), routine=routine)
        self.context = context

    async def fail(self, error: BaseException) -> None:
        status = to_status(self.failure(error))
        await self.context.abort(status.code, status.details, status.trailing_metadata)


class ServiceInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, routine_methods: frozenset[str] = frozenset()) -> None:
        """`routine_methods`: full method names ("/pkg.Service/Method") whose successful calls
        are logged at debug, so that another service polling them does not fill the log."""
        self.routine_methods = routine_methods

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(_UNOBSERVED_PREFIXES):
            return handler
        routine = method in self.routine_methods
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                _wrap_unary(method, handler.unary_unary, routine=routine),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                _wrap_stream(method, handler.unary_stream, routine=routine),
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def _wrap_unary(
    method: str, behaviour: Callable[..., Awaitable[Any]], *, routine: bool
) -> Callable[..., Awaitable[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> Any:
        with _Observation(method, context, routine=routine) as observation:
            try:
                return await behaviour(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - every failure must become a status
                await observation.fail(error)

    return wrapped


def _wrap_stream(
    method: str, behaviour: Callable[..., AsyncIterator[Any]], *, routine: bool
) -> Callable[..., AsyncIterator[Any]]:
    async def wrapped(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        with _Observation(method, context, routine=routine) as observation:
            try:
                async for response in behaviour(request, context):
                    yield response
            except grpc.aio.AbortError:
                raise
            except Exception as error:  # noqa: BLE001 - every failure must become a status
                await observation.fail(error)

    return wrapped
