"""The inference service's errors."""

from __future__ import annotations

from modelplane.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound, Unavailable

__all__ = [
    "AudioTooLong",
    "AudioUnreadable",
    "InputTooLong",
    "InvalidRequest",
    "ModelLoading",
    "ModelNotFound",
    "ModelNotServable",
    "TemplateMissing",
    "TritonUnavailable",
    "UnknownVoice",
    "WrongTask",
]


class InvalidRequest(InvalidArgument):
    reason = "INVALID_REQUEST"


class InputTooLong(InvalidArgument):
    reason = "INPUT_TOO_LONG"


class WrongTask(InvalidArgument):
    reason = "WRONG_TASK"


class ModelNotServable(FailedPrecondition):
    """The model is in a state from which it cannot serve (FAILED): a person must act."""

    reason = "MODEL_NOT_SERVABLE"


class ModelLoading(Unavailable):
    """The model is being loaded; the request can be retried."""

    reason = "MODEL_LOADING"


class TritonUnavailable(Unavailable):
    reason = "TRITON_UNAVAILABLE"


class TemplateMissing(InvalidArgument):
    """A chat was asked of a model without a chat template."""

    reason = "CHAT_TEMPLATE_MISSING"


class AudioUnreadable(InvalidArgument):
    """An upload that is empty, not audio, or damaged beyond decoding."""

    reason = "AUDIO_UNREADABLE"


class AudioTooLong(InvalidArgument):
    """An upload longer than the service transcribes in one request."""

    reason = "AUDIO_TOO_LONG"


class UnknownVoice(InvalidArgument):
    reason = "UNKNOWN_VOICE"
