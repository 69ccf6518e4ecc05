"""Decoding uploads and encoding speech (inference/audio.py), on audio made here with FFmpeg's own
encoders: every format a client may ask for reads back as the samples that went in."""

from __future__ import annotations

import io

import av
import numpy as np
import pytest

from modelplane.inference import audio
from modelplane.inference.audio import AudioFormat, SpeechEncoder
from modelplane.inference.errors import AudioTooLong, AudioUnreadable

RATE = 22050


def _tone(seconds: float, rate: int = RATE, frequency: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * frequency * t) * 32767).astype(np.int16)


def _encode(audio_format: AudioFormat, pieces: list[np.ndarray], rate: int = RATE) -> bytes:
    encoder = SpeechEncoder(audio_format, rate)
    return b"".join(encoder.encode(piece) for piece in pieces) + encoder.finish()


def _file(container: str, codec: str, seconds: float, rate: int = 44100) -> bytes:
    """A file as a browser or phone would upload it, made with FFmpeg's encoders."""
    sink = io.BytesIO()
    with av.open(sink, mode="w", format=container) as output:
        stream = output.add_stream(codec, rate=rate, layout="stereo")
        samples = np.repeat(_tone(seconds, rate)[None, :], 2, axis=0)
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="stereo")
        frame.sample_rate = rate
        for packet in stream.encode(frame):
            output.mux(packet)
        for packet in stream.encode(None):
            output.mux(packet)
    return sink.getvalue()


@pytest.mark.parametrize("audio_format", [AudioFormat.MP3, AudioFormat.WAV, AudioFormat.OPUS, AudioFormat.FLAC])
def test_each_speech_format_decodes_back_to_its_length(audio_format: AudioFormat) -> None:
    data = _encode(audio_format, [_tone(0.7), _tone(0.8)])
    decoded = audio.decode(data, sample_rate=16000, max_seconds=60)
    # Encoders pad the start (MP3's delay, Opus's pre-skip) by a few milliseconds at most.
    assert decoded.seconds == pytest.approx(1.5, abs=0.08)
    assert np.abs(decoded.samples).max() > 0.3


def test_mp3_streams_out_before_the_end() -> None:
    encoder = SpeechEncoder(AudioFormat.MP3, RATE)
    assert encoder.media_type == "audio/mpeg"
    assert len(encoder.encode(_tone(1.0))) > 1000  # the first sentence's bytes, not held back


def test_pcm_is_24_khz_16_bit_like_openai() -> None:
    data = _encode(AudioFormat.PCM, [_tone(1.0), _tone(1.0)])
    assert len(data) == pytest.approx(2 * 24000 * 2, rel=0.01)


def test_streamed_wav_header_says_unknown_length_and_still_decodes() -> None:
    data = _encode(AudioFormat.WAV, [_tone(0.5)])
    assert data[:4] == b"RIFF" and data[4:8] == b"\xff\xff\xff\xff"
    assert audio.decode(data, sample_rate=RATE, max_seconds=60).seconds == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize(
    ("container", "codec"), [("webm", "libopus"), ("ipod", "aac"), ("ogg", "libopus"), ("wav", "pcm_s24le")]
)
def test_browser_and_phone_uploads_decode(container: str, codec: str) -> None:
    decoded = audio.decode(_file(container, codec, 2.0, 48000), sample_rate=16000, max_seconds=60)
    assert decoded.seconds == pytest.approx(2.0, abs=0.1)


def test_an_empty_file_is_refused_by_name() -> None:
    with pytest.raises(AudioUnreadable, match=r"'empty\.mp3' is empty"):
        audio.decode(b"", sample_rate=16000, max_seconds=60, filename="empty.mp3")


def test_a_file_that_is_not_audio_is_refused() -> None:
    with pytest.raises(AudioUnreadable, match="could not be decoded as audio"):
        audio.decode(b"%PDF-1.7 not a recording at all " * 50, sample_rate=16000, max_seconds=60)


def test_a_file_cut_short_in_its_first_frame_is_refused() -> None:
    mp3 = _encode(AudioFormat.MP3, [_tone(3.0)])
    with pytest.raises(AudioUnreadable):
        audio.decode(mp3[:200], sample_rate=16000, max_seconds=60)


def _ffmpeg_mp3(seconds: float) -> bytes:
    """An MP3 as FFmpeg (and LAME itself) writes one: with an Info frame that counts its frames."""
    sink = io.BytesIO()
    with av.open(sink, mode="w", format="mp3") as output:
        stream = output.add_stream("libmp3lame", rate=RATE, layout="mono")
        frame = av.AudioFrame.from_ndarray(_tone(seconds).reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = RATE
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            output.mux(packet)
    return sink.getvalue()


def test_an_mp3_cut_in_the_middle_is_refused_when_its_header_states_its_length() -> None:
    whole = _ffmpeg_mp3(10.0)
    assert audio.decode(whole, sample_rate=16000, max_seconds=60).seconds == pytest.approx(10.0, abs=0.1)
    with pytest.raises(AudioUnreadable, match=r"cut short: its header says it lasts 10\.0 s, but it holds 5\.0 s"):
        audio.decode(whole[: len(whole) // 2], sample_rate=16000, max_seconds=60)


def test_audio_over_the_limit_is_refused_with_the_limit() -> None:
    with pytest.raises(AudioTooLong, match="at most 2 s"):
        audio.decode(_encode(AudioFormat.WAV, [_tone(3.0)]), sample_rate=16000, max_seconds=2)


def test_long_audio_is_cut_at_pauses_and_loses_nothing() -> None:
    rate = 16000
    speech = np.concatenate([_tone(9.0, rate), np.zeros(rate // 2, np.int16), _tone(9.0, rate)]).astype(np.float32)
    pieces = audio.split_at_pauses(speech, rate, chunk_seconds=10.0)
    assert np.array_equal(np.concatenate([chunk for _, chunk in pieces]), speech)
    assert all(chunk.size <= 10 * rate for _, chunk in pieces)
    # The first cut falls in the silence between the two tones.
    assert 9.0 * rate <= pieces[1][0] <= 9.5 * rate
