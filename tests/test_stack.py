"""`modelplane up` as `make run` runs it in a terminal."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from tests.integration.conftest import running_stack


def test_ctrl_c_stops_everything_without_an_error(tmp_path: Path) -> None:
    """Ctrl-C sends SIGINT to the terminal's whole process group: the supervisor must stop the
    services and Triton in order, and none of them may be taken for a crash and restarted."""
    with running_stack(tmp_path, bundled=False, own_session=True) as stack:
        os.killpg(stack.pid, signal.SIGINT)
        _, status = os.waitpid(stack.pid, 0)  # the fixture's own SIGINT then finds it gone
    assert os.waitstatus_to_exitcode(status) == 0
    records = [json.loads(line) for line in stack.log_text().splitlines() if line.startswith("{")]
    events = [record["event"] for record in records]
    assert "triton stopped" in events
    assert "triton died; restarting" not in events and "service died; restarting" not in events
    errors = [record for record in records if record.get("level") in ("error", "critical")]
    assert errors == []
