"""What Dify apps are built from, through the whole stack on the bundled SmolLM2-135M-Instruct
(GGUF, llama.cpp in Triton), with the official openai client: a chat that answers, tool calls
(blocking and streamed, required and named), structured output, the capabilities a user sees, and
the bad requests each refused with a 400 that says what to fix. Every tool call's arguments and
every structured answer are validated against their schema."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel

from tests.integration.conftest import RunningStack

CHAT = "smollm2-135m-instruct"
BASE = "gemma-3-270m"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "The city, e.g. Paris"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city"],
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Current weather in a city.", "parameters": WEATHER_SCHEMA},
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a time zone.",
            "parameters": {"type": "object", "properties": {"zone": {"type": "string"}}, "required": ["zone"]},
        },
    },
]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
ASK_WEATHER = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(stack: RunningStack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key="unused", max_retries=0, timeout=300)


def _valid_call(name: str, arguments: str) -> dict:
    assert name in SCHEMAS, name
    value = json.loads(arguments)
    jsonschema.validate(value, SCHEMAS[name])
    return value


def test_the_chat_model_answers_and_ends_its_turn(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CHAT,
        messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
        temperature=0,
    )
    choice = answer.choices[0]
    assert "Paris" in choice.message.content
    assert choice.finish_reason == "stop"  # no max_tokens: the model ended its turn
    assert answer.usage.completion_tokens < 100


def test_a_base_model_without_max_tokens_stops_at_its_cap(stack: RunningStack) -> None:
    body = {"model": BASE, "prompt": "Once upon a time", "temperature": 1.0, "seed": 3}
    answer = httpx.post(f"{stack.gateway_url}/v1/completions", json=body, timeout=300).json()
    assert answer["usage"]["completion_tokens"] <= 256


def test_models_show_context_length_and_capabilities(stack: RunningStack) -> None:
    cards = {card["id"]: card for card in httpx.get(f"{stack.gateway_url}/v1/models", timeout=10).json()["data"]}
    assert cards[CHAT]["capabilities"] == ["tools", "json_schema"]
    assert cards[CHAT]["context_length"] == 4096
    assert "capabilities" not in cards["all-minilm-l6-v2"] or cards["all-minilm-l6-v2"]["capabilities"] is None


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_tool_choice_required_gives_calls_whose_arguments_validate(client: openai.OpenAI, stream: bool) -> None:
    request = {"model": CHAT, "messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": "required", "temperature": 0}
    if not stream:
        answer = client.chat.completions.create(**request)
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        calls = [(c.id, c.function.name, c.function.arguments) for c in choice.message.tool_calls]
        assert answer.usage.completion_tokens > 0
    else:
        calls_by_index: dict[int, list] = {}
        reasons, contents = [], []
        for chunk in client.chat.completions.create(**request, stream=True):
            delta = chunk.choices[0].delta
            contents.append(delta.content or "")
            reasons.append(chunk.choices[0].finish_reason)
            for call in delta.tool_calls or []:
                # Each call arrives whole, in one delta.
                assert call.index not in calls_by_index and call.id and call.function.name
                calls_by_index[call.index] = [call.id, call.function.name, call.function.arguments]
        assert reasons[-1] == "tool_calls" and "".join(contents) == ""
        calls = [tuple(value) for value in calls_by_index.values()]
    assert calls
    for call_id, name, arguments in calls:
        assert call_id.startswith("call_")
        _valid_call(name, arguments)


def test_a_named_tool_choice_calls_that_tool(client: openai.OpenAI) -> None:
    answer = client.chat.completions.create(
        model=CHAT,
        messages=ASK_WEATHER,
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        temperature=0,
    )
    calls = answer.choices[0].message.tool_calls
    assert [c.function.name for c in calls] == ["get_time"] * len(calls)
    for call in calls:
        _valid_call(call.function.name, call.function.arguments)


class City(BaseModel):
    name: str
    country: str
    population: int


@pytest.mark.parametrize("stream", [False, True], ids=["blocking", "stream"])
def test_structured_output_follows_a_pydantic_schema(client: openai.OpenAI, stream: bool) -> None:
    messages = [{"role": "user", "content": "Describe Paris as JSON with its name, country and population."}]
    if not stream:
        parsed = client.chat.completions.parse(model=CHAT, messages=messages, response_format=City, temperature=0)
        city = parsed.choices[0].message.parsed
        assert isinstance(city, City)
        return
    schema = {"name": "City", "schema": City.model_json_schema()}
    text = "".join(
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=CHAT,
            messages=messages,
            response_format={"type": "json_schema", "json_schema": schema},
            temperature=0,
            stream=True,
        )
        if chunk.choices
    )
    City.model_validate_json(text)


def test_a_bare_schema_in_json_schema_is_accepted_as_dify_users_type_it(stack: RunningStack) -> None:
    body = {
        "model": CHAT,
        "messages": [{"role": "user", "content": "Name a colour."}],
        "response_format": {"type": "json_schema", "json_schema": WEATHER_SCHEMA},
        "temperature": 0,
        "max_tokens": 60,
    }
    answer = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json=body, timeout=300).json()
    jsonschema.validate(json.loads(answer["choices"][0]["message"]["content"]), WEATHER_SCHEMA)


BAD_REQUESTS = {
    "tool parameters that are not a JSON schema": (
        {
            "messages": ASK_WEATHER,
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 7}}}],
        },
        "The parameters schema of tool 'f' cannot be used: it is not a valid JSON schema",
        "tools.0.function.parameters",
    ),
    "tool_choice naming an unknown function": (
        {"messages": ASK_WEATHER, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "fly"}}},
        "tool_choice names the function 'fly', which is not among the request's tools (get_weather, get_time)",
        "tool_choice",
    ),
    "a tool message without tool_call_id": (
        {"messages": [*ASK_WEATHER, {"role": "tool", "content": "18 C"}], "tools": TOOLS},
        "Message 1 has role 'tool' but no tool_call_id; set it to the id of the assistant's tool call",
        "messages.1.tool_call_id",
    ),
    "a json_schema that cannot be compiled": (
        {
            "messages": ASK_WEATHER,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "w", "schema": {"properties": {"a": {"$ref": "#/$defs/nowhere"}}}},
            },
        },
        "The response_format.json_schema 'w' cannot be used: its $ref '#/$defs/nowhere' at /properties/a does not",
        "response_format.json_schema.schema",
    ),
    "an image for a text model": (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                    ],
                }
            ]
        },
        "Message 0 has a content part of type 'image_url', but the models served here read text only",
        "messages.0.content",
    ),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_with_what_to_fix(stack: RunningStack, case: str) -> None:
    body, message, param = BAD_REQUESTS[case]
    response = httpx.post(f"{stack.gateway_url}/v1/chat/completions", json={"model": CHAT, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith(message), error["message"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
