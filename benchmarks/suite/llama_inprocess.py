"""llama-cpp-python in-process: the chat contender without any server. Runs in the environment
that has llama-cpp-python (not modelplane's), so it imports nothing from the project.

    python llama_inprocess.py '{"model_path": ..., "prompts": [...], "max_tokens": 64,
                                "streams": [1, 4], "requests": 3, "n_threads": 2}'

Prints one JSON object: per stream count, every request's time to first token, tokens and
decode time, and the wall time of the load. Concurrent streams share one `Llama` behind a lock,
served in turn (a llama.cpp context serves one sequence at a time), as llama-cpp-python's own
server does.
"""

import json
import os
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as modelplane's llama.cpp model runs

from llama_cpp import Llama


def main() -> None:
    args = json.loads(sys.argv[1])
    llm = Llama(
        model_path=args["model_path"], n_ctx=4096, n_threads=args["n_threads"], chat_format="gemma", verbose=False
    )
    lock = threading.Lock()

    def one(prompt: str) -> dict:
        sent = time.perf_counter()
        first = last = None
        tokens = 0
        with lock:
            for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}],
                max_tokens=args["max_tokens"],
                temperature=0.0,
                stream=True,
            ):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    last = time.perf_counter()
                    first = first or last
                    tokens += 1
        return {"ttft_s": (first or sent) - sent, "tokens": tokens, "decode_s": (last or sent) - (first or sent)}

    one("Hello")  # first-call costs paid before anything is timed
    results = {}
    for streams in args["streams"]:
        records: list[dict] = []

        def client(offset: int, streams: int = streams, records: list[dict] = records) -> None:
            for i in range(args["requests"]):
                records.append(one(args["prompts"][(offset + i * streams) % len(args["prompts"])]))

        started = time.perf_counter()
        threads = [threading.Thread(target=client, args=(n,)) for n in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        results[str(streams)] = {"wall_s": time.perf_counter() - started, "requests": records}
    print(json.dumps(results))


if __name__ == "__main__":
    main()
