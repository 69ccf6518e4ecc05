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


# Texts far over a 256-token limit, of the kinds that tokenise unevenly: prose, words longer than
# WordPiece reads (100 characters: one [UNK]), text without spaces, CJK, code, whitespace runs.
_WORDS = [
    "the",
    "model",
    "serves",
    "private",
    "deployments",
    "quickly;",
    "Tokenisation,",
    "embeddings",
    "(and",
    "rerank)",
    "é",
    "ñ",
    "ü",
]
LONG_TEXTS = {
    "prose": " ".join(_WORDS[i * 7 % len(_WORDS)] for i in range(50_000)),
    "long-words": " ".join(("x" * 150 + str(i)) for i in range(2_000)),
    "no-spaces": "abcdefghij0123456789" * 15_000,
    "cjk": "模型服务私有部署。東京で埋め込みを計算する。" * 5_000,
    "code": "def f(x):\n\treturn {'k': [x, x**2]}  # comment\n" * 6_000,
    "whitespace-runs": ("word" + " " * 37 + "\n\n\t") * 7_000,
}


def _truncated(tokenizer: EncoderTokenizer, encodings: list) -> tuple:
    batch = tokenizer.batch([(e.ids, e.type_ids) for e in encodings], ["input_ids", "attention_mask", "token_type_ids"])
    return batch.arrays["input_ids"].tolist(), batch.token_counts, batch.truncated


@pytest.mark.parametrize("kind", list(LONG_TEXTS))
def test_a_huge_text_is_tokenised_only_as_far_as_the_limit_needs_with_the_same_result(
    minilm_path: Path, kind: str
) -> None:
    tokenizer = EncoderTokenizer((minilm_path / "tokenizer.json").read_bytes(), max_tokens=256, pad_token="[PAD]")
    text = LONG_TEXTS[kind]
    whole = tokenizer.tokenizer.encode_batch([text], add_special_tokens=True)  # what every text got before
    assert _truncated(tokenizer, tokenizer.encode_texts([text])) == _truncated(tokenizer, whole)
    [pair] = tokenizer.encode_pairs([("which model serves text?", text)])
    [whole_pair] = tokenizer.tokenizer.encode_batch([["which model serves text?", text]], add_special_tokens=True)
    assert _truncated(tokenizer, [pair]) == _truncated(tokenizer, [whole_pair])
    if kind not in ("long-words", "no-spaces"):  # WordPiece reads a word over 100 characters as one [UNK]
        assert len(tokenizer.bounded(text)) < len(text) // 5


def test_texts_up_to_the_whole_text_length_are_not_touched(minilm_path: Path) -> None:
    tokenizer = EncoderTokenizer((minilm_path / "tokenizer.json").read_bytes(), max_tokens=256, pad_token="[PAD]")
    text = LONG_TEXTS["prose"][: 256 * 32]
    assert tokenizer.bounded(text) is text
    assert tokenizer.bounded(text + " more") != text + " more"


def test_a_byte_level_and_a_sentencepiece_tokenizer_give_the_same_tokens_bounded() -> None:
    """Encoders with GPT-2's byte-level BPE (RoBERTa) and SentencePiece's metaspace (XLM-R, E5)
    split words differently from WordPiece; tokenizers trained here, as no hub is reachable."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers

    corpus = [LONG_TEXTS[kind][:20_000] for kind in LONG_TEXTS]
    for pre_tokenizer in (pre_tokenizers.ByteLevel(add_prefix_space=False), pre_tokenizers.Metaspace()):
        raw = Tokenizer(models.BPE(unk_token="<unk>"))
        raw.pre_tokenizer = pre_tokenizer
        special = ["<s>", "</s>", "<pad>", "<unk>"]
        alphabet = pre_tokenizers.ByteLevel.alphabet() if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) else []
        raw.train_from_iterator(
            corpus, trainers.BpeTrainer(vocab_size=2000, special_tokens=special, initial_alphabet=alphabet)
        )
        raw.post_processor = processors.TemplateProcessing(
            single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 1)]
        )
        tokenizer = EncoderTokenizer(raw.to_str().encode(), max_tokens=128, pad_token="<pad>")
        for kind, text in LONG_TEXTS.items():
            whole = tokenizer.tokenizer.encode_batch([text], add_special_tokens=True)
            assert _truncated(tokenizer, tokenizer.encode_texts([text])) == _truncated(tokenizer, whole), kind
