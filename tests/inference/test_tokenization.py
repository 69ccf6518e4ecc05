"""Encoder tokenisation matches the model's own tokenizer as transformers applies it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from modelplane.inference.tokenization import EncoderTokenizer

TEXTS = ["Hello world", "A much longer sentence about embeddings, batching and Triton Inference Server.", ""]


@pytest.fixture(scope="module")
def tokenizer(minilm_path: Path) -> EncoderTokenizer:
    return EncoderTokenizer((minilm_path / "tokenizer.json").read_bytes(), max_tokens=16, pad_token="[PAD]")


def test_padded_batch_equals_transformers(tokenizer: EncoderTokenizer, minilm_path: Path) -> None:
    reference = AutoTokenizer.from_pretrained(minilm_path)([*TEXTS[:2], "Hello"], padding=True, return_tensors="np")
    encodings = tokenizer.encode_texts([*TEXTS[:2], "Hello"])
    names = ["input_ids", "attention_mask", "token_type_ids"]
    tokenizer.max_tokens = 512
    batch = tokenizer.batch([(e.ids, e.type_ids) for e in encodings], names)
    for name in names:
        np.testing.assert_array_equal(batch.arrays[name], reference[name])
    assert batch.token_counts == reference["attention_mask"].sum(axis=1).tolist()
    tokenizer.max_tokens = 16


def test_token_id_inputs_get_the_same_special_tokens_as_text(tokenizer: EncoderTokenizer) -> None:
    plain = tokenizer.tokenizer.encode("Hello world", add_special_tokens=False).ids
    assert tokenizer.frame_token_ids(plain) == tokenizer.encode_texts(["Hello world"])[0].ids


def test_long_inputs_are_cut_to_the_limit_keeping_the_closing_token(tokenizer: EncoderTokenizer) -> None:
    [encoding] = tokenizer.encode_texts(["word " * 40])
    batch = tokenizer.batch([(encoding.ids, encoding.type_ids)], ["input_ids", "attention_mask"])
    ids = batch.arrays["input_ids"][0]
    assert len(ids) == 16 and batch.truncated == [True] and batch.token_counts == [16]
    assert ids[-1] == encoding.ids[-1]  # [SEP] survives the cut
