"""The llama.cpp model's reading of vLLM's sampling parameters (no Triton, no llama.cpp): what it
accepts, what it refuses, and the engine request it becomes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services/modelplane/loader/triton_models/llamacpp"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "services/modelplane/loader/triton_models"))

from llama_text import SamplingParams
from llm_protocol import RequestError


def test_guided_decoding_json_becomes_the_engines_json_schema() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    params = SamplingParams.from_json(json.dumps({"temperature": 0, "guided_decoding": {"json": schema}}))
    body = params.engine_request("Hi", seed=7)
    assert body["json_schema"] == schema and body["temperature"] == 0.0 and body["seed"] == 7
    as_text = SamplingParams.from_json(json.dumps({"guided_decoding": {"json": json.dumps(schema)}}))
    assert as_text.json_schema == schema
    assert SamplingParams.from_json('{"guided_decoding": {"json_object": true}}').json_schema == {"type": "object"}
    assert "json_schema" not in SamplingParams.from_json("{}").engine_request("Hi", seed=1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"guided_decoding": {"regex": "a+"}}', "guided_decoding ['regex'] is not supported by this model"),
        ('{"guided_decoding": {"json": [1]}}', "guided_decoding.json must be a JSON schema object"),
        ('{"json_schema": {}}', "unsupported sampling parameters ['json_schema']"),
        ('{"logprobs": 2}', "unsupported sampling parameters ['logprobs']"),
    ],
)
def test_what_the_model_would_not_honour_is_refused(raw: str, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams.from_json(raw)
