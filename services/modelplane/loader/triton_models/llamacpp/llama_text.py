"""Request parsing for the llama.cpp Triton model: vLLM's sampling parameters, checked, and the
request body of llama.cpp's server engine they become (no Triton or llama.cpp imports, so it is
tested without a server). Copied next to model.py in the model's version folder, with
llm_protocol.py."""

import json
import mmap
import struct
from dataclasses import dataclass

from llm_protocol import RequestError

# llama.cpp reads seed 0xFFFFFFFF as "pick a random seed", so it cannot be a caller's seed.
MAX_SEED = 0xFFFFFFFE
# Accepted when they ask for nothing this model would do differently (vLLM clients send them).
_NEUTRAL = {"n": 1, "best_of": 1}


@dataclass(frozen=True)
class SamplingParams:
    """The `sampling_parameters` JSON object, with vLLM's names. Absent keys mean what they mean in
    vLLM and the OpenAI API (temperature 1, no top-k/top-p/min-p filtering, no penalties), not
    llama.cpp's own defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05).

    `guided_decoding` is vLLM's (GuidedDecodingParams as a JSON object): {"json": <JSON schema>}
    or {"json_object": true} constrains the output to JSON that the schema accepts; llama.cpp
    compiles the schema into a grammar (LLGuidance) that masks every sampled token.
    {"grammar": <text>} constrains it to a grammar: llama.cpp's GBNF, or a Lark grammar that starts
    with "%llguidance {}" (LLGuidance's, which can hold JSON schemas inline with `%json`)."""

    max_tokens: int | None = None  # None: as many as the context leaves
    temperature: float = 1.0  # 0 is greedy decoding
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed per request
    stop: tuple[str, ...] = ()
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    json_schema: dict | None = None  # from guided_decoding; {} accepts any JSON value
    grammar: str | None = None  # from guided_decoding

    @classmethod
    def from_json(cls, raw: str) -> "SamplingParams":
        try:
            values = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as error:
            raise RequestError(f"sampling_parameters is not valid JSON: {error}") from None
        if not isinstance(values, dict):
            raise RequestError("sampling_parameters must be a JSON object")
        values = {key: value for key, value in values.items() if value is not None}
        for key, neutral in _NEUTRAL.items():
            if key in values and values.pop(key) != neutral:
                raise RequestError(f"sampling parameter {key} other than {neutral} is not supported by this model")
        # A parameter we would silently ignore (logprobs, ...) changes what the caller gets back;
        # refusing it is the honest answer.
        accepted = (set(cls.__dataclass_fields__) - {"json_schema", "grammar"}) | {"guided_decoding"}
        unknown = sorted(set(values) - accepted)
        if unknown:
            raise RequestError(f"unsupported sampling parameters {unknown}; supported: {sorted(accepted)}")
        stop = values.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings")
        json_schema, grammar = _guided(values.get("guided_decoding"))
        params = cls(
            max_tokens=_int(values, "max_tokens", None, low=1),
            temperature=_float(values, "temperature", 1.0, low=0.0),
            top_p=_float(values, "top_p", 1.0, low=0.0, high=1.0),
            top_k=max(0, _int(values, "top_k", 0, low=-1)),
            min_p=_float(values, "min_p", 0.0, low=0.0, high=1.0),
            seed=_int(values, "seed", None, low=0, high=MAX_SEED),
            stop=tuple(s for s in stop if s),
            presence_penalty=_float(values, "presence_penalty", 0.0, low=-2.0, high=2.0),
            frequency_penalty=_float(values, "frequency_penalty", 0.0, low=-2.0, high=2.0),
            repetition_penalty=_float(values, "repetition_penalty", 1.0, low=0.0),
            json_schema=json_schema,
            grammar=grammar,
        )
        if params.top_p == 0.0:
            raise RequestError("top_p must be greater than 0")
        return params

    def engine_request(self, prompt: str, seed: int) -> dict:
        """The body of llama.cpp's completion request (its server's names), streamed."""
        body = {
            "prompt": prompt,
            "stream": True,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "typical_p": 1.0,
            "seed": seed,
            "stop": list(self.stop),
            "repeat_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
        }
        if self.json_schema is not None:
            body["json_schema"] = self.json_schema
        if self.grammar is not None:
            body["grammar"] = self.grammar
        return body


def _guided(guided) -> tuple[dict | None, str | None]:
    """The JSON schema and the grammar of vLLM's guided_decoding (at most one of them), both None
    when the output is free."""
    if guided is None:
        return None, None
    if not isinstance(guided, dict):
        raise RequestError("guided_decoding must be a JSON object")
    given = sorted(key for key, value in guided.items() if value not in (None, False))
    unsupported = [key for key in given if key not in ("json", "json_object", "grammar")]
    if unsupported:
        raise RequestError(
            f"guided_decoding {unsupported} is not supported by this model; supported: json, json_object, grammar"
        )
    if len(given) > 1:
        raise RequestError(f"guided_decoding sets {given}; set only one of them")
    grammar = guided.get("grammar")
    if grammar is not None:
        if not isinstance(grammar, str) or not grammar.strip():
            raise RequestError("guided_decoding.grammar must be a non-empty string")
        return None, grammar
    return _guided_json(guided), None


def _guided_json(guided: dict) -> dict | None:
    schema = guided.get("json")
    if schema is not None:
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as error:
                raise RequestError(f"guided_decoding.json is not valid JSON: {error}") from None
        if not isinstance(schema, dict):
            raise RequestError("guided_decoding.json must be a JSON schema object")
        return schema
    if guided.get("json_object"):
        return {"type": "object"}
    return None


def _int(values: dict, key: str, default, low=None, high=None):
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{key} must be an integer, got {value!r}")
    _check_range(key, value, low, high)
    return value


def _float(values: dict, key: str, default, low=None, high=None):
    if key not in values:
        return default
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise RequestError(f"{key} must be a number, got {value!r}")
    _check_range(key, value, low, high)
    return float(value)


def _check_range(key, value, low, high):
    if low is not None and value < low:
        raise RequestError(f"{key} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise RequestError(f"{key} must be <= {high}, got {value}")


# GGUF metadata value types (the GGUF spec): fixed sizes in bytes; 8 is a string, 9 an array.
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_longest_token_bytes(path: str) -> int:
    """The most bytes one vocabulary entry (`tokenizer.ggml.tokens`) of a GGUF file spells, read
    from its metadata without loading the model. Entries are spelled as stored (SentencePiece's
    "▁" is 3 bytes for one space, a byte token "<0x0A>" 6 for one), so this bounds from above the
    bytes any token stands for: what refusing an unfittable prompt before tokenising needs."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        at = 0

        def number(fmt: str):
            nonlocal at
            value = struct.unpack_from("<" + fmt, data, at)[0]
            at += struct.calcsize(fmt)
            return value

        def skip(value_type: int) -> None:
            nonlocal at
            if value_type in _GGUF_FIXED:
                at += _GGUF_FIXED[value_type]
            elif value_type == _GGUF_STRING:
                length = number("Q")
                at += length
            elif value_type == _GGUF_ARRAY:
                element_type, count = number("I"), number("Q")
                if element_type in _GGUF_FIXED:
                    at += _GGUF_FIXED[element_type] * count
                else:
                    for _ in range(count):
                        skip(element_type)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {value_type}")

        if data[:4] != b"GGUF" or struct.unpack_from("<I", data, 4)[0] < 2:
            raise ValueError(f"{path} is not a GGUF file of version 2 or later")
        at = 16  # magic, version, tensor count
        for _ in range(number("Q")):
            length = number("Q")
            key = data[at : at + length]
            at += length
            value_type = number("I")
            if key == b"tokenizer.ggml.tokens" and value_type == _GGUF_ARRAY:
                element_type, count = number("I"), number("Q")
                if element_type != _GGUF_STRING:
                    raise ValueError(f"{path}: tokenizer.ggml.tokens is not an array of strings")
                longest = 0
                unpack = struct.Struct("<Q").unpack_from
                for _ in range(count):
                    (length,) = unpack(data, at)
                    at += 8 + length
                    longest = max(longest, length)
                return longest or 1
            skip(value_type)
    raise ValueError(f"{path} has no tokenizer.ggml.tokens")
