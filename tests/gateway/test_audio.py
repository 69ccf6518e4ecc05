"""The audio routes as a translator: OpenAI's multipart form and JSON in, the inference service's
answers out in every `response_format`, refusals before any call, and an error before the first
sentence as an ordinary HTTP error. Behind the gateway is a scripted inference service (the real
models run in tests/integration/test_speech.py)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest
from fastapi.testclient import TestClient

from modelplane.gateway.app import create_app
from modelplane.gateway.settings import GatewaySettings
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway.scripted import serving

SEGMENTS = [
    pb.TranscriptionSegment(id=0, start_seconds=0.0, end_seconds=2.5, text=" Hello there."),
    pb.TranscriptionSegment(id=1, start_seconds=2.5, end_seconds=3661.25, text=" Goodbye."),
]


class ScriptedInference(pb_grpc.InferenceServiceServicer):
    def __init__(self) -> None:
        self.requests: list[object] = []
        self.refuse: tuple[grpc.StatusCode, str] | None = None

    def Transcribe(self, request: pb.TranscribeRequest, context: grpc.ServicerContext) -> pb.TranscribeResponse:
        self.requests.append(request)
        if self.refuse:
            context.abort(*self.refuse)
        return pb.TranscribeResponse(
            model=request.model, text="Hello there. Goodbye.", language="en", duration_seconds=3662, segments=SEGMENTS
        )

    def Synthesize(self, request: pb.SynthesizeRequest, context: grpc.ServicerContext) -> Iterator[object]:
        self.requests.append(request)
        if self.refuse:
            context.abort(*self.refuse)
        yield pb.SynthesizeResponse(audio=b"ID3first", media_type="audio/mpeg", seconds=1.0)
        yield pb.SynthesizeResponse(audio=b"second", seconds=2.0)
        yield pb.SynthesizeResponse(audio=b"", seconds=2.0)


@pytest.fixture
def inference() -> Iterator[ScriptedInference]:
    servicer = ScriptedInference()
    with serving(servicer) as address:
        servicer.address = address  # type: ignore[attr-defined]
        yield servicer


@pytest.fixture
def client(inference: ScriptedInference) -> Iterator[TestClient]:
    address = inference.address  # type: ignore[attr-defined]
    with TestClient(create_app(GatewaySettings(inference_address=address, registry_address=address))) as client:
        yield client


def _transcribe(client: TestClient, **fields: str) -> object:
    return client.post(
        "/v1/audio/transcriptions",
        data={"model": "w", **fields},
        files={"file": ("note.webm", b"RIFF....", "audio/webm")},
    )


def test_transcription_fields_reach_the_service(client: TestClient, inference: ScriptedInference) -> None:
    response = _transcribe(client, language="de", prompt="Names: Zoë.", temperature="0.3")
    assert response.status_code == 200 and response.json() == {"text": "Hello there. Goodbye."}
    sent = inference.requests[-1]
    assert (sent.model, sent.audio, sent.filename, sent.language, sent.prompt) == (
        "w",
        b"RIFF....",
        "note.webm",
        "de",
        "Names: Zoë.",
    )
    assert sent.temperature == pytest.approx(0.3)


def test_transcription_response_formats(client: TestClient) -> None:
    assert _transcribe(client, response_format="text").text == "Hello there. Goodbye.\n"
    verbose = _transcribe(client, response_format="verbose_json").json()
    assert verbose["task"] == "transcribe" and verbose["language"] == "en" and verbose["duration"] == 3662
    assert [s["text"] for s in verbose["segments"]] == [" Hello there.", " Goodbye."]
    assert _transcribe(client, response_format="srt").text == (
        "1\n00:00:00,000 --> 00:00:02,500\nHello there.\n\n2\n00:00:02,500 --> 01:01:01,250\nGoodbye.\n"
    )
    assert _transcribe(client, response_format="vtt").text == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:02.500\nHello there.\n\n00:00:02.500 --> 01:01:01.250\nGoodbye.\n"
    )


@pytest.mark.parametrize(
    ("request_kwargs", "param", "words"),
    [
        ({"json": {"model": "w"}}, "file", "multipart/form-data"),
        ({"data": {"model": "w"}, "files": {"other": ("a", b"x")}}, "file", "no `file`"),
        ({"data": {}, "files": {"file": ("a.mp3", b"x")}}, "model", "no `model`"),
        ({"data": {"model": "w", "response_format": "xml"}, "files": {"file": ("a", b"x")}}, "response_format", "json"),
        ({"data": {"model": "w", "temperature": "warm"}, "files": {"file": ("a", b"x")}}, "temperature", "[0, 1]"),
    ],
)
def test_transcription_refusals_name_the_field(
    client: TestClient, inference: ScriptedInference, request_kwargs: dict, param: str, words: str
) -> None:
    response = client.post("/v1/audio/transcriptions", **request_kwargs)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param and words in response.json()["error"]["message"]
    assert inference.requests == []


def test_speech_streams_the_services_pieces(client: TestClient, inference: ScriptedInference) -> None:
    response = client.post("/audio/speech", json={"model": "t", "input": "Hi.", "voice": "nova", "speed": 1.25})
    assert response.status_code == 200
    assert response.headers["content-type"] == "audio/mpeg" and response.content == b"ID3firstsecond"
    sent = inference.requests[-1]
    assert (sent.voice, sent.format, sent.speed) == ("nova", pb.AUDIO_FORMAT_MP3, 1.25)


def test_speech_refusals(client: TestClient, inference: ScriptedInference) -> None:
    wrong = client.post("/v1/audio/speech", json={"model": "t", "input": "Hi", "response_format": "aac"})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "response_format"
    sse = client.post("/v1/audio/speech", json={"model": "t", "input": "Hi", "stream_format": "sse"})
    assert sse.status_code == 400 and sse.json()["error"]["param"] == "stream_format"
    assert inference.requests == []
    inference.refuse = (grpc.StatusCode.INVALID_ARGUMENT, "Voice 'x' is not one of model 't''s voices (joe).")
    refused = client.post("/v1/audio/speech", json={"model": "t", "input": "Hi", "voice": "x"})
    assert refused.status_code == 400 and "voices (joe)" in refused.json()["error"]["message"]
