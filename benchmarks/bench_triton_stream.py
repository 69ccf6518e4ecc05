"""The inference service's encoder calls into Triton: one stream per node against a unary call each.

    .venv/bin/python benchmarks/bench_triton_stream.py [--calls 1500] [--rows 8] [--rounds 2]

Starts a real tritonserver (the embedded one) with a python-backend model that answers at once
with a (rows, 384) float32 array, so that only the call's own cost is measured: no tokenizer, no
onnxruntime. The inference service's `TritonInferer.encode` then sends calls of `--rows` rows of
24 token ids (a coalesced batch at 16 single-text clients carries about 8), one or two at a time,
as messages of the node's stream and as unary calls (`streams=False`), taking turns, and prints
the wall time per call and the CPU time per call of this process (the inference service's side),
tritonserver and the model's stub, read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

_CONFIG = """name: "echo"
backend: "python"
max_batch_size: 0
input [{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1, -1 ] },
       { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1, -1 ] }]
output [{ name: "embeddings" data_type: TYPE_FP32 dims: [ -1, 384 ] }]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

_MODEL = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        answers = []
        for request in requests:
            rows = pb_utils.get_input_tensor_by_name(request, "input_ids").as_numpy().shape[0]
            vectors = np.full((rows, 384), 0.5, dtype=np.float32)
            answers.append(pb_utils.InferenceResponse([pb_utils.Tensor("embeddings", vectors)]))
        return answers
"""


def _cpu(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


async def _measure(
    inferer, triton: list[psutil.Process], stub: list[psutil.Process], *, calls: int, rows: int, concurrency: int
) -> dict[str, float]:
    arrays = {
        "input_ids": np.full((rows, 24), 2054, dtype=np.int64),
        "attention_mask": np.ones((rows, 24), dtype=np.int64),
    }
    walls: list[float] = []

    async def worker(count: int) -> None:
        for _ in range(count):
            started = time.perf_counter()
            answer = await inferer.encode("echo", arrays, "embeddings")
            walls.append(time.perf_counter() - started)
            assert answer.shape == (rows, 384)

    me = [psutil.Process()]
    before = (_cpu(me), _cpu(triton), _cpu(stub))
    await asyncio.gather(*(worker(calls // concurrency) for _ in range(concurrency)))
    after = (_cpu(me), _cpu(triton), _cpu(stub))
    done = len(walls)
    return {
        "wall_us": 1e6 * statistics.median(walls),
        "inference_us": 1e6 * (after[0] - before[0]) / done,
        "triton_us": 1e6 * (after[1] - before[1]) / done,
        "stub_us": 1e6 * (after[2] - before[2]) / done,
    }


async def _run(args: argparse.Namespace, folder: Path) -> None:
    from modelplane.common.settings import TritonSettings  # noqa: PLC0415
    from modelplane.inference.triton import TritonInferer  # noqa: PLC0415
    from modelplane.loader.triton_control import TritonControl  # noqa: PLC0415
    from modelplane.triton.embedded import EmbeddedTriton  # noqa: PLC0415
    from tests.conftest import free_port  # noqa: PLC0415

    (folder / "models" / "echo" / "1").mkdir(parents=True)
    (folder / "models" / "echo" / "config.pbtxt").write_text(_CONFIG)
    (folder / "models" / "echo" / "1" / "model.py").write_text(_MODEL)
    settings = TritonSettings(
        model_repository=folder / "models",
        grpc_address=f"127.0.0.1:{free_port()}",
        http_port=free_port(),
        metrics_port=free_port(),
    )
    triton = EmbeddedTriton(settings, workdir=folder / "triton")
    await triton.start()
    control = TritonControl(settings.grpc_address)
    paths = {
        "stream": TritonInferer(settings.grpc_address, streams=True),
        "unary": TritonInferer(settings.grpc_address, streams=False),
    }
    try:
        await control.load("echo", timeout_seconds=120)
        assert triton.process is not None
        server = psutil.Process(triton.process.pid)
        stub = [child for child in server.children(recursive=True) if "stub" in child.name()]
        for inferer in paths.values():
            await _measure(inferer, [server], stub, calls=100, rows=args.rows, concurrency=1)  # warm
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for concurrency in (1, 2):
                for name, inferer in paths.items():
                    figures = await _measure(
                        inferer, [server], stub, calls=args.calls, rows=args.rows, concurrency=concurrency
                    )
                    results.setdefault((name, concurrency), []).append(figures)
        print(
            f"calls of {args.rows} rows x 24 tokens, {args.calls} per measurement, {args.rounds} round(s) taking turns"
        )
        print("| calls | wall per call µs | inference CPU per call µs | tritonserver CPU µs | stub CPU µs |")
        print("| --- | ---: | ---: | ---: | ---: |")
        for (name, concurrency), rounds in results.items():
            cells = [
                "-".join(f"{figures[key]:.0f}" for figures in rounds)
                for key in ("wall_us", "inference_us", "triton_us", "stub_us")
            ]
            what = "one at a time" if concurrency == 1 else "two at a time"
            print(f"| {name}, {what} | " + " | ".join(cells) + " |")
    finally:
        for inferer in paths.values():
            await inferer.close()
        await control.close()
        await triton.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1500)
    parser.add_argument("--rows", type=int, default=8, help="rows per call")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    with tempfile.TemporaryDirectory(prefix="bench-triton-stream-") as folder:
        asyncio.run(_run(args, Path(folder)))


if __name__ == "__main__":
    main()
