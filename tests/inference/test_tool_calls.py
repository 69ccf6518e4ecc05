"""Tools, structured output and thinking on the inference side (no network): the checks that refuse
what cannot be enforced, the schema a tool answer is constrained to, the rendering of a tool
conversation, the parsing of an answer, and the splitting of thinking from the answer."""

from __future__ import annotations

import json

import jsonschema
import pytest

from modelplane.common.types import Model, ModelSpec, RuntimeHints, ServingProfile, Task
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest
from modelplane.inference.generation import ChatMessage, SamplingParameters, render_chat, sampling_for_triton
from modelplane.inference.reasoning import ReasoningSplitter
from modelplane.inference.structured import ResponseFormat, ResponseFormatType, check_schema, finite, response_schema
from modelplane.inference.tool_calls import Tool, ToolCall, ToolChoice, ToolChoiceMode, plan_tools
from modelplane.loader.chat_templates import GEMMA

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city.",
    parameters_json=json.dumps(
        {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        }
    ),
)
TIME = Tool(name="get_time", parameters_json="")
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _serving(template: str) -> ServingModel:
    model = Model(spec=ModelSpec(name="m", task=Task.GENERATION))
    return ServingModel(model, ServingProfile(triton_model_name="m", chat_template=template), None)


@pytest.mark.parametrize(
    ("schema", "problem"),
    [
        ({"type": "objectx"}, "it is not a valid JSON schema ('objectx' is not valid under any of the given schemas"),
        ({"properties": {"a": {"$ref": "#/$defs/missing"}}}, "its $ref '#/$defs/missing' at /properties/a does not"),
        ({"properties": {"a": {"$ref": "https://example.com/s.json"}}}, "its $ref 'https://example.com/s.json'"),
        ({"type": "string", "pattern": "(?<=a)b"}, "the pattern '(?<=a)b' at / uses lookaround or a backreference"),
        ([1, 2], "a JSON schema is a JSON object, not list."),
    ],
)
def test_schemas_that_cannot_be_enforced_are_refused_naming_the_problem(schema: object, problem: str) -> None:
    with pytest.raises(InvalidRequest) as refused:
        check_schema(schema, "response_format", "response_format.json_schema.schema")
    assert refused.value.message.startswith(f"The response_format cannot be used: {problem}")
    assert refused.value.metadata["param"] == "response_format.json_schema.schema"


def test_a_schema_with_local_definitions_is_accepted() -> None:
    schema = {"$defs": {"city": {"type": "string", "pattern": "^[A-Z]"}}, "properties": {"c": {"$ref": "#/$defs/city"}}}
    check_schema(schema, "x", "x")
    assert response_schema(ResponseFormat(ResponseFormatType.JSON_SCHEMA, json.dumps(schema))) == schema
    assert response_schema(ResponseFormat(ResponseFormatType.JSON_OBJECT)) == {"type": "object"}
    assert response_schema(ResponseFormat(ResponseFormatType.TEXT)) is None


def test_schemas_are_made_finite_for_a_small_model_without_losing_what_they_accept() -> None:
    original = {
        "type": "object",
        "properties": {
            "properties": {"type": "integer"},  # a property named like a keyword stays a property
            "items": {"type": "array", "items": {"type": "object", "properties": {"n": {"type": "number"}}}},
            "bounded": {"type": "integer", "maximum": 5},
        },
        "additionalProperties": True,
    }
    made = finite(original)
    assert made["additionalProperties"] is True  # what the caller said stays
    assert made["properties"]["properties"] == {"type": "integer", "minimum": -(2**53 - 1), "maximum": 2**53 - 1}
    inner = made["properties"]["items"]["items"]
    assert inner["additionalProperties"] is False and inner["properties"]["n"]["maximum"] == 1e15
    assert made["properties"]["bounded"] == {"type": "integer", "maximum": 5}
    assert original["properties"]["properties"] == {"type": "integer"}  # not changed in place


def test_bad_tools_and_tool_choices_are_refused_with_what_to_fix() -> None:
    bad_schema = Tool(name="f", parameters_json=json.dumps({"type": "nonsense"}))
    with pytest.raises(InvalidRequest, match="parameters schema of tool 'f' cannot be used: it is not a valid JSON"):
        plan_tools([bad_schema], ToolChoice())
    with pytest.raises(InvalidRequest) as unknown:
        plan_tools([WEATHER], ToolChoice(ToolChoiceMode.FUNCTION, "launch_rocket"))
    assert unknown.value.message == (
        "tool_choice names the function 'launch_rocket', which is not among the request's tools (get_weather); "
        "name one of them."
    )
    with pytest.raises(InvalidRequest, match="a function name has 1 to 64 letters"):
        plan_tools([Tool(name="no spaces")], ToolChoice())
    with pytest.raises(InvalidRequest, match="the request has no tools"):
        plan_tools([], ToolChoice(ToolChoiceMode.REQUIRED))
    assert plan_tools([WEATHER], ToolChoice(ToolChoiceMode.NONE)) is None


def test_the_answer_schema_admits_only_real_calls_with_valid_arguments() -> None:
    auto = plan_tools([WEATHER, TIME], ToolChoice()).output_schema()
    valid = jsonschema.Draft202012Validator(auto)
    assert valid.is_valid({"response": "Hello"})
    assert valid.is_valid({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
    assert valid.is_valid({"tool_calls": [{"name": "get_time", "arguments": {}}]})
    assert not valid.is_valid({"tool_calls": [{"name": "get_weather", "arguments": {}}]})  # city is required
    assert not valid.is_valid({"tool_calls": [{"name": "send_mail", "arguments": {}}]})
    assert not valid.is_valid({"tool_calls": []})
    required = jsonschema.Draft202012Validator(
        plan_tools([WEATHER], ToolChoice(ToolChoiceMode.REQUIRED)).output_schema()
    )
    assert not required.is_valid({"response": "Hello"})
    named = plan_tools([WEATHER, TIME], ToolChoice(ToolChoiceMode.FUNCTION, "get_time")).output_schema()
    assert not jsonschema.Draft202012Validator(named).is_valid(
        {"tool_calls": [{"name": "get_weather", "arguments": {}}]}
    )


def test_an_answer_becomes_calls_with_ids_or_text() -> None:
    plan = plan_tools([WEATHER], ToolChoice())
    text, calls = plan.parse('{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}')
    assert text is None and len(calls) == 1
    assert calls[0].name == "get_weather" and json.loads(calls[0].arguments_json) == {"city": "Paris"}
    assert calls[0].id.startswith("call_") and len(calls[0].id) == 29
    assert plan.parse('{"response": "It is sunny."}') == ("It is sunny.", [])


def test_a_tool_conversation_is_rendered_in_the_generic_form() -> None:
    plan = plan_tools([WEATHER], ToolChoice())
    messages = [
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "18 C, sunny", tool_call_id="call_1"),
    ]
    prompt = render_chat(_serving(CHATML), messages, plan)
    system = prompt.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\nBe brief.\n\nYou can call these tools")
    assert '"name": "get_weather"' in system and '{"response": <your answer>}' in system
    assert '<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]}' in prompt
    result = '{"tool_result": {"tool_call_id": "call_1", "name": "get_weather", "content": "18 C, sunny"}}'
    reminder = 'Use this result to answer the user with {"response": ...}.'
    assert prompt.endswith(f"<|im_start|>user\n{result}\n{reminder}<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_insisting_on_alternating_turns_gets_results_merged_into_user_turns() -> None:
    plan = plan_tools([WEATHER], ToolChoice())
    messages = [
        ChatMessage("user", "Weather in Paris?"),
        ChatMessage("assistant", "", tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),)),
        ChatMessage("tool", "18 C", tool_call_id="call_1"),
        ChatMessage("user", "And in Lyon?"),
    ]
    prompt = render_chat(_serving(GEMMA), messages, plan)  # Gemma's template refuses any role but user/model
    assert '<start_of_turn>user\n{"tool_result": {"tool_call_id": "call_1"' in prompt
    assert prompt.endswith('{"response": ...}.\n\nAnd in Lyon?<end_of_turn>\n<start_of_turn>model\n')


def test_a_tool_message_without_its_call_id_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        render_chat(_serving(CHATML), [ChatMessage("user", "x"), ChatMessage("tool", "42")], None)
    assert refused.value.message.startswith("Message 1 has role 'tool' but no tool_call_id")
    assert refused.value.metadata["param"] == "messages.1.tool_call_id"


def test_a_base_models_cap_applies_only_without_max_tokens_and_a_schema_is_guided_decoding() -> None:
    assert sampling_for_triton(SamplingParameters(), 4096, 256) == {"max_tokens": 256}
    assert sampling_for_triton(SamplingParameters(max_tokens=900), 4096, 256) == {"max_tokens": 900}
    guided = sampling_for_triton(SamplingParameters(), 4096, 0, {"type": "object"})
    assert guided == {"max_tokens": 4096, "guided_decoding": {"json": {"type": "object"}}}
    assert RuntimeHints(default_max_tokens=256).default_max_tokens == 256


@pytest.mark.parametrize(
    "pieces", [["<think>I should", " add.</think>\n\nFour."], ["<th", "ink>I should add.</", "think>", "Four."]]
)
def test_thinking_is_split_from_the_answer_and_no_tag_is_ever_sent(pieces: list[str]) -> None:
    splitter = ReasoningSplitter("<|im_start|>assistant\n")
    out = [splitter.push(piece) for piece in pieces] + [splitter.flush()]
    assert "".join(r for r, _ in out) == "I should add."
    assert "".join(a for _, a in out) == "Four."
    assert not any("<" in r + a for r, a in out)


def test_a_template_that_opens_the_thought_itself_starts_inside_it() -> None:
    splitter = ReasoningSplitter("<|im_start|>assistant\n<think>\n")
    assert splitter.push("Hmm.</think>Yes.") == ("Hmm.", "Yes.")
    plain = ReasoningSplitter("")
    assert plain.push("No thinking here.") == ("", "No thinking here.")
