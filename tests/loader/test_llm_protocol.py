"""What the LLM models in Triton (llama.cpp, onnxruntime-genai) share: refusing a prompt that
cannot fit the context from its size, before tokenising it."""

from __future__ import annotations

import pytest

from modelplane.loader.triton_models.llm_protocol import RequestError, longest_token_bytes, refuse_unfittable_prompt


def test_the_longest_token_is_measured_in_bytes() -> None:
    # A SentencePiece piece with its '▁' (3 bytes in UTF-8), and llama.cpp's pieces as bytes.
    assert longest_token_bytes(["a", "▁hello", "日本"]) == 8
    assert longest_token_bytes([b"ab", b"\xe6\x97\xa5\xe6\x9c\xac\xe8\xaa\x9e"]) == 9
    assert longest_token_bytes([]) == 1


def test_a_prompt_is_refused_only_when_even_the_longest_tokens_could_not_fit_it_twice() -> None:
    refuse_unfittable_prompt("x" * (2 * 4096 * 16), context_tokens=4096, longest_token_bytes=16)
    with pytest.raises(RequestError) as refused:
        refuse_unfittable_prompt("é" * (4096 * 16 + 1), context_tokens=4096, longest_token_bytes=16)
    assert str(refused.value) == "the prompt is 131074 bytes, at least 8192 tokens; the context holds 4096"
