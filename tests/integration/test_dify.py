"""Dify's own provider code against the running stack: the `dify-plugin` package's OpenAI-API-
compatible model classes, driven as Dify drives them when an admin saves a model (credential
validation) and when an app or knowledge base uses it (invocation).

dify-plugin pins gevent and gevent-patches every process that imports it, so it runs from its own
virtual environment (made once per requirements file and kept in the user's cache) through
dify/driver.py.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import numpy as np
import pytest

from tests.integration.conftest import RunningStack
from tests.integration.services import serve_gateway

DIFY = Path(__file__).parent / "dify"
EMBEDDER = "all-minilm-l6-v2"
API_KEY = "sk-modelplane-dify-test-7c1d"


def _dify(python: Path, scenario: dict) -> dict:
    """What Dify does with the scenario's model and credentials: validate, then invoke."""
    done = subprocess.run(
        [str(python), str(DIFY / "driver.py")],
        input=json.dumps(scenario),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _credentials(url: str, api_key: str | None = None, **more: str) -> dict:
    """The form an admin fills in: endpoint URL, optional API key, and per type a few numbers."""
    credentials = {"endpoint_url": url, **more}
    if api_key is not None:
        credentials["api_key"] = api_key
    return credentials


@pytest.fixture(scope="module")
def keyed_gateway(stack: RunningStack) -> Iterator[str]:
    with serve_gateway(stack, api_keys=API_KEY) as url:
        yield url


TEXTS = ["What is modelplane?", "Dify calls it over the OpenAI-compatible API.", "Bananas are yellow."]
QUERY = "What is the capital of the United States?"
DOCS = [
    "Carson City is the capital city of the American state of Nevada.",
    "Washington, D.C. is the capital of the United States.",
    "Bananas are yellow.",
]


@pytest.mark.parametrize("base", ["/v1", "", "/v1/"], ids=["v1", "bare-host", "trailing-slash"])
def test_text_embedding_validates_and_embeds_without_a_key(stack: RunningStack, dify_python: Path, base: str) -> None:
    outcome = _dify(
        dify_python,
        {
            "model_type": "text-embedding",
            "model": EMBEDDER,
            "credentials": _credentials(stack.gateway_url + base, context_size="256"),
            "texts": TEXTS,
        },
    )
    assert outcome["stage"] == "done", outcome
    result = outcome["result"]
    direct = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS}, timeout=60)
    np.testing.assert_allclose(result["embeddings"], [d["embedding"] for d in direct.json()["data"]], atol=1e-5)
    # Dify bills what the gateway counted with the model's own tokenizer, not a GPT-2 estimate.
    assert result["tokens"] == direct.json()["usage"]["total_tokens"]


def test_rerank_validates_and_ranks_with_bearer_none(
    stack: RunningStack, dify_python: Path, cross_encoder: str
) -> None:
    """Without an API key Dify's rerank class sends 'Authorization: Bearer None'."""
    outcome = _dify(
        dify_python,
        {
            "model_type": "rerank",
            "model": cross_encoder,
            "credentials": _credentials(f"{stack.gateway_url}/v1"),
            "query": QUERY,
            "docs": DOCS,
            "top_n": 2,
        },
    )
    assert outcome["stage"] == "done", outcome
    docs = outcome["result"]["docs"]
    direct = httpx.post(
        f"{stack.gateway_url}/v1/rerank", json={"model": cross_encoder, "query": QUERY, "documents": DOCS}, timeout=60
    ).json()["results"]
    assert [d["index"] for d in docs] == [r["index"] for r in direct[:2]]
    assert [d["text"] for d in docs] == [DOCS[r["index"]] for r in direct[:2]]


def test_rerank_with_an_embedding_model(stack: RunningStack, dify_python: Path) -> None:
    outcome = _dify(
        dify_python,
        {
            "model_type": "rerank",
            "model": EMBEDDER,
            "credentials": _credentials(f"{stack.gateway_url}/v1"),
            "query": QUERY,
            "docs": DOCS,
            "score_threshold": 0.5,
        },
    )
    assert outcome["stage"] == "done", outcome
    # Dify min-max normalises scores; the document that answers the question comes first.
    assert outcome["result"]["docs"][0]["index"] == 1


@pytest.mark.parametrize("model_type", ["text-embedding", "rerank"])
def test_with_keys_the_right_key_validates_and_a_wrong_one_is_refused(
    keyed_gateway: str, dify_python: Path, model_type: str
) -> None:
    scenario = {"model_type": model_type, "model": EMBEDDER, "texts": TEXTS, "query": QUERY, "docs": DOCS}
    right = _dify(dify_python, {**scenario, "credentials": _credentials(f"{keyed_gateway}/v1", API_KEY)})
    assert right["stage"] == "done", right
    for wrong_key in (None, "sk-wrong"):
        wrong = _dify(dify_python, {**scenario, "credentials": _credentials(f"{keyed_gateway}/v1", wrong_key)})
        assert wrong["stage"] == "validate" and wrong["error_type"] == "CredentialsValidateFailedError"
        assert "401" in wrong["error"]


def test_unknown_model_fails_validation(stack: RunningStack, dify_python: Path) -> None:
    outcome = _dify(
        dify_python,
        {
            "model_type": "text-embedding",
            "model": "no-such-model",
            "credentials": _credentials(f"{stack.gateway_url}/v1"),
            "texts": TEXTS,
        },
    )
    assert outcome["stage"] == "validate" and "404" in outcome["error"]


def _generation_model(stack: RunningStack) -> str:
    """The bundled chat model; its absence is a failure of `make run`, not a reason to skip."""
    models = httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()["data"]
    generation = [card["id"] for card in models if card["task"] == "generation"]
    assert generation, "no generation model is registered in the stack (make run serves gemma-3-270m)"
    return generation[0]


@pytest.mark.parametrize("mode", ["chat", "completion"])
@pytest.mark.parametrize("stream", [True, False], ids=["stream", "blocking"])
def test_llm_validates_with_a_ping_and_generates(
    stack: RunningStack, dify_python: Path, mode: str, stream: bool
) -> None:
    model = _generation_model(stack)
    outcome = _dify(
        dify_python,
        {
            "model_type": "llm",
            "model": model,
            "credentials": _credentials(f"{stack.gateway_url}/v1", mode=mode, context_size="8192"),
            "prompt": "Once upon a time",
            "max_tokens": 12,
            "stream": stream,
        },
    )
    assert outcome["stage"] == "done", outcome
    assert outcome["result"]["text"].strip()
    assert outcome["result"]["prompt_tokens"]
    assert not outcome["result"]["usage_counted_by_dify"]  # streamed or not, the gateway sent usage


WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "description": "The city, e.g. Paris"}},
        "required": ["city"],
    },
}


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_agent_calls_a_tool_and_answers_with_its_result(stack: RunningStack, dify_python: Path, stream: bool) -> None:
    """Dify's agent loop with function calling set to Tool Call: the model calls the tool (its
    arguments valid for the tool's schema), the result goes back in a tool message, and the model
    then answers with text."""
    outcome = _dify(
        dify_python,
        {
            "model_type": "agent",
            "model": "smollm2-135m-instruct",
            "credentials": _credentials(
                f"{stack.gateway_url}/v1",
                mode="chat",
                context_size="4096",
                function_calling_type="tool_call",
                stream_function_calling="supported",
            ),
            "prompt": "Call the get_weather tool for Paris.",
            "tools": [WEATHER_TOOL],
            "tool_result": "Sunny, 18 degrees Celsius.",
            "stream": stream,
        },
    )
    assert outcome["stage"] == "done", outcome
    result = outcome["result"]
    assert result["first_calls"], result
    for call in result["first_calls"]:
        assert call["name"] == "get_weather" and call["id"].startswith("call_") and call["type"] == "function"
        jsonschema.validate(json.loads(call["arguments"]), WEATHER_TOOL["parameters"])
    assert result["usage"]["prompt_tokens"]
    # The second turn answers from the tool's result, in text (no tool-call JSON in it).
    assert result["second_calls"] == []
    assert "Sunny" in result["second_text"] and "tool_call" not in result["second_text"]
