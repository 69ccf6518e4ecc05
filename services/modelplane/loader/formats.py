"""What kind of package a directory holds, decided from its files."""

from __future__ import annotations

from pathlib import Path

from modelplane.common.types import ModelFormat, PackageManifest
from modelplane.loader.errors import NotAModel

GGUF_MAGIC = b"GGUF"


def detect_format(package: Path, manifest: PackageManifest) -> ModelFormat:
    names = {f.path for f in manifest.files}
    top_level = {name for name in names if "/" not in name}
    if "model.bin" in top_level and any(name.startswith("vocabulary.") for name in top_level):
        return ModelFormat.CTRANSLATE2
    if "config.json" in top_level:
        if any(name.endswith(".safetensors") for name in top_level):
            return ModelFormat.HUGGINGFACE
        if any(name.endswith((".bin", ".pt", ".pth")) for name in top_level):
            return ModelFormat.PYTORCH
    if any(name.endswith(".onnx") for name in top_level):
        return ModelFormat.ONNX
    for name in top_level:
        if name.endswith(".gguf"):
            with (package / name).open("rb") as handle:
                if handle.read(4) == GGUF_MAGIC:
                    return ModelFormat.GGUF
    if any(name.endswith((".plan", ".engine")) for name in top_level):
        return ModelFormat.TENSORRT_PLAN
    shown = ", ".join(sorted(top_level)[:8]) + (" …" if len(top_level) > 8 else "")
    raise NotAModel(
        f"The package holds no model this loader recognises (found: {shown}). Expected a Hugging Face directory "
        "(config.json with *.safetensors or *.bin weights), an *.onnx file, a *.gguf file, or a CTranslate2 "
        "directory (model.bin with vocabulary.*)."
    )
