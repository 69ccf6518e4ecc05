"""llama-cpp-python in-process: the chat contender without any server. Runs in the environment
that has llama-cpp-python (not modelplane's), so it imports nothing from the project.

    python llama_inprocess.py '{"model_path": ..., "prompts": [...], "max_tokens": 64,
                                "streams": [1, 4], "requests": 3}'

Prints one JSON object: per stream count, every request's time to first token, tokens and
decode time, and the wall time of the load. Concurrent streams share one `Llama`, served in turn
in arrival order by one engine thread (a llama.cpp context serves one sequence at a time), as
llama-cpp-python's own server and modelplane's one engine slot serve them.
"""

import json
import os
import queue
import sys
import threading
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as modelplane's llama.cpp model runs

from llama_cpp import Llama


def main() -> None:
    args = json.loads(sys.argv[1])
    llm = Llama(model_path=args["model_path"], n_ctx=4096, chat_format="gemma", verbose=False)  # default threads
    jobs: queue.Queue = queue.Queue()

    def engine() -> None:
        while True:
            prompt, max_tokens, out = jobs.get()
            for chunk in llm.create_chat_completion(
                messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0.0, stream=True
            ):
                if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    out.put(time.perf_counter())
            out.put(None)

    threading.Thread(target=engine, daemon=True).start()

    def one(prompt: str, max_tokens: int | None = None) -> dict:
        sent = time.perf_counter()
        out: queue.Queue = queue.Queue()
        jobs.put((prompt, max_tokens or args["max_tokens"], out))
        stamps = list(iter(out.get, None))
        first, last = (stamps[0], stamps[-1]) if stamps else (sent, sent)
        return {"ttft_s": first - sent, "tokens": len(stamps), "decode_s": last - first}

    one("Hello", 4)  # first-call costs paid before anything is timed
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
