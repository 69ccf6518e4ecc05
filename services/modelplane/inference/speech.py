"""Speech: transcription (an upload decoded here, sent to the model in chunks cut at pauses, the
segments joined with their times) and synthesis (the model's sentences encoded here as they come).

The models in Triton take and give raw samples; what clients send and want (MP3, WebM, Opus, ...)
is this module's and audio.py's business, so a production Triton runs the same model entries.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import numpy as np

from modelplane.inference import audio
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest, UnknownVoice
from modelplane.inference.triton import TritonInferer

# OpenAI's voice names, which Dify and OpenAI's clients send; each speaks with the model's default
# voice (Dify's default is alloy).
OPENAI_VOICES = frozenset(
    {"alloy", "ash", "ballad", "coral", "echo", "fable", "nova", "onyx", "sage", "shimmer", "verse"}
)
MIN_SPEED, MAX_SPEED = 0.25, 4.0
# Of the previous chunk's transcript, this many characters prompt the next chunk, as Whisper
# conditions each 30 s window on the text before it.
_PROMPT_CARRY_CHARS = 200


@dataclass(frozen=True)
class Segment:
    id: int
    start: float
    end: float
    text: str
    avg_logprob: float = 0.0
    no_speech_prob: float = 0.0
    compression_ratio: float = 0.0
    temperature: float = 0.0


@dataclass(frozen=True)
class Transcript:
    model: str
    text: str
    language: str
    duration: float
    segments: list[Segment] = field(default_factory=list)


@dataclass(frozen=True)
class SpeechPiece:
    """The next bytes of the encoded audio; the first piece names the media type."""

    audio: bytes
    media_type: str = ""
    seconds: float = 0.0


def _language(serving: ServingModel, language: str) -> str:
    code = language.strip().lower()
    known = serving.profile.speech.languages if serving.profile.speech else []
    if code and known and code not in known:
        raise InvalidRequest(
            f"Language '{language}' is not one model '{serving.name}' knows; give an ISO 639-1 code such as "
            f"{', '.join(known[:8])} (it knows {len(known)}), or leave `language` out to have it detected.",
            metadata={"model": serving.name},
        )
    return code


async def transcribe(
    triton: TritonInferer,
    serving: ServingModel,
    data: bytes,
    *,
    filename: str,
    language: str,
    prompt: str,
    temperature: float | None,
    max_seconds: float,
    chunk_seconds: float,
    request_id: str = "",
    timeout_seconds: float | None = None,
) -> Transcript:
    if temperature is not None and not 0.0 <= temperature <= 1.0:
        raise InvalidRequest(f"temperature {temperature} is outside [0, 1].", metadata={"model": serving.name})
    code = _language(serving, language)
    rate = serving.profile.speech.sample_rate_hz if serving.profile.speech else 16000
    decoded = await asyncio.to_thread(audio.decode, data, sample_rate=rate, max_seconds=max_seconds, filename=filename)
    segments: list[Segment] = []
    carried = prompt
    for offset, samples in audio.split_at_pauses(decoded.samples, rate, chunk_seconds):
        arrays = {
            "audio": samples,
            "language": np.array([code.encode()], dtype=np.object_),
            "initial_prompt": np.array([carried.encode()], dtype=np.object_),
            "temperature": np.array([temperature or 0.0], dtype=np.float32),
        }
        output = await triton.infer(
            serving.profile.triton_model_name,
            arrays,
            "transcript",
            request_id=request_id,
            timeout_seconds=timeout_seconds,
        )
        result = json.loads(output.reshape(-1)[0])
        # Every chunk after the first is heard in the language of the first, as one recording is.
        code = code or result.get("language", "")
        start, length = offset / rate, samples.size / rate
        for item in result["segments"]:
            segments.append(
                Segment(
                    id=len(segments),
                    start=round(start + item["start"], 3),
                    # Whisper ends a window's last segment on its 20 ms grid, past the audio's end.
                    end=round(start + min(item["end"], length), 3),
                    text=item["text"],
                    avg_logprob=item["avg_logprob"],
                    no_speech_prob=item["no_speech_prob"],
                    compression_ratio=item["compression_ratio"],
                    temperature=item["temperature"],
                )
            )
        tail = "".join(item["text"] for item in result["segments"]).strip()
        carried = tail[-_PROMPT_CARRY_CHARS:] if tail else carried
    text = "".join(s.text for s in segments).strip()
    return Transcript(serving.name, text, code, round(decoded.seconds, 3), segments)


def resolve_voice(serving: ServingModel, voice: str) -> str:
    """The model's voice a request's `voice` names: its own, or its default for OpenAI's names."""
    speech = serving.profile.speech
    voices = speech.voices if speech else []
    default = (speech.default_voice if speech else "") or (voices[0] if voices else "")
    if not voice or voice in voices:
        return voice or default
    if voice.lower() in OPENAI_VOICES:
        return default
    lowered = {v.lower(): v for v in voices}
    if voice.lower() in lowered:
        return lowered[voice.lower()]
    raise UnknownVoice(
        f"Voice '{voice}' is not one of model '{serving.name}''s voices ({', '.join(voices) or 'none named'}). "
        f"Use one of those, or one of OpenAI's voice names ({', '.join(sorted(OPENAI_VOICES))}), which speak with "
        f"'{default}'.",
        metadata={"model": serving.name},
    )


async def synthesize(
    triton: TritonInferer,
    serving: ServingModel,
    text: str,
    *,
    voice: str,
    audio_format: audio.AudioFormat,
    speed: float | None,
    max_chars: int,
    request_id: str = "",
) -> AsyncIterator[SpeechPiece]:
    """Streams the encoded speech: each sentence is encoded and sent as soon as the model gives it."""
    if not text.strip():
        raise InvalidRequest("`input` is empty; send the text to speak.", metadata={"model": serving.name})
    if len(text) > max_chars:
        raise InvalidRequest(
            f"`input` has {len(text)} characters; at most {max_chars} are spoken per request. Split the text (in "
            "Dify, lower the model's word limit).",
            metadata={"model": serving.name},
        )
    rate = speed if speed is not None else 1.0
    if not MIN_SPEED <= rate <= MAX_SPEED:
        raise InvalidRequest(
            f"speed {rate:g} is outside [{MIN_SPEED:g}, {MAX_SPEED:g}]; 1 is the voice's own rate.",
            metadata={"model": serving.name},
        )
    speaker = resolve_voice(serving, voice)
    speech = serving.profile.speech
    voices = speech.voices if speech else []
    sample_rate = speech.sample_rate_hz if speech and speech.sample_rate_hz else 22050
    encoder = audio.SpeechEncoder(audio_format, sample_rate)
    # A single-speaker voice takes no speaker: its one voice's name is only what requests call it.
    sentences = triton.synthesize(
        serving.profile.triton_model_name,
        text,
        speaker=speaker if len(voices) > 1 else "",
        speed=rate,
        request_id=request_id,
    )
    spoken = 0
    first = True
    try:
        async for samples, _ in sentences:
            spoken += samples.size
            data = encoder.encode(samples)
            if data or first:
                yield SpeechPiece(data, encoder.media_type if first else "", spoken / sample_rate)
                first = False
    finally:
        await sentences.aclose()
    yield SpeechPiece(encoder.finish(), encoder.media_type if first else "", spoken / sample_rate)
