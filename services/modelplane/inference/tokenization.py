"""Tokenisation for encoder models, with the model's own tokenizer (tokenizer.json)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from tokenizers import Encoding, Tokenizer


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
        return self.tokenizer.encode_batch(list(texts), add_special_tokens=True)

    def encode_pairs(self, pairs: Sequence[tuple[str, str]]) -> list[Encoding]:
        return self.tokenizer.encode_batch([list(p) for p in pairs], add_special_tokens=True)

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
