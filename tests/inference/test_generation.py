"""Chat rendering and the sampling parameters sent to Triton (no network)."""

from __future__ import annotations

import pytest

from modelplane.common.types import Model, ModelSpec, ServingProfile, Task
from modelplane.inference.catalog import ServingModel
from modelplane.inference.errors import InvalidRequest, TemplateMissing
from modelplane.inference.generation import ChatMessage, SamplingParameters, render_chat, sampling_for_triton
from modelplane.loader.chat_templates import GEMMA


def _serving(template: str, **special: str) -> ServingModel:
    model = Model(spec=ModelSpec(name="m", task=Task.GENERATION))
    profile = ServingProfile(triton_model_name="m", chat_template=template, context_length=4096, special_tokens=special)
    return ServingModel(model, profile, None)


def test_gemma_default_folds_the_system_message_into_the_first_user_turn() -> None:
    messages = [
        ChatMessage("system", "Answer briefly."),
        ChatMessage("user", "What is 2+2?"),
        ChatMessage("assistant", "4"),
        ChatMessage("user", "And 3+3? "),
    ]
    assert render_chat(_serving(GEMMA, bos_token="<bos>"), messages) == (
        "<bos><start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\n4<end_of_turn>\n"
        "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_a_template_refusing_the_conversation_is_a_clear_invalid_request() -> None:
    with pytest.raises(InvalidRequest) as refused:
        render_chat(_serving(GEMMA), [ChatMessage("assistant", "Hi"), ChatMessage("assistant", "again")])
    assert refused.value.message == (
        "Model 'm''s chat template refused the conversation: Conversation roles must alternate "
        "user/assistant/user/assistant/..."
    )


def test_a_model_without_a_template_cannot_chat_and_the_error_names_it() -> None:
    with pytest.raises(TemplateMissing) as refused:
        render_chat(_serving(""), [ChatMessage("user", "Hi")])
    assert refused.value.message.startswith("Model 'm' has no chat template")
    assert "/v1/completions" in refused.value.message


def test_the_template_is_sandboxed() -> None:
    with pytest.raises(InvalidRequest, match="refused the conversation"):
        render_chat(_serving("{{ messages.__class__.__mro__[1].__subclasses__() }}"), [ChatMessage("user", "x")])


def test_only_what_the_caller_set_is_sent_and_max_tokens_always() -> None:
    assert sampling_for_triton(SamplingParameters(), 4096) == {"max_tokens": 4096}
    sent = sampling_for_triton(SamplingParameters(max_tokens=7, temperature=0.0, seed=3, stop=("\n",)), 4096)
    assert sent == {"max_tokens": 7, "temperature": 0.0, "seed": 3, "stop": ["\n"]}
