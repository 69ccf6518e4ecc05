"""Request ids: created at the edge, carried in gRPC metadata, bound to every log line."""

from __future__ import annotations

import re
import uuid
from contextvars import ContextVar

REQUEST_ID_HEADER = "x-request-id"
# A request id crosses process boundaries in headers and log lines, so only a tame alphabet is
# accepted; anything else (CR/LF injection, megabyte ids) is replaced by a fresh id.
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")

current_request_id: ContextVar[str] = ContextVar("current_request_id", default="")


def new_request_id() -> str:
    return uuid.uuid4().hex


def accept_request_id(candidate: str | None) -> str:
    """Returns the caller's request id when it is safe to propagate, else a new one."""
    if candidate and _SAFE_REQUEST_ID.match(candidate):
        return candidate
    return new_request_id()


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """Metadata that carries the current request id to the next service."""
    request_id = current_request_id.get()
    return ((REQUEST_ID_HEADER, request_id),) if request_id else ()
