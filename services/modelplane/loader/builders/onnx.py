"""ONNX encoder packages: validated (onnx checker, the inputs and output an encoder needs) and
passed through; optionally with an int8 or fp16 variant checked against the package's own graph."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, ModelFormat, Task
from modelplane.loader.builders.encoder import EncoderBuilder
from modelplane.loader.builders.targets import precision_options, tensorrt_sentence, with_tensorrt_plan
from modelplane.loader.conversion import run_converter
from modelplane.loader.convert.onnx_package import CONVERTER_VERSION
from modelplane.loader.settings import LoaderSettings


class OnnxPackageBuilder(EncoderBuilder):
    converter_version = CONVERTER_VERSION

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        return model_format == ModelFormat.ONNX and task in (Task.EMBEDDING, Task.RERANK)

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        options = precision_options(model, settings)
        command = [
            sys.executable,
            "-m",
            "modelplane.loader.convert.onnx_package",
            "--source",
            str(package),
            "--output",
            str(artifact),
            "--task",
            "rerank" if model.spec.task == Task.RERANK else "embedding",
            "--precision",
            options["precision"],
            "--precision-tolerance",
            str(options["precision_tolerance"]),
        ]
        report = await run_converter(command, settings.load_timeout_seconds)
        return await with_tensorrt_plan(model, artifact, report, settings)

    def describe(self, report: dict[str, Any]) -> str:
        if report.get("precision", "fp32") == "fp32":
            checked = "passed onnx's checker and the encoder interface checks; served as shipped"
        else:
            checked = (
                f"{report['precision']} variant max abs diff {report['max_abs_diff']:.2e} against the shipped graph "
                f"(tolerance {report['tolerance']:.0e})"
            )
        return f"staged; ONNX package {checked}" + tensorrt_sentence(report)
