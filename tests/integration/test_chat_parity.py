"""Hugging Face causal LMs through the whole stack: registered as safetensors, converted by the
loader to ONNX with a KV cache, served by onnxruntime-genai in Triton, and asked through the
gateway. Greedy decoding must give exactly what transformers.generate gives on the same prompts."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from modelplane.common.types import ModelFormat, ModelSpec, Task
from modelplane.loader.client import LoaderClient
from modelplane.registry.client import RegistryClient
from tests.causal_lms import ARCHITECTURES, build_causal_lm, greedy_reference
from tests.integration.conftest import RunningStack

PROMPTS = ("Once upon a time", "The quick brown fox", "Grüße aus München! 日本語")
NEW_TOKENS = 24


@pytest.fixture(scope="module", params=ARCHITECTURES)
async def served_causal_lm(request: pytest.FixtureRequest, stack: RunningStack, tmp_path_factory) -> tuple[str, Path]:
    architecture = request.param
    source = build_causal_lm(architecture, tmp_path_factory.mktemp(f"tiny-{architecture}"))
    name = f"tiny-{architecture}"
    async with RegistryClient(stack.registry) as registry:
        await registry.register(
            ModelSpec(name=name, task=Task.GENERATION, format=ModelFormat.HUGGINGFACE, source_uri=str(source))
        )
    async with LoaderClient(stack.loader) as loader:
        await loader.ensure_loaded(name, reason="test", timeout_seconds=600)
    return name, source


@pytest.mark.parametrize("prompt", PROMPTS)
async def test_greedy_completion_equals_transformers_generate(
    served_causal_lm: tuple[str, Path], stack: RunningStack, prompt: str
) -> None:
    name, source = served_causal_lm
    prompt_ids, generated, text = greedy_reference(source, prompt, NEW_TOKENS)
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(
            f"{stack.gateway_url}/v1/completions",
            json={"model": name, "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0},
        )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["choices"][0]["text"] == text
    assert answer["usage"] == {
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(generated),
        "total_tokens": len(prompt_ids) + len(generated),
    }
    ended_by_eos = len(generated) < NEW_TOKENS
    assert answer["choices"][0]["finish_reason"] == ("stop" if ended_by_eos else "length")


async def test_chat_uses_the_models_own_template(served_causal_lm: tuple[str, Path], stack: RunningStack) -> None:
    """The tiny models ship a ChatML template; the prompt the stack renders must be the one
    transformers renders, so the greedy answer is the same too."""
    from transformers import AutoTokenizer

    name, source = served_causal_lm
    messages = [{"role": "user", "content": "Say hello."}]
    rendered = AutoTokenizer.from_pretrained(source).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    prompt_ids, _, text = greedy_reference(source, rendered, 8)
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(
            f"{stack.gateway_url}/v1/chat/completions",
            json={"model": name, "messages": messages, "max_tokens": 8, "temperature": 0},
        )
    answer = response.json()
    assert answer["choices"][0]["message"]["content"] == text
    assert answer["usage"]["prompt_tokens"] == len(prompt_ids)


async def test_a_sampling_field_the_engine_cannot_honour_is_refused_not_ignored(
    served_causal_lm: tuple[str, Path], stack: RunningStack
) -> None:
    name, _ = served_causal_lm
    async with httpx.AsyncClient(timeout=300) as client:
        response = await client.post(
            f"{stack.gateway_url}/v1/completions", json={"model": name, "prompt": "Hi", "presence_penalty": 0.5}
        )
    assert response.status_code == 400
    assert response.json()["error"]["message"] == (
        f"Model '{name}' refused the request: sampling parameter presence_penalty=0.5 is not supported by this model."
    )
