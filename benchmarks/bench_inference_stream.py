"""The gateway's calls to the inference service: one stream per model against a unary call each.

    .venv/bin/python benchmarks/bench_inference_stream.py [--calls 2000] [--texts 8]

Starts the inference service's real servicer on a real grpc.aio server (uvloop, the server
interceptor) in a process of its own, behind a scripted handler that answers at once with 384-
dimension vectors, so that only the call's own cost is measured: no tokenizer, no Triton, no
model. The gateway's `Backends` then sends Embed calls of `--texts` texts (a coalesced batch at 16
clients carries about 8), one or two at a time, over the stream and as unary calls, taking turns,
and prints the wall time per call and each process's CPU time per call, read from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import time

import numpy as np
import psutil


def serve() -> None:
    import grpc  # noqa: PLC0415
    import uvloop  # noqa: PLC0415

    from modelplane.common.interceptors import ServiceInterceptor  # noqa: PLC0415
    from modelplane.common.types import Usage  # noqa: PLC0415
    from modelplane.inference.handlers import Embedding, EmbedResult  # noqa: PLC0415
    from modelplane.inference.servicer import InferenceServicer  # noqa: PLC0415
    from modelplane.inference.v1 import inference_service_pb2_grpc as pb_grpc  # noqa: PLC0415

    vector = np.random.default_rng(0).standard_normal(384).astype(np.float32)

    class Answers:
        async def embed(self, model: str, inputs: list, **_: object) -> EmbedResult:
            embeddings = [Embedding(i, vector, 5, False) for i in range(len(inputs))]
            return EmbedResult(model, embeddings, Usage(prompt_tokens=5 * len(inputs)))

    async def main() -> None:
        server = grpc.aio.server(interceptors=[ServiceInterceptor()])
        pb_grpc.add_InferenceServiceServicer_to_server(InferenceServicer(Answers()), server)  # type: ignore[arg-type]
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        print(port, file=sys.stderr, flush=True)
        await server.wait_for_termination()

    uvloop.run(main())


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return times.user + times.system


async def measure(port: int, server: psutil.Process, *, streams: bool, calls: int, texts: int, concurrency: int) -> str:
    from modelplane.gateway.backends import Backends  # noqa: PLC0415
    from modelplane.inference.v1 import inference_service_pb2 as pb  # noqa: PLC0415

    request = pb.EmbedRequest(
        model="m", inputs=[pb.EmbedInput(text="hello world")] * texts, vector_encoding=pb.VECTOR_ENCODING_PACKED_FLOAT32
    )
    backends = Backends(f"127.0.0.1:{port}", f"127.0.0.1:{port}", 30.0, inference_streams=streams)
    me = psutil.Process()
    try:
        for _ in range(50):
            await backends.unary("inference", None, request)
        client_before, server_before, started = _cpu(me), _cpu(server), time.perf_counter()

        async def caller() -> None:
            for _ in range(calls // concurrency):
                await backends.unary("inference", None, request)

        await asyncio.gather(*(caller() for _ in range(concurrency)))
        wall = time.perf_counter() - started
        client, service = _cpu(me) - client_before, _cpu(server) - server_before
    finally:
        await backends.close()
    return (
        f"{'stream' if streams else 'unary':<7} {concurrency} at a time: {1e6 * wall / calls:6.0f} µs/call wall, "
        f"gateway CPU {1e6 * client / calls:5.0f} µs/call, inference CPU {1e6 * service / calls:5.0f} µs/call"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--texts", type=int, default=8, help="texts per call")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve()
        return
    import uvloop  # noqa: PLC0415

    # The service logs a line per call: to /dev/null, so that a full pipe never stalls it.
    process = subprocess.Popen(
        [sys.executable, __file__, "--serve"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        assert process.stderr is not None
        port = int(process.stderr.readline())
        server = psutil.Process(process.pid)

        async def run() -> None:
            for concurrency in (1, 2):
                for _ in range(args.rounds):
                    for streams in (True, False):
                        line = await measure(
                            port, server, streams=streams, calls=args.calls, texts=args.texts, concurrency=concurrency
                        )
                        print(line, flush=True)

        uvloop.run(run())
    finally:
        process.kill()
        process.wait()


if __name__ == "__main__":
    main()
