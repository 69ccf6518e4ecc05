"""How much memory a model takes: estimated before its first load, measured once it is loaded.

The estimate is the size of what Triton will load (the files of the model's repository entry)
times a factor for the kind of package, plus the fixed cost of a backend process. The
measurement, on the embedded Triton, is the proportional set size (PSS) of the model's
`triton_python_backend_stub` processes: each python-backend instance runs in its own stub, found
by the model directory on its command line. PSS shares the interpreter and onnxruntime pages
between the stubs that map them, so the footprints of all loaded models add up to what they use
together. An external Triton's processes are not visible; its models keep their estimates.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil

from modelplane.common.types import Model, ModelFormat

STUB_PROCESS = "triton_python_backend_stub"

# Resident bytes per byte of model files, by package format. Measured on the embedded Triton:
# all-MiniLM-L6-v2 (86 MiB of ONNX) holds 124-149 MiB of PSS, a 4 MiB BERT 36-42 MiB, i.e. about
# 33 MiB of process plus 1.35x the weights (onnxruntime keeps the initializers and the optimised
# graph's copies of some). The factors round up: an estimate too high costs an early eviction, one
# too low an over-full device. A GGUF is memory-mapped and needs its KV cache besides.
FORMAT_FACTORS: dict[ModelFormat, float] = {
    ModelFormat.UNSPECIFIED: 1.4,
    ModelFormat.HUGGINGFACE: 1.4,
    ModelFormat.PYTORCH: 1.4,
    ModelFormat.ONNX: 1.4,
    ModelFormat.TENSORRT_PLAN: 1.2,
    ModelFormat.GGUF: 1.3,
}


def estimate_footprint(model: Model, entry: Path, overhead_bytes: int) -> int:
    """Bytes the model is expected to hold once loaded: the operator's estimate when the spec has
    one, else its repository entry's files scaled by its format, plus one process's overhead, plus
    what its builder says it needs while serving (an LLM's KV caches)."""
    if model.spec.memory_estimate_bytes:
        return model.spec.memory_estimate_bytes
    version_dir = entry / str(model.version)
    files = sum(f.stat().st_size for f in version_dir.rglob("*") if f.is_file()) if version_dir.is_dir() else 0
    if not files and model.status.manifest is not None:
        files = sum(f.size_bytes for f in model.status.manifest.files)
    factor = FORMAT_FACTORS.get(model.spec.format, FORMAT_FACTORS[ModelFormat.UNSPECIFIED])
    runtime = model.status.profile.runtime_memory_bytes if model.status.profile is not None else 0
    return int(files * factor) + overhead_bytes + runtime


class BackendProcesses:
    """The embedded Triton's python-backend stub processes of each model in one repository."""

    def __init__(self, repository: Path) -> None:
        self.repository = repository.resolve()

    def _stubs(self) -> dict[str, list[psutil.Process]]:
        """Stub processes by model name, in one scan of the process table."""
        root = f"{self.repository}/"
        found: dict[str, list[psutil.Process]] = {}
        for process in psutil.process_iter(["name", "cmdline"]):
            cmdline = process.info.get("cmdline") or []
            if process.info.get("name") == STUB_PROCESS and len(cmdline) > 1 and cmdline[1].startswith(root):
                found.setdefault(cmdline[1][len(root) :].split("/", 1)[0], []).append(process)
        return found

    def _resident_bytes(self) -> dict[str, int]:
        totals: dict[str, int] = {}
        for name, stubs in self._stubs().items():
            for stub in stubs:
                try:
                    info = stub.memory_full_info()
                    used = getattr(info, "pss", 0) or info.rss
                except psutil.AccessDenied:
                    used = stub.memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                totals[name] = totals.get(name, 0) + used
        return totals

    async def resident_bytes(self) -> dict[str, int]:
        """Each model's measured memory now; models with no stub process here are absent."""
        return await asyncio.to_thread(self._resident_bytes)

    async def running(self, name: str) -> bool:
        """Whether any stub process of the model is still alive (its memory not yet released)."""
        return name in await asyncio.to_thread(self._stubs)
