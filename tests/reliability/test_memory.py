"""Load/unload cycles of one tiny real model through the loader, with the resident memory of every
service and of tritonserver printed at the start and at the end.

`MODELPLANE_RELIABILITY_CYCLES` sets the number of cycles. A cycle takes about 3.5 s on two cores
(a python-backend model starts its own stub process), so CI runs 10 and the figures of a
1,000-cycle run are in the README's Reliability section:

    MODELPLANE_RELIABILITY_CYCLES=1000 .venv/bin/python -m pytest tests/reliability/test_memory.py -s -o timeout=0
"""

from __future__ import annotations

import contextlib
import os
import time

import httpx
import psutil

from modelplane.common.types import ModelState
from modelplane.loader.client import LoaderClient
from tests.integration.conftest import RunningStack
from tests.reliability.conftest import AUTH, ENCODERS, consistent, record, rss_mib, service_processes, states

CYCLES = int(os.environ.get("MODELPLANE_RELIABILITY_CYCLES", "10"))
MODEL = ENCODERS[4]


def memory(stack: RunningStack) -> dict[str, float]:
    return {role: rss_mib(process) for role, process in sorted(service_processes(stack).items())}


async def test_load_unload_cycles_keep_serving_and_memory_is_reported(rel: RunningStack, models: object) -> None:
    async with LoaderClient(rel.loader) as loader:
        await loader.ensure_loaded(MODEL, reason="test", timeout_seconds=300)  # fetch and convert once
        await loader.unload(MODEL)
        before = memory(rel)
        started = time.monotonic()
        for cycle in range(1, CYCLES + 1):
            await loader.ensure_loaded(MODEL, reason="test", timeout_seconds=300)
            await loader.unload(MODEL)
            if cycle % 100 == 0:  # the curve, for a long run
                print(f"after {cycle} cycles ({time.monotonic() - started:.0f} s): {memory(rel)}", flush=True)
        elapsed = time.monotonic() - started
        after = memory(rel)
        await loader.ensure_loaded(MODEL, reason="test", timeout_seconds=300)
    async with httpx.AsyncClient(timeout=30, headers=AUTH) as client:
        response = await client.post(f"{rel.gateway_url}/v1/embeddings", json={"model": MODEL, "input": ["still"]})
    assert response.status_code == 200, response.text  # the model still serves after the cycles
    async with LoaderClient(rel.loader) as loader:
        await loader.unload(MODEL)
    assert (await states(rel))[MODEL] == ModelState.STAGED
    await consistent(rel)
    assert _stubs_of(rel, MODEL) == []  # every unload's python-backend process has exited

    record(f"load/unload cycles of {MODEL}: {CYCLES} in {elapsed:.0f} s ({elapsed / max(CYCLES, 1):.2f} s each)")
    for role in before:
        growth = after.get(role, 0.0) - before[role]
        record(f"  RSS {role:<12} {before[role]:8.1f} MiB -> {after.get(role, 0.0):8.1f} MiB ({growth:+.1f} MiB)")


def _stubs_of(stack: RunningStack, model: str) -> list[int]:
    """Triton's python-backend processes still serving `model`."""
    stubs = []
    for process in psutil.Process(stack.pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            command = " ".join(process.cmdline())
            if "triton_python_backend_stub" in command and f"/models/{model}/" in command:
                stubs.append(process.pid)
    return stubs
