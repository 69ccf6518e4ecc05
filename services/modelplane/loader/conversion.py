"""Runs converters in a subprocess and caches what they produce.

Converted artifacts are keyed by (package digest, converter version, target, options), so a
second load of the same package converts nothing. A conversion writes into a private directory
that is renamed into place only when it succeeded.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import shutil
import sys
import uuid
from pathlib import Path
from typing import Any

import structlog

from modelplane.loader.convert.encoder import CONVERTER_VERSION as ENCODER_CONVERTER_VERSION
from modelplane.loader.errors import ConversionFailed

log = structlog.get_logger()

REPORT_FILE = "conversion.json"


def artifact_key(package_digest: str, converter_version: str, **options: object) -> str:
    text = json.dumps({"package": package_digest, "converter": converter_version, **options}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def read_report(artifact: Path) -> dict[str, Any] | None:
    report = artifact / REPORT_FILE
    return json.loads(report.read_text()) if report.is_file() else None


async def convert_encoder(
    package: Path, artifact: Path, *, task: str, tolerance: float, timeout_seconds: float
) -> dict[str, Any]:
    """Exports a Hugging Face encoder to ONNX into `artifact` unless it is already there."""
    cached = read_report(artifact)
    if cached is not None:
        return cached
    work = artifact.with_name(f"{artifact.name}.partial-{uuid.uuid4().hex[:8]}")
    command = [
        sys.executable,
        "-m",
        "modelplane.loader.convert.encoder",
        "--source",
        str(package),
        "--output",
        str(work),
        "--task",
        task,
        "--tolerance",
        str(tolerance),
    ]
    try:
        report = await _run_converter(command, timeout_seconds)
        await asyncio.to_thread(_publish, work, artifact, report)
        return report
    finally:
        await asyncio.to_thread(shutil.rmtree, work, True)


def _publish(work: Path, artifact: Path, report: dict[str, Any]) -> None:
    """Records the report and moves the finished conversion into place (atomic rename)."""
    (work / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if not artifact.exists():  # else a concurrent conversion of the same package finished first
        work.rename(artifact)


async def _run_converter(command: list[str], timeout_seconds: float) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL
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
    if process.returncode == 0 and "error" not in result and result:
        return result
    if "error" in result:
        raise ConversionFailed(f"Conversion failed: {result['error']}")
    tail = "\n".join(stderr.decode(errors="replace").strip().splitlines()[-5:])
    log.error("converter crashed", returncode=process.returncode, stderr=tail)
    raise ConversionFailed(
        f"The converter exited with status {process.returncode}: {tail[-500:] or 'no output'}. "
        "The loader log has the full output."
    )


__all__ = ["ENCODER_CONVERTER_VERSION", "artifact_key", "convert_encoder", "read_report"]
