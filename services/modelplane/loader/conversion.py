"""Running converters in a subprocess, and caching what they produce.

Converted artifacts are keyed by (package digest, converter version, target, options), so a second load
of the same package converts nothing. A conversion writes into a private directory that is
renamed into place only when it succeeded, so a crash or a cancelled load leaves no artifact
that looks finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import structlog

from modelplane.common.process import PARENT_PID_VARIABLE
from modelplane.common.redact import without_server_paths
from modelplane.common.request_context import current_request_id
from modelplane.loader.errors import ConversionFailed

log = structlog.get_logger()

REPORT_FILE = "conversion.json"


def artifact_key(converter_version: str, options: dict[str, Any]) -> str:
    """The artifact's name under its package's directory in the cache (artifacts/<package>/<key>)."""
    text = json.dumps({"converter": converter_version, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_report(artifact: Path) -> dict[str, Any] | None:
    report = artifact / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else None


async def build_once(artifact: Path, build: Callable[[Path], Awaitable[dict[str, Any]]]) -> dict[str, Any]:
    """Runs `build` into a private directory and publishes it as `artifact`, unless it exists."""
    cached = read_report(artifact)
    if cached is not None:
        return cached
    work = artifact.with_name(f"{artifact.name}.partial-{uuid.uuid4().hex[:8]}")
    try:
        report = await build(work)
        await asyncio.to_thread(_publish, work, artifact, report)
        return report
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


def _publish(work: Path, artifact: Path, report: dict[str, Any]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    artifact.parent.mkdir(parents=True, exist_ok=True)
    (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if not artifact.exists():  # else a concurrent conversion of the same package finished first
        work.rename(artifact)


async def run_converter(command: list[str], timeout_seconds: float) -> dict[str, Any]:
    """Runs a converter command that prints one JSON object (its report, or {"error": ...})."""
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        stdin=asyncio.subprocess.DEVNULL,
        # A converter orphaned by a killed loader would go on converting, racing the restarted
        # loader's own conversion of the same package for the artifact's name: it follows us.
        # PYTHONSAFEPATH: the working directory is not on the converter's sys.path (in the image it
        # is MODELPLANE_HOME, whose folder `triton/` shadowed the `triton` module torch imports).
        env={**os.environ, PARENT_PID_VARIABLE: str(os.getpid()), "PYTHONSAFEPATH": "1"},
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), timeout=timeout_seconds)
    except (TimeoutError, asyncio.CancelledError):
        process.kill()
        with contextlib.suppress(ProcessLookupError):
            await process.wait()
        raise
    lines = stdout.decode(errors="replace").strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else {}
    except json.JSONDecodeError:
        result = {}
    if process.returncode == 0 and result and "error" not in result:
        return result
    # The model's FAILED reason reaches API clients: it names what is wrong with the package, never
    # a traceback or where the server keeps files; the loader log keeps the full text.
    request_id = current_request_id.get()
    where = f" under request id {request_id}" if request_id else ""
    if "error" in result:
        log.warning("converter refused the package", error=str(result["error"]))
        raise ConversionFailed(f"Conversion failed: {without_server_paths(str(result['error']))}")
    lines = stderr.decode(errors="replace").strip().splitlines()
    log.error("converter crashed", returncode=process.returncode, stderr="\n".join(lines[-60:]))
    if process.returncode is not None and process.returncode < 0:
        how = f"was killed by {signal.Signals(-process.returncode).name}"
    else:
        how = f"crashed (exit status {process.returncode})"
    last = next((line.strip() for line in reversed(lines) if line.strip() and not line[0].isspace()), "")
    cause = f": {without_server_paths(last)[:300]}" if last and not last.startswith("Traceback") else ""
    raise ConversionFailed(
        f"The converter {how}{cause}. Check that the package is a complete model of the registered task and "
        f"format; the loader log has the converter's full output{where}."
    )
