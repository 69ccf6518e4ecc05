"""Child processes that do not outlive their supervisor."""

from __future__ import annotations

import ctypes
import signal

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Run in the child before exec: if the supervisor is killed outright, the kernel sends the
    child SIGTERM, so no service or Triton lives on holding ports and memory."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
