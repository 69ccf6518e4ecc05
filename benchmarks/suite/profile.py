"""Where a one-text embedding spends its time in the gateway and the inference service.

    .venv/bin/python -m benchmarks.suite.profile [--seconds 15] [--rate 1000] [--clients 1] [--texts 1]

Starts the stack (`modelplane up`, MiniLM loaded), sends requests of `--texts` texts through the
gateway from `--clients` concurrent clients (one-text requests from one client by default), and
meanwhile (1) samples the gateway's and the inference service's Python
stacks with py-spy, only the thread holding the GIL (Python's own work, not its waiting), and
(2) reads each process's CPU time from /proc. Prints the CPU time per
request of every process on the path (the overhead's bound on a CPU-only machine) and, per
service, the functions where the samples were (self time) and the frames they were under.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from benchmarks.bench_embed_concurrency import cache_dir, corpus
from benchmarks.suite.context import MINILM
from benchmarks.suite.embedders import HttpEmbedder

SERVICES = ("gateway", "inference")


def _processes(home: Path) -> dict[str, psutil.Process]:
    """The stack's processes by role: its services, tritonserver and the python-backend stub."""
    found: dict[str, psutil.Process] = {}
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = process.info["cmdline"] or []
            if process.environ().get("MODELPLANE_HOME") != str(home) and not any(str(home) in c for c in cmdline):
                continue
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        text = " ".join(cmdline)
        for name in (*SERVICES, "registry", "loader"):
            if f"modelplane.cli serve {name}" in text:
                found[name] = process
        if "tritonserver" in text and "triton_python_backend_stub" not in text:
            found["tritonserver"] = process
        if "triton_python_backend_stub" in text and MINILM in text:
            found["python-backend stub (onnxruntime)"] = process
    return found


def _summarise(raw: Path, top: int) -> list[str]:
    """py-spy's raw (collapsed) stacks: the share of samples per leaf function and per frame."""
    leaves: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        frames = stack.split(";")
        samples = int(count)
        total += samples
        leaves[frames[-1]] += samples
        for frame in set(frames):
            inclusive[frame] += samples
    if not total:
        return ["  (no samples)"]
    lines = [f"  {total} samples; self time:"]
    lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in leaves.most_common(top)]
    # Frames under which (nearly) every sample was are the process's entry point: leave them out.
    below_main = [(frame, n) for frame, n in inclusive.most_common() if n < 0.85 * total]
    lines.append("  inclusive (frames the samples were under, without the entry point's):")
    lines += [f"    {100 * n / total:5.1f}%  {frame}" for frame, n in below_main[: top * 2]]
    return lines


async def _drive(port: int, seconds: float, rate: float, clients: int = 1, texts_per_request: int = 1) -> int:
    """Texts embedded by `clients` clients in `seconds`, each at most `rate` requests a second."""
    texts = corpus()
    stop = time.perf_counter() + seconds

    async def one(offset: int) -> int:
        client = HttpEmbedder("gateway", port, MINILM)
        done = 0
        while time.perf_counter() < stop:
            started = time.perf_counter()
            first = (offset * 7919 + done) % len(texts)
            await client.embed([texts[(first + i) % len(texts)] for i in range(texts_per_request)])
            done += texts_per_request
            await asyncio.sleep(max(0.0, 1 / rate - (time.perf_counter() - started)))
        await client.close()
        return done

    return sum(await asyncio.gather(*(one(offset) for offset in range(clients))))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rate", type=float, default=1000.0, help="most requests per second (one client)")
    parser.add_argument("--clients", type=int, default=1, help="concurrent clients")
    parser.add_argument("--texts", type=int, default=1, help="texts per request")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    from tests.integration.conftest import running_stack  # noqa: PLC0415

    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as tmp:
        home = Path(tmp)
        env = {"MODELPLANE_LOADER_CACHE_DIR": str(cache_dir() / "modelplane-cache")}
        (home / "stack").mkdir()
        with running_stack(home / "stack", extra_env=env) as stack:
            port = int(stack.gateway_url.rsplit(":", 1)[1])
            asyncio.run(_drive(port, 2.0, args.rate))  # warm
            processes = _processes(home / "stack")
            before = {name: p.cpu_times() for name, p in processes.items()}
            spies = {
                name: subprocess.Popen(
                    [py_spy, "record", "--pid", str(processes[name].pid), "--rate", "250", "--duration",
                     str(int(args.seconds)), "--format", "raw", "--output", str(home / f"{name}.txt"), "--nonblocking",
                     "--gil"],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for name in SERVICES
                if name in processes
            }  # fmt: skip
            started = time.perf_counter()
            texts = asyncio.run(_drive(port, args.seconds, args.rate, args.clients, args.texts))
            elapsed = time.perf_counter() - started
            after = {name: p.cpu_times() for name, p in processes.items()}
            for spy in spies.values():
                spy.wait(timeout=60)
        print(
            f"{texts} texts through the gateway in {elapsed:.1f} s ({texts / elapsed:.0f}/s), "
            f"{args.clients} client(s) x {args.texts} text(s) per request"
        )
        print("CPU time per text (user + system), by process:")
        total = 0.0
        for name in processes:
            used = (after[name].user + after[name].system) - (before[name].user + before[name].system)
            total += used
            print(f"  {name:<36} {1000 * used / texts:6.2f} ms")
        print(f"  {'all':<36} {1000 * total / texts:6.2f} ms")
        for name in spies:
            print(f"\npy-spy, {name} service:")
            print("\n".join(_summarise(home / f"{name}.txt", args.top)))


if __name__ == "__main__":
    main()
