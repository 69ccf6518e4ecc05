"""The official `openai` Python client against the running stack, as application code uses it."""

from __future__ import annotations

import base64
from collections.abc import Iterator

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import RunningStack
from tests.integration.services import serve_gateway

EMBEDDER = "all-minilm-l6-v2"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "Triton loads models from a repository.", "a"]


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> openai.OpenAI:
    # Dify-style deployments often have no key configured: the client still needs some string.
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(stack: RunningStack) -> np.ndarray:
    response = httpx.post(f"{stack.gateway_url}/v1/embeddings", json={"model": EMBEDDER, "input": TEXTS}, timeout=60)
    return np.array([item["embedding"] for item in response.json()["data"]])


@pytest.mark.parametrize("encoding_format", [None, "float", "base64"])
def test_embeddings(client: openai.OpenAI, reference: np.ndarray, encoding_format: str | None) -> None:
    """With no encoding_format the client asks for base64 and decodes it itself; asked for base64
    explicitly, it hands the strings over as they came."""
    extra = {"encoding_format": encoding_format} if encoding_format else {}
    response = client.embeddings.create(model=EMBEDDER, input=TEXTS, **extra)
    assert [item.index for item in response.data] == [0, 1, 2]
    vectors = [
        np.frombuffer(base64.b64decode(item.embedding), dtype="<f4") if encoding_format == "base64" else item.embedding
        for item in response.data
    ]
    np.testing.assert_allclose(vectors, reference, atol=1e-6)
    assert response.model == EMBEDDER
    assert response.usage.prompt_tokens == response.usage.total_tokens > len(TEXTS)


def test_embeddings_of_one_string_and_of_token_ids(client: openai.OpenAI, reference: np.ndarray) -> None:
    one = client.embeddings.create(model=EMBEDDER, input=TEXTS[2])
    np.testing.assert_allclose(one.data[0].embedding, reference[2], atol=1e-6)
    # 1037 is "a" in MiniLM's vocabulary: token ids embed exactly as the text does.
    ids = client.embeddings.create(model=EMBEDDER, input=[[1037]])
    np.testing.assert_allclose(ids.data[0].embedding, reference[2], atol=1e-5)


def test_models_list(client: openai.OpenAI) -> None:
    models = {model.id: model for model in client.models.list()}
    assert models[EMBEDDER].owned_by == "modelplane"
    assert models[EMBEDDER].model_extra["task"] == "embedding"


def test_errors_arrive_as_the_clients_own_exceptions(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as missing:
        client.embeddings.create(model="no-such-model", input="x")
    assert missing.value.status_code == 404
    assert missing.value.code == "model_not_found"
    assert "Model 'no-such-model' is not registered" in missing.value.message
    assert missing.value.request_id  # the client reads x-request-id, the id to grep the logs for

    with pytest.raises(openai.UnprocessableEntityError) as malformed:
        client.embeddings.create(model=EMBEDDER, input=[])
    assert malformed.value.body["param"] == "input"


@pytest.fixture(scope="module")
def keyed_gateway(stack: RunningStack) -> Iterator[str]:
    with serve_gateway(stack, api_keys="sk-openai-client-test") as url:
        yield f"{url}/v1"


def test_api_keys(keyed_gateway: str) -> None:
    right = openai.OpenAI(base_url=keyed_gateway, api_key="sk-openai-client-test", max_retries=0)
    assert right.embeddings.create(model=EMBEDDER, input="x").data
    wrong = openai.OpenAI(base_url=keyed_gateway, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.embeddings.create(model=EMBEDDER, input="x")
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"


def _generation_model(client: openai.OpenAI) -> str:
    """The bundled chat model; its absence is a failure of `make run`, not a reason to skip."""
    generation = [m.id for m in client.models.list() if (m.model_extra or {}).get("task") == "generation"]
    assert generation, "no generation model is registered in the stack (make run serves gemma-3-270m)"
    return generation[0]


def test_chat_completions(client: openai.OpenAI) -> None:
    model = _generation_model(client)
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 8
    chunks = list(
        client.chat.completions.create(
            model=model,
            messages=messages,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_stream_without_stream_options_ends_with_usage_and_every_chunk_has_a_choice(client: openai.OpenAI) -> None:
    """Code written for OpenAI reads choices[0] of every chunk when it did not ask for usage; the
    usage still comes, on the last chunk, and equals the blocking answer's."""
    model = _generation_model(client)
    messages = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0)
    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == answer.choices[0].finish_reason
    assert chunks[-1].usage == answer.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_completions(client: openai.OpenAI) -> None:
    model = _generation_model(client)
    answer = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == answer.choices[0].text
