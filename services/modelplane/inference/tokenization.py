"""Tokenisation for encoder models, with the model's own tokenizer (tokenizer.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer

# A text up to this many characters per token of the model's limit is tokenised whole (4096
# tokens' worth of 8 KiB for a 256-token model: far more than any text the model keeps).
WHOLE_TEXT_CHARS_PER_TOKEN = 32
# Tokens a bounded prefix must have beyond the model's limit: room for a tokenizer that reads a
# word differently when it is cut, though the cut falls between words where it can.
BOUND_MARGIN_TOKENS = 16
# How far back from a cut a whitespace is looked for, in characters.
_WHITESPACE_SEARCH = 1024


def _cut_before_whitespace(text: str, length: int) -> str:
    """text[:length], shortened to end just before a whitespace when one is near."""
    start = max(0, length - _WHITESPACE_SEARCH)
    for position in range(length, start, -1):
        if text[position].isspace() and not text[position - 1].isspace():
            return text[:position]
    return text[:length]


@dataclass(frozen=True)
class EncodedBatch:
    """Tensors for Triton, padded to the longest input of the batch, plus per-input facts."""

    arrays: dict[str, np.ndarray]
    token_counts: list[int]
    truncated: list[bool]


class EncoderTokenizer:
    def __init__(self, tokenizer_json: bytes, *, max_tokens: int, pad_token: str | None) -> None:
        self.tokenizer = Tokenizer.from_str(tokenizer_json.decode())
        self.max_tokens = max_tokens
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        pad_id = self.tokenizer.token_to_id(pad_token) if pad_token else None
        self.pad_id = int(pad_id) if pad_id is not None else 0
        self._prefix, self._suffix = self._special_frame()
        self.vocabulary_size = self.tokenizer.get_vocab_size(with_added_tokens=True)

    def _special_frame(self) -> tuple[list[int], list[int]]:
        """The special tokens the model wraps one input in ([CLS] … [SEP] for BERT), learned from
        the tokenizer itself so that token-id inputs get exactly what text inputs get."""
        plain = self.tokenizer.encode("hello", add_special_tokens=False).ids
        framed = self.tokenizer.encode("hello", add_special_tokens=True).ids
        for start in range(len(framed) - len(plain) + 1):
            if framed[start : start + len(plain)] == plain:
                return framed[:start], framed[start + len(plain) :]
        return [], []

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=True).ids)

    def encode_texts(self, texts: Sequence[str]) -> list[Encoding]:
        """Each text's encoding; one far longer than the model's limit only as far as the limit
        needs (`bounded`), so a 10 MB text costs what its first few thousand characters cost."""
        return self.tokenizer.encode_batch([self.bounded(text) for text in texts], add_special_tokens=True)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        """(query, document) pairs; truncation cuts a pair's end, so a bounded part loses nothing kept."""
        return self.tokenizer.encode_batch(
            [[self.bounded(query), self.bounded(document)] for query, document in pairs], add_special_tokens=True
        )

    def length_of(self, count: int, text: str) -> str:
        """How long an input over the limit is, for a refusal: its token count, or for a text that
        was tokenised only in part (`bounded`), that it is over the limit."""
        if len(text) > self.max_tokens * WHOLE_TEXT_CHARS_PER_TOKEN:
            return f"more than {self.max_tokens} tokens"
        return f"{count} tokens"

    def bounded(self, text: str) -> str:
        """The text, or for a text far longer than the model's limit the prefix of it whose tokens
        are all that truncation keeps, and more.

        Texts up to `max_tokens * WHOLE_TEXT_CHARS_PER_TOKEN` characters are returned whole, exactly
        as before. A longer one is cut just before a whitespace (where tokenizers split words, so the
        tokens before the cut are the whole text's own) after `max_tokens * 8` characters, and
        the prefix is kept once it has `BOUND_MARGIN_TOKENS` tokens more than the model takes;
        otherwise (long words, texts without spaces) the prefix grows fourfold until it does, or
        until it is the whole text. The prefix then tokenises to the same first `max_tokens` tokens
        as the text: truncation keeps the same, and over the limit is over the limit."""
        if len(text) <= self.max_tokens * WHOLE_TEXT_CHARS_PER_TOKEN:
            return text
        wanted = self.max_tokens + BOUND_MARGIN_TOKENS
        length = self.max_tokens * 8
        while length < len(text):
            prefix = _cut_before_whitespace(text, length)
            if len(self.tokenizer.encode(prefix, add_special_tokens=False).ids) >= wanted:
                return prefix
            length *= 4
        return text

    def frame_token_ids(self, ids: Sequence[int]) -> list[int]:
        return [*self._prefix, *ids, *self._suffix]

    def batch(self, sequences: Sequence[tuple[list[int], list[int]]], input_names: Sequence[str]) -> EncodedBatch:
        """Pads (ids, type_ids) sequences into tensors, cutting each to the model's limit while
        keeping its closing special tokens."""
        cut: list[tuple[list[int], list[int]]] = []
        truncated: list[bool] = []
        for ids, type_ids in sequences:
            if len(ids) > self.max_tokens:
                keep = self.max_tokens - len(self._suffix)
                ids = ids[:keep] + self._suffix
                type_ids = type_ids[:keep] + type_ids[len(type_ids) - len(self._suffix) :]
                truncated.append(True)
            else:
                truncated.append(False)
            cut.append((ids, type_ids))
        length = max(len(ids) for ids, _ in cut)
        input_ids = np.full((len(cut), length), self.pad_id, dtype=np.int64)
        attention = np.zeros((len(cut), length), dtype=np.int64)
        token_types = np.zeros((len(cut), length), dtype=np.int64)
        for row, (ids, type_ids) in enumerate(cut):
            input_ids[row, : len(ids)] = ids
            attention[row, : len(ids)] = 1
            token_types[row, : len(type_ids)] = type_ids
        available = {"input_ids": input_ids, "attention_mask": attention, "token_type_ids": token_types}
        return EncodedBatch(
            arrays={name: available[name] for name in input_names},
            token_counts=[len(ids) for ids, _ in cut],
            truncated=truncated,
        )
