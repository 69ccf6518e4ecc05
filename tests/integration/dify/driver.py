"""Drives Dify's own OpenAI-API-compatible model classes (the `dify-plugin` package) as Dify does:
validate the credentials an admin saved, then invoke the model. Runs in the separate environment
test_dify.py makes (never imported by the project's tests: dify-plugin gevent-patches the process).

Reads one JSON scenario on stdin, prints one JSON result on stdout:

    {"model_type": "text-embedding" | "rerank" | "llm" | "agent" | "speech2text" | "tts", "model": ...,
     "credentials": {...}, ...}
    → {"stage": "done", "result": {...}}
    → {"stage": "validate" | "invoke", "error": "<what Dify shows>", "error_type": "<exception class>"}
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

from dify_plugin import (
    OAICompatEmbeddingModel,
    OAICompatLargeLanguageModel,
    OAICompatRerankModel,
    OAICompatSpeech2TextModel,
    OAICompatText2SpeechModel,
)
from dify_plugin.entities.model.message import (
    AssistantPromptMessage,
    PromptMessageTool,
    ToolPromptMessage,
    UserPromptMessage,
)
from dify_plugin.interfaces.model.ai_model import AIModel


def _count_words(self: AIModel, text: str) -> int:
    """Stands in for Dify's GPT-2 token count. A Dify deployment ships that tokenizer; tiktoken here
    would download it from the internet, which this machine cannot reach. Dify uses the count only
    to cut texts it thinks too long for the configured context size, and for usage when a response
    carries none (modelplane always sends usage)."""
    return len(text.split())


AIModel._get_num_tokens_by_gpt2 = _count_words  # type: ignore[method-assign]


def _embedding(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    model = OAICompatEmbeddingModel(model_schemas=[])

    def invoke() -> dict:
        result = model.invoke(scenario["model"], scenario["credentials"], scenario["texts"])
        return {"embeddings": result.embeddings, "model": result.model, "tokens": result.usage.tokens}

    return model, invoke


def _rerank(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    model = OAICompatRerankModel(model_schemas=[])

    def invoke() -> dict:
        result = model.invoke(
            scenario["model"],
            scenario["credentials"],
            scenario["query"],
            scenario["docs"],
            score_threshold=scenario.get("score_threshold"),
            top_n=scenario.get("top_n"),
        )
        return {"docs": [{"index": d.index, "text": d.text, "score": d.score} for d in result.docs]}

    return model, invoke


def _llm(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    model = OAICompatLargeLanguageModel(model_schemas=[])

    def invoke() -> dict:
        # Dify counts tokens itself only when a response carries no usage: record when it does.
        counted: list[str] = []
        count = model._num_tokens_from_string

        def counting(*args: object, **kwargs: object) -> int:
            counted.append("dify")
            return count(*args, **kwargs)

        model._num_tokens_from_string = counting  # type: ignore[method-assign]
        chunks = model.invoke(
            scenario["model"],
            scenario["credentials"],
            [UserPromptMessage(content=scenario["prompt"])],
            model_parameters={"max_tokens": scenario.get("max_tokens", 16), "temperature": 0},
            stream=scenario.get("stream", True),
        )
        text, usage = "", None
        for chunk in chunks:
            text += chunk.delta.message.content or ""
            usage = chunk.delta.usage or usage
        return {
            "text": text,
            "prompt_tokens": usage.prompt_tokens if usage else None,
            "usage_counted_by_dify": bool(counted),
        }

    return model, invoke


def _agent(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    """Two turns of Dify's agent loop: the model calls a tool; the tool's result goes back in a tool
    message that names the call; the model answers (or calls again: the caller checks)."""
    model = OAICompatLargeLanguageModel(model_schemas=[])
    tools = [PromptMessageTool(**tool) for tool in scenario["tools"]]

    def turn(messages: list) -> tuple[str, list[AssistantPromptMessage.ToolCall], dict]:
        chunks = model.invoke(
            scenario["model"],
            scenario["credentials"],
            messages,
            model_parameters={"max_tokens": scenario.get("max_tokens", 256), "temperature": 0},
            tools=tools,
            stream=scenario.get("stream", True),
        )
        text, calls, usage = "", [], None
        for chunk in chunks:
            text += chunk.delta.message.content or ""
            calls += chunk.delta.message.tool_calls or []
            usage = chunk.delta.usage or usage
        return text, calls, {"prompt_tokens": usage.prompt_tokens if usage else None}

    def invoke() -> dict:
        messages = [UserPromptMessage(content=scenario["prompt"])]
        text, calls, usage = turn(messages)
        first = [
            {"id": c.id, "type": c.type, "name": c.function.name, "arguments": c.function.arguments} for c in calls
        ]
        result = {"first_text": text, "first_calls": first, "usage": usage}
        if not calls:
            return result
        messages.append(AssistantPromptMessage(content=text, tool_calls=calls))
        for call in calls:
            messages.append(
                ToolPromptMessage(content=scenario["tool_result"], tool_call_id=call.id, name=call.function.name)
            )
        text, calls, _ = turn(messages)
        result["second_text"] = text
        result["second_calls"] = [{"name": c.function.name, "arguments": c.function.arguments} for c in calls]
        return result

    return model, invoke


def _speech2text(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    """Dify's validation transcribes the SDK's own demo MP3; invocation, the recording a user made."""
    model = OAICompatSpeech2TextModel(model_schemas=[])

    def invoke() -> dict:
        with open(scenario["audio_file"], "rb") as recording:
            return {"text": model.invoke(scenario["model"], scenario["credentials"], recording)}

    return model, invoke


def _tts(scenario: dict) -> tuple[AIModel, Callable[[], dict]]:
    """Dify's validation speaks "Test." with the first of the voices in the credentials; invocation
    reads a text aloud with the voice the app chose, and Dify joins the streamed chunks."""
    model = OAICompatText2SpeechModel(model_schemas=[])

    def invoke() -> dict:
        chunks = model.invoke(scenario["model"], "tenant", scenario["credentials"], scenario["text"], scenario["voice"])
        audio = b"".join(chunks)
        with open(scenario["output_file"], "wb") as output:
            output.write(audio)
        return {"bytes": len(audio)}

    return model, invoke


def main() -> int:
    scenario = json.load(sys.stdin)
    kinds = {
        "text-embedding": _embedding,
        "rerank": _rerank,
        "llm": _llm,
        "agent": _agent,
        "speech2text": _speech2text,
        "tts": _tts,
    }
    model, invoke = kinds[scenario["model_type"]](scenario)
    stage = "validate"
    try:
        model.validate_credentials(scenario["model"], scenario["credentials"])
        stage = "invoke"
        result = invoke()
    except Exception as error:  # noqa: BLE001 - the test reads what Dify would show the admin
        print(json.dumps({"stage": stage, "error": str(error), "error_type": type(error).__name__}))
        return 0
    print(json.dumps({"stage": "done", "result": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
