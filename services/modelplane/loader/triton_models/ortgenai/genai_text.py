"""Request parsing and text handling for the onnxruntime-genai Triton model (no Triton imports).

Kept apart from model.py so that it can be tested without a server, and so model.py stays
about Triton: tensors in, responses out.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field, fields

from llm_protocol import RequestError, stop_prefix_length
from tokenizers import Tokenizer

# vLLM's default when a request names no max_tokens; kept so that a caller written against
# Triton's vLLM backend sees the same behaviour here.
DEFAULT_MAX_TOKENS = 16

_REPLACEMENT_CHAR = "\ufffd"
_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass(frozen=True)
class SamplingParameters:
    """The subset of vLLM's SamplingParams that this model honours, with vLLM's defaults."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k (vLLM uses -1 or 0; both are accepted)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    repetition_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


_FIELD_TYPES = {f.name: f.type for f in fields(SamplingParameters)}
# Accepted for compatibility when they ask for nothing this model would do differently.
_NEUTRAL = {"n": 1, "best_of": 1, "presence_penalty": 0.0, "frequency_penalty": 0.0, "ignore_eos": False}


def _to_bool(key: str, value) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise RequestError(f"sampling parameter {key!r} must be a boolean, got {value!r}")


def _coerce(key: str, value):
    # vLLM clients often send every value as a string ("0.7", "true"); accept both forms.
    kind = _FIELD_TYPES[key]
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
        if kind == "bool":
            return _to_bool(key, value)
        if kind == "int | None":
            return int(value)
    except (TypeError, ValueError):
        raise RequestError(f"sampling parameter {key!r} has an invalid value {value!r}") from None
    if key == "stop":
        stops = (value,) if isinstance(value, str) else tuple(value)
        if not all(isinstance(s, str) and s for s in stops):
            raise RequestError("sampling parameter 'stop' must be a string or a list of non-empty strings")
        return stops
    if key == "stop_token_ids":
        return tuple(int(t) for t in value)
    return value


def parse_sampling_parameters(raw: bytes | str | None) -> SamplingParameters:
    """Parse the `sampling_parameters` JSON string; unknown or unsupported keys are refused.

    Refusing, rather than ignoring, a parameter such as `presence_penalty: 0.5` means a caller
    never gets output that silently differs from what it asked for.
    """
    if raw is None or raw in (b"", ""):
        return SamplingParameters()
    try:
        given = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise RequestError(f"sampling_parameters is not valid JSON: {exc}") from None
    if not isinstance(given, dict):
        raise RequestError("sampling_parameters must be a JSON object")

    values = {}
    for key, value in given.items():
        if value is None:
            continue  # vLLM's convention: null means "use the default"
        if key in _NEUTRAL:
            if _coerce_neutral(key, value) != _NEUTRAL[key]:
                raise RequestError(f"sampling parameter {key}={value!r} is not supported by this model")
            continue
        if key not in _FIELD_TYPES:
            raise RequestError(f"unknown sampling parameter {key!r}; supported: {', '.join(sorted(_FIELD_TYPES))}")
        values[key] = _coerce(key, value)

    params = SamplingParameters(**values)
    if params.max_tokens < 1:
        raise RequestError("max_tokens must be at least 1")
    if params.min_tokens < 0 or params.min_tokens > params.max_tokens:
        raise RequestError("min_tokens must be between 0 and max_tokens")
    if params.temperature < 0:
        raise RequestError("temperature must be >= 0")
    if not 0.0 < params.top_p <= 1.0:
        raise RequestError("top_p must be in (0, 1]")
    if params.repetition_penalty <= 0:
        raise RequestError("repetition_penalty must be > 0")
    if params.top_k < 0:
        params = SamplingParameters(**{**values, "top_k": 0})
    return params


def _coerce_neutral(key: str, value):
    if isinstance(_NEUTRAL[key], bool):
        return _to_bool(key, value)
    try:
        return type(_NEUTRAL[key])(value)
    except (TypeError, ValueError):
        raise RequestError(f"sampling parameter {key!r} has an invalid value {value!r}") from None


def encode_prompt(tokenizer: Tokenizer, prompt: str, bos_token_id: int | None) -> list[int]:
    """Token ids of the prompt exactly as `transformers` would produce them.

    A prompt rendered from a chat template that starts with the BOS text gets a second BOS
    from the tokenizer's post-processor; one is dropped, as llama.cpp does, because a doubled
    BOS measurably degrades output.
    """
    ids = tokenizer.encode(prompt, add_special_tokens=True).ids
    if bos_token_id is not None and len(ids) >= 2 and ids[0] == ids[1] == bos_token_id:
        ids = ids[1:]
    return ids


def byte_fallback_ids(tokenizer: Tokenizer) -> frozenset[int]:
    """Ids of SentencePiece byte-fallback tokens (<0x00>..<0xFF>); empty for byte-level BPE."""
    return frozenset(i for token, i in tokenizer.get_vocab().items() if _BYTE_TOKEN.fullmatch(token))


def special_ids(tokenizer: Tokenizer) -> frozenset[int]:
    return frozenset(i for i, token in tokenizer.get_added_tokens_decoder().items() if token.special)


@dataclass
class GeneratedText:
    """The text of one request's generated tokens, released in pieces that never change.

    The whole generated sequence is decoded after every token, exactly as transformers'
    `decode` would, and only its stable prefix is released or searched for stop strings:
    - a trailing U+FFFD may be the start of a multi-byte character split across tokens;
    - text from a trailing run of byte-fallback tokens can still change: the ByteFallback
      decoder turns every byte of a run that is not valid UTF-8 into U+FFFD, so "<0x3A>" reads
      ":" until a following "<0xE6>" makes both bytes "��" (a skipped special token inside the
      run does not end it: it is removed before the decoder sees it);
    - text that could be the start of a stop string is held back until it cannot be; a
      completed stop string ends the text (it is included only if asked).
    Decoding everything each time costs O(n) per token, small next to a forward pass, and unlike
    windowed decoding it is exact for every decoder (byte-level, byte fallback, Metaspace).
    """

    tokenizer: Tokenizer
    byte_tokens: frozenset[int] = frozenset()
    special_tokens: frozenset[int] = frozenset()
    stop: tuple[str, ...] = ()
    include_stop: bool = False
    skip_special_tokens: bool = True
    token_ids: list[int] = field(default_factory=list)
    stopped: bool = False
    _text: str = ""
    _stable: int = 0  # length of the decoded prefix that later tokens cannot change
    _end: int | None = None  # where the text ends once a stop string is found
    _released: int = 0
    _searched: int = 0

    def append(self, token_id: int) -> bool:
        """Add a token; return True if it completed a stop string."""
        self.token_ids.append(token_id)
        self._text = self.tokenizer.decode(self.token_ids, skip_special_tokens=self.skip_special_tokens)
        self._stable = self._stable_length()
        self._find_stop(self._stable)
        return self.stopped

    def finish(self) -> bool:
        """The generation ended: all text is now final. Return True if that completed a stop string."""
        self._stable = len(self._text)
        self._find_stop(self._stable)
        return self.stopped

    @property
    def text(self) -> str:
        return self._text if self._end is None else self._text[: self._end]

    def release(self) -> str:
        """The text not released before that can no longer change (all of it after finish)."""
        if self.stopped:
            end = len(self.text)
        else:
            end = self._stable - stop_prefix_length(self._text[: self._stable], self.stop)
        end = max(end, self._released)
        delta = self.text[self._released : end]
        self._released = end
        return delta

    def _stable_length(self) -> int:
        text = self._text
        end = len(text)
        if self.byte_tokens:
            transparent = self.special_tokens if self.skip_special_tokens else frozenset()
            run_start = len(self.token_ids)
            while run_start > 0 and (
                self.token_ids[run_start - 1] in self.byte_tokens or self.token_ids[run_start - 1] in transparent
            ):
                run_start -= 1
            if run_start < len(self.token_ids):
                before = self.tokenizer.decode(self.token_ids[:run_start], skip_special_tokens=self.skip_special_tokens)
                end = len(os.path.commonprefix([before, text]))  # noqa: RUF071 - characters are what is meant
        while end > 0 and text[end - 1] == _REPLACEMENT_CHAR:
            end -= 1
        return end

    def _find_stop(self, upto: int) -> None:
        if not self.stop or self.stopped:
            return
        longest = max(len(s) for s in self.stop)
        start = max(0, self._searched - longest + 1)
        window = self._text[:upto]
        hits = [(i, s) for s in self.stop if (i := window.find(s, start)) >= 0]
        self._searched = upto
        if hits:
            index, matched = min(hits)
            self.stopped = True
            self._end = index + len(matched) if self.include_stop else index
