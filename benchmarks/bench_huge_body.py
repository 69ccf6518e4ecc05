"""What one huge request body costs the running stack: a 10 MB text to embed (cut to the model's
limit) and a 10 MB chat message (refused: it cannot fit the context), against a normal request of
each in the same run, and how long a small request sent meanwhile waits (the harm to others).

Run it against a stack started with `make run` (or `modelplane up`); it prints a table:

    .venv/bin/python -m benchmarks.bench_huge_body --url http://127.0.0.1:8080 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time

import httpx

WORDS = [
    "the",
    "model",
    "serves",
    "private",
    "deployments",
    "quickly",
    "while",
    "tokenisation",
    "embeds",
    "every",
    "sentence",
]


def prose(size_bytes: int) -> str:
    """English-like text of about `size_bytes` bytes."""
    words: list[str] = []
    size = 0
    index = 0
    while size < size_bytes:
        word = WORDS[index * 7 % len(WORDS)]
        words.append(word)
        size += len(word) + 1
        index += 1
    return " ".join(words)


async def timed(client: httpx.AsyncClient, path: str, body: dict) -> tuple[float, int]:
    started = time.perf_counter()
    response = await client.post(path, json=body)
    return time.perf_counter() - started, response.status_code


async def with_bystander(client: httpx.AsyncClient, path: str, body: dict, small: dict) -> tuple[float, int, float]:
    """The big request, and a small embedding sent 0.2 s after it: (big s, big status, small s)."""
    big = asyncio.create_task(timed(client, path, body))
    await asyncio.sleep(0.2)
    small_seconds, _ = await timed(client, "/v1/embeddings", small)
    big_seconds, status = await big
    return big_seconds, status, small_seconds


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080")
    parser.add_argument("--embedder", default="all-minilm-l6-v2")
    parser.add_argument("--chat-model", default="gemma-3-270m")
    parser.add_argument("--megabytes", type=float, default=10.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    huge = prose(int(args.megabytes * 1024 * 1024))
    normal = prose(2_000)
    small = {"model": args.embedder, "input": "hello"}
    cases = {
        "embeddings, normal text": ("/v1/embeddings", {"model": args.embedder, "input": normal}),
        f"embeddings, {args.megabytes:g} MB text": ("/v1/embeddings", {"model": args.embedder, "input": huge}),
        "chat, normal message": (
            "/v1/chat/completions",
            {"model": args.chat_model, "max_tokens": 1, "messages": [{"role": "user", "content": normal}]},
        ),
        f"chat, {args.megabytes:g} MB message": (
            "/v1/chat/completions",
            {"model": args.chat_model, "max_tokens": 1, "messages": [{"role": "user", "content": huge}]},
        ),
    }
    async with httpx.AsyncClient(base_url=args.url, timeout=600) as client:
        await timed(client, "/v1/embeddings", small)  # both models warm
        print(f"{'request':<28} {'status':>6} {'median s':>9} {'max s':>7} {'small request meanwhile, median s':>34}")
        for label, (path, body) in cases.items():
            rounds = [await with_bystander(client, path, body, small) for _ in range(args.rounds)]
            statuses = sorted({status for _, status, _ in rounds})
            seconds = [big for big, _, _ in rounds]
            bystander = statistics.median(small_seconds for _, _, small_seconds in rounds)
            print(
                f"{label:<28} {','.join(map(str, statuses)):>6} {statistics.median(seconds):9.2f} "
                f"{max(seconds):7.2f} {bystander:34.2f}"
            )


if __name__ == "__main__":
    asyncio.run(main())
