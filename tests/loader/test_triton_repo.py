"""Triton repository entries: the config text and the atomic swap."""

from __future__ import annotations

from pathlib import Path

from modelplane.loader.triton_repo import ModelRepository, TensorConfig, TritonModelConfig, render_config


def _config(name: str = "minilm") -> TritonModelConfig:
    return TritonModelConfig(
        name=name,
        backend="python",
        max_batch_size=64,
        inputs=[TensorConfig("input_ids", "TYPE_INT64", (-1,), allow_ragged_batch=True)],
        outputs=[TensorConfig("sentence_embedding", "TYPE_FP32", (384,))],
        max_queue_delay_microseconds=2000,
        parameters={"onnx_file": "model.onnx"},
    )


def test_config_text_has_batching_and_parameters() -> None:
    text = render_config(_config())
    assert 'name: "minilm"' in text and 'backend: "python"' in text and "max_batch_size: 64" in text
    assert "allow_ragged_batch: true" in text
    assert "dynamic_batching {\n  max_queue_delay_microseconds: 2000\n}" in text
    assert 'key: "onnx_file"\n  value: { string_value: "model.onnx" }' in text


def test_write_replaces_an_entry_and_leaves_no_staging_behind(tmp_path: Path) -> None:
    repository = ModelRepository(tmp_path / "models")
    weights = tmp_path / "model.onnx"
    weights.write_bytes(b"v1")
    repository.write(_config(), 1, {"model.onnx": weights})
    weights_v2 = tmp_path / "model-v2.onnx"
    weights_v2.write_bytes(b"v2")
    entry = repository.write(_config(), 2, {"model.onnx": weights_v2})
    assert sorted(p.name for p in entry.iterdir()) == ["2", "config.pbtxt"]
    assert (entry / "2" / "model.onnx").read_bytes() == b"v2"
    assert list(repository.staging.iterdir()) == [] and list(repository.trash.iterdir()) == []
    assert [p.name for p in repository.root.iterdir()] == ["minilm"]


def test_an_entry_built_beside_is_swapped_in_and_the_served_one_can_be_put_back(tmp_path: Path) -> None:
    """A refresh builds the new entry beside the served one; if Triton refuses it, the served
    entry goes back, so a later restart loads what was serving."""
    repository = ModelRepository(tmp_path / "models")
    served, new = tmp_path / "served.onnx", tmp_path / "new.onnx"
    served.write_bytes(b"served")
    new.write_bytes(b"new")
    entry = repository.write(_config(), 1, {"model.onnx": served})
    built = repository.build(_config(), 1, {"model.onnx": new})
    assert (entry / "1" / "model.onnx").read_bytes() == b"served"  # untouched until the swap
    retired = repository.swap_in(built)
    assert (entry / "1" / "model.onnx").read_bytes() == b"new"
    repository.restore("minilm", retired)
    assert (entry / "1" / "model.onnx").read_bytes() == b"served"
    assert list(repository.staging.iterdir()) == [] and list(repository.trash.iterdir()) == []
