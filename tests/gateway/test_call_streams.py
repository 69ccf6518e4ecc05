"""Embed and Rerank calls as messages of one stream (InferenceService.EncodeStream): the gateway's
client (gateway/call_streams.py, through Backends) against the inference service's real servicer
on a real grpc.aio server, whose handler is scripted so that a call can be slow, fail, or watch
its cancellation. The real model behind the stream is exercised in tests/integration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from modelplane.common.errors import DeadlineExceeded, InvalidArgument, ModelplaneError, Unavailable
from modelplane.common.interceptors import ServiceInterceptor
from modelplane.common.request_context import current_request_id
from modelplane.common.types import Usage
from modelplane.gateway.backends import Backends
from modelplane.gateway.call_streams import CallStreams, CallTimedOut, SendUnary
from modelplane.inference.handlers import Embedding, EmbedResult
from modelplane.inference.rerank import RerankedDocument, RerankResult
from modelplane.inference.servicer import InferenceServicer
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc

EMBED_METHOD = "/modelplane.inference.v1.InferenceService/Embed"


def vector_of(text: str) -> np.ndarray:
    return np.random.default_rng(sum(text.encode())).standard_normal(8).astype(np.float32)


class ScriptedHandler:
    """Embeds "slow:<seconds>" after that long, refuses "bad" naming its input, crashes on
    "crash"; remembers each call's request id and the calls that were cancelled."""

    def __init__(self) -> None:
        self.request_ids: list[str] = []
        self.cancelled: list[str] = []
        self.deadlines: list[float | None] = []

    async def embed(
        self, model: str, inputs: list, *, truncation: object, deadline_seconds: float | None
    ) -> EmbedResult:
        self.request_ids.append(current_request_id.get())
        self.deadlines.append(deadline_seconds)
        texts = [item.text for item in inputs]
        for index, text in enumerate(texts):
            if text == "bad":
                raise InvalidArgument(f"Input {index} is bad.", metadata={"model": model, "index": str(index)})
            if text == "crash":
                raise RuntimeError("secret internals")
            if text.startswith("slow:"):
                try:
                    await asyncio.sleep(float(text.split(":")[1]))
                except asyncio.CancelledError:
                    self.cancelled.append(text)
                    raise
        embeddings = [Embedding(i, vector_of(text), len(text), False) for i, text in enumerate(texts)]
        return EmbedResult(model, embeddings, Usage(prompt_tokens=sum(len(text) for text in texts)))

    async def rerank(self, model: str, query: str, documents: list[str], **_: object) -> RerankResult:
        self.request_ids.append(current_request_id.get())
        scores = [len(set(query) & set(document)) / 10 for document in documents]
        order = sorted(range(len(documents)), key=lambda i: -scores[i])
        results = [RerankedDocument(i, scores[i], None) for i in order]
        return RerankResult(model, results, Usage(prompt_tokens=len(query) + sum(map(len, documents))))


class Service:
    """The inference servicer on a real grpc.aio server (port 0), restartable on the same port."""

    def __init__(self, handler: ScriptedHandler) -> None:
        self.handler = handler
        self.port = 0
        self.servicer: InferenceServicer | None = None
        self.server: grpc.aio.Server | None = None

    async def start(self) -> None:
        self.server = grpc.aio.server(interceptors=[ServiceInterceptor()])
        self.servicer = InferenceServicer(self.handler)  # type: ignore[arg-type]
        pb_grpc.add_InferenceServiceServicer_to_server(self.servicer, self.server)
        self.port = self.server.add_insecure_port(f"127.0.0.1:{self.port}")
        await self.server.start()

    async def stop(self) -> None:
        """As the inference service stops: streams drain, then the server stops with a grace."""
        assert self.servicer is not None and self.server is not None
        self.servicer.streams.drain()
        await self.server.stop(5)


@pytest.fixture
async def service() -> AsyncIterator[Service]:
    service = Service(ScriptedHandler())
    await service.start()
    yield service
    assert service.server is not None
    await service.server.stop(0)


@pytest.fixture
async def backends(service: Service) -> AsyncIterator[Backends]:
    address = f"127.0.0.1:{service.port}"
    client = Backends(address, address, 10.0, embed_calls_in_flight=0)
    yield client
    await client.close()


def embed_request(*texts: str) -> pb.EmbedRequest:
    return pb.EmbedRequest(
        model="m", inputs=[pb.EmbedInput(text=t) for t in texts], vector_encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32
    )


def vectors(response: pb.EmbedResponse) -> list[np.ndarray]:
    return [np.frombuffer(e.packed_values, dtype="<f4") for e in response.embeddings]


def requests_counted(code: str) -> float:
    return REGISTRY.get_sample_value("modelplane_grpc_requests_total", {"method": EMBED_METHOD, "code": code}) or 0.0


async def test_calls_on_the_stream_answer_as_unary_calls_do(backends: Backends, service: Service) -> None:
    """Same vectors, token counts and rerank results as the unary RPCs, and each call is counted
    under the unary method's name with its request id, on one stream."""
    inference = backends.inference
    ok_before = requests_counted("OK")
    current_request_id.set("req-stream-1")
    streamed = await backends.unary("inference", inference.Embed, embed_request("one", "two words"))
    unary = await inference.Embed(embed_request("one", "two words"))
    assert [v.tobytes() for v in vectors(streamed)] == [v.tobytes() for v in vectors(unary)]
    assert [e.num_tokens for e in streamed.embeddings] == [3, 9] and streamed.usage.prompt_tokens == 12
    rerank = pb.RerankRequest(model="m", query="abc", documents=["xyz", "abcd", "ab"])
    streamed_rerank = await backends.unary("inference", inference.Rerank, rerank)
    assert streamed_rerank == await inference.Rerank(rerank)
    assert service.handler.request_ids[0] == "req-stream-1" and service.handler.request_ids[2] == "req-stream-1"
    assert requests_counted("OK") - ok_before == 2  # the two unary calls are counted too, on their own RPC
    assert backends._streams is not None and list(backends._streams._streams) == ["m"]


async def test_a_slow_call_does_not_hold_back_the_others(backends: Backends) -> None:
    slow = asyncio.create_task(backends.unary("inference", None, embed_request("slow:1.0")))
    await asyncio.sleep(0.05)
    fast = await asyncio.wait_for(backends.unary("inference", None, embed_request("quick")), 0.8)
    assert not slow.done()
    assert (await slow).embeddings[0].num_tokens == 8
    assert fast.embeddings[0].num_tokens == 5


async def test_a_calls_error_is_its_own_and_the_stream_goes_on(backends: Backends, service: Service) -> None:
    refused_before = requests_counted("INVALID_ARGUMENT")
    with pytest.raises(InvalidArgument) as refused:
        await backends.unary("inference", None, embed_request("fine", "bad"))
    assert refused.value.message == "Input 1 is bad."
    assert refused.value.metadata == {"model": "m", "index": "1"}
    assert requests_counted("INVALID_ARGUMENT") - refused_before == 1
    current_request_id.set("req-crash")
    with pytest.raises(ModelplaneError) as crashed:
        await backends.unary("inference", None, embed_request("crash"))
    assert crashed.value.code == grpc.StatusCode.INTERNAL
    assert crashed.value.message == "Internal error (request id req-crash); the service log has the details."
    assert (await backends.unary("inference", None, embed_request("after"))).embeddings[0].num_tokens == 5


async def test_one_bad_request_in_a_coalesced_call_fails_alone(service: Service) -> None:
    address = f"127.0.0.1:{service.port}"
    client = Backends(address, address, 10.0, embed_calls_in_flight=1)
    try:
        texts = ["slow:0.2", "a", "bad", "b", "c"]
        answers = await asyncio.gather(
            *(client.embed("m", embed_request(t).inputs, size=32, concurrency=1) for t in texts), return_exceptions=True
        )
    finally:
        await client.close()
    assert isinstance(answers[2], InvalidArgument) and answers[2].message == "Input 0 is bad."
    for text, answer in zip(texts, answers, strict=True):
        if text != "bad":
            assert not isinstance(answer, BaseException), answer
            (_, share), *_ = answer
            assert share.prompt_tokens == len(text)
            assert np.frombuffer(share.embeddings[0].packed_values, "<f4").tobytes() == vector_of(text).tobytes()


async def test_the_deadline_stops_the_call_in_the_service(service: Service) -> None:
    address = f"127.0.0.1:{service.port}"
    streams = CallStreams(pb_grpc.InferenceServiceStub(grpc.aio.insecure_channel(address)))
    try:
        # The client's own timeout: it gives up and tells the service, which stops the call.
        message = pb.EncodeStreamRequest(embed=embed_request("slow:5"), timeout_ms=60_000)
        with pytest.raises(CallTimedOut):
            await streams.call("m", message, 0.2)
        # The service's: the message's timeout passes first.
        message = pb.EncodeStreamRequest(embed=embed_request("slow:6"), timeout_ms=200)
        with pytest.raises(DeadlineExceeded) as late:
            await streams.call("m", message, 5.0)
        assert late.value.message == "The call did not finish within its timeout of 200 ms."
        for _ in range(50):
            if len(service.handler.cancelled) == 2:
                break
            await asyncio.sleep(0.02)
        assert service.handler.cancelled == ["slow:5", "slow:6"]
        assert service.handler.deadlines == [60.0, 0.2]
    finally:
        await streams.close()


async def test_a_caller_that_goes_away_cancels_its_call(backends: Backends, service: Service) -> None:
    call = asyncio.create_task(backends.unary("inference", None, embed_request("slow:5")))
    await asyncio.sleep(0.2)
    call.cancel()
    for _ in range(50):
        if service.handler.cancelled:
            break
        await asyncio.sleep(0.02)
    assert service.handler.cancelled == ["slow:5"]
    assert (await backends.unary("inference", None, embed_request("next"))).embeddings[0].num_tokens == 4


async def test_the_gateway_reconnects_after_the_inference_service_restarts(
    backends: Backends, service: Service
) -> None:
    """A call under way when the service stops is answered; after the restart the next call goes
    on a new stream; while the service is down, calls get 503's error, not a hang."""
    await backends.unary("inference", None, embed_request("before"))
    under_way = asyncio.create_task(backends.unary("inference", None, embed_request("slow:0.5")))
    await asyncio.sleep(0.1)
    await service.stop()
    assert (await under_way).embeddings[0].num_tokens == 8
    with pytest.raises(Unavailable) as down:
        await backends.unary("inference", None, embed_request("while down"))
    assert down.value.message.startswith("The inference service is unavailable")
    await service.start()
    for _ in range(40):  # the channel reconnects on its backoff (at most 2 s)
        try:
            answer = await backends.unary("inference", None, embed_request("after"))
            break
        except Unavailable:
            await asyncio.sleep(0.1)
    assert answer.embeddings[0].num_tokens == 5


async def test_an_inference_service_without_streams_gets_unary_calls() -> None:
    class Unary(pb_grpc.InferenceServiceServicer):
        async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
            return pb.EmbedResponse(model="old", embeddings=[pb.Embedding(index=0, num_tokens=1)])

    server = grpc.aio.server()
    pb_grpc.add_InferenceServiceServicer_to_server(Unary(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    client = Backends(f"127.0.0.1:{port}", f"127.0.0.1:{port}", 10.0)
    try:
        # grpc may report a stream refused while the first message was written as its own INTERNAL
        # instead of UNIMPLEMENTED: that call goes unary too, and a later one learns the reason.
        assert client._streams is not None
        for _ in range(10):
            assert (await client.unary("inference", None, embed_request("x"))).model == "old"
            if not client._streams.supported:
                break
        assert not client._streams.supported
        with pytest.raises(SendUnary):
            await client._streams.call("m", pb.EncodeStreamRequest(embed=embed_request("x")), 1.0)
    finally:
        await client.close()
        await server.stop(0)


async def test_streams_of_models_named_once_do_not_pile_up(service: Service) -> None:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    streams = CallStreams(pb_grpc.InferenceServiceStub(channel), max_streams=2)
    try:
        for model in ("a", "b", "a", "c", "d"):
            message = pb.EncodeStreamRequest(embed=embed_request("x"))
            assert (await streams.call(model, message, 5.0)).embed.usage.prompt_tokens == 1
        assert list(streams._streams) == ["c", "d"]
    finally:
        await streams.close()
        await channel.close()
