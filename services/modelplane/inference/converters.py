"""Protobuf ⇄ domain conversion for the inference service's messages."""

from __future__ import annotations

import numpy as np

from modelplane.common.types import Usage
from modelplane.common.v1 import usage_pb2
from modelplane.inference.audio import AudioFormat
from modelplane.inference.errors import InvalidRequest
from modelplane.inference.generation import ChatMessage, GenerationChunk, SamplingParameters
from modelplane.inference.handlers import EmbedInput, EmbedResult
from modelplane.inference.rerank import RerankResult
from modelplane.inference.speech import SpeechPiece, Transcript
from modelplane.inference.structured import ResponseFormat, ResponseFormatType
from modelplane.inference.tool_calls import Tool, ToolCall, ToolChoice, ToolChoiceMode
from modelplane.inference.v1 import inference_service_pb2 as pb


def embed_inputs_from_proto(request: pb.EmbedRequest) -> list[EmbedInput]:
    return [
        EmbedInput(token_ids=tuple(item.token_ids.ids))
        if item.WhichOneof("content") == "token_ids"
        else EmbedInput(text=item.text)
        for item in request.inputs
    ]


def usage_to_proto(usage: Usage) -> usage_pb2.Usage:
    return usage_pb2.Usage(
        prompt_tokens=usage.prompt_tokens, completion_tokens=usage.completion_tokens, total_tokens=usage.total_tokens
    )


def embed_result_to_proto(
    result: EmbedResult, encoding: pb.VectorEncoding.ValueType = pb.VECTOR_ENCODING_UNSPECIFIED
) -> pb.EmbedResponse:
    packed = encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32
    return pb.EmbedResponse(
        model=result.model,
        embeddings=[
            pb.Embedding(index=e.index, num_tokens=e.num_tokens, truncated=e.truncated, packed_values=_packed(e.values))
            if packed
            else pb.Embedding(index=e.index, values=e.values.tolist(), num_tokens=e.num_tokens, truncated=e.truncated)
            for e in result.embeddings
        ],
        usage=usage_to_proto(result.usage),
    )


def _packed(values: np.ndarray) -> bytes:
    return values.astype("<f4", copy=False).tobytes()


def rerank_result_to_proto(result: RerankResult) -> pb.RerankResponse:
    return pb.RerankResponse(
        model=result.model,
        results=[
            pb.RerankResult(index=r.index, relevance_score=r.relevance_score, document=r.document or "")
            for r in result.results
        ],
        usage=usage_to_proto(result.usage),
    )


def sampling_from_proto(parameters: pb.SamplingParameters) -> SamplingParameters:
    def optional(name: str) -> float | int | None:
        return getattr(parameters, name) if parameters.HasField(name) else None

    return SamplingParameters(
        max_tokens=optional("max_tokens"),  # type: ignore[arg-type]
        temperature=optional("temperature"),
        top_p=optional("top_p"),
        top_k=optional("top_k"),  # type: ignore[arg-type]
        seed=optional("seed"),  # type: ignore[arg-type]
        stop=tuple(parameters.stop),
        presence_penalty=optional("presence_penalty"),
        frequency_penalty=optional("frequency_penalty"),
        repetition_penalty=optional("repetition_penalty"),
    )


def _tool_call(call: pb.ToolCall) -> ToolCall:
    return ToolCall(id=call.id, name=call.name, arguments_json=call.arguments_json)


def chat_messages_from_proto(request: pb.ChatRequest) -> list[ChatMessage]:
    return [
        ChatMessage(
            role=m.role,
            content=m.content,
            name=m.name,
            tool_calls=tuple(_tool_call(c) for c in m.tool_calls),
            tool_call_id=m.tool_call_id,
        )
        for m in request.messages
    ]


def tools_from_proto(request: pb.ChatRequest) -> list[Tool]:
    return [Tool(name=t.name, description=t.description, parameters_json=t.parameters_json) for t in request.tools]


def tool_choice_from_proto(request: pb.ChatRequest) -> ToolChoice:
    return ToolChoice(mode=ToolChoiceMode(request.tool_choice.mode), function_name=request.tool_choice.function_name)


def response_format_from_proto(response_format: pb.ResponseFormat) -> ResponseFormat:
    return ResponseFormat(
        type=ResponseFormatType(response_format.type),
        schema_json=response_format.schema_json,
        name=response_format.name,
    )


def generate_chunk_to_proto(chunk: GenerationChunk) -> pb.GenerateResponse:
    usage = usage_to_proto(chunk.usage) if chunk.usage is not None else None
    return pb.GenerateResponse(text=chunk.text, finish_reason=int(chunk.finish_reason), usage=usage)


def chat_chunk_to_proto(chunk: GenerationChunk) -> pb.ChatResponse:
    usage = usage_to_proto(chunk.usage) if chunk.usage is not None else None
    return pb.ChatResponse(
        text=chunk.text,
        finish_reason=int(chunk.finish_reason),
        usage=usage,
        tool_calls=[pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments_json) for c in chunk.tool_calls],
        reasoning_text=chunk.reasoning,
    )


def transcript_to_proto(result: Transcript) -> pb.TranscribeResponse:
    return pb.TranscribeResponse(
        model=result.model,
        text=result.text,
        language=result.language,
        duration_seconds=result.duration,
        segments=[
            pb.TranscriptionSegment(
                id=s.id,
                start_seconds=s.start,
                end_seconds=s.end,
                text=s.text,
                avg_logprob=s.avg_logprob,
                no_speech_prob=s.no_speech_prob,
                compression_ratio=s.compression_ratio,
                temperature=s.temperature,
            )
            for s in result.segments
        ],
    )


def speech_piece_to_proto(piece: SpeechPiece) -> pb.SynthesizeResponse:
    return pb.SynthesizeResponse(audio=piece.audio, media_type=piece.media_type, seconds=piece.seconds)


def audio_format_from_proto(value: int) -> AudioFormat:
    try:
        return AudioFormat(value)
    except ValueError:
        offered = ", ".join(f.name for f in AudioFormat if f != AudioFormat.UNSPECIFIED)
        raise InvalidRequest(f"Audio format {value} is not one this service encodes; use {offered}.") from None
