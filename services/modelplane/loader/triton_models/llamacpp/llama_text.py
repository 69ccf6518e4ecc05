"""Request parsing and stop strings for the llama.cpp Triton model (no Triton or llama.cpp imports,
so it is tested without a server). Copied next to model.py in the model's version folder, with
llm_protocol.py."""

import json
from dataclasses import dataclass

from llm_protocol import RequestError, stop_prefix_length

# llama.cpp reads seed 0xFFFFFFFF as "pick a random seed", so it cannot be a caller's seed.
MAX_SEED = 0xFFFFFFFE
# Accepted when they ask for nothing this model would do differently (vLLM clients send them).
_NEUTRAL = {"n": 1, "best_of": 1}


@dataclass(frozen=True)
class SamplingParams:
    """The `sampling_parameters` JSON object, with vLLM's names. Absent keys mean what they mean in
    vLLM and the OpenAI API (temperature 1, no top-k/top-p/min-p filtering, no penalties), not
    llama-cpp-python's own defaults (temperature 0.8, top_k 40, top_p 0.95, min_p 0.05)."""

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
        unknown = sorted(set(values) - set(cls.__dataclass_fields__))
        if unknown:
            raise RequestError(
                f"unsupported sampling parameters {unknown}; supported: {sorted(cls.__dataclass_fields__)}"
            )
        stop = values.get("stop", ())
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
            raise RequestError("stop must be a string or a list of strings")
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
        )
        if params.top_p == 0.0:
            raise RequestError("top_p must be greater than 0")
        return params


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


class StopStringFilter:
    """Cuts generated text at the first stop string and holds back text that may be the start of
    one, so a stop string never reaches the client, not even split across two chunks.

    The held-back part is always the longest suffix that is a prefix of some stop string, so a stop
    string completed later can only begin inside it and one `find` over held-back + new text finds
    it. (llama-cpp-python's own stop handling picks the first stop in list order, not the earliest
    in the text.)"""

    def __init__(self, stops: tuple[str, ...]):
        self._stops = stops
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was hit)."""
        if not self._stops:
            return text, False
        text = self._held + text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self._held = ""
            return text[: min(hits)], True
        keep = stop_prefix_length(text, self._stops)
        self._held = text[len(text) - keep :]
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Text held back at the end of a generation that did not end in a stop string."""
        held, self._held = self._held, ""
        return held
