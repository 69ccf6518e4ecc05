"""Imported at start-up by every Python process of a stack that `benchmarks/suite/hops.py` starts
(this folder leads its PYTHONPATH); it does nothing unless MODELPLANE_HOP_TRACE names a folder.

In the gateway and the inference service it wraps the functions a one-text embedding passes
through so that each notes `time.perf_counter()` (CLOCK_MONOTONIC: one clock for every process
on the machine) as the request passes, and writes the marks to MODELPLANE_HOP_TRACE/<service>
every second. Measurement only: nothing of this is part of modelplane. A function it cannot find
(the code moved) is written to MODELPLANE_HOP_TRACE/<service>.error, and hops.py stops on it.
"""

from __future__ import annotations

import os
import sys
import threading
import time

_FOLDER = os.environ.get("MODELPLANE_HOP_TRACE")
_COMMAND = " ".join(sys.argv)
_SERVICE = next((name for name in ("gateway", "inference") if f"serve {name}" in _COMMAND), None)
_marks: list[tuple[str, float]] = []


def _mark(name: str) -> None:
    _marks.append((name, time.perf_counter()))


def _around(owner: object, name: str, label: str) -> None:
    """Marks `<label>>` on entering `owner.name` (a coroutine function or a plain one) and
    `<label><` on leaving it."""
    import inspect  # noqa: PLC0415

    function = getattr(owner, name)
    if inspect.iscoroutinefunction(function):

        async def wrapped(*args: object, **kwargs: object) -> object:
            _mark(label + ">")
            try:
                return await function(*args, **kwargs)
            finally:
                _mark(label + "<")
    else:

        def wrapped(*args: object, **kwargs: object) -> object:  # type: ignore[misc]
            _mark(label + ">")
            try:
                return function(*args, **kwargs)
            finally:
                _mark(label + "<")

    setattr(owner, name, wrapped)


def _gateway() -> None:
    from modelplane.gateway import call_streams, direct  # noqa: PLC0415

    routes = direct.DirectRoutes.__call__

    async def served(self, scope, receive, send):
        async def sending(message):
            if message.get("type") == "http.response.body":
                _mark("gateway: response written")
            await send(message)

        _mark("gateway: request read by uvicorn and the middlewares")
        await routes(self, scope, receive, sending)

    direct.DirectRoutes.__call__ = served
    stream = call_streams._CallStream
    opened = stream.__init__

    class Call:  # the stream call's write and read, marked
        def __init__(self, call) -> None:
            self.call = call

        async def write(self, message):
            _mark("gateway: stream message written")
            return await self.call.write(message)

        async def read(self):
            answer = await self.call.read()
            _mark("gateway: stream answer read")
            return answer

        def __getattr__(self, name: str) -> object:
            return getattr(self.call, name)

    def opening(self, *args, **kwargs) -> None:
        opened(self, *args, **kwargs)
        self._call = Call(self._call)

    stream.__init__ = opening


def _inference() -> None:
    from modelplane.common import interceptors  # noqa: PLC0415
    from modelplane.inference import call_stream, handlers, routing, servicer, tokenization, triton  # noqa: PLC0415

    take = call_stream._Stream._take

    def taking(self, message):
        _mark("inference: stream message read")
        return take(self, message)

    call_stream._Stream._take = taking
    serve = call_stream.CallStreams.serve

    async def serving(self, requests):
        async for answer in serve(self, requests):
            _mark("inference: answer handed to the stream")
            yield answer

    call_stream.CallStreams.serve = serving
    _around(interceptors.CallObservation, "__enter__", "inference: call observed (request id, metrics)")
    _around(interceptors.CallObservation, "__exit__", "inference: call's log line and metrics")
    _around(servicer.InferenceServicer, "_embed", "inference: embed")
    _around(handlers.InferenceHandler, "_serving", "inference: model looked up")
    _around(tokenization.EncoderTokenizer, "encode_texts", "inference: tokenised")
    _around(handlers.InferenceHandler, "_run_encoder", "inference: encoder call")
    _around(routing.Router, "call", "inference: routed")
    _around(triton.TritonInferer, "infer", "inference: Triton call")


def _install() -> None:
    time.sleep(2.0)  # the service has imported its modules by now; requests come much later
    try:
        _gateway() if _SERVICE == "gateway" else _inference()
    except Exception as error:  # noqa: BLE001 - hops.py reports it
        with open(os.path.join(_FOLDER, f"{_SERVICE}.error"), "w") as out:
            out.write(repr(error))
        return
    while True:
        time.sleep(1.0)
        with open(os.path.join(_FOLDER, f"{_SERVICE}.tmp"), "w") as out:
            out.writelines(f"{name}\t{at:.7f}\n" for name, at in list(_marks))
        os.replace(os.path.join(_FOLDER, f"{_SERVICE}.tmp"), os.path.join(_FOLDER, _SERVICE))


if _FOLDER and _SERVICE:
    threading.Thread(target=_install, name="hop-trace", daemon=True).start()
