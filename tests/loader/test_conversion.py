"""Conversion of real (small, random-weight) models saved as a user would save them: cross-encoder
rerankers, PyTorch pickles, ONNX packages, int8/fp16 variants, and the Triton configs they get."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from tritonclient.grpc import model_config_pb2

from modelplane.common.types import Model, ModelSpec, Precision, RuntimeHints, RuntimeTarget, Task
from modelplane.loader.builders import select_builder
from modelplane.loader.builders.targets import target_options
from modelplane.loader.conversion import run_converter
from modelplane.loader.convert import encoder, onnx_package
from modelplane.loader.errors import ConversionFailed
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import parse_config, render_config

# Real conversions (PyTorch to ONNX, checked against PyTorch): seconds each, left out of `make test-fast`.
pytestmark = pytest.mark.slow

WORDS = [
    "the",
    "a",
    "query",
    "document",
    "model",
    "serves",
    "text",
    "fast",
    "slow",
    "cat",
    "dog",
    "runs",
    "private",
    "network",
    "triton",
    "loader",
]
PAIRS = [("which model serves text", "the loader serves models fast"), ("a cat", "the dog runs"), ("triton", "a")]


def _save_bert(directory: Path, *, classifier: bool, safe: bool = True) -> Path:
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertModel, BertTokenizerFast

    torch.manual_seed(0)
    directory.mkdir(parents=True)
    (directory / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(directory / "vocab.txt"))
    config = BertConfig(
        vocab_size=len(WORDS) + 5,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=1,
    )
    model = (BertForSequenceClassification if classifier else BertModel)(config).eval()
    model.save_pretrained(directory)
    if not safe:  # as older checkpoints ship: a pickled state dict (transformers 5 no longer writes one)
        torch.save(model.state_dict(), directory / "pytorch_model.bin")
        for weights in directory.glob("*.safetensors"):
            weights.unlink()
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def reranker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_bert(tmp_path_factory.mktemp("reranker") / "pkg", classifier=True)


def _scores_torch(package: Path) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(package).eval()
    batch = AutoTokenizer.from_pretrained(package)(
        [q for q, _ in PAIRS], [d for _, d in PAIRS], padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        return model(**batch).logits.numpy()


def _scores_onnx(artifact: Path, report: dict) -> np.ndarray:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    tokenizer.enable_padding()
    encodings = tokenizer.encode_batch(PAIRS)
    feed = {
        "input_ids": np.array([e.ids for e in encodings], dtype=np.int64),
        "attention_mask": np.array([e.attention_mask for e in encodings], dtype=np.int64),
        "token_type_ids": np.array([e.type_ids for e in encodings], dtype=np.int64),
    }
    session = ort.InferenceSession(str(artifact / report["onnx_file"]), providers=["CPUExecutionProvider"])
    return session.run(None, {name: feed[name] for name in report["input_names"]})[0]


def test_a_cross_encoder_reranker_converts_and_matches_pytorch_on_new_pairs(reranker: Path, tmp_path: Path) -> None:
    report = json.loads(json.dumps(encoder.asdict(encoder.convert(reranker, tmp_path / "out", "rerank", 1e-4))))
    assert report["output_name"] == "logits" and report["output_dimension"] == 1
    assert report["max_abs_diff"] <= 1e-4 and report["precision"] == "fp32"
    expected = _scores_torch(reranker)
    actual = _scores_onnx(tmp_path / "out", report)
    assert actual.shape == (3, 1) and np.max(np.abs(actual - expected)) < 1e-4


def test_an_int8_variant_records_its_measured_difference_and_tolerance(reranker: Path, tmp_path: Path) -> None:
    report = encoder.convert(reranker, tmp_path / "out", "rerank", 1e-4, precision="int8", precision_tolerance=0.05)
    assert report.precision == "int8" and report.onnx_file == "model.int8.onnx"
    assert report.tolerance == 0.05 and 0 < report.max_abs_diff <= 0.05 and report.fp32_max_abs_diff <= 1e-4
    actual = _scores_onnx(tmp_path / "out", encoder.asdict(report))
    assert np.max(np.abs(actual - _scores_torch(reranker))) <= 0.05


def test_fp16_without_a_gpu_is_refused_rather_than_shipped_unchecked(reranker: Path, tmp_path: Path) -> None:
    with pytest.raises(encoder.ConversionError, match=r"fp16 artifacts are for GPU targets .* no CUDA provider"):
        encoder.convert(reranker, tmp_path / "out", "rerank", 1e-4, precision="fp16", precision_tolerance=0.01)


def test_pytorch_bin_weights_are_read_with_weights_only_and_convert(tmp_path: Path) -> None:
    package = _save_bert(tmp_path / "pkg", classifier=True, safe=False)
    assert (package / "pytorch_model.bin").is_file() and not list(package.glob("*.safetensors"))
    report = encoder.convert(package, tmp_path / "out", "rerank", 1e-4)
    assert report.weights.startswith("pytorch pickle (weights_only=True)") and report.max_abs_diff <= 1e-4
    assert not (tmp_path / ".out-weights").exists()  # the safetensors copy is gone


class _Payload:
    """A pickle whose loading would call open(marker, "w"): if it ever ran, the marker would exist."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_malicious_pickle_is_refused_and_its_payload_never_runs(tmp_path: Path) -> None:
    import torch

    package = _save_bert(tmp_path / "pkg", classifier=True, safe=False)
    marker = tmp_path / "payload-ran"
    torch.save({"weight": _Payload(marker)}, package / "pytorch_model.bin")  # a checkpoint as torch writes it
    with pytest.raises(encoder.ConversionError) as refused:
        encoder.convert(package, tmp_path / "out", "rerank", 1e-4)  # in this process: a payload would run here
    assert "pytorch_model.bin is not plain weights: loading it with weights_only=True was refused" in str(refused.value)
    assert "Unsupported global: GLOBAL io.open" in str(refused.value) and "ship the .safetensors" in str(refused.value)
    assert not marker.exists()
    assert not (tmp_path / "out" / "model.onnx").exists()


def test_an_onnx_package_is_validated_and_passed_through(reranker: Path, tmp_path: Path) -> None:
    encoder.convert(reranker, tmp_path / "exported", "rerank", 1e-4)
    report = onnx_package.convert(tmp_path / "exported", tmp_path / "out", "rerank", "fp32", 0.0)
    assert report["input_names"] == ["input_ids", "attention_mask", "token_type_ids"]
    assert report["output_name"] == "logits" and report["output_dimension"] == 1
    assert (tmp_path / "out" / "model.onnx").read_bytes() == (tmp_path / "exported" / "model.onnx").read_bytes()


def test_a_corrupt_onnx_file_is_refused(tmp_path: Path, reranker: Path) -> None:
    encoder.convert(reranker, tmp_path / "pkg", "rerank", 1e-4)
    onnx_file = tmp_path / "pkg" / "model.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[: onnx_file.stat().st_size // 3])
    with pytest.raises(
        onnx_package.ValidationError, match=r"model.onnx (is not a readable ONNX model|fails onnx's checker)"
    ):
        onnx_package.validate(tmp_path / "pkg", "rerank")


def test_an_onnx_graph_that_returns_token_vectors_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["input_ids"], ["hidden"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["hidden", "axes"], ["tokens"]),
        ],
        "tokens",
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"]),
        ],
        [helper.make_tensor_value_info("tokens", TensorProto.FLOAT, ["batch", "sequence", 1])],
        [helper.make_tensor("axes", TensorProto.INT64, [1], [2])],
    )
    (tmp_path / "pkg").mkdir()
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(tmp_path / "pkg" / "model.onnx")
    )
    (tmp_path / "pkg" / "tokenizer.json").write_text("{}")
    with pytest.raises(onnx_package.ValidationError, match="has rank 3; it must be \\[batch, n\\]"):
        onnx_package.validate(tmp_path / "pkg", "embedding")


# Triton configurations -----------------------------------------------------------------------------


def _report() -> dict:
    return {
        "onnx_file": "model.onnx",
        "input_names": ["input_ids", "attention_mask", "token_type_ids"],
        "output_name": "logits",
        "output_dimension": 1,
        "max_seq_length": 512,
        "normalize": False,
    }


@pytest.mark.parametrize("target", [RuntimeTarget.ONNXRUNTIME, RuntimeTarget.EMBEDDED])
def test_triton_configs_parse_as_tritons_model_config(target: RuntimeTarget, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": [{"id": 0, "content": "[PAD]"}]}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    hints = RuntimeHints(
        target=target,
        max_batch_size=32,
        preferred_batch_sizes=[8, 16],
        max_queue_delay_microseconds=500,
        instance_count=2,
    )
    model = Model(spec=ModelSpec(name="reranker", task=Task.RERANK, runtime_hints=hints))
    entry = select_builder(encoder_format(), Task.RERANK).entry(model, tmp_path, tmp_path, _report(), LoaderSettings())
    config = parse_config(render_config(entry.config))
    assert config.name == "reranker" and config.max_batch_size == 32
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [i.name for i in config.input] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(i.data_type == model_config_pb2.TYPE_INT64 and list(i.dims) == [-1] for i in config.input)
    assert config.output[0].name == "logits" and list(config.output[0].dims) == [1]
    assert config.instance_group[0].count == 2
    assert config.model_warmup[0].inputs["input_ids"].zero_data
    if target == RuntimeTarget.ONNXRUNTIME:
        assert config.platform == "onnxruntime_onnx" and config.default_model_filename == "model.onnx"
        assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
        assert set(entry.files) == {"model.onnx"}
    else:
        assert config.backend == "python" and config.parameters["onnx_file"].string_value == "model.onnx"
        assert all(i.allow_ragged_batch for i in config.input)


def encoder_format():
    from modelplane.common.types import ModelFormat

    return ModelFormat.HUGGINGFACE


def test_a_tensorrt_target_on_a_loader_without_a_gpu_is_refused_clearly() -> None:
    model = Model(
        spec=ModelSpec(name="m", task=Task.EMBEDDING, runtime_hints=RuntimeHints(target=RuntimeTarget.TENSORRT))
    )
    with pytest.raises(
        ConversionFailed, match=r"targets TensorRT, whose plans are built on the GPU .* lacks an NVIDIA GPU"
    ):
        target_options(model, LoaderSettings())


def test_precision_and_target_key_the_artifact() -> None:
    builder = select_builder(encoder_format(), Task.EMBEDDING)
    plain = builder.options(Model(spec=ModelSpec(name="m", task=Task.EMBEDDING)), LoaderSettings())
    int8 = builder.options(
        Model(spec=ModelSpec(name="m", task=Task.EMBEDDING, runtime_hints=RuntimeHints(precision=Precision.INT8))),
        LoaderSettings(),
    )
    assert plain["precision"] == "fp32" and int8["precision"] == "int8" and int8["precision_tolerance"] == 0.05
    assert plain["target"] == "EMBEDDED"


# What a failed conversion tells a client ----------------------------------------------------------


async def test_a_converter_crash_is_reported_without_its_traceback_or_server_paths(tmp_path: Path) -> None:
    """The model's FAILED reason reaches API clients (409): the exception, not the trace, and no
    path where the server keeps its files; the loader log keeps the full output."""
    crash = "import json; open('/var/cache/modelplane/packages/ab12/config.json')"  # fails: no such file
    with pytest.raises(ConversionFailed) as failed:
        await run_converter([sys.executable, "-c", crash], timeout_seconds=60)
    message = failed.value.message
    assert message.startswith(
        "The converter crashed (exit status 1): FileNotFoundError: [Errno 2] No such file or directory: 'config.json'."
    ), message
    assert "Traceback" not in message and 'File "' not in message and "/var/cache" not in message
    assert "the loader log has the converter's full output" in message


async def test_a_converter_killed_by_a_signal_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConversionFailed, match=r"^The converter was killed by SIGKILL\. Check that the package"):
        await run_converter([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"], 60)


async def test_the_onnx_checkers_finding_names_the_file_not_the_cache_path(tmp_path: Path) -> None:
    """An ONNX model whose external weights file is missing: onnx's checker names it by its full
    path inside the loader's cache."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    package = tmp_path / "cache" / "packages" / ("ab" * 32)
    package.mkdir(parents=True)
    weights = numpy_helper.from_array(np.ones((4, 4), dtype=np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "external",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(package / "model.onnx"), save_as_external_data=True, location="weights.bin", size_threshold=0)
    (package / "weights.bin").unlink()
    (package / "tokenizer.json").write_text("{}")
    command = [sys.executable, "-m", "modelplane.loader.convert.onnx_package", "--source", str(package)]
    with pytest.raises(ConversionFailed) as failed:
        await run_converter([*command, "--output", str(tmp_path / "out"), "--task", "embedding"], timeout_seconds=120)
    message = failed.value.message
    assert message.startswith("Conversion failed: model.onnx ")
    assert "weights.bin" in message and str(tmp_path) not in message and "/packages/" not in message, message
