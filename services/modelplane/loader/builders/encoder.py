"""Hugging Face encoders (embedding models, cross-encoders) → ONNX with pooling in the graph, and
the Triton entry for each target: the embedded python backend, the onnxruntime backend, TensorRT."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, ModelFormat, RerankScoring, RuntimeTarget, ServingProfile, Task
from modelplane.loader.builders import ArtifactBuilder, RepositoryEntry, read_assets
from modelplane.loader.builders.targets import (
    effective_target,
    precision_options,
    target_options,
    tensorrt_sentence,
    with_tensorrt_plan,
)
from modelplane.loader.conversion import run_converter
from modelplane.loader.convert.encoder import CONVERTER_VERSION
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import TensorConfig, TritonModelConfig, WarmupSample, python_model_source


def _special_tokens(artifact: Path) -> dict[str, str]:
    tokens: dict[str, str] = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = artifact / name
        if not path.is_file():
            continue
        for key, value in json.loads(path.read_text()).items():
            if key.endswith("_token") and key not in tokens:
                content = value.get("content") if isinstance(value, dict) else value
                if isinstance(content, str):
                    tokens[key] = content
    return tokens


def _token_id(artifact: Path, token: str | None) -> int:
    tokenizer = json.loads((artifact / "tokenizer.json").read_text())
    for added in tokenizer.get("added_tokens", []):
        if added.get("content") == token:
            return int(added["id"])
    return int((tokenizer.get("model", {}).get("vocab", {}) or {}).get(token or "", 0))


class EncoderBuilder(ArtifactBuilder):
    converter_version = CONVERTER_VERSION

    def accepts(self, model_format: ModelFormat, task: Task) -> bool:
        formats = (ModelFormat.HUGGINGFACE, ModelFormat.PYTORCH)
        return model_format in formats and task in (Task.EMBEDDING, Task.RERANK)

    def _tolerance(self, model: Model, settings: LoaderSettings) -> float:
        return model.spec.runtime_hints.parity_tolerance or settings.parity_tolerance

    def options(self, model: Model, settings: LoaderSettings) -> dict[str, Any]:
        return {
            "task": model.spec.task.name,
            "tolerance": self._tolerance(model, settings),
            **precision_options(model, settings),
            **target_options(model, settings),
        }

    async def build(self, model: Model, package: Path, artifact: Path, settings: LoaderSettings) -> dict[str, Any]:
        task = "rerank" if model.spec.task == Task.RERANK else "embedding"
        options = precision_options(model, settings)
        command = [
            sys.executable,
            "-m",
            "modelplane.loader.convert.encoder",
            "--source",
            str(package),
            "--output",
            str(artifact),
            "--task",
            task,
            "--tolerance",
            str(self._tolerance(model, settings)),
            "--precision",
            options["precision"],
            "--precision-tolerance",
            str(options["precision_tolerance"]),
        ]
        report = await run_converter(command, settings.load_timeout_seconds)
        return await with_tensorrt_plan(model, artifact, report, settings)

    def describe(self, report: dict[str, Any]) -> str:
        precision = report.get("precision", "fp32")
        return (
            f"staged; ONNX ({precision}) parity max abs diff {report['max_abs_diff']:.2e} against PyTorch "
            f"(tolerance {report['tolerance']:.0e})" + tensorrt_sentence(report)
        )

    def entry(
        self, model: Model, package: Path, artifact: Path, report: dict[str, Any], settings: LoaderSettings
    ) -> RepositoryEntry:
        hints = model.spec.runtime_hints
        target = effective_target(model, settings)
        special = _special_tokens(artifact)
        max_batch = hints.max_batch_size or settings.max_batch_size
        output_dim = int(report["output_dimension"])
        embedded = target == RuntimeTarget.EMBEDDED
        inputs = [
            # On the embedded target the model pads ragged requests itself (see onnx_encoder/model.py),
            # so requests of different lengths still batch together.
            TensorConfig(name, "TYPE_INT64", (-1,), allow_ragged_batch=embedded)
            for name in report["input_names"]
        ]
        config = TritonModelConfig(
            name=model.name,
            inputs=inputs,
            outputs=[TensorConfig(report["output_name"], "TYPE_FP32", (output_dim,))],
            max_batch_size=max_batch,
            preferred_batch_sizes=list(hints.preferred_batch_sizes),
            max_queue_delay_microseconds=(
                hints.max_queue_delay_microseconds
                if hints.max_queue_delay_microseconds is not None
                else settings.max_queue_delay_microseconds
            ),
            instance_count=hints.instance_count or 1,
            dynamic_batching=settings.dynamic_batching,
        )
        files = {report["onnx_file"]: artifact / report["onnx_file"]}
        if embedded:
            config.backend = "python"
            config.parameters = {
                "onnx_file": report["onnx_file"],
                "intra_op_threads": str(settings.onnx_intra_op_threads),
                "pad_token_id": str(_token_id(artifact, special.get("pad_token"))),
                "length_buckets": ",".join(str(bound) for bound in sorted(settings.length_buckets)),
                "bucket_merge_tokens": str(settings.bucket_merge_tokens),
                "parallel_runs": str(settings.onnx_parallel_runs),
            }
            files["model.py"] = python_model_source("onnx_encoder")
        elif target == RuntimeTarget.TENSORRT:
            config.platform = "tensorrt_plan"
            config.default_model_filename = report["tensorrt"]["plan_file"]
            config.instance_kind = "KIND_GPU"
            files = {report["tensorrt"]["plan_file"]: artifact / report["tensorrt"]["plan_file"]}
        else:
            config.platform = "onnxruntime_onnx"
            config.default_model_filename = report["onnx_file"]
            config.instance_kind = "KIND_GPU"
        config.warmup = [WarmupSample("short text", 1, {name: ("TYPE_INT64", (16,)) for name in report["input_names"]})]
        task = model.spec.task
        assets = read_assets(artifact)
        profile = ServingProfile(
            triton_model_name=model.name,
            embedding_dimension=output_dim if task != Task.RERANK else 0,
            max_input_tokens=hints.max_sequence_length or int(report["max_seq_length"]),
            normalize_embeddings=bool(report.get("normalize")),
            input_names=list(report["input_names"]),
            output_name=report["output_name"],
            tokenizer_sha256=next((a.sha256 for a in assets if a.name == "tokenizer.json"), ""),
            rerank_scoring=hints.rerank_scoring
            or (RerankScoring.CROSS_ENCODER if task == Task.RERANK else RerankScoring.EMBEDDING_COSINE),
            max_batch_size=max_batch,
            special_tokens=special,
        )
        return RepositoryEntry(config=config, files=files, profile=profile, assets=assets)
