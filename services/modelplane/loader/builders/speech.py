"""Speech models: Whisper in CTranslate2 form for speech to text (run by faster-whisper), and Piper
voices (ONNX) for text to speech (run by piper-tts). Both run in Triton as python-backend models
that take and give raw samples; decoding uploads and encoding speech is the inference service's
work, so a production Triton can run the same entries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, ModelFormat, ServingProfile, SpeechProfile, Task
from modelplane.loader.builders import ArtifactBuilder, RepositoryEntry
from modelplane.loader.errors import NotAModel
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import TritonModelConfig, python_model_source

# Whisper hears 16 kHz audio, whatever its size.
WHISPER_SAMPLE_RATE = 16000
_WHISPER_FILES = ("model.bin", "config.json", "tokenizer.json")


def _python_config(name: str, parameters: dict[str, str]) -> TritonModelConfig:
    # The tensors (and Piper's decoupled policy) come from the models' auto_complete_config.
    return TritonModelConfig(name=name, inputs=[], outputs=[], backend="python", parameters=parameters)


def _package_files(package: Path) -> dict[str, Path]:
    return {path.name: path for path in sorted(package.iterdir()) if path.is_file()}


class WhisperBuilder(ArtifactBuilder):
    converter_version = "whisper-ct2-1"

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        return model_format == ModelFormat.CTRANSLATE2 and task == Task.SPEECH2TEXT

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        missing = [name for name in _WHISPER_FILES if not (package / name).is_file()]
        if missing:
            raise NotAModel(
                f"The CTranslate2 package of '{model.name}' lacks {', '.join(missing)}; a Whisper model for "
                "faster-whisper needs model.bin, config.json, tokenizer.json and vocabulary.* side by side."
            )
        config = json.loads((package / "config.json").read_text())
        if "lang_ids" not in config or "alignment_heads" not in config:
            raise NotAModel(
                f"The CTranslate2 package of '{model.name}' is not a Whisper model (its config.json has no lang_ids "
                "or alignment_heads); speech to text serves Whisper models converted for faster-whisper."
            )
        tokens = {t["id"]: t["content"] for t in json.loads((package / "tokenizer.json").read_text())["added_tokens"]}
        languages = [tokens[i].strip("<|>") for i in config["lang_ids"] if i in tokens]
        return {"languages": languages, "multilingual": len(languages) > 1}

    def options(self, model: Model, settings: LoaderSettings) -> dict[str, Any]:
        return {"task": model.spec.task.name}

    def describe(self, report: dict[str, Any]) -> str:
        return f"staged; Whisper (CTranslate2) for faster-whisper, {len(report['languages'])} language(s)"

    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        config = _python_config(
            model.name,
            {
                "model_dir": ".",
                "compute_type": settings.speech2text_compute_type,
                "beam_size": str(settings.speech2text_beam_size),
            },
        )
        files = {"model.py": python_model_source("whisper"), **_package_files(package)}
        profile = ServingProfile(
            triton_model_name=model.name,
            speech=SpeechProfile(sample_rate_hz=WHISPER_SAMPLE_RATE, languages=report["languages"]),
        )
        return RepositoryEntry(config=config, files=files, profile=profile)


def _voice_file(package: Path, name: str) -> Path:
    voices = sorted(path for path in package.glob("*.onnx") if path.with_name(f"{path.name}.json").is_file())
    if len(voices) != 1:
        raise NotAModel(
            f"The package of '{name}' should hold one Piper voice: an *.onnx file with its *.onnx.json config beside "
            f"it; found {len(voices)}."
        )
    return voices[0]


class PiperBuilder(ArtifactBuilder):
    converter_version = "piper-1"

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        return model_format == ModelFormat.ONNX and task == Task.TTS

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        onnx = _voice_file(package, model.name)
        config = json.loads(onnx.with_name(f"{onnx.name}.json").read_text())
        if "phoneme_id_map" not in config or "audio" not in config:
            raise NotAModel(
                f"{onnx.name}.json of '{model.name}' is not a Piper voice config (no phoneme_id_map or audio); text "
                "to speech serves Piper voices."
            )
        speakers = sorted(config.get("speaker_id_map") or {}, key=lambda s: config["speaker_id_map"][s])
        own = config.get("dataset") or onnx.stem
        language = (config.get("language") or {}).get("family", "")
        return {
            "onnx_file": onnx.name,
            "sample_rate": int(config["audio"]["sample_rate"]),
            "voices": speakers or [own],
            "multi_speaker": bool(speakers),
            "languages": [language] if language else [],
        }

    def describe(self, report: dict[str, Any]) -> str:
        voices = ", ".join(report["voices"])
        return f"staged; Piper voice {report['onnx_file']} ({report['sample_rate']} Hz, voices {voices})"

    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        config = _python_config(
            model.name,
            {"onnx_file": report["onnx_file"], "intra_op_threads": str(settings.onnx_intra_op_threads)},
        )
        onnx = report["onnx_file"]
        # The decoupled-model plumbing the LLM models use is copied beside model.py, as for them.
        source = python_model_source("piper")
        shared = source.parent.with_name("llm_protocol.py")
        files = {
            "model.py": source,
            shared.name: shared,
            onnx: package / onnx,
            f"{onnx}.json": package / f"{onnx}.json",
        }
        voices = report["voices"]
        profile = ServingProfile(
            triton_model_name=model.name,
            speech=SpeechProfile(
                sample_rate_hz=report["sample_rate"],
                voices=voices,
                default_voice=voices[0],
                languages=report["languages"],
            ),
        )
        return RepositoryEntry(config=config, files=files, profile=profile)
