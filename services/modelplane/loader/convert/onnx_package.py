"""Validate an ONNX package and pass it through (optionally with an int8/fp16 variant).

An ONNX package holds one `*.onnx` file (with its external data files, if any) and the model's
tokenizer (`tokenizer.json`). The graph must pass onnx's checker, take int64 `input_ids` and
`attention_mask` (and optionally `token_type_ids`) shaped [batch, sequence], and produce one
float output shaped [batch, n]: pooled sentence embeddings, or a cross-encoder's logits. A graph
that returns token vectors (rank 3) is refused: pooling belongs in the graph, so that every Triton
target serves the same artifact.

Runs in a subprocess of the loader; prints one JSON object (the report, or {"error": ...}).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from modelplane.common.process import follow_parent
from modelplane.loader.convert.encoder import TOKENIZER_FILES, read_encoder_config
from modelplane.loader.convert.precision import PrecisionError, lower_precision

CONVERTER_VERSION = "onnx-1"
ALLOWED_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
SAMPLE_TEXTS = ["A short one.", "modelplane serves models to a private Dify deployment."]


class ValidationError(Exception):
    pass


def _onnx_file(source: Path) -> Path:
    candidates = sorted(source.glob("*.onnx"))
    if len(candidates) != 1:
        names = ", ".join(p.name for p in candidates) or "none"
        raise ValidationError(f"an ONNX package holds exactly one .onnx file at its top level (found: {names}).")
    return candidates[0]


def validate(source: Path, task: str) -> dict:
    import onnx  # noqa: PLC0415

    path = _onnx_file(source)
    try:
        onnx.checker.check_model(str(path), full_check=True)
        model = onnx.load(str(path), load_external_data=False)
    except (onnx.checker.ValidationError, onnx.onnx_cpp2py_export.shape_inference.InferenceError) as error:
        raise ValidationError(f"{path.name} fails onnx's checker: {str(error).splitlines()[0][:300]}") from None
    except Exception as error:  # noqa: BLE001 - a file protobuf cannot parse raises many types
        raise ValidationError(f"{path.name} is not a readable ONNX model ({type(error).__name__}).") from None
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    names = [i.name for i in inputs]
    if "input_ids" not in names or "attention_mask" not in names or set(names) - set(ALLOWED_INPUTS):
        raise ValidationError(
            f"{path.name} takes inputs {names}; an encoder must take input_ids and attention_mask (and optionally "
            "token_type_ids), as Hugging Face exports do."
        )
    for tensor in inputs:
        kind = tensor.type.tensor_type
        if kind.elem_type != onnx.TensorProto.INT64 or len(kind.shape.dim) != 2:
            raise ValidationError(f"input {tensor.name} of {path.name} must be int64 shaped [batch, sequence].")
    if len(model.graph.output) != 1:
        raise ValidationError(f"{path.name} has {len(model.graph.output)} outputs; one is needed.")
    output = model.graph.output[0]
    rank = len(output.type.tensor_type.shape.dim)
    if rank != 2:
        raise ValidationError(
            f"output {output.name} of {path.name} has rank {rank}; it must be [batch, n] (pooled embeddings or "
            "logits). Export the model with pooling in the graph, or ship the Hugging Face model for conversion."
        )
    if not (source / "tokenizer.json").is_file():
        raise ValidationError("the package has no tokenizer.json; ship the model's fast tokenizer with it.")
    return {"onnx": path, "input_names": [n for n in ALLOWED_INPUTS if n in names], "output_name": output.name}


def convert(source: Path, output: Path, task: str, precision: str, tolerance: float) -> dict:
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    from tokenizers import Tokenizer  # noqa: PLC0415

    started = time.perf_counter()
    checked = validate(source, task)
    output.mkdir(parents=True, exist_ok=True)
    for item in source.iterdir():  # the graph, its external data, the tokenizer: linked, not copied
        if item.is_file():
            _link_or_copy(item, output / item.name)
    onnx_path = output / checked["onnx"].name
    tokenizer = Tokenizer.from_file(str(source / "tokenizer.json"))
    tokenizer.enable_padding()
    tokenizer.enable_truncation(32)  # short samples: the graph's position limit is not known here
    encodings = tokenizer.encode_batch(SAMPLE_TEXTS)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    feed = {name: feed[name] for name in checked["input_names"]}
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    reference = session.run([checked["output_name"]], feed)[0]
    max_abs_diff, provider = 0.0, "CPUExecutionProvider"
    if precision != "fp32":
        try:
            onnx_path, max_abs_diff, provider = lower_precision(
                onnx_path, precision, feed, checked["output_name"], reference, tolerance
            )
        except PrecisionError as error:
            raise ValidationError(str(error)) from None
    encoder = read_encoder_config(source, 512)
    config_file = source / "tokenizer_config.json"
    max_length = json.loads(config_file.read_text()).get("model_max_length", 512) if config_file.is_file() else 512
    return {
        "converter_version": CONVERTER_VERSION,
        "task": task,
        "onnx_file": onnx_path.name,
        "input_names": checked["input_names"],
        "output_name": checked["output_name"],
        "output_dimension": int(reference.shape[-1]),
        "max_seq_length": int(min(max_length, 8192)),
        "pooling": "in the graph",
        "normalize": encoder.normalize if task != "rerank" else False,
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance if precision != "fp32" else 0.0,
        "precision": precision,
        "execution_provider": provider,
        "tokenizer_files": [n for n in TOKENIZER_FILES if (source / n).is_file()],
        "seconds": round(time.perf_counter() - started, 3),
    }


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)


def main(argv: list[str] | None = None) -> int:
    follow_parent()  # a converter dies with the loader that started it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--task", choices=["embedding", "rerank"], required=True)
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    parser.add_argument("--precision-tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        report = convert(args.source, args.output, args.task, args.precision, args.precision_tolerance)
    except ValidationError as error:
        print(json.dumps({"error": str(error)}))
        return 1
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
