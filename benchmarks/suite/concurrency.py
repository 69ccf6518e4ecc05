"""Workload: embeddings under concurrency, issue 10's benchmark (benchmarks/bench_embed_concurrency.py).

1, 4, 16 and 64 concurrent single-text clients and one client sending batches of 32, through the
gateway of modelplane as it is configured by default, of a stack that batches nothing, and of
infinity-emb, in one run. The script starts its own stacks, so it runs after the suite's stack
is stopped, and its figures and targets come back through its --json file.
"""

from __future__ import annotations

import json
import subprocess
import sys

from benchmarks import bench_embed_concurrency as bench
from benchmarks.suite.context import REPO, Context
from benchmarks.suite.measure import fmt_ratio


def run(ctx: Context, *, infinity: bool) -> dict:
    path = ctx.work / "concurrency.json"
    command = [sys.executable, str(REPO / "benchmarks" / "bench_embed_concurrency.py"), *ctx.sizes.concurrency_args]
    if not infinity:
        command.append("--no-infinity")
    out = subprocess.run([*command, "--json", str(path)], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        reason = f"bench_embed_concurrency.py exited {out.returncode}: {out.stderr[-2000:]}"
        return {"status": "failed", "reason": reason}
    return {"status": "ran", "output": out.stdout.strip(), "figures": json.loads(path.read_text())}


def render(data: dict) -> str:
    return f"```\n{data['output']}\n```\n"


def targets(data: dict) -> list[tuple[str, str, str]]:
    """(target, measured, verdict) for issue 10's targets, as issue 22 raised them."""
    results = bench.Results.from_json(data["figures"])
    rows = []
    for target in bench.targets(results, results.systems()):
        met = target.met()
        if met is None:
            continue
        verdict = "met" if met else "**missed**"
        rows.append((f"(issues 10, 22) {target.label} {target.goal_text()}", fmt_ratio(target.per_round), verdict))
    return rows
