"""The split of a backend process's memory into its own and the runtime all processes share."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from modelplane.loader.footprint import is_runtime_library, parse_smaps

SMAPS = """\
5591d3c00000-5591d3c2a000 r--p 00000000 fe:00 1311 /opt/tritonserver/backends/python/triton_python_backend_stub
Size:                168 kB
Rss:                 168 kB
Pss:                  84 kB
7f2a10000000-7f2a14000000 rw-p 00000000 00:00 0
Size:              65536 kB
Rss:               40960 kB
Pss:               40960 kB
7f2a20000000-7f2a30000000 r--p 00000000 fe:00 2222 /var/lib/modelplane/cache/ab/model.gguf
Size:             262144 kB
Rss:              100000 kB
Pss:              100000 kB
7f2a40000000-7f2a40800000 r-xp 00000000 fe:00 3333 /venv/onnxruntime/capi/libonnxruntime.so.1.20.1
Size:               8192 kB
Rss:                6000 kB
Pss:                2000 kB
7f2a40800000-7f2a40900000 rw-p 00800000 fe:00 3333 /venv/onnxruntime/capi/libonnxruntime.so.1.20.1
Size:               1024 kB
Rss:                 300 kB
Pss:                 300 kB
Anonymous:           200 kB
7f2a50000000-7f2a50100000 rw-s 00000000 00:01 4444 /dev/shm/triton_python_backend_shm_region_1
Size:               1024 kB
Rss:                1024 kB
Pss:                 512 kB
7f2a60000000-7f2a60200000 r-xp 00000000 fe:00 5555 /usr/lib/x86_64-linux-gnu/libpython3.12.so
Size:               2048 kB
Rss:                1200 kB
Pss:                 600 kB
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0 [stack]
Size:                132 kB
Rss:                  40 kB
Pss:                  40 kB
"""


def test_libraries_are_shared_and_everything_else_is_the_models_own() -> None:
    own, shared = parse_smaps(SMAPS)
    # Anonymous memory, the mmapped GGUF, its shared-memory region, the stack and the pages of
    # onnxruntime it wrote to (relocations) are its own.
    assert own == (40960 + 100000 + 512 + 40 + 200) * 1024
    # The stub binary's, onnxruntime's and libpython's file pages are the runtime every stub maps.
    assert shared == (84 + 2000 + 100 + 600) * 1024


@pytest.mark.parametrize(
    ("path", "runtime"),
    [
        ("/x/libonnxruntime.so.1.20.1", True),
        ("/x/_multiarray_umath.cpython-312-x86_64-linux-gnu.so", True),
        ("/x/triton_python_backend_stub", True),
        ("/x/model.gguf", False),
        ("/x/model.onnx", False),
        ("/dev/shm/triton_python_backend_shm_region_1", False),
        ("/x/solar.sofa", False),
    ],
)
def test_what_counts_as_the_runtime(path: str, runtime: bool) -> None:
    assert is_runtime_library(path) is runtime


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="Linux only")
def test_this_process_splits_into_its_own_and_its_libraries() -> None:
    own, shared = parse_smaps(Path(f"/proc/{os.getpid()}/smaps").read_text())
    assert own > 0 and shared > 0
