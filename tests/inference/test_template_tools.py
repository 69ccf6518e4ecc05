"""Tool calls in a template's own Hermes form (no network): recognising the form from the
template, rendering a tool conversation through it, the grammar the answer is constrained to, and
reading the answer, streamed, into calls or text."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import jsonschema
import pytest

from modelplane.common.errors import Internal
from modelplane.common.types import Model, ModelSpec, ServingProfile, Task, Usage
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest
from modelplane.inference.generation import (
    ChatMessage,
    FinishReason,
    GenerationChunk,
    SamplingParameters,
    render_chat,
    renders_hermes_tools,
    sampling_for_triton,
    tool_answer,
    tool_form,
)
from modelplane.inference.template_tools import CallTextReader, TemplateTools
from modelplane.inference.tool_calls import MAX_PARALLEL_CALLS, Tool, ToolCall, ToolChoice, ToolChoiceMode, plan_tools
from modelplane.loader.chat_templates import GEMMA
from tests.chat_templates import BARE_JSON_CALLS, HERMES

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


def _form(choice: ToolChoice = ToolChoice(), *, parallel: bool | None = None, response=None) -> TemplateTools:  # noqa: B008
    plan = plan_tools([WEATHER, TIME], choice, response, parallel)
    assert plan is not None
    form = tool_form(HERMES, plan)
    assert isinstance(form, TemplateTools)
    return form


def _serving(template: str) -> ServingModel:
    model = Model(spec=ModelSpec(name="m", task=Task.GENERATION))
    return ServingModel(model, ServingProfile(triton_model_name="m", chat_template=template), None)


def test_only_a_template_that_renders_hermes_calls_is_taken_for_the_form() -> None:
    assert renders_hermes_tools(HERMES)
    # Templates without tools, with another call format, or that break on the probe.
    assert not renders_hermes_tools(CHATML)
    assert not renders_hermes_tools(GEMMA)
    assert not renders_hermes_tools(BARE_JSON_CALLS)
    # The tag is there but the arguments are written as Python, not JSON.
    assert not renders_hermes_tools(HERMES.replace("tool_call.arguments | tojson", "tool_call.arguments"))
    # Tool results are dropped.
    assert not renders_hermes_tools(
        HERMES.replace("{{- message.content }}\n        {{- '\\n</tool_response>'", "{{- '\\n</tool_response>'")
    )
    assert not renders_hermes_tools(
        HERMES.replace("{%- for message in messages %}", "{{ raise_exception('no') }}{%- for message in messages %}")
    )
    plan = plan_tools([WEATHER], ToolChoice())
    assert plan is not None and tool_form(CHATML, plan) is plan  # the generic form


def test_a_tool_conversation_is_rendered_by_the_template_itself() -> None:
    call = ToolCall(id="call_1", name="get_weather", arguments_json='{"city": "Paris"}')
    messages = [
        ChatMessage(role="user", content="Weather in Paris?"),
        ChatMessage(role="assistant", content="", tool_calls=(call,)),
        ChatMessage(role="tool", content="18 C, sunny", tool_call_id="call_1"),
    ]
    prompt = render_chat(_serving(HERMES), messages, _form())
    listed = re.search(r"<tools>\n(.*)\n</tools>", prompt, re.DOTALL)
    assert listed is not None
    tools = [json.loads(line) for line in listed.group(1).splitlines()]
    assert [t["function"]["name"] for t in tools] == ["get_weather", "get_time"]
    assert tools[0]["type"] == "function" and tools[0]["function"]["parameters"]["required"] == ["city"]
    assert (
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
        in prompt
    )
    assert "<|im_start|>user\n<tool_response>\n18 C, sunny\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    assert "tool_result" not in prompt and '"response"' not in prompt  # nothing of the generic form
    named = render_chat(_serving(HERMES), messages[:1], _form(ToolChoice(ToolChoiceMode.FUNCTION, "get_time")))
    assert '"get_time"' in named and '"get_weather"' not in named
    with pytest.raises(InvalidRequest, match="Message 1 has role 'tool' but no tool_call_id"):
        render_chat(_serving(HERMES), [messages[0], ChatMessage(role="tool", content="x")], _form())


def _call_schema(grammar: str) -> dict:
    line = next(line for line in grammar.splitlines() if line.startswith("call: "))
    return json.loads(line[line.index("%json ") + 6 : line.rindex(' "')])


def test_the_grammar_admits_text_or_calls_whose_arguments_validate() -> None:
    auto = _form().engine_grammar()
    assert auto is not None and auto.startswith("%llguidance {}\n")
    assert "start: answer | calls\n" in auto and "calls: call\n" in auto  # one call unless parallel
    assert 'call: "<tool_call>\\n" %json {' in auto and auto.rstrip().endswith("~/(.|\\n)*<tool_call>(.|\\n)*/")
    schema = _call_schema(auto)
    jsonschema.validate({"name": "get_weather", "arguments": {"city": "Paris"}}, schema)
    for bad in ({"name": "get_weather", "arguments": {}}, {"name": "fly", "arguments": {}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    required = _form(ToolChoice(ToolChoiceMode.REQUIRED), parallel=True).engine_grammar()
    assert required is not None and "start: calls\n" in required and "TEXT" not in required
    assert f'calls: call ("\\n" call){{0,{MAX_PARALLEL_CALLS - 1}}}\n' in required
    structured = _form(response={"type": "object", "properties": {"a": {"type": "integer"}}}).engine_grammar()
    assert structured is not None and 'answer: %json {"type": "object"' in structured
    sampling = sampling_for_triton(SamplingParameters(), 4096, 0, grammar=auto)
    assert sampling["guided_decoding"] == {"grammar": auto}


def test_a_forced_call_is_prefilled_and_only_its_arguments_are_constrained() -> None:
    form = _form(ToolChoice(ToolChoiceMode.FUNCTION, "get_weather"))
    assert form.prefill() == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert form.suffix() == "}\n</tool_call>"
    assert form.engine_grammar() is None
    schema = form.engine_schema()
    assert schema is not None and schema["required"] == ["city"]
    assert _form().prefill() == "" and _form().engine_schema() is None


def test_an_answer_is_checked_and_parsed_into_calls_or_text() -> None:
    form = _form(parallel=True)
    block = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    other = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    answer = f"{block}\n{block}\n{other}"
    assert form.problem(answer) is None
    content, calls = form.parse(answer)
    assert content is None and [(c.name, c.arguments_json) for c in calls] == [
        ("get_weather", '{"city": "Paris"}'),  # the repeat is dropped
        ("get_time", "{}"),
    ]
    assert all(c.id.startswith("call_") for c in calls)
    assert form.parse("It is sunny.") == ("It is sunny.", [])
    assert form.problem("It is sunny.") is None
    assert form.problem(block.replace('"Paris"', "7")) == "7 is not of type 'string'"
    assert form.problem(f"{block}\nand more") == "it has text outside its <tool_call> blocks"
    assert form.problem(f"Calling: {block}") == "its text holds a tool call"
    assert _form().problem(f"{block}\n{other}") == "it has 2 calls, more than 1"
    assert _form(ToolChoice(ToolChoiceMode.REQUIRED)).problem("Hi") == "it calls no tool"


@pytest.mark.parametrize(
    ("pieces", "sent"),
    [
        (["It", " is", " sunny."], ["It", " is", " sunny."]),
        (["<", "tool", " is", " ready"], ["", "", "<tool is", " ready"]),  # held while it may be a tag
        (["<tool_", "call>\n{", '"name"'], ["", "", ""]),
    ],
)
def test_text_streams_as_soon_as_it_cannot_be_a_call(pieces: list[str], sent: list[str]) -> None:
    reader = CallTextReader()
    assert [reader.push(piece) for piece in pieces] == sent
    assert reader.started == any(sent)


async def _chunks(pieces: list[str], reason: FinishReason = FinishReason.STOP) -> AsyncIterator[GenerationChunk]:
    for piece in pieces[:-1]:
        yield GenerationChunk(text=piece)
    yield GenerationChunk(text=pieces[-1], finish_reason=reason, usage=Usage(prompt_tokens=9, completion_tokens=5))


async def test_text_streams_and_a_call_comes_whole_at_the_end() -> None:
    form = _form()
    chunks = [c async for c in tool_answer(_chunks(["It is", " sunny", "."]), form, "m")]
    assert [c.text for c in chunks] == ["It is", " sunny", "."]
    assert chunks[-1].finish_reason == FinishReason.STOP and not chunks[-1].tool_calls
    pieces = ["<tool_call>\n", '{"name": "get_weather", ', '"arguments": {"city": "Paris"}}', "\n</tool_call>"]
    chunks = [c async for c in tool_answer(_chunks(pieces), form, "m")]
    assert [c.text for c in chunks] == [""]
    assert chunks[-1].finish_reason == FinishReason.TOOL_CALLS
    assert [(c.name, json.loads(c.arguments_json)) for c in chunks[-1].tool_calls] == [
        ("get_weather", {"city": "Paris"})
    ]
    forced = _form(ToolChoice(ToolChoiceMode.FUNCTION, "get_weather"))
    chunks = [c async for c in tool_answer(_chunks(['{"city": ', '"Oslo"}']), forced, "m")]
    assert [c.text for c in chunks] == [""]
    assert json.loads(chunks[-1].tool_calls[0].arguments_json) == {"city": "Oslo"}
    with pytest.raises(Internal, match="does not satisfy the requested schema \\(its text holds a tool call\\)"):
        _ = [c async for c in tool_answer(_chunks(["Sure. <tool_call>\n{}\n</tool_call>"]), form, "m")]
