"""How much memory a model takes: estimated before its first load, measured once it is loaded.

The estimate is the size of what Triton will load (the files of the model's repository entry)
times a factor for the kind of package, plus the fixed cost of a backend process. The
measurement, on the embedded Triton, reads the memory of the model's
`triton_python_backend_stub` processes (each python-backend instance runs in its own stub, found
by the model directory on its command line) and splits it in two:

- **its own**: everything but shared libraries (the weights, onnxruntime's arenas, the
  interpreter's heap, a memory-mapped GGUF), as proportional set size. It stays the same
  whatever else is loaded, and it is what unloading the model gives back.
- **the shared runtime**: the pages of shared libraries (libpython, onnxruntime, numpy's), which
  every stub maps from the same files. The budget counts them once per device, not once per
  model: a tiny BERT alone is 34 MiB of its own plus 23 MiB of runtime; three of them are
  3 x 34 plus 27, not 3 x 57. Counting each stub's full PSS at load time (as before) made the
  first model loaded carry the whole runtime, and two models that fit together evict each other.

An external Triton's processes are not visible; its models keep their estimates.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from modelplane.common.types import Model, ModelFormat

STUB_PROCESS = "triton_python_backend_stub"

# Resident bytes per byte of model files, by package format. Measured on the embedded Triton, a
# model's own memory: all-MiniLM-L6-v2 (86 MiB of ONNX) holds 146 MiB, a 4 MiB BERT 34 MiB, i.e.
# about 28 MiB of process plus 1.35x the weights (onnxruntime keeps the initializers and the
# optimised graph's copies of some); the shared runtime comes on top, once per device. The factors
# round up: an estimate too high costs an early eviction, one too low an over-full device. A GGUF
# is memory-mapped and needs its KV cache besides.
FORMAT_FACTORS: dict[ModelFormat, float] = {
    ModelFormat.UNSPECIFIED: 1.4,
    ModelFormat.HUGGINGFACE: 1.4,
    ModelFormat.PYTORCH: 1.4,
    ModelFormat.ONNX: 1.4,
    ModelFormat.TENSORRT_PLAN: 1.2,
    ModelFormat.GGUF: 1.3,
    # CTranslate2 converts a Whisper model's float16 weights to int8 on the CPU as it loads them.
    ModelFormat.CTRANSLATE2: 1.2,
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


@dataclass
class Resident:
    """The memory of the backend processes, as one measurement saw it."""

    own: dict[str, int] = field(default_factory=dict)  # by model name
    shared_bytes: int = 0  # the shared libraries' pages, which all stubs map: counted once


def is_runtime_library(path: str) -> bool:
    """Whether a mapped file is code every stub loads (a shared library or the stub binary),
    rather than data of the model's own (a memory-mapped GGUF, say)."""
    name = path.rsplit("/", 1)[-1]
    return name.endswith(".so") or ".so." in name or name == STUB_PROCESS


_MAPPING = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def parse_smaps(text: str) -> tuple[int, int]:
    """(own, shared) bytes from a /proc/<pid>/smaps: the proportional set size of every mapping,
    the shared libraries' file pages counted as shared, and everything else (anonymous memory, the
    libraries' copied-on-write pages, shared-memory regions, mapped model files) as the process's
    own."""
    own = shared = 0
    runtime = False
    for line in text.splitlines():
        if _MAPPING.match(line):
            parts = line.split(maxsplit=5)
            runtime = len(parts) == 6 and is_runtime_library(parts[5])
        elif line.startswith("Pss:"):
            nbytes = int(line.split()[1]) * 1024
            if runtime:
                shared += nbytes
            else:
                own += nbytes
        elif runtime and line.startswith("Anonymous:"):
            copied = int(line.split()[1]) * 1024  # written pages of a library: this process's alone
            shared -= copied
            own += copied
    return own, shared


def _split(stub: psutil.Process) -> tuple[int, int]:
    """A stub's own and shared bytes; where its mappings cannot be read (another user's process)
    all of its memory counts as its own, which errs high."""
    try:
        return parse_smaps(Path(f"/proc/{stub.pid}/smaps").read_text())
    except FileNotFoundError:
        raise psutil.NoSuchProcess(stub.pid) from None
    except OSError:
        pass
    try:
        info = stub.memory_full_info()
        return getattr(info, "pss", 0) or info.rss, 0
    except psutil.AccessDenied:
        return stub.memory_info().rss, 0


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

    def _measure(self) -> Resident:
        resident = Resident()
        for name, stubs in self._stubs().items():
            for stub in stubs:
                try:
                    own, shared = _split(stub)
                except psutil.NoSuchProcess:
                    continue
                resident.own[name] = resident.own.get(name, 0) + own
                resident.shared_bytes += shared
        return resident

    async def measure(self) -> Resident:
        """Each model's own memory now, and the runtime all of them share; models with no stub
        process here are absent."""
        return await asyncio.to_thread(self._measure)

    async def running(self, name: str) -> bool:
        """Whether any stub process of the model is still alive (its memory not yet released)."""
        return name in await asyncio.to_thread(self._stubs)
