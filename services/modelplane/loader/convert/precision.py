"""Lower-precision ONNX artifacts, each checked against the fp32 reference outputs.

- int8: onnxruntime's dynamic quantisation (weights int8, activations quantised at run time), for
  CPU targets; checked on the CPU here.
- fp16: weights and activations in half precision with fp32 inputs and outputs, for GPU targets.
  Its check needs onnxruntime's CUDA provider: without a GPU the conversion is refused rather
  than shipped unchecked.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PrecisionError(Exception):
    pass


def lower_precision(
    onnx_path: Path, precision: str, feed: dict[str, Any], output_name: str, expected: Any, tolerance: float
) -> tuple[Path, float, str]:
    """Writes the `precision` variant beside `onnx_path`; returns (file, max abs diff, provider)."""
    import numpy as np  # noqa: PLC0415
    import onnx  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415

    target = onnx_path.with_name(f"model.{precision}.onnx")
    if precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic  # noqa: PLC0415

        quantize_dynamic(str(onnx_path), str(target), weight_type=QuantType.QInt8)
        provider = "CPUExecutionProvider"
    elif precision == "fp16":
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            raise PrecisionError(
                "fp16 artifacts are for GPU targets and are parity-checked on the GPU, but this loader's onnxruntime "
                f"has no CUDA provider (available: {', '.join(ort.get_available_providers())}). Run the conversion "
                "on a loader with a GPU, or use precision FP32 (or INT8 for CPU)."
            )
        from onnxruntime.transformers.float16 import convert_float_to_float16  # noqa: PLC0415

        onnx.save(convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True), str(target))
        provider = "CUDAExecutionProvider"
    else:
        raise PrecisionError(f"unknown precision {precision!r}")
    session = ort.InferenceSession(str(target), providers=[provider])
    actual = session.run([output_name], feed)[0]
    max_abs_diff = float(np.max(np.abs(actual.astype(np.float32) - expected)))
    if max_abs_diff > tolerance:
        target.unlink()
        raise PrecisionError(
            f"the {precision} model differs from fp32 by up to {max_abs_diff:.2e}, above the tolerance "
            f"{tolerance:.0e}; keep fp32 for this model or raise its parity tolerance knowingly."
        )
    return target, max_abs_diff, provider
