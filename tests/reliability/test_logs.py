"""The logs of the whole reliability run (every service, the supervisor and Triton), scanned for
what must never be in them. It runs last (conftest orders it), after the faults, the load and
the hostile input, plus a fetch with the S3 credentials and requests with a wrong key here."""

from __future__ import annotations

import contextlib
import json
from collections import Counter

import httpx

from modelplane.loader.client import LoaderClient
from tests.integration.conftest import RunningStack
from tests.loader.servers import S3_ACCESS_KEY_ID, S3_SECRET_ACCESS_KEY
from tests.reliability.conftest import API_KEY, ENCODERS, S3_MODEL, record

WRONG_KEY = "sk-wrong-" + "7" * 32


async def test_no_key_or_credential_appears_in_any_log(rel: RunningStack, models: object) -> None:
    async with LoaderClient(rel.loader) as loader:  # the loader signs S3 requests with the secret
        await loader.ensure_loaded(S3_MODEL, reason="test", timeout_seconds=300)
        await loader.unload(S3_MODEL)
    async with httpx.AsyncClient(base_url=rel.gateway_url, timeout=30) as client:
        wrong = await client.post(
            "/v1/embeddings",
            json={"model": ENCODERS[0], "input": ["x"]},
            headers={"Authorization": f"Bearer {WRONG_KEY}"},
        )
    assert wrong.status_code == 401

    logs = {path.name: path.read_text(errors="replace") for path in rel.home.rglob("*.log")}
    assert "stack.log" in logs and "tritonserver.log" in logs
    text = "\n".join(logs.values())
    for secret in (API_KEY, WRONG_KEY, S3_SECRET_ACCESS_KEY, S3_ACCESS_KEY_ID):
        assert secret not in text, f"a secret ({secret[:6]}…) is in the logs"
    # Keepalive pings our clients send must be within what our servers accept.
    assert "too_many_pings" not in text

    levels: Counter[tuple[str, str]] = Counter()
    for line in logs["stack.log"].splitlines():
        if line.startswith("{"):
            with contextlib.suppress(json.JSONDecodeError):  # a C library's stderr line, not ours
                entry = json.loads(line)
                levels[(entry.get("service", "supervisor"), entry.get("level", "?"))] += 1
    size = sum(len(t) for t in logs.values())
    record(f"log scan: {len(logs)} files, {size / 1024:.0f} KiB, no key or credential; lines by service and level:")
    for (service, level), count in sorted(levels.items()):
        if level in ("warning", "error", "critical"):
            record(f"  {service:<10} {level:<8} {count}")
