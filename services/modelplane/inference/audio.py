"""Audio in and out of the speech models: uploads decoded with FFmpeg's libraries (PyAV) into the
samples a speech-to-text model hears, and synthesized samples encoded, as they come, into the
format a client asked for (MP3 with LAME through lameenc; Opus and FLAC through PyAV; WAV and raw
PCM by hand)."""

from __future__ import annotations

import enum
import io
import struct
from dataclasses import dataclass

import av
import lameenc
import numpy as np

from modelplane.inference.errors import AudioTooLong, AudioUnreadable


class AudioFormat(enum.IntEnum):
    UNSPECIFIED = 0
    MP3 = 1
    WAV = 2
    OPUS = 3
    FLAC = 4
    PCM = 5


MEDIA_TYPES = {
    AudioFormat.MP3: "audio/mpeg",
    AudioFormat.WAV: "audio/wav",
    AudioFormat.OPUS: "audio/ogg",
    AudioFormat.FLAC: "audio/flac",
    AudioFormat.PCM: "audio/pcm",
}
# OpenAI's pcm is 24 kHz; Opus encodes at 48 kHz.
PCM_SAMPLE_RATE = 24000
OPUS_SAMPLE_RATE = 48000
MP3_BIT_RATE_KBPS = 64


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32 mono in [-1, 1]
    sample_rate: int

    @property
    def seconds(self) -> float:
        return self.samples.size / self.sample_rate


def decode(data: bytes, *, sample_rate: int, max_seconds: float, filename: str = "") -> DecodedAudio:
    """The file's first audio track as mono float32 at `sample_rate`. Refuses (AudioUnreadable)
    what FFmpeg cannot read as audio, and (AudioTooLong) what lasts longer than `max_seconds`."""
    name = f"'{filename}'" if filename else "The file"
    if not data:
        raise AudioUnreadable(f"{name} is empty. Send the recording's bytes in the `file` field.")
    limit = int(max_seconds * sample_rate)
    parts: list[np.ndarray] = []
    total = 0
    try:
        with av.open(io.BytesIO(data), mode="r") as container:
            stream = next((s for s in container.streams if s.type == "audio"), None)
            if stream is None:
                raise AudioUnreadable(
                    f"{name} has no audio track (FFmpeg read it as {container.format.name}). Send a recording."
                )
            declared = float(container.duration / av.time_base) if container.duration else 0.0
            # An MP3 with a Xing/Info header states its length exactly; without one FFmpeg only
            # estimates it from the size, which says nothing about a file cut short.
            exact = container.format.name == "mp3" and _has_mp3_length_header(data)
            if declared > max_seconds + 1:
                raise _too_long(name, declared, max_seconds)
            resampler = av.AudioResampler(format="flt", layout="mono", rate=sample_rate)
            for frame in container.decode(stream):
                frame.pts = None
                for out in resampler.resample(frame):
                    samples = out.to_ndarray().reshape(-1)
                    parts.append(samples)
                    total += samples.size
                if total > limit:
                    raise _too_long(name, total / sample_rate, max_seconds, at_least=True)
            for out in resampler.resample(None):
                parts.append(out.to_ndarray().reshape(-1))
    except av.error.FFmpegError as error:
        raise AudioUnreadable(
            f"{name} could not be decoded as audio ({_ffmpeg_reason(error)}). Send an audio file FFmpeg reads "
            "(MP3, WAV, WebM/Opus, M4A, OGG, FLAC); a file cut short in its header cannot be read."
        ) from None
    samples = np.concatenate(parts).astype(np.float32, copy=False) if parts else np.zeros(0, np.float32)
    if samples.size == 0:
        raise AudioUnreadable(
            f"{name} holds no decodable audio (it may be cut short, or its audio frames damaged). Send the whole "
            "recording."
        )
    decoded = DecodedAudio(samples, sample_rate)
    if exact and declared - decoded.seconds > max(1.0, 0.05 * declared):
        raise AudioUnreadable(
            f"{name} is cut short: its header says it lasts {declared:.1f} s, but it holds {decoded.seconds:.1f} s "
            "of audio. Send the whole file (the upload may have been interrupted)."
        )
    return decoded


def _has_mp3_length_header(data: bytes) -> bool:
    """Whether the MP3's first frame is a Xing or Info frame (which counts the file's frames)."""
    start = 0
    if data[:3] == b"ID3" and len(data) >= 10:
        start = 10 + ((data[6] & 0x7F) << 21 | (data[7] & 0x7F) << 14 | (data[8] & 0x7F) << 7 | (data[9] & 0x7F))
    first_frame = data[start : start + 200]
    return b"Xing" in first_frame or b"Info" in first_frame


def _ffmpeg_reason(error: av.error.FFmpegError) -> str:
    reason = getattr(error, "strerror", None) or str(error)
    return reason.rstrip(".")


def _too_long(name: str, seconds: float, limit: float, at_least: bool = False) -> AudioTooLong:
    length = f"more than {limit:.0f} s" if at_least else f"{seconds:.0f} s"
    return AudioTooLong(
        f"{name} lasts {length}; at most {limit:.0f} s ({limit / 60:.0f} min) are transcribed per request. Split "
        "the recording into shorter files (or raise MODELPLANE_INFERENCE_MAX_AUDIO_SECONDS)."
    )


def split_at_pauses(samples: np.ndarray, sample_rate: int, chunk_seconds: float) -> list[tuple[int, np.ndarray]]:
    """(offset in samples, chunk) pieces of at most `chunk_seconds`, each cut at the quietest 100 ms
    of its last tenth, so that a cut falls between words rather than through one."""
    size = int(chunk_seconds * sample_rate)
    window = max(1, sample_rate // 10)
    pieces = []
    start = 0
    while samples.size - start > size:
        end = start + size
        search = samples[end - max(window, size // 10) : end]
        frames = search[: search.size // window * window].reshape(-1, window)
        quietest = int(np.argmin(np.sqrt((frames**2).mean(axis=1)))) if frames.size else 0
        cut = end - search.size + quietest * window + window // 2
        pieces.append((start, samples[start:cut]))
        start = cut
    pieces.append((start, samples[start:]))
    return pieces


class SpeechEncoder:
    """Encodes 16-bit mono samples as they are synthesized; `encode` returns the bytes ready to send
    (possibly none), `finish` the rest."""

    def __init__(self, audio_format: AudioFormat, sample_rate: int) -> None:
        self.format = AudioFormat.MP3 if audio_format == AudioFormat.UNSPECIFIED else audio_format
        self.media_type = MEDIA_TYPES[self.format]
        self.sample_rate = sample_rate
        self._header_sent = False
        self._lame: lameenc.Encoder | None = None
        self._resampler: av.AudioResampler | None = None
        self._muxer: _Muxer | None = None
        if self.format == AudioFormat.MP3:
            self._lame = lameenc.Encoder()
            self._lame.set_bit_rate(MP3_BIT_RATE_KBPS)
            self._lame.set_in_sample_rate(sample_rate)
            self._lame.set_channels(1)
            self._lame.set_quality(2)
        elif self.format == AudioFormat.PCM and sample_rate != PCM_SAMPLE_RATE:
            self._resampler = av.AudioResampler(format="s16", layout="mono", rate=PCM_SAMPLE_RATE)
        elif self.format == AudioFormat.OPUS:
            self._muxer = _Muxer("ogg", "libopus", OPUS_SAMPLE_RATE, bit_rate=32000)
        elif self.format == AudioFormat.FLAC:
            self._muxer = _Muxer("flac", "flac", sample_rate)

    def encode(self, samples: np.ndarray) -> bytes:
        samples = np.ascontiguousarray(samples, dtype=np.int16).reshape(-1)
        if self._lame is not None:
            return bytes(self._lame.encode(samples.tobytes()))
        if self.format == AudioFormat.WAV:
            data = samples.astype("<i2", copy=False).tobytes()
            if not self._header_sent:
                self._header_sent = True
                return _streaming_wav_header(self.sample_rate) + data
            return data
        if self.format == AudioFormat.PCM:
            if self._resampler is None:
                return samples.astype("<i2", copy=False).tobytes()
            return b"".join(_frame_bytes(out) for out in self._resampler.resample(self._frame(samples)))
        assert self._muxer is not None
        return self._muxer.encode(self._frame(samples))

    def finish(self) -> bytes:
        if self._lame is not None:
            return bytes(self._lame.flush())
        if self.format == AudioFormat.WAV:
            return b"" if self._header_sent else _streaming_wav_header(self.sample_rate)
        if self.format == AudioFormat.PCM:
            if self._resampler is None:
                return b""
            return b"".join(_frame_bytes(out) for out in self._resampler.resample(None))
        assert self._muxer is not None
        return self._muxer.finish()

    def _frame(self, samples: np.ndarray) -> av.AudioFrame:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self.sample_rate
        frame.pts = None
        return frame


def _frame_bytes(frame: av.AudioFrame) -> bytes:
    return frame.to_ndarray().astype("<i2", copy=False).tobytes()


def _streaming_wav_header(sample_rate: int) -> bytes:
    """A WAVE header whose RIFF and data sizes say 'unknown' (0xFFFFFFFF): the length of a stream is
    not known when its header is sent. Players and decoders read to the end of the data."""
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, sample_rate, sample_rate * 2, 2, 16)
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )


class _Muxer:
    """An FFmpeg encoder and container writing into memory, handing out the bytes as they are muxed."""

    def __init__(self, container_format: str, codec: str, rate: int, bit_rate: int = 0) -> None:
        self._sink = _Sink()
        self._container = av.open(self._sink, mode="w", format=container_format)
        self._stream = self._container.add_stream(codec, rate=rate, layout="mono")
        if bit_rate:
            self._stream.bit_rate = bit_rate

    def encode(self, frame: av.AudioFrame | None) -> bytes:
        for packet in self._stream.encode(frame):
            self._container.mux(packet)
        return self._sink.take()

    def finish(self) -> bytes:
        data = self.encode(None)
        self._container.close()
        return data + self._sink.take()


class _Sink(io.RawIOBase):
    """A write-only, unseekable file for PyAV's muxers that hands out what was written so far."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self._parts.append(bytes(data))
        return len(data)

    def take(self) -> bytes:
        data = b"".join(self._parts)
        self._parts.clear()
        return data
