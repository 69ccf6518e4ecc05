"""The gateway's own CPU per request, with POST /v1/embeddings served directly and through FastAPI.

Behind the gateway is a scripted inference service (a real gRPC server in its own process) that
answers Embed at once with a fixed 384-dimension vector, so what is measured is the gateway
alone: HTTP parsing, the access middleware, routing, validation, the coalesced gRPC call and the
response's JSON. Two gateways run side by side, `MODELPLANE_GATEWAY_DIRECT_ROUTES` true (the
default) and false, and are measured in turn, round after round, with concurrent single-text
clients (Dify's default); the gateway process's CPU time comes from /proc.

    .venv/bin/python -m benchmarks.bench_gateway_overhead                 # about a minute
    .venv/bin/python -m benchmarks.bench_gateway_overhead --clients 1 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.bench_embed_concurrency import MODEL, Server, _client, corpus, free_port, wait_for

DIMENSIONS = 384


def serve_scripted_inference(port: int) -> None:
    """The scripted inference service (this module run with --serve-inference PORT)."""
    import grpc  # noqa: PLC0415 - only the server's process needs these
    import numpy as np  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    from modelplane.common.v1 import usage_pb2  # noqa: PLC0415
    from modelplane.inference.v1 import inference_service_pb2 as pb  # noqa: PLC0415
    from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: PLC0415

    vector = (np.random.default_rng(0).standard_normal(DIMENSIONS) / 20).astype("<f4")
    packed, values = vector.tobytes(), vector.tolist()

    class Scripted(pb_grpc.InferenceServiceServicer):
        async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
            as_packed = request.vector_encoding == pb.VECTOR_ENCODING_PACKED_FLOAT32
            embeddings = [
                pb.Embedding(index=i, num_tokens=8, packed_values=packed)
                if as_packed
                else pb.Embedding(index=i, num_tokens=8, values=values)
                for i in range(len(request.inputs))
            ]
            usage = usage_pb2.Usage(prompt_tokens=8 * len(embeddings), total_tokens=8 * len(embeddings))
            return pb.EmbedResponse(model=request.model, embeddings=embeddings, usage=usage)

    async def main() -> None:
        server = grpc.aio.server()
        pb_grpc.add_InferenceServiceServicer_to_server(Scripted(), server)
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        print("scripted inference ready", flush=True)
        await server.wait_for_termination()

    uvloop.run(main())


def _start(name: str, command: list[str], env: dict[str, str], port: int, ready: str, workdir: Path) -> Server:
    log = workdir / f"{name}.log"
    with log.open("wb") as output:
        process = subprocess.Popen(command, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True)
    server = Server(name, port, process, log)
    wait_for(server, ready, 60)
    return server


@contextlib.contextmanager
def running(workdir: Path) -> Iterator[dict[str, Server]]:
    servers: list[Server] = []
    try:
        inference_port = free_port()
        servers.append(
            _start(
                "inference",
                [sys.executable, "-m", "benchmarks.bench_gateway_overhead", "--serve-inference", str(inference_port)],
                dict(os.environ),
                inference_port,
                "scripted inference ready",
                workdir,
            )
        )
        gateways = {}
        for name, direct in (("direct", "true"), ("through-fastapi", "false")):
            port = free_port()
            env = {
                **os.environ,
                "MODELPLANE_GATEWAY_PORT": str(port),
                "MODELPLANE_GATEWAY_HOST": "127.0.0.1",
                "MODELPLANE_GATEWAY_INFERENCE_ADDRESS": f"127.0.0.1:{inference_port}",
                "MODELPLANE_GATEWAY_DIRECT_ROUTES": direct,
                "MODELPLANE_GATEWAY_METRICS_PORT": str(free_port()),
                "MODELPLANE_LOG_FORMAT": "json",
            }
            command = [sys.executable, "-m", "modelplane.cli", "serve", "gateway"]
            gateways[name] = _start(name, command, env, port, "Application startup complete", workdir)
            servers.append(gateways[name])
        yield gateways
    finally:
        for server in reversed(servers):
            server.stop()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def measure(server: Server, bodies: list[bytes], clients: int, seconds: float) -> tuple[float, float, float]:
    """(requests/s, gateway CPU µs per request, p50 ms) over `seconds` of load."""
    warm = time.perf_counter()
    await asyncio.gather(*(_client(server.port, bodies[i::clients], 1, warm, warm + 1.0, []) for i in range(clients)))
    latencies: list[float] = []
    before, started = cpu_seconds(server.process.pid), time.perf_counter()
    counts = await asyncio.gather(
        *(_client(server.port, bodies[i::clients], 1, started, started + seconds, latencies) for i in range(clients))
    )
    elapsed, cpu = time.perf_counter() - started, cpu_seconds(server.process.pid) - before
    requests = sum(counts)
    latencies.sort()
    return requests / elapsed, cpu / requests * 1e6, 1000 * latencies[len(latencies) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16, help="concurrent single-text clients (default 16)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per gateway and round")
    parser.add_argument("--serve-inference", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_inference:
        serve_scripted_inference(args.serve_inference)
        return
    texts = corpus()
    bodies = [
        json.dumps({"model": MODEL, "input": [text], "encoding_format": "float"}).encode() for text in texts[:400]
    ]
    results: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-gateway-") as workdir, running(Path(workdir)) as gateways:
        for round_number in range(args.rounds):
            for name, server in gateways.items():
                result = asyncio.run(measure(server, bodies, args.clients, args.seconds))
                results.setdefault(name, []).append(result)
                print(
                    f"round {round_number + 1} {name:<16} {result[0]:7.0f} requests/s  "
                    f"gateway CPU {result[1]:5.0f} µs/request  p50 {result[2]:.2f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    print(
        f"\nThe gateway alone, {args.clients} single-text clients, scripted inference; medians of {args.rounds} rounds"
    )
    print(f"{'path':<16} {'requests/s':>11} {'CPU µs/request':>15} {'p50 ms':>7}")
    medians = {name: [statistics.median(r[i] for r in rounds) for i in range(3)] for name, rounds in results.items()}
    for name, (rate, cpu, p50) in medians.items():
        print(f"{name:<16} {rate:11.0f} {cpu:15.0f} {p50:7.2f}")
    ratios = [
        fastapi[1] / direct[1] for direct, fastapi in zip(results["direct"], results["through-fastapi"], strict=True)
    ]
    print(
        f"\nCPU per request through FastAPI / served directly: {statistics.median(ratios):.2f}x "
        f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
