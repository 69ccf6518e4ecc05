"""The inference service's errors."""

from __future__ import annotations

from modelplane.common.errors import FailedPrecondition, InvalidArgument, ModelNotFound, Unavailable, Unimplemented

__all__ = [
    "AudioTooLong",
    "AudioUnreadable",
    "InputTooLong",
    "InvalidRequest",
    "ModelLoading",
    "ModelNotFound",
    "ModelNotOnNode",
    "ModelNotServable",
    "NodeUnreachable",
    "StreamInterrupted",
    "TemplateMissing",
    "TritonUnavailable",
    "UnknownVoice",
    "VoiceNotInstalled",
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


class NodeUnreachable(TritonUnavailable):
    """A node's Triton could not be reached, or its connection broke during the call. The request
    may go to another copy of the model unless its answer had started (routing.py)."""


class ModelNotOnNode(ModelLoading):
    """A node's Triton does not hold the model although the registry said it did (it was just
    unloaded there, or Triton restarted): another copy may take the request."""


class StreamInterrupted(Unavailable):
    """The node answering a stream failed after part of the answer was sent; it is not replayed."""

    reason = "STREAM_INTERRUPTED"


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


class VoiceNotInstalled(Unimplemented):
    """Speech was asked of an installation without the optional `voice` extra (README "Licences")."""

    reason = "VOICE_NOT_INSTALLED"
