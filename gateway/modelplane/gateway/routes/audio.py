"""POST /v1/audio/transcriptions and POST /v1/audio/speech, as OpenAI's clients and Dify's
OpenAI-API-compatible provider call them.

Transcription takes OpenAI's multipart form; the inference service decodes the file (any container
FFmpeg reads) and transcribes it, in chunks when it is long; this route writes the answer in the
`response_format` asked for (json, text, verbose_json, srt, vtt). Speech streams the audio the
inference service encodes, sentence by sentence, so a player starts before the text is spoken.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator
from typing import Any

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.datastructures import UploadFile

from modelplane.common.errors import ModelplaneError
from modelplane.gateway import errors, schemas
from modelplane.gateway.backends import backends
from modelplane.inference.v1 import inference_service_pb2 as inference_pb

router = APIRouter()
log = structlog.get_logger()

TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
SPEECH_FORMATS = {
    "mp3": inference_pb.AUDIO_FORMAT_MP3,
    "wav": inference_pb.AUDIO_FORMAT_WAV,
    "opus": inference_pb.AUDIO_FORMAT_OPUS,
    "flac": inference_pb.AUDIO_FORMAT_FLAC,
    "pcm": inference_pb.AUDIO_FORMAT_PCM,
}
_AUDIO_TYPES = ("audio/mpeg", "audio/wav", "audio/ogg", "audio/flac", "audio/pcm")
_FORM_FIELDS = ("model", "language", "prompt", "response_format", "temperature")

_TRANSCRIPTION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file", "model"],
                    "properties": {
                        "file": {"type": "string", "format": "binary", "description": "The recording."},
                        "model": {"type": "string", "description": "A speech2text model from GET /v1/models."},
                        "language": {"type": "string", "description": "ISO 639-1 code; absent: detected."},
                        "prompt": {"type": "string", "description": "Text the speech continues."},
                        "response_format": {"type": "string", "enum": list(TRANSCRIPTION_FORMATS)},
                        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                }
            }
        },
    }
}


async def _form(request: Request) -> tuple[bytes, str, dict[str, str]]:
    """The uploaded file's bytes and name, and the text fields."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise errors.BadRequest(
            "Send the recording as multipart/form-data with the file in `file` and the model's name in `model` "
            "(as OpenAI's clients and curl -F do).",
            param="file",
        )
    try:
        form = await request.form(max_files=1, max_fields=32)
    except errors.BodyTooLarge:
        raise
    except Exception as error:  # noqa: BLE001 - python-multipart's parse errors have no common base
        raise errors.BadRequest(f"The multipart body could not be read ({error}).", param="file") from None
    try:
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise errors.BadRequest("The form has no `file`; attach the recording as `file`.", param="file")
        fields = {}
        for name in _FORM_FIELDS:
            value = form.get(name)
            if value is not None and not isinstance(value, str):
                raise errors.BadRequest(f"`{name}` must be a text field, not a file.", param=name)
            fields[name] = value or ""
        return await upload.read(), upload.filename or "", fields
    finally:
        await form.close()


def _temperature(text: str) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:
        raise errors.BadRequest(f"temperature '{text}' is not a number in [0, 1].", param="temperature")
    return value


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _subtitles(segments: Any, vtt: bool) -> str:
    cues = []
    for index, segment in enumerate(segments, start=1):
        times = (
            f"{_timestamp(segment.start_seconds, '.' if vtt else ',')} --> "
            f"{_timestamp(segment.end_seconds, '.' if vtt else ',')}"
        )
        cues.append(f"{times}\n{segment.text.strip()}\n" if vtt else f"{index}\n{times}\n{segment.text.strip()}\n")
    return ("WEBVTT\n\n" if vtt else "") + "\n".join(cues)


@router.post(
    "/audio/transcriptions",
    response_model=schemas.TranscriptionResponse,
    response_model_exclude_none=True,
    openapi_extra=_TRANSCRIPTION_BODY,
    responses={
        200: {"content": {"text/plain": {}}, "description": "JSON, or text for text, srt and vtt."},
        **schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503),
    },
)
async def create_transcription(request: Request) -> Any:
    """Transcribes a recording in any container FFmpeg reads (MP3, WAV, WebM/Opus, M4A, OGG, FLAC)."""
    data, filename, fields = await _form(request)
    model = fields["model"]
    if not model:
        raise errors.BadRequest("The form has no `model`; name a speech2text model from GET /v1/models.", param="model")
    structlog.contextvars.bind_contextvars(model=model)
    response_format = fields["response_format"] or "json"
    if response_format not in TRANSCRIPTION_FORMATS:
        raise errors.BadRequest(
            f"response_format '{response_format}' is not offered; use one of {', '.join(TRANSCRIPTION_FORMATS)}.",
            param="response_format",
        )
    message = inference_pb.TranscribeRequest(
        model=model,
        audio=data,
        filename=filename,
        language=fields["language"],
        prompt=fields["prompt"],
        temperature=_temperature(fields["temperature"]),
    )
    client = backends(request)
    result = await client.unary("inference", client.inference.Transcribe, message)
    if response_format == "text":
        return PlainTextResponse(result.text + "\n")
    if response_format in ("srt", "vtt"):
        return PlainTextResponse(_subtitles(result.segments, response_format == "vtt"))
    if response_format == "json":
        return JSONResponse({"text": result.text})
    return schemas.TranscriptionResponse(
        text=result.text,
        task="transcribe",
        language=result.language,
        duration=result.duration_seconds,
        segments=[
            schemas.TranscriptionSegment(
                id=s.id,
                seek=round(s.start_seconds * 100),
                start=s.start_seconds,
                end=s.end_seconds,
                text=s.text,
                tokens=[],
                temperature=s.temperature,
                avg_logprob=s.avg_logprob,
                compression_ratio=s.compression_ratio,
                no_speech_prob=s.no_speech_prob,
            )
            for s in result.segments
        ],
    )


@router.post(
    "/audio/speech",
    response_class=StreamingResponse,
    responses={
        200: {"content": {media: {} for media in _AUDIO_TYPES}, "description": "The audio, streamed."},
        **schemas.error_responses(*schemas.COMMON_ERRORS, 400, 403, 404, 409, 503),
    },
)
async def create_speech(body: schemas.SpeechRequest, request: Request) -> Any:
    """Speaks the text; the audio streams out sentence by sentence as it is synthesized."""
    structlog.contextvars.bind_contextvars(model=body.model)
    audio_format = SPEECH_FORMATS.get(body.response_format.lower())
    if audio_format is None:
        raise errors.BadRequest(
            f"response_format '{body.response_format}' is not offered; use one of {', '.join(SPEECH_FORMATS)}.",
            param="response_format",
        )
    if body.stream_format not in (None, "audio"):
        raise errors.BadRequest(
            f"stream_format '{body.stream_format}' is not offered; the audio itself is streamed (`audio`).",
            param="stream_format",
        )
    client = backends(request)
    message = inference_pb.SynthesizeRequest(
        model=body.model, input=body.input, voice=body.voice, format=audio_format, speed=body.speed
    )
    pieces = client.stream("inference", client.inference.Synthesize, message)
    # Errors found before the first sentence (unknown voice, empty input, a model that is not
    # there) are ordinary HTTP errors; once audio has started, a failure can only end the stream.
    try:
        first = await anext(pieces)
    except StopAsyncIteration:
        raise ModelplaneError("The inference service ended the speech without audio.") from None
    return StreamingResponse(
        _audio(first, pieces),
        media_type=first.media_type or "application/octet-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _audio(first: Any, pieces: AsyncIterator[Any]) -> AsyncIterator[bytes]:
    try:
        if first.audio:
            yield first.audio
        async for piece in pieces:
            if piece.audio:
                yield piece.audio
    except (ModelplaneError, errors.GatewayError) as error:
        # The status line has gone; the client sees the audio end early. The log says why.
        log.warning("speech stream ended early", error=str(error))
    finally:
        with contextlib.suppress(RuntimeError, asyncio.CancelledError):
            await pieces.aclose()  # type: ignore[attr-defined]
