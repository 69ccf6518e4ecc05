"""Child processes that do not outlive their supervisor."""

from __future__ import annotations

import ctypes
import os
import signal

_PR_SET_PDEATHSIG = 1
# Set by a parent for a child that calls `follow_parent()` itself: the parent's pid.
PARENT_PID_VARIABLE = "MODELPLANE_PARENT_PID"


def die_with_parent() -> None:
    """Run in the child before exec: if the supervisor is killed outright, the kernel sends the
    child SIGTERM, so no service or Triton lives on holding ports and memory."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def follow_parent() -> None:
    """The same, called by the child itself first thing, for parents that cannot run a preexec_fn
    (a process with gRPC threads must not run Python between fork and exec: the child aborts).
    Exits at once when the parent already died before the request could be made."""
    die_with_parent()
    expected = os.environ.get(PARENT_PID_VARIABLE)
    if expected and os.getppid() != int(expected):
        raise SystemExit("the process that started this one has exited; stopping")
