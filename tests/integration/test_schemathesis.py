"""Schemathesis against the gateway's OpenAPI document, on the running stack: generated requests,
valid and invalid, and not one 5xx or response that breaks the document."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx

from tests.integration.conftest import RunningStack

EXAMPLES_PER_OPERATION = 500
# What the run may take at most; it normally takes well under a tenth of it.
TIME_BUDGET_SECONDS = 480


def _requests_by_status(stack: RunningStack) -> dict[str, float]:
    """The gateway's own count of the API requests it answered, by status (its route label is the
    path without the /v1 prefix)."""
    text = httpx.get(f"{stack.gateway_url}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for route, status, value in re.findall(
        r'^modelplane_http_requests_total\{route="([^"]*)",status="(\d+)"\} (\S+)$', text, re.MULTILINE
    ):
        if route not in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
            counts[status] = counts.get(status, 0.0) + float(value)
    return counts


def test_no_5xx_and_no_schema_violation(stack: RunningStack, cross_encoder: str, tmp_path: Path) -> None:
    before = _requests_by_status(stack)
    run = subprocess.run(
        [
            str(Path(sys.executable).with_name("schemathesis")),
            "run",
            f"{stack.gateway_url}/openapi.json",
            "--checks",
            "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,"
            "response_headers_conformance",
            "--include-path-regex",
            "^/v1/",
            "--max-examples",
            str(EXAMPLES_PER_OPERATION),
            "--seed",
            "20261124",
            # One worker: Hypothesis describes its strategies through `ast`, which is not thread-safe
            # on CPython 3.11 (two workers fail now and then inside Schemathesis itself).
            "--workers",
            "1",
            "--request-timeout",
            "120",
            "--no-color",
            "--report",
            "junit",
            "--report-dir",
            str(tmp_path),
        ],
        env={
            **os.environ,
            "SCHEMATHESIS_HOOKS": "tests.integration.schemathesis_hooks",
            "MODELPLANE_TEST_MODELS": f"all-minilm-l6-v2,{cross_encoder}",
        },
        capture_output=True,
        text=True,
        timeout=TIME_BUDGET_SECONDS + 120,
        check=False,
    )
    after = _requests_by_status(stack)
    sent = {status: after.get(status, 0.0) - before.get(status, 0.0) for status in after}
    print(f"schemathesis requests by status: {dict(sorted(sent.items()))}")
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert sum(sent.values()) >= 500, sent
    assert not any(status.startswith("5") for status, count in sent.items() if count), sent
    # The generated requests reached the models, not only the gateway's refusals.
    assert sent.get("200", 0) >= 100, sent
