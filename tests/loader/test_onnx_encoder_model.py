"""The embedded encoder model (loader/triton_models/onnx_encoder/model.py) on a real converted
ONNX BERT: its calls run one after another or several at once (`parallel_runs`), and every row
gets the same vector either way, the same as when it runs alone.

The model runs inside Triton's python-backend stub, which this test does not start (the
integration tests do); `triton_python_backend_utils` is the stub's module, stood in for here by
the two names `initialize` and `_run_bucketed` touch."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from modelplane.loader.convert import encoder
from tests.loader.test_conversion import _save_bert

pytestmark = pytest.mark.slow

MODEL_PY = Path(encoder.__file__).parents[1] / "triton_models" / "onnx_encoder" / "model.py"


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("encoder")
    package = _save_bert(folder / "pkg", classifier=False)
    report = encoder.asdict(encoder.convert(package, folder / "repo" / "1", "embedding", 1e-4))
    return folder / "repo", report


@pytest.fixture
def model_class(monkeypatch: pytest.MonkeyPatch) -> type:
    utils = types.ModuleType("triton_python_backend_utils")
    utils.Logger = types.SimpleNamespace(log_info=lambda message: None)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", utils)
    spec = importlib.util.spec_from_file_location("onnx_encoder_model", MODEL_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.TritonPythonModel


def _model(model_class: type, converted: tuple[Path, dict], *, parallel_runs: int, merge_tokens: int = 16):
    repository, report = converted
    parameters = {
        "onnx_file": report["onnx_file"],
        "length_buckets": "8,12,16,24,32,48",
        "bucket_merge_tokens": str(merge_tokens),
        "parallel_runs": str(parallel_runs),
    }
    config = {"parameters": {k: {"string_value": v} for k, v in parameters.items()}, "output": [{"name": "y"}]}
    model = model_class()
    model.initialize(
        {
            "model_config": json.dumps(config),
            "model_repository": str(repository),
            "model_version": "1",
            "model_name": "enc",
        }
    )
    model.output_name = report["output_name"]
    return model


def _feed(lengths: list[int]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(5, 21, size=length)
        ids[row, 0], ids[row, length - 1] = 2, 3  # [CLS] ... [SEP]
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _alone(model, feed: dict[str, np.ndarray], row: int) -> np.ndarray:
    length = int(feed["attention_mask"][row].sum())
    return model._run_bucketed({name: array[row : row + 1, :length] for name, array in feed.items()})[0]


LENGTHS = [3, 40, 7, 7, 12, 31, 5, 22, 9, 16, 48, 4, 13, 27, 6, 19, 8, 8, 35, 11]


def test_parallel_runs_give_every_row_the_vector_it_gets_alone(model_class: type, converted: tuple[Path, dict]) -> None:
    one, two = (_model(model_class, converted, parallel_runs=n) for n in (1, 2))
    try:
        feed = _feed(LENGTHS)
        serial, parallel = one._run_bucketed(feed), two._run_bucketed(feed)
        assert parallel.shape == serial.shape == (len(LENGTHS), 32)
        np.testing.assert_allclose(parallel, serial, rtol=0, atol=1e-6)
        for row in range(len(LENGTHS)):
            np.testing.assert_allclose(parallel[row], _alone(two, feed, row), rtol=0, atol=1e-6)
    finally:
        one.finalize()
        two.finalize()


def test_a_large_call_is_split_between_the_runs_and_a_small_one_is_not(
    model_class: type, converted: tuple[Path, dict]
) -> None:
    model = _model(model_class, converted, parallel_runs=2)
    try:
        # Sixteen rows of one bucket: one call of 16 x 24 tokens, worth splitting in two.
        lengths = np.array([20, 21, 22, 23, 24, 20, 21, 22, 23, 24, 20, 21, 22, 23, 24, 20])
        calls = model._spread([np.arange(16)], lengths)
        assert len(calls) == 2 and sorted(np.concatenate(calls).tolist()) == list(range(16))
        assert abs(int(lengths[calls[0]].sum()) - int(lengths[calls[1]].sum())) <= 24
        # Two rows: splitting would cost a call's overhead for little work, so they run as one.
        assert [rows.tolist() for rows in model._spread([np.arange(2)], lengths[:2])] == [[0, 1]]
        # Several calls already: none is split, the largest goes first.
        calls = model._spread([np.arange(3), np.arange(3, 16)], lengths)
        assert [len(rows) for rows in calls] == [13, 3]
        feed = _feed(lengths.tolist())
        np.testing.assert_allclose(
            model._run_bucketed(feed), _model(model_class, converted, parallel_runs=1)._run_bucketed(feed), atol=1e-6
        )
    finally:
        model.finalize()
