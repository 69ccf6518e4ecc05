"""The inference service's gRPC edge: convert, call the handler, convert back."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from modelplane.inference import converters
from modelplane.inference.handlers import InferenceHandler, Truncation
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    return context.time_remaining()


class InferenceServicer(pb_grpc.InferenceServiceServicer):
    def __init__(self, handler: InferenceHandler) -> None:
        self.handler = handler

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        result = await self.handler.embed(
            request.model,
            converters.embed_inputs_from_proto(request),
            truncation=Truncation(request.truncation),
            deadline_seconds=_deadline(context),
        )
        return converters.embed_result_to_proto(result, request.vector_encoding)

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        result = await self.handler.rerank(
            request.model,
            request.query,
            list(request.documents),
            top_n=request.top_n if request.HasField("top_n") else None,
            return_documents=request.return_documents,
            truncation=Truncation(request.truncation),
            deadline_seconds=_deadline(context),
        )
        return converters.rerank_result_to_proto(result)

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        # When the client goes away, grpc cancels this coroutine; closing the handler's stream then
        # cancels the request inside Triton.
        chunks = self.handler.generate(
            request.model,
            request.prompt,
            converters.sampling_from_proto(request.parameters),
            response_format=converters.response_format_from_proto(request.response_format),
            deadline_seconds=_deadline(context),
        )
        async for chunk in chunks:
            yield converters.generate_chunk_to_proto(chunk)

    async def Chat(self, request: pb.ChatRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ChatResponse]:
        chunks = self.handler.chat(
            request.model,
            converters.chat_messages_from_proto(request),
            converters.sampling_from_proto(request.parameters),
            tools=converters.tools_from_proto(request),
            tool_choice=converters.tool_choice_from_proto(request),
            response_format=converters.response_format_from_proto(request.response_format),
            deadline_seconds=_deadline(context),
        )
        async for chunk in chunks:
            yield converters.chat_chunk_to_proto(chunk)

    async def Transcribe(
        self, request: pb.TranscribeRequest, context: grpc.aio.ServicerContext
    ) -> pb.TranscribeResponse:
        result = await self.handler.transcribe(
            request.model,
            request.audio,
            filename=request.filename,
            language=request.language,
            prompt=request.prompt,
            temperature=request.temperature if request.HasField("temperature") else None,
            deadline_seconds=_deadline(context),
        )
        return converters.transcript_to_proto(result)

    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        pieces = self.handler.synthesize(
            request.model,
            request.input,
            voice=request.voice,
            audio_format=converters.audio_format_from_proto(request.format),
            speed=request.speed if request.HasField("speed") else None,
            deadline_seconds=_deadline(context),
        )
        async for piece in pieces:
            yield converters.speech_piece_to_proto(piece)
