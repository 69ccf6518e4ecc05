"""Artifact builders: one per kind of package, chosen by format and task.

A builder turns a verified package into what Triton serves: it names its conversion (so the
result is cached under a key of package digest, converter version and options), runs the
conversion (in a subprocess where it needs PyTorch), and describes the Triton repository entry,
the serving profile and the assets the inference service needs. Adding a kind of model is adding
a builder; the pipeline does not change.
"""

from __future__ import annotations

import abc
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, ModelAsset, ModelFormat, ServingProfile, Task
from modelplane.loader.errors import NotAModel
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import TritonModelConfig

# Files of an artifact the inference service needs next to the model (tokenizers, templates).
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass
class RepositoryEntry:
    """What the loader writes for one model: Triton's config, the files of the version directory
    (name → file in the cache), the serving profile and the assets for the registry."""

    config: TritonModelConfig
    files: dict[str, Path]
    profile: ServingProfile
    assets: list[ModelAsset] = field(default_factory=list)


def read_assets(artifact: Path, names: tuple[str, ...] = ASSET_FILES) -> list[ModelAsset]:
    assets = []
    for name in names:
        path = artifact / name
        if path.is_file():
            content = path.read_bytes()
            assets.append(ModelAsset(name=name, sha256=hashlib.sha256(content).hexdigest(), content=content))
    return assets


class ArtifactBuilder(abc.ABC):
    #: Changes whenever the builder's output changes, so stale cached artifacts are not reused.
    converter_version: str

    @abc.abstractmethod
    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        """Whether this builder serves packages of this format for this task."""

    def options(self, model: Model, settings: LoaderSettings) -> dict[str, Any]:
        """The options that change the artifact; part of its cache key."""
        return {"task": model.spec.task.name}

    @abc.abstractmethod
    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        """Converts the package into `artifact` (a fresh directory) and returns the conversion report."""

    @abc.abstractmethod
    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        """The Triton repository entry, profile and assets for a built artifact."""

    def describe(self, report: dict[str, Any]) -> str:
        """A sentence for the STAGED event: what the conversion proved."""
        return "staged"


def builders() -> list[ArtifactBuilder]:
    """Every builder, asked in order; a new kind of package adds its builder here."""
    from modelplane.loader.builders.encoder import EncoderBuilder  # noqa: PLC0415 - avoids an import cycle
    from modelplane.loader.builders.llm import CausalLmBuilder, GgufBuilder  # noqa: PLC0415
    from modelplane.loader.builders.onnx import OnnxPackageBuilder  # noqa: PLC0415
    from modelplane.loader.builders.speech import PiperBuilder, WhisperBuilder  # noqa: PLC0415

    return [
        EncoderBuilder(),
        OnnxPackageBuilder(),
        GgufBuilder(),
        CausalLmBuilder(),
        WhisperBuilder(),
        PiperBuilder(),
    ]


def select_builder(model_format: ModelFormat, task: Task) -> ArtifactBuilder:
    for builder in builders():
        if builder.accepts(model_format, task):
            return builder
    raise NotAModel(
        f"A {model_format.name} package for {task.name.lower()} is not something this loader serves yet; "
        "supported: Hugging Face encoders (safetensors, or PyTorch .bin weights) and ONNX encoders, for "
        "embedding and rerank; GGUF files and Hugging Face causal LMs, for generation; Whisper in CTranslate2 "
        "form, for speech2text; Piper voices (ONNX), for tts."
    )
