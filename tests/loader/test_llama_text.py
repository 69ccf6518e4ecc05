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


def test_guided_decoding_grammar_becomes_the_engines_grammar() -> None:
    grammar = '%llguidance {}\nstart: "yes" | "no"\n'
    body = SamplingParams.from_json(json.dumps({"guided_decoding": {"grammar": grammar}})).engine_request("Hi", seed=1)
    assert body["grammar"] == grammar and "json_schema" not in body
    assert "grammar" not in SamplingParams.from_json("{}").engine_request("Hi", seed=1)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ('{"guided_decoding": {"grammar": " "}}', "guided_decoding.grammar must be a non-empty string"),
        (
            '{"guided_decoding": {"grammar": "start: \\"a\\"", "json_object": true}}',
            "guided_decoding sets ['grammar', 'json_object']; set only one of them",
        ),
        ('{"guided_decoding": {"regex": "a+"}}', "guided_decoding ['regex'] is not supported by this model"),
        ('{"guided_decoding": {"json": [1]}}', "guided_decoding.json must be a JSON schema object"),
        ('{"json_schema": {}}', "unsupported sampling parameters ['json_schema']"),
        ('{"logprobs": 2}', "unsupported sampling parameters ['logprobs']"),
    ],
)
def test_what_the_model_would_not_honour_is_refused(raw: str, message: str) -> None:
    with pytest.raises(RequestError, match=message.replace("[", r"\[").replace("]", r"\]")):
        SamplingParams.from_json(raw)


def _gguf(path: Path, tokens: list[bytes], *, version: int = 3) -> Path:
    """A GGUF file with metadata only: a string, a float array and the vocabulary, as llama.cpp
    writes them (little-endian; u64 lengths)."""
    import struct

    def string(b: bytes) -> bytes:
        return struct.pack("<Q", len(b)) + b

    kvs = [
        string(b"general.name") + struct.pack("<I", 8) + string(b"tiny"),
        string(b"tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, len(tokens)) + b"\0\0\0\0" * len(tokens),
        string(b"tokenizer.ggml.tokens") + struct.pack("<IIQ", 9, 8, len(tokens)) + b"".join(string(t) for t in tokens),
    ]
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", version, 0, len(kvs)) + b"".join(kvs))
    return path


def test_the_longest_vocabulary_entry_is_read_from_the_gguf_metadata(tmp_path: Path) -> None:
    from llama_text import gguf_longest_token_bytes

    tokens = [b"<0x0A>", "▁the".encode(), b" " * 31, "▁नमस्ते".encode()]
    assert gguf_longest_token_bytes(str(_gguf(tmp_path / "m.gguf", tokens))) == 31
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_longest_token_bytes(str(_gguf(tmp_path / "old.gguf", tokens, version=1)))
    (tmp_path / "x.bin").write_bytes(b"PK\3\4" + bytes(40))
    with pytest.raises(ValueError, match="not a GGUF file"):
        gguf_longest_token_bytes(str(tmp_path / "x.bin"))
