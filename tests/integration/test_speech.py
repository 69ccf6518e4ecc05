"""Voice through the running stack, with the real bundled models (Whisper base on faster-whisper,
Piper's en_US joe voice): text → /audio/speech → /audio/transcriptions → the text again; OpenAI's
client and Dify's provider classes; and every bad input refused with an error that says what to do,
while the same processes keep serving."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest

from modelplane.common.channels import open_channel
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.integration.conftest import RunningStack
from tests.integration.test_dify import _credentials, _dify
from tests.reliability.conftest import service_processes

STT = "whisper-base"
TTS = "piper-en-us-joe"
SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "We will meet at the library at seven o'clock tomorrow morning.",
]
TEXT = " ".join(SENTENCES)


def words(text: str) -> list[str]:
    text = text.lower().replace("7", "seven").replace("o'clock", "oclock").replace("o’clock", "oclock")
    return re.findall(r"[a-z0-9']+", text)


def word_error_rate(reference: str, hypothesis: str) -> float:
    """Word-level Levenshtein distance over the reference's length."""
    ref, hyp = words(reference), words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, start=1):
        previous, row[0] = row[0], i
        for j, h in enumerate(hyp, start=1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (r != h))
    return row[len(hyp)] / max(1, len(ref))


@pytest.fixture(scope="module")
def http(stack: RunningStack) -> httpx.Client:
    with httpx.Client(base_url=stack.gateway_url, timeout=300) as client:
        yield client


@pytest.fixture(scope="module")
def spoken(http: httpx.Client) -> dict[str, bytes]:
    """TEXT spoken as MP3 (the default) and WAV."""
    files = {}
    for audio_format in ("mp3", "wav"):
        body = {"model": TTS, "input": TEXT, "voice": "alloy"}
        if audio_format != "mp3":
            body["response_format"] = audio_format
        response = http.post("/v1/audio/speech", json=body)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"] == {"mp3": "audio/mpeg", "wav": "audio/wav"}[audio_format]
        files[audio_format] = response.content
    return files


def _duration(data: bytes) -> float:
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        return sum(frame.samples for frame in container.decode(stream)) / stream.rate


@pytest.mark.parametrize("audio_format", ["mp3", "wav"])
def test_speech_transcribed_back_to_the_text(http: httpx.Client, spoken: dict[str, bytes], audio_format: str) -> None:
    data = spoken[audio_format]
    assert _duration(data) > 6  # three sentences, spoken
    response = http.post(
        "/v1/audio/transcriptions",
        data={"model": STT, "language": "en"},
        files={"file": (f"speech.{audio_format}", data, f"audio/{audio_format}")},
    )
    assert response.status_code == 200, response.text
    text = response.json()["text"]
    assert word_error_rate(TEXT, text) <= 0.2, text


async def test_speech_streams_one_piece_per_sentence(stack: RunningStack) -> None:
    """The inference service sends each sentence's audio as the model gives it, before the next."""
    async with open_channel(stack.inference) as channel:
        stub = pb_grpc.InferenceServiceStub(channel)
        request = pb.SynthesizeRequest(model=TTS, input=TEXT, format=pb.AUDIO_FORMAT_WAV)
        received = [piece async for piece in stub.Synthesize(request, timeout=300)]
    assert received[0].media_type == "audio/wav"
    spoken_so_far = [piece.seconds for piece in received if piece.audio]
    # One piece per sentence (and the header with the first): the stream grows as it is spoken.
    assert len(spoken_so_far) >= len(SENTENCES), spoken_so_far
    assert spoken_so_far == sorted(spoken_so_far) and spoken_so_far[0] < spoken_so_far[-1]


def test_transcription_formats(http: httpx.Client, spoken: dict[str, bytes]) -> None:
    files = {"file": ("speech.mp3", spoken["mp3"], "audio/mpeg")}
    verbose = http.post("/v1/audio/transcriptions", data={"model": STT, "response_format": "verbose_json"}, files=files)
    assert verbose.status_code == 200, verbose.text
    body = verbose.json()
    assert body["language"] == "en" and body["duration"] == pytest.approx(_duration(spoken["mp3"]), abs=0.2)
    assert body["segments"] and all(s["start"] < s["end"] for s in body["segments"])
    assert "".join(s["text"] for s in body["segments"]).strip() == body["text"]

    srt = http.post("/v1/audio/transcriptions", data={"model": STT, "response_format": "srt"}, files=files)
    assert srt.status_code == 200 and srt.headers["content-type"].startswith("text/plain")
    assert re.match(r"1\n00:00:00,\d{3} --> 00:00:\d\d,\d{3}\n\S", srt.text), srt.text
    vtt = http.post("/v1/audio/transcriptions", data={"model": STT, "response_format": "vtt"}, files=files)
    assert vtt.text.startswith("WEBVTT\n\n00:00:00.") and " --> " in vtt.text
    text = http.post("/v1/audio/transcriptions", data={"model": STT, "response_format": "text"}, files=files)
    assert text.text.strip() == body["text"]


@pytest.mark.parametrize("audio_format", ["opus", "flac", "pcm"])
def test_other_speech_formats(http: httpx.Client, audio_format: str) -> None:
    response = http.post(
        "/audio/speech", json={"model": TTS, "input": "Hello there.", "response_format": audio_format, "speed": 1.5}
    )
    assert response.status_code == 200, response.text
    if audio_format == "pcm":
        assert len(response.content) % 2 == 0 and len(response.content) > 24000 * 2 * 0.3
    else:
        assert _duration(response.content) > 0.3


def test_speed_changes_the_length(http: httpx.Client) -> None:
    def seconds(speed: float) -> float:
        body = {"model": TTS, "input": SENTENCES[0], "response_format": "wav", "speed": speed}
        return _duration(http.post("/v1/audio/speech", json=body).content)

    assert seconds(2.0) < 0.7 * seconds(1.0)


def test_openai_client(stack: RunningStack, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0)
    target = tmp_path / "speech.mp3"
    with client.audio.speech.with_streaming_response.create(model=TTS, voice="nova", input=SENTENCES[0]) as response:
        response.stream_to_file(target)
    with target.open("rb") as recording:
        transcript = client.audio.transcriptions.create(model=STT, file=recording)
    assert word_error_rate(SENTENCES[0], transcript.text) <= 0.2, transcript.text


def test_dify_speech_to_text_validates_and_transcribes(
    stack: RunningStack, dify_python: Path, spoken: dict[str, bytes], tmp_path: Path
) -> None:
    recording = tmp_path / "recording.mp3"
    recording.write_bytes(spoken["mp3"])
    outcome = _dify(
        dify_python,
        {
            "model_type": "speech2text",
            "model": STT,
            "credentials": _credentials(f"{stack.gateway_url}/v1"),
            "audio_file": str(recording),
        },
    )
    assert outcome["stage"] == "done", outcome
    assert word_error_rate(TEXT, outcome["result"]["text"]) <= 0.2, outcome


def test_dify_tts_validates_with_alloy_and_reads_aloud(stack: RunningStack, dify_python: Path, tmp_path: Path) -> None:
    output = tmp_path / "read-aloud.mp3"
    outcome = _dify(
        dify_python,
        {
            "model_type": "tts",
            "model": TTS,
            "credentials": _credentials(f"{stack.gateway_url}/v1"),  # voices unset: Dify uses alloy
            "text": TEXT,
            "voice": "alloy",
            "output_file": str(output),
        },
    )
    assert outcome["stage"] == "done", outcome
    # Dify speaks sentence by sentence, one request each, and plays the MP3s one after the other.
    assert _duration(output.read_bytes()) > 6


def _silent_flac(seconds: float) -> bytes:
    sink = io.BytesIO()
    with av.open(sink, mode="w", format="flac") as output:
        stream = output.add_stream("flac", rate=8000, layout="mono")
        block = np.zeros((1, 8000 * 60), dtype=np.int16)
        for _ in range(int(seconds // 60) + 1):
            frame = av.AudioFrame.from_ndarray(block, format="s16", layout="mono")
            frame.sample_rate = 8000
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return sink.getvalue()


def _ffmpeg_mp3(wav: bytes) -> bytes:
    """The recording re-encoded as FFmpeg writes an MP3: with an Info frame that states its length."""
    sink = io.BytesIO()
    with av.open(io.BytesIO(wav)) as source, av.open(sink, mode="w", format="mp3") as output:
        stream = output.add_stream("libmp3lame", rate=source.streams.audio[0].rate, layout="mono")
        for frame in source.decode(source.streams.audio[0]):
            frame.pts = None
            for packet in stream.encode(frame):
                output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return sink.getvalue()


def test_bad_input_is_refused_with_what_to_do(
    stack: RunningStack, http: httpx.Client, spoken: dict[str, bytes]
) -> None:
    before = {role: process.pid for role, process in service_processes(stack).items()}
    mp3 = _ffmpeg_mp3(spoken["wav"])

    def transcribe(name: str, data: bytes, **fields: str) -> httpx.Response:
        return http.post("/v1/audio/transcriptions", data={"model": STT, **fields}, files={"file": (name, data)})

    def speak(**body: object) -> httpx.Response:
        return http.post("/v1/audio/speech", json={"model": TTS, "input": "Hello.", **body})

    cases = {
        "empty file": (transcribe("empty.mp3", b""), 400, "'empty.mp3' is empty"),
        "not audio": (
            transcribe("notes.txt", b"These are my notes, not a recording. " * 40),
            400,
            "could not be decoded",
        ),
        "truncated mp3": (transcribe("cut.mp3", mp3[: len(mp3) // 2]), 400, "'cut.mp3' is cut short"),
        "too long": (transcribe("long.flac", _silent_flac(31 * 60)), 400, "at most 1800 s"),
        "unknown language": (transcribe("speech.mp3", spoken["mp3"], language="xx"), 400, "ISO 639-1"),
        "transcription format": (transcribe("speech.mp3", spoken["mp3"], response_format="xml"), 400, "not offered"),
        "unknown voice": (speak(voice="darth"), 400, "not one of model 'piper-en-us-joe''s voices (joe)"),
        "empty input": (speak(input=" "), 400, "`input` is empty"),
        "speech format": (speak(response_format="aac"), 400, "not offered; use one of mp3, wav, opus, flac, pcm"),
        "speed": (speak(speed=9), 400, "outside [0.25, 4]"),
        "wrong task": (speak(model=STT), 400, "serves speech2text, not tts"),
    }
    for case, (response, status, words_of_message) in cases.items():
        assert response.status_code == status, (case, response.text)
        error = response.json()["error"]
        assert words_of_message in error["message"], (case, error)
        assert error["type"] == "invalid_request_error"
    after = {role: process.pid for role, process in service_processes(stack).items()}
    assert after == before
    # And the models serve on.
    assert speak().status_code == 200


async def test_speech_models_count_in_the_budget_and_load_on_demand_after_an_unload(
    stack: RunningStack, http: httpx.Client
) -> None:
    """Speech models live the life of every model: measured footprints in the budget, unloaded to
    STAGED, and loaded again (from the cache, nothing fetched) by the next request for them."""
    from modelplane.common.types import ModelState
    from modelplane.loader.client import LoaderClient
    from modelplane.registry.client import RegistryClient

    async with RegistryClient(stack.registry) as registry:
        for name in (STT, TTS):
            model = await registry.get_model(name)
            assert model.state == ModelState.READY
            assert model.status.footprint_bytes > 50 * 2**20, (name, model.status.footprint_bytes)
        # An unload returns once the backend process has exited; on a busy 2-core machine (load
        # average 10) that took longer than the client's default 30 s in one run of three.
        async with LoaderClient(stack.loader, timeout_seconds=120) as loader:
            unloaded = await loader.unload(TTS, reason="test")
        assert unloaded.state == ModelState.STAGED
        response = await asyncio.to_thread(
            http.post, "/v1/audio/speech", json={"model": TTS, "input": "Back again.", "response_format": "wav"}
        )
        assert response.status_code == 200 and _duration(response.content) > 0.3
        assert (await registry.get_model(TTS)).state == ModelState.READY
