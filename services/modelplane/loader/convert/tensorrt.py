"""Build a TensorRT plan from an encoder's ONNX file, on the GPU that will serve it.

A plan is specific to the GPU model and the TensorRT version that built it; the loader keys the
cached plan by both (builders/targets.py). The optimisation profile covers batch 1..max batch and
sequence 1..max length, with the most common shapes (batch 8, 128 tokens) as the optimum. The
plan is checked against onnxruntime (CPU) on sample inputs before it is accepted.

Runs in a subprocess of the loader; prints one JSON object (the report, or {"error": ...}).
Needs an NVIDIA GPU and the `tensorrt` Python package matching the serving Triton's TensorRT.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from modelplane.common.process import follow_parent


class BuildError(Exception):
    pass


def build(onnx_path: Path, output: Path, max_batch: int, max_length: int, fp16: bool) -> dict:
    import tensorrt as trt  # noqa: PLC0415

    started = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise BuildError(f"TensorRT could not parse {onnx_path.name}: {errors[:500]}")
    config = builder.create_builder_config()
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    optimum = (min(8, max_batch), min(128, max_length))
    for index in range(network.num_inputs):
        name = network.get_input(index).name
        profile.set_shape(name, (1, 1), optimum, (max_batch, max_length))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise BuildError("TensorRT failed to build the plan; the loader log has TensorRT's messages.")
    output.write_bytes(bytes(serialized))
    max_abs_diff = check_parity(onnx_path, output, [network.get_input(i).name for i in range(network.num_inputs)])
    return {
        "plan_file": output.name,
        "max_abs_diff": max_abs_diff,
        "fp16": fp16,
        "max_batch_size": max_batch,
        "max_sequence_length": max_length,
        "seconds": round(time.perf_counter() - started, 3),
    }


def check_parity(onnx_path: Path, plan_path: Path, input_names: list[str]) -> float:
    """Runs the plan and onnxruntime on the same random token ids and compares the outputs."""
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    import tensorrt as trt  # noqa: PLC0415
    import torch  # noqa: PLC0415 - its CUDA tensors hold the plan's buffers

    rng = np.random.default_rng(0)
    feed = {name: rng.integers(1000, 2000, size=(4, 32), dtype=np.int64) for name in input_names}
    if "attention_mask" in feed:
        feed["attention_mask"] = np.ones((4, 32), dtype=np.int64)
    if "token_type_ids" in feed:
        feed["token_type_ids"] = np.zeros((4, 32), dtype=np.int64)
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, feed)[0]
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    context = engine.create_execution_context()
    buffers = {}
    for index in range(engine.num_io_tensors):
        name = engine.get_tensor_name(index)
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            tensor = torch.from_numpy(feed[name]).to(_torch_dtype(engine.get_tensor_dtype(name))).cuda()
            context.set_input_shape(name, tuple(tensor.shape))
        else:
            tensor = None
        buffers[name] = tensor
    for name, tensor in buffers.items():
        if tensor is None:
            shape = tuple(context.get_tensor_shape(name))
            buffers[name] = torch.empty(shape, dtype=_torch_dtype(engine.get_tensor_dtype(name)), device="cuda")
        context.set_tensor_address(name, buffers[name].data_ptr())
    stream = torch.cuda.Stream()
    context.execute_async_v3(stream.cuda_stream)
    stream.synchronize()
    output_name = next(n for n in buffers if n not in feed)
    actual = buffers[output_name].float().cpu().numpy()
    return float(np.max(np.abs(actual - expected)))


def _torch_dtype(trt_dtype: object) -> object:
    import tensorrt as trt  # noqa: PLC0415
    import torch  # noqa: PLC0415

    return {
        trt.int64: torch.int64,
        trt.int32: torch.int32,
        trt.float32: torch.float32,
        trt.float16: torch.float16,
    }[trt_dtype]


def main(argv: list[str] | None = None) -> int:
    follow_parent()  # a converter dies with the loader that started it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--max-sequence-length", type=int, default=512)
    precision = parser.add_mutually_exclusive_group()
    precision.add_argument("--fp16", action="store_true")
    precision.add_argument("--fp32", action="store_true")
    args = parser.parse_args(argv)
    try:
        report = build(args.onnx, args.output, args.max_batch_size, args.max_sequence_length, args.fp16)
    except (BuildError, ImportError) as error:
        print(json.dumps({"error": str(error)}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
