"""The chat and completion routes' HTTP shapes: SSE framing, errors before and after the stream
starts, keepalive comments, content parts, ignored fields.

Behind the gateway is a scripted inference service (a real gRPC server on a free port that answers
with chunks a test chooses), because a mid-stream failure or a slow first token cannot be caused
on demand in the real stack. The real stack is exercised in tests/integration/test_chat.py."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import grpc
import pytest
from fastapi.testclient import TestClient

from modelplane.common.v1 import usage_pb2
from modelplane.gateway.app import create_app
from modelplane.gateway.routes import chat
from modelplane.gateway.settings import GatewaySettings
from modelplane.inference.v1 import inference_service_pb2 as pb
from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc
from tests.gateway.scripted import serving

USAGE = usage_pb2.Usage(prompt_tokens=7, completion_tokens=3, total_tokens=10)


class ScriptedInference(pb_grpc.InferenceServiceServicer):
    """Answers Generate and Chat with `script`: texts, then a final chunk or an error."""

    def __init__(self) -> None:
        self.requests: list[object] = []
        self.first_delay = 0.0
        self.texts = ["Hello", ",", " world"]
        self.fail_after: grpc.StatusCode | None = None
        self.fail_before: tuple[grpc.StatusCode, str] | None = None
        self.final: dict = {"text": "!", "finish_reason": pb.FINISH_REASON_LENGTH}

    def _answer(self, request: object, context: grpc.ServicerContext, kind: type) -> Iterator[object]:
        self.requests.append(request)
        if self.fail_before:
            context.abort(*self.fail_before)
        time.sleep(self.first_delay)
        for text in self.texts:
            yield kind(text=text)
        if self.fail_after:
            context.abort(self.fail_after, "Triton is not reachable; retry shortly.")
        yield kind(**self.final, usage=USAGE)

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        yield from self._answer(request, context, pb.GenerateResponse)

    def Chat(self, request: pb.ChatRequest, context: grpc.ServicerContext) -> Iterator[pb.ChatResponse]:
        yield from self._answer(request, context, pb.ChatResponse)


@pytest.fixture
def inference() -> Iterator[tuple[ScriptedInference, str]]:
    servicer = ScriptedInference()
    with serving(servicer) as address:
        yield servicer, address


@pytest.fixture
def client(inference: tuple[ScriptedInference, str]) -> Iterator[TestClient]:
    settings = GatewaySettings(inference_address=inference[1], registry_address=inference[1], max_tokens_limit=512)
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client


def _events(text: str) -> list[str]:
    """The stream's events, checking the framing Dify's parser relies on: `data:` lines (or SSE
    comments), each event followed by a blank line."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    for event in events:
        assert "\n" not in event and (event.startswith("data: ") or event.startswith(": ")), event
    return events


def _chunks(events: list[str]) -> list[dict]:
    return [json.loads(e.removeprefix("data: ")) for e in events if e.startswith("data: {")]


CHAT = {"model": "m", "messages": [{"role": "user", "content": "Hi"}]}


def test_chat_stream_framing_finish_reason_on_the_last_content_chunk_then_usage_and_done(client: TestClient) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = _events(response.text)
    assert events[-1] == "data: [DONE]"
    chunks = _chunks(events)
    assert all("choices" in c and c["object"] == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c["choices"]]
    assert [c["choices"][0]["delta"]["content"] for c in content] == ["Hello", ",", " world!"]
    assert content[0]["choices"][0]["delta"]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in content] == [None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 3,
        "total_tokens": 10,
    }
    assert len({c["id"] for c in chunks}) == 1


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_stream_without_usage_option_carries_usage_on_its_last_content_chunk(client: TestClient, route: str) -> None:
    """Dify's SDK never asks for usage; without it Dify would count tokens with a tokenizer of its
    own. No chunk has empty choices: a client that did not ask may read choices[0] of each."""
    body = {**CHAT, "stream": True} if "chat" in route else {"model": "m", "prompt": "Once", "stream": True}
    chunks = _chunks(_events(client.post(route, json=body).text))
    assert all(c["choices"] for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert all("usage" not in c for c in chunks[:-1])


def test_non_streamed_answers_have_openai_shapes(client: TestClient) -> None:
    chat_answer = client.post("/v1/chat/completions", json=CHAT).json()
    assert chat_answer["object"] == "chat.completion"
    assert chat_answer["choices"][0]["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert chat_answer["choices"][0]["finish_reason"] == "length"
    assert chat_answer["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    completion = client.post("/v1/completions", json={"model": "m", "prompt": ["Once"]}).json()
    assert completion["object"] == "text_completion" and completion["choices"][0]["text"] == "Hello, world!"


def test_request_fields_reach_the_service_and_unknown_fields_are_ignored(
    client: TestClient, inference: tuple[ScriptedInference, str]
) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]},
        ],
        "max_tokens": 100000,
        "temperature": 0,
        "seed": 42,
        "stop": "\n",
        "tools": [{"type": "function", "function": {"name": "f"}}, {"type": "retrieval"}],
        "response_format": {"type": "json_schema", "json_schema": {"type": "object"}},
        "user": "dify-user",
        "logit_bias": {"1": 2},
    }
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    sent = inference[0].requests[-1]
    assert isinstance(sent, pb.ChatRequest)
    assert [(m.role, m.content) for m in sent.messages] == [("system", "Be brief."), ("user", "Hello")]
    parameters = sent.parameters
    assert parameters.max_tokens == 512  # the gateway's limit
    assert parameters.temperature == 0 and parameters.HasField("temperature")
    assert parameters.seed == 42 and list(parameters.stop) == ["\n"]
    assert not parameters.HasField("top_p")
    assert [(t.name, t.parameters_json) for t in sent.tools] == [("f", "")]  # other tool types are ignored
    # A bare schema in json_schema (as Dify users type it) is the schema.
    assert sent.response_format.type == pb.RESPONSE_FORMAT_TYPE_JSON_SCHEMA
    assert json.loads(sent.response_format.schema_json) == {"type": "object"}
    client.post("/v1/chat/completions", json=CHAT)
    assert not inference[0].requests[-1].parameters.HasField("max_tokens")  # absent: the model's own cap applies


def test_refusals_before_the_stream_are_http_errors(
    client: TestClient, inference: tuple[ScriptedInference, str]
) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:,"}}
    body = {"model": "m", "messages": [{"role": "user", "content": [image]}]}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(
        "Message 0 has a content part of type 'image_url', but the models served here read text only"
    )
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x", "n": 3})
    assert response.status_code == 400 and response.json()["error"]["param"] == "n"
    inference[0].fail_before = (grpc.StatusCode.NOT_FOUND, "Model 'm' is not registered.")
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    assert response.status_code == 404 and response.json()["error"]["message"] == "Model 'm' is not registered."


def test_an_error_after_the_stream_started_is_an_error_chunk_and_the_end(
    client: TestClient, inference: tuple[ScriptedInference, str]
) -> None:
    inference[0].fail_after = grpc.StatusCode.UNAVAILABLE
    response = client.post("/v1/chat/completions", json={**CHAT, "stream": True})
    assert response.status_code == 200
    chunks = _chunks(_events(response.text))
    assert [c["choices"][0]["delta"]["content"] for c in chunks[:-1]] == ["Hello", ",", " world"]
    assert "choices" not in chunks[-1]  # how Dify's parser tells an error chunk
    assert chunks[-1]["error"]["code"] == "inference_unavailable"
    assert "Triton is not reachable; retry shortly." in chunks[-1]["error"]["message"]
    assert "[DONE]" not in response.text


def test_a_slow_first_token_is_waited_for_with_sse_comments(
    client: TestClient, inference: tuple[ScriptedInference, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(chat, "FIRST_TOKEN_GRACE_SECONDS", 0.1)
    monkeypatch.setattr(chat, "KEEPALIVE_SECONDS", 0.1)
    inference[0].first_delay = 0.6
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x", "stream": True})
    events = _events(response.text)
    assert events[0] == ": waiting for the model"
    assert "".join(c["choices"][0]["text"] for c in _chunks(events)) == "Hello, world!"


def test_values_beyond_the_contracts_range_are_refused_as_invalid_not_a_crash(client: TestClient) -> None:
    # Found by Schemathesis: a top_k too large for the contract's int32 was a 500.
    response = client.post("/v1/completions", json={"model": "m", "prompt": "x", "top_k": 4933163660300166})
    assert response.status_code == 422 and response.json()["error"]["param"] == "top_k"
    huge = client.post("/v1/completions", json={"model": "m", "prompt": "x", "max_tokens": 2**40})
    assert huge.status_code == 200  # lowered to the gateway's limit


CALLS = [
    pb.ToolCall(id="call_1", name="get_weather", arguments_json='{"city": "Paris"}'),
    pb.ToolCall(id="call_2", name="get_time", arguments_json='{"zone": "CET"}'),
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def test_tool_calls_blocking_have_openai_shape(client: TestClient, inference: tuple[ScriptedInference, str]) -> None:
    inference[0].texts = []
    inference[0].final = {"tool_calls": CALLS, "finish_reason": pb.FINISH_REASON_TOOL_CALLS}
    answer = client.post("/v1/chat/completions", json={**CHAT, "tools": TOOLS, "tool_choice": "required"}).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] is None  # Dify reads the key: it must be there
    assert choice["message"]["tool_calls"] == [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        {"id": "call_2", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}},
    ]
    assert inference[0].requests[-1].tool_choice.mode == pb.TOOL_CHOICE_MODE_REQUIRED


def test_tool_calls_streamed_come_whole_one_per_delta(
    client: TestClient, inference: tuple[ScriptedInference, str]
) -> None:
    inference[0].texts = []
    inference[0].final = {"tool_calls": CALLS, "finish_reason": pb.FINISH_REASON_TOOL_CALLS}
    body = {**CHAT, "tools": TOOLS, "stream": True, "tool_choice": {"type": "function", "function": {"name": "x"}}}
    chunks = _chunks(_events(client.post("/v1/chat/completions", json=body).text))
    deltas = [c["choices"][0]["delta"] for c in chunks]
    assert [d["tool_calls"] for d in deltas] == [
        [
            {
                "index": 0,
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
        [
            {
                "index": 1,
                "id": "call_2",
                "type": "function",
                "function": {"name": "get_time", "arguments": '{"zone": "CET"}'},
            }
        ],
    ]
    assert all("content" not in d for d in deltas) and deltas[0]["role"] == "assistant"
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None, "tool_calls"]
    sent = inference[0].requests[-1]
    assert (sent.tool_choice.mode, sent.tool_choice.function_name) == (pb.TOOL_CHOICE_MODE_FUNCTION, "x")


def test_legacy_functions_get_a_function_call(client: TestClient, inference: tuple[ScriptedInference, str]) -> None:
    inference[0].texts = []
    inference[0].final = {"tool_calls": CALLS[:1], "finish_reason": pb.FINISH_REASON_TOOL_CALLS}
    body = {**CHAT, "functions": [{"name": "get_weather", "parameters": {"type": "object"}}], "function_call": "auto"}
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "function_call"
    assert choice["message"]["function_call"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert inference[0].requests[-1].tools[0].name == "get_weather"


def test_history_with_tool_calls_and_results_reaches_the_service(
    client: TestClient, inference: tuple[ScriptedInference, str]
) -> None:
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    ]
    assert (
        client.post("/v1/chat/completions", json={"model": "m", "messages": messages, "tools": TOOLS}).status_code
        == 200
    )
    sent = inference[0].requests[-1].messages
    assert [(c.id, c.name, c.arguments_json) for c in sent[1].tool_calls] == [("call_1", "get_weather", "{}")]
    assert (sent[2].role, sent[2].tool_call_id, sent[2].content) == ("tool", "call_1", "Sunny")


def test_reasoning_goes_to_reasoning_content(client: TestClient, inference: tuple[ScriptedInference, str]) -> None:
    inference[0].texts = []
    inference[0].final = {"text": "Four.", "reasoning_text": "2+2 is 4.", "finish_reason": pb.FINISH_REASON_STOP}
    message = client.post("/v1/chat/completions", json=CHAT).json()["choices"][0]["message"]
    assert (message["content"], message["reasoning_content"]) == ("Four.", "2+2 is 4.")
    chunks = _chunks(_events(client.post("/v1/chat/completions", json={**CHAT, "stream": True}).text))
    assert chunks[0]["choices"][0]["delta"] == {
        "role": "assistant",
        "content": "Four.",
        "reasoning_content": "2+2 is 4.",
    }


@pytest.mark.parametrize(
    ("field", "message"),
    [
        (
            {"tool_choice": "sometimes"},
            "tool_choice is 'sometimes'; use 'auto', 'none', 'required' or a named function.",
        ),
        ({"response_format": {"type": "yaml"}}, "response_format type 'yaml' is not known"),
        ({"response_format": {"type": "json_schema"}}, 'response_format json_schema needs "json_schema"'),
    ],
)
def test_malformed_tool_and_format_fields_are_400s(client: TestClient, field: dict, message: str) -> None:
    response = client.post("/v1/chat/completions", json={**CHAT, **field})
    assert response.status_code == 400 and response.json()["error"]["message"].startswith(message)
