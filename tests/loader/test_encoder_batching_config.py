"""The batching part of an encoder's Triton config: what the settings and hints turn into."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from modelplane.common.types import Model, ModelFormat, ModelSpec, RuntimeHints, Task
from modelplane.loader.builders.encoder import EncoderBuilder
from modelplane.loader.settings import LoaderSettings
from modelplane.loader.triton_repo import render_config

REPORT = {
    "onnx_file": "model.onnx",
    "input_names": ["input_ids", "attention_mask", "token_type_ids"],
    "output_name": "sentence_embedding",
    "output_dimension": 384,
    "max_seq_length": 256,
    "normalize": True,
}


@pytest.fixture
def artifact(tmp_path: Path, minilm_path: Path) -> Path:
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(minilm_path / name, tmp_path / name)
    return tmp_path


def _config_text(artifact: Path, settings: LoaderSettings, hints: RuntimeHints | None = None) -> str:
    spec = ModelSpec(
        name="minilm", task=Task.EMBEDDING, format=ModelFormat.HUGGINGFACE, runtime_hints=hints or RuntimeHints()
    )
    entry = EncoderBuilder().entry(Model(spec=spec), artifact, artifact, REPORT, settings)
    return render_config(entry.config)


def test_by_default_triton_batches_without_waiting_and_the_model_buckets_by_length(artifact: Path) -> None:
    text = _config_text(artifact, LoaderSettings())
    assert "dynamic_batching {\n  max_queue_delay_microseconds: 0\n}" in text
    assert text.count("allow_ragged_batch: true") == 3
    assert 'key: "length_buckets"\n  value: { string_value: "12,16,24,32,48,64,96,128,192,256,384,512" }' in text
    assert 'key: "bucket_merge_tokens"\n  value: { string_value: "16" }' in text
    assert 'key: "parallel_runs"\n  value: { string_value: "2" }' in text


def test_bucket_bounds_and_batching_come_from_the_environment(artifact: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELPLANE_LOADER_LENGTH_BUCKETS", "[64, 16, 32]")
    monkeypatch.setenv("MODELPLANE_LOADER_MAX_QUEUE_DELAY_MICROSECONDS", "500")
    monkeypatch.setenv("MODELPLANE_LOADER_BUCKET_MERGE_TOKENS", "0")
    monkeypatch.setenv("MODELPLANE_LOADER_ONNX_PARALLEL_RUNS", "1")
    text = _config_text(artifact, LoaderSettings())
    assert 'key: "parallel_runs"\n  value: { string_value: "1" }' in text
    assert 'value: { string_value: "16,32,64" }' in text
    assert 'key: "bucket_merge_tokens"\n  value: { string_value: "0" }' in text
    assert "max_queue_delay_microseconds: 500" in text

    monkeypatch.setenv("MODELPLANE_LOADER_DYNAMIC_BATCHING", "false")
    assert "dynamic_batching" not in _config_text(artifact, LoaderSettings())


def test_a_models_hints_override_the_defaults(artifact: Path) -> None:
    hints = RuntimeHints(max_batch_size=16, max_queue_delay_microseconds=1000, preferred_batch_sizes=[8, 16])
    text = _config_text(artifact, LoaderSettings(), hints)
    assert "max_batch_size: 16" in text
    assert "preferred_batch_size: [ 8, 16 ]\n  max_queue_delay_microseconds: 1000" in text
