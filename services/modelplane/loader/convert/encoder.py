"""Export a Hugging Face encoder (embedding model or cross-encoder) to ONNX and prove it.

Runs in a subprocess of the loader (`python -m modelplane.loader.convert.encoder`), so PyTorch's
memory, its import time and any crash stay out of the service. Pooling is part of the exported
graph, so every Triton target (python backend, onnxruntime backend, TensorRT) serves the same
artifact and only pooled vectors cross the network. The export is parity-checked against PyTorch
on sample inputs of different lengths; above the tolerance the conversion fails.

Prints one JSON object (the ConversionReport, or {"error": ...}) on stdout.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from modelplane.common.process import follow_parent
from modelplane.loader.convert.precision import PrecisionError, lower_precision
from modelplane.loader.convert.weights import PICKLE_SUFFIXES, UnsafeWeights, as_safetensors

CONVERTER_VERSION = "encoder-2"
OPSET = 17
SAMPLE_TEXTS = [
    "A short one.",
    "modelplane serves models to a private Dify deployment inside the organisation's own network.",
    "Triton holds the converted models; the loader fetches, verifies and converts packages, and the inference "
    "service tokenises texts and calls Triton over gRPC. " * 3,
]
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
)


class ConversionError(Exception):
    pass


@dataclass
class EncoderConfig:
    """What sentence-transformers' files say about turning token vectors into one vector."""

    pooling: str = "mean"
    normalize: bool = False
    max_seq_length: int = 512


@dataclass
class ConversionReport:
    converter_version: str
    task: str
    onnx_file: str
    input_names: list[str]
    output_name: str
    output_dimension: int
    max_seq_length: int
    pooling: str
    normalize: bool
    max_abs_diff: float
    tolerance: float
    opset: int
    seconds: float
    tokenizer_files: list[str] = field(default_factory=list)
    torch_version: str = ""
    transformers_version: str = ""
    precision: str = "fp32"
    fp32_max_abs_diff: float = 0.0
    execution_provider: str = "CPUExecutionProvider"
    weights: str = "safetensors"


def read_encoder_config(source: Path, model_max_positions: int) -> EncoderConfig:
    config = EncoderConfig(max_seq_length=model_max_positions)
    modules_file = source / "modules.json"
    if not modules_file.exists():
        return config
    for module in json.loads(modules_file.read_text()):
        kind = module.get("type", "")
        if kind.endswith("models.Normalize"):
            config.normalize = True
        elif kind.endswith("models.Pooling"):
            pooling = json.loads((source / module["path"] / "config.json").read_text())
            if pooling.get("pooling_mode_cls_token"):
                config.pooling = "cls"
            elif pooling.get("pooling_mode_max_tokens"):
                config.pooling = "max"
            elif pooling.get("pooling_mode_mean_sqrt_len_tokens"):
                config.pooling = "mean_sqrt_len"
            else:
                config.pooling = "mean"
    bert_config = source / "sentence_bert_config.json"
    if bert_config.exists():
        limit = json.loads(bert_config.read_text()).get("max_seq_length")
        if limit:
            config.max_seq_length = min(int(limit), model_max_positions)
    return config


def _build_wrapper(model, task: str, pooling: str):
    import torch  # noqa: PLC0415

    class PooledEncoder(torch.nn.Module):
        """Token vectors → one vector per text, as sentence-transformers pools them."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            # Keyword arguments: transformers 5 models take use_cache and friends positionally.
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            tokens = self.model(**kwargs).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(tokens.dtype)
            if pooling == "cls":
                return tokens[:, 0]
            if pooling == "max":
                return torch.where(mask > 0, tokens, torch.finfo(tokens.dtype).min).max(dim=1).values
            summed = (tokens * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            if pooling == "mean_sqrt_len":
                return summed / counts.sqrt()
            return summed / counts

    class CrossEncoderLogits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, token_type_ids=None):
            kwargs = {"input_ids": input_ids, "attention_mask": attention_mask}
            if token_type_ids is not None:
                kwargs["token_type_ids"] = token_type_ids
            return self.model(**kwargs).logits

    return CrossEncoderLogits() if task == "rerank" else PooledEncoder()


def convert(
    source: Path, output: Path, task: str, tolerance: float, precision: str = "fp32", precision_tolerance: float = 0.0
) -> ConversionReport:
    """Exports `source` to ONNX in `output`; `precision` int8 or fp16 adds a lower-precision variant
    (checked against PyTorch with `precision_tolerance`) and serves that instead."""
    weights = "safetensors"
    if not any(source.glob("*.safetensors")) and any(source.glob(f"*{s}") for s in PICKLE_SUFFIXES):
        try:
            source = as_safetensors(source, output.parent / f".{output.name}-weights")
        except UnsafeWeights as error:
            raise ConversionError(str(error)) from None
        weights = "pytorch pickle (weights_only=True) → safetensors"
    try:
        return _convert(source, output, task, tolerance, precision, precision_tolerance, weights)
    finally:
        if weights != "safetensors":
            shutil.rmtree(source, ignore_errors=True)


def _convert(
    source: Path, output: Path, task: str, tolerance: float, precision: str, precision_tolerance: float, weights: str
) -> ConversionReport:
    import numpy as np  # noqa: PLC0415
    import onnxruntime as ort  # noqa: PLC0415
    import torch  # noqa: PLC0415
    import transformers  # noqa: PLC0415
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer  # noqa: PLC0415

    started = time.perf_counter()
    if not (source / "config.json").exists():
        raise ConversionError(
            f"{source.name} has no config.json, so it is not a Hugging Face model directory; "
            "package the model as save_pretrained writes it."
        )
    loader = AutoModelForSequenceClassification if task == "rerank" else AutoModel
    try:
        # use_safetensors: transformers itself never unpickles anything (see weights.py).
        model = loader.from_pretrained(source, local_files_only=True, use_safetensors=True).eval()
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError, KeyError) as error:
        raise ConversionError(f"transformers could not load the model: {error}") from error
    max_positions = int(getattr(model.config, "max_position_embeddings", 512) or 512)
    encoder = read_encoder_config(source, max_positions)
    input_names = ["input_ids", "attention_mask"]
    if "token_type_ids" in tokenizer.model_input_names:
        input_names.append("token_type_ids")
    output_name = "logits" if task == "rerank" else "sentence_embedding"
    wrapper = _build_wrapper(model, task, encoder.pooling)

    if task == "rerank":
        batch = tokenizer(
            [SAMPLE_TEXTS[0]] * len(SAMPLE_TEXTS),
            SAMPLE_TEXTS,
            padding=True,
            truncation=True,
            max_length=encoder.max_seq_length,
            return_tensors="pt",
        )
    else:
        batch = tokenizer(
            SAMPLE_TEXTS, padding=True, truncation=True, max_length=encoder.max_seq_length, return_tensors="pt"
        )
    inputs = tuple(batch[name] for name in input_names)
    output.mkdir(parents=True, exist_ok=True)
    onnx_path = output / "model.onnx"
    dynamic_axes = {name: {0: "batch", 1: "sequence"} for name in input_names}
    dynamic_axes[output_name] = {0: "batch"}
    with torch.no_grad():
        expected = wrapper(*inputs).numpy()
        torch.onnx.export(
            wrapper,
            inputs,
            str(onnx_path),
            input_names=input_names,
            output_names=[output_name],
            dynamic_axes=dynamic_axes,
            opset_version=OPSET,
            dynamo=False,
        )
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    actual = session.run([output_name], {name: batch[name].numpy().astype(np.int64) for name in input_names})[0]
    max_abs_diff = float(np.max(np.abs(actual - expected)))
    if max_abs_diff > tolerance:
        raise ConversionError(
            f"the ONNX export differs from PyTorch by up to {max_abs_diff:.2e}, above the tolerance "
            f"{tolerance:.0e}; the model may use an operation the exporter gets wrong."
        )
    fp32_max_abs_diff, provider = max_abs_diff, "CPUExecutionProvider"
    if precision != "fp32":
        feed = {name: batch[name].numpy().astype(np.int64) for name in input_names}
        try:
            onnx_path, max_abs_diff, provider = lower_precision(
                onnx_path, precision, feed, output_name, expected, precision_tolerance
            )
        except PrecisionError as error:
            raise ConversionError(str(error)) from None
        tolerance = precision_tolerance
    copied = []
    for name in TOKENIZER_FILES:
        if (source / name).exists():
            (output / name).write_bytes((source / name).read_bytes())
            copied.append(name)
    if "tokenizer.json" not in copied:
        # Slow tokenizers (vocab.txt only) are converted to the fast format the inference service reads.
        tokenizer.save_pretrained(output)
        copied = sorted({*copied, "tokenizer.json"})
    return ConversionReport(
        converter_version=CONVERTER_VERSION,
        task=task,
        onnx_file=onnx_path.name,
        input_names=input_names,
        output_name=output_name,
        output_dimension=int(expected.shape[-1]),
        max_seq_length=encoder.max_seq_length,
        pooling=encoder.pooling if task != "rerank" else "",
        normalize=encoder.normalize if task != "rerank" else False,
        max_abs_diff=max_abs_diff,
        tolerance=tolerance,
        opset=OPSET,
        seconds=round(time.perf_counter() - started, 3),
        tokenizer_files=copied,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        precision=precision,
        fp32_max_abs_diff=fp32_max_abs_diff,
        execution_provider=provider,
        weights=weights,
    )


def main(argv: list[str] | None = None) -> int:
    follow_parent()  # a converter dies with the loader that started it
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--task", choices=["embedding", "rerank"], required=True)
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--precision", choices=["fp32", "fp16", "int8"], default="fp32")
    parser.add_argument("--precision-tolerance", type=float, default=0.0)
    args = parser.parse_args(argv)
    try:
        report = convert(args.source, args.output, args.task, args.tolerance, args.precision, args.precision_tolerance)
    except ConversionError as error:
        print(json.dumps({"error": str(error)}))
        return 1
    print(json.dumps(asdict(report)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
