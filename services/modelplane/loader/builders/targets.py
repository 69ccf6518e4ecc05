"""What the runtime target and precision add to an encoder artifact: the options that key it in
the cache, and for TensorRT the plan built from its ONNX file on this machine's GPU."""

from __future__ import annotations

import functools
import importlib.metadata
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from modelplane.common.types import Model, Precision, RuntimeTarget
from modelplane.loader.conversion import run_converter
from modelplane.loader.errors import ConversionFailed
from modelplane.loader.settings import LoaderSettings


def effective_target(model: Model, settings: LoaderSettings) -> RuntimeTarget:
    return model.spec.runtime_hints.target or settings.default_target


def precision_options(model: Model, settings: LoaderSettings) -> dict[str, Any]:
    precision = model.spec.runtime_hints.precision
    if precision == Precision.INT8:
        return {"precision": "int8", "precision_tolerance": settings.int8_parity_tolerance}
    if precision == Precision.FP16:
        return {"precision": "fp16", "precision_tolerance": settings.fp16_parity_tolerance}
    return {"precision": "fp32", "precision_tolerance": 0.0}


@functools.cache
def gpu_model() -> str:
    """The name of GPU 0 as the driver reports it, or "" on a machine without an NVIDIA GPU."""
    if shutil.which("nvidia-smi") is None:
        return ""
    result = subprocess.run(
        ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "--id=0"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return result.stdout.strip() if result.returncode == 0 else ""


def tensorrt_version() -> str:
    for distribution in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13"):
        try:
            return importlib.metadata.version(distribution)
        except importlib.metadata.PackageNotFoundError:
            continue
    return ""


def target_options(model: Model, settings: LoaderSettings) -> dict[str, Any]:
    """A TensorRT plan runs only on the GPU model and TensorRT version that built it, so both key it."""
    target = effective_target(model, settings)
    if target != RuntimeTarget.TENSORRT:
        return {"target": target.name}
    gpu, version = gpu_model(), tensorrt_version()
    if not gpu or not version:
        missing = "an NVIDIA GPU (nvidia-smi found none)" if not gpu else "the tensorrt Python package"
        raise ConversionFailed(
            f"Model '{model.name}' targets TensorRT, whose plans are built on the GPU that will serve them, but this "
            f"loader lacks {missing}. Run the loader beside the GPU Triton (with the tensorrt version of that "
            "Triton), or choose the ONNXRUNTIME target."
        )
    return {"target": target.name, "gpu": gpu, "tensorrt": version}


async def with_tensorrt_plan(
    model: Model, artifact: Path, report: dict[str, Any], settings: LoaderSettings
) -> dict[str, Any]:
    """Builds model.plan beside the ONNX file when the target is TensorRT."""
    if effective_target(model, settings) != RuntimeTarget.TENSORRT:
        return report
    options = target_options(model, settings)
    command = [
        sys.executable,
        "-m",
        "modelplane.loader.convert.tensorrt",
        "--onnx",
        str(artifact / report["onnx_file"]),
        "--output",
        str(artifact / "model.plan"),
        "--max-batch-size",
        str(model.spec.runtime_hints.max_batch_size or settings.max_batch_size),
        "--max-sequence-length",
        str(model.spec.runtime_hints.max_sequence_length or report["max_seq_length"]),
        "--fp16" if options.get("precision") == "fp16" else "--fp32",
    ]
    plan = await run_converter(command, settings.load_timeout_seconds)
    return {**report, "tensorrt": {**plan, "gpu": options["gpu"], "tensorrt_version": options["tensorrt"]}}


def tensorrt_sentence(report: dict[str, Any]) -> str:
    plan = report.get("tensorrt")
    if not plan:
        return ""
    return f"; TensorRT {plan['tensorrt_version']} plan for {plan['gpu']}, max abs diff {plan['max_abs_diff']:.2e}"
