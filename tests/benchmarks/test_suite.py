"""`make bench` works: the suite runs end to end in its tiny mode and writes the report, the raw
figures and the plots. It proves the harness, not the figures (those come from `make bench`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.suite import concurrency, failover, report, routing, voice
from benchmarks.suite.measure import percentile, ratio_per_round

REPO = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"
_META = {
    "date": "2026-12-03 08:00 UTC",
    "commit": "abc1234",
    "command": "python -m benchmarks.suite --only failover",
    "machine": "2 CPUs",
    "minutes": 3.0,
    "load_before": 1.0,
    "load_after": 2.0,
    "quick": False,
    "versions": {},
}


@pytest.mark.slow  # runs every benchmark workload once, the embedded Triton included
def test_quick_run_writes_the_report_the_figures_and_the_plots(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.suite", "--quick", "--no-stack", "--no-infinity",
        "--only", "fetch,load,embeddings,chat", "--out", str(tmp_path),
    ]  # fmt: skip
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-3000:]

    results = json.loads((tmp_path / "benchmarks" / "results.json").read_text())
    fetch = results["workloads"]["fetch"]
    assert fetch["status"] == "ran"
    rows = {(row["package"], row["source"]): row for row in fetch["rows"]}
    assert {source for package, source in rows if package == "MiniLM (bundled)"} == {"local", "http"}  # --quick
    minilm = rows["MiniLM (bundled)", "local"]
    assert minilm["bytes"] > 80 * 2**20
    assert minilm["fetch_verify_s"] > 0
    assert minilm["linked"]  # the bundled package and the scratch cache share a filesystem here
    assert math.isclose(minilm["ratio_to_hashlib"], minilm["fetch_verify_s"] / minilm["hashlib_s"])
    remote = rows["MiniLM (bundled)", "http"]
    assert remote["transfer_s"] > 0 and math.isclose(
        remote["ratio_to_bound"], remote["fetch_verify_s"] / max(remote["hashlib_s"], remote["transfer_s"])
    )
    assert 0 < remote["peak_rss_mib"] < 200

    embeddings = results["workloads"]["embeddings"]
    assert embeddings["status"] == "ran"
    assert embeddings["contenders"] == ["sentence-transformers in-process"]
    assert embeddings["points"]["sentence-transformers in-process"]["batch 1"][0]["requests"] > 0

    # Chat needs the stack or llama-cpp-python's environment; without them it is reported, not failed.
    chat = results["workloads"]["chat"]
    assert chat["status"] in {"ran", "skipped"}

    doc = (tmp_path / "BENCHMARKS.md").read_text()
    assert "| MiniLM (bundled) | local | 87 | 13 |" in doc
    assert "| sentence-transformers in-process |" in doc
    assert "**Not measured in this run:** needs the modelplane stack (--no-stack was given)" in doc  # load
    assert "Not run here (blocked: no GPU)" in doc
    for plot in ("load.png", "embeddings.png"):
        assert (tmp_path / "benchmarks" / plot).read_bytes().startswith(PNG)
    assert "![embeddings](benchmarks/embeddings.png)" in doc


def test_an_unknown_workload_is_refused_with_the_list_of_workloads(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "benchmarks.suite", "--only", "embedings", "--out", str(tmp_path)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2
    assert (
        "unknown workload(s) ['embedings']; choose from "
        "fetch, load, embeddings, chat, tools, voice, overhead, routing, failover, preload, concurrency, placement"
        in run.stderr
    )
    assert not (tmp_path / "BENCHMARKS.md").exists()


def test_percentiles_use_the_nearest_rank_and_ratios_pair_rounds() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile([3.0], 99) == 3.0
    assert math.isnan(percentile([], 50))
    assert ratio_per_round([2.0, 3.0, 4.0], [1.0, 0.0, 2.0]) == [2.0, 2.0]


def test_issue_10s_and_22s_targets_are_read_from_the_concurrency_scripts_figures() -> None:
    def point(texts_per_second: float, p99_ms: float = 10.0) -> dict:
        return {"texts_per_second": texts_per_second, "p50_ms": 1.0, "p99_ms": p99_ms, "requests": 100}

    figures = {  # what bench_embed_concurrency.py --json writes: "system|load" → one entry per round
        "batched|1 x 1 text": [point(180, p99_ms=11.0), point(180, p99_ms=12.0)],
        "batched|16 x 1 text": [point(400), point(360)],
        "batched|1 x 32 texts": [point(480), point(500)],
        "unbatched|1 x 1 text": [point(190, p99_ms=10.0), point(190, p99_ms=10.0)],
        "unbatched|16 x 1 text": [point(240), point(240)],
        "infinity-emb|16 x 1 text": [point(140), point(200)],
    }
    rows = concurrency.targets({"status": "ran", "output": "", "figures": figures})
    assert rows == [
        (
            "(issues 10, 22) 16 single-text clients / batch-32 requests, same stack >= 0.85x",
            "0.78× (0.83, 0.72)",
            "**missed**",
        ),
        ("(issues 10, 22) 16 single-text clients / infinity-emb, same load >= 2x", "2.33× (2.86, 1.80)", "met"),
        ("(issues 10, 22) p99 at 1 client / the unbatched stack's <= 1.2x", "1.15× (1.10, 1.20)", "met"),
    ]
    # With the CPU time per text (issue 22), its ratio is a target too.
    for key, cpu in (("batched|16 x 1 text", 4.0), ("batched|1 x 32 texts", 3.8)):
        for entry in figures[key]:
            entry["cpu_ms_per_text"] = cpu
    rows = concurrency.targets({"status": "ran", "output": "", "figures": figures})
    assert (
        "(issues 10, 22) CPU per text: 16 single-text clients / batch-32 requests <= 1.1x",
        "1.05× (1.05, 1.05)",
        "met",
    ) in rows


def test_issue_19s_voice_figures_and_targets() -> None:
    """Real-time factors per contender, and the speech-to-text target as the per-round ratio."""
    data = {
        "status": "ran",
        "audio_s": 30.0,
        "stt": {
            voice.GATEWAY: [{"wall_s": 10.0}, {"wall_s": 12.0}],
            voice.IN_PROCESS: [{"wall_s": 9.0}, {"wall_s": 10.0}],
        },
        "tts": {
            voice.GATEWAY: [{"first_byte_s": 0.4, "wall_s": 5.0, "audio_s": 30.0}],
            voice.IN_PROCESS: [{"first_byte_s": 0.3, "wall_s": 4.0, "audio_s": 30.0}],
        },
    }
    table = voice.render(data)
    assert "| modelplane gateway | 2.8 | 11.00 |" in table  # 30 s of speech in 10 and 12 s
    assert "| modelplane gateway | 400 | 6.0 | 30.0 |" in table
    (stt, stt_ratio, stt_verdict), (_, tts_ratio, _) = voice.targets(data)
    # Rounds: 9/10 and 10/12 of in-process speed, median 0.87: below the 0.9 target.
    assert "0.9× faster-whisper" in stt and (stt_ratio, stt_verdict) == ("0.87× (0.90, 0.83)", "**missed**")
    assert tts_ratio == "0.80×"


def test_issue_17s_routing_overhead_figures_and_target() -> None:
    data = {
        "summary": {
            "one node direct": {"p50_ms": 4.0, "p99_ms": 9.0},
            "routed (2 copies)": {"p50_ms": 4.1, "p99_ms": 9.5},
        },
        "paired_added_ms": 0.08,
        "decision_us": 6.5,
        "nodes_used": ["node-a", "node-b"],
    }
    table = routing.render(data)
    assert "| routed: two READY copies, power of two choices | 4.100 | 9.500 | **+0.100** | +0.500 | 1.025× |" in table
    assert "6.5 µs per call (nodes used: node-a, node-b)" in table
    assert routing.target(data) == (
        "routing adds < 0.3 ms per request at p50 (routed vs one node direct)",
        "+0.100 ms (decision alone 6.5 µs)",
        "met",
    )
    assert "ratio 1.025× at p50" in routing.summary_line(data)


def test_issue_17s_failover_figures_and_target() -> None:
    data = {
        "status": "ran",
        "model": "lone",
        "package": "MiniLM",
        "clients": 16,
        "lease_s": 10.0,
        "load_s": 21.5,
        "lost_s": 10.4,
        "ready_s": 29.0,
        "bound_s": 31.5,
        "requests": {"lone": 900, "shared": 4000},
        "outcomes": {
            "lone": {"OK": 820, "UNAVAILABLE TRITON_UNAVAILABLE": 80},
            "shared": {"OK": 4000},
        },
    }
    table = failover.render(data)
    assert "| the node is LOST (lease 10 s) | 10.4 |" in table
    assert "| lone (MiniLM) is READY on the other node | **29.0** |" in table
    assert "| the target: lease + its load measured in this run (21.5 s) | 31.5 |" in table
    assert "lone (one copy) 900 requests, 80 errors (OK 820, UNAVAILABLE TRITON_UNAVAILABLE 80)" in table
    assert "shared (a copy on each node) 4000 requests, 0 errors (OK 4000)" in table
    assert failover.target(data) == (
        "a lost node's models READY elsewhere within lease + load time",
        "29.0 s vs 31.5 s (lease 10 + load 21.5)",
        "met",
    )
    assert failover.target(data | {"ready_s": 40.0})[2] == "**missed**"
    assert "READY elsewhere at 29.0 s against lease + load 31.5 s" in failover.summary_line(data)
    # The report has its section, and its target among the targets.
    doc = report.markdown({"meta": _META, "workloads": {"failover": data}}, {})
    assert "## Failover across nodes (issue 17's workload)" in doc
    assert "| a lost node's models READY elsewhere within lease + load time | 29.0 s vs 31.5 s" in doc


def test_failover_steps_the_replacement_load_and_the_control_plane_overhead() -> None:
    data = {
        "status": "ran",
        "model": "lone",
        "package": "MiniLM",
        "clients": 16,
        "lease_s": 10.0,
        "load_s": 16.5,
        "lost_s": 9.9,
        "ready_s": 27.9,
        "ready_seen_s": 28.1,
        "bound_s": 26.5,
        "steps_s": {"lease_expired": 8.1, "lost": 8.15, "placed": 8.2, "load_started": 8.3, "ready": 27.9},
        "phases_s": [["FETCHING", 0.4], ["VERIFYING", 0.3], ["CONVERTING", 15.0], ["STAGED", 0.1], ["LOADING", 3.8]],
        "replacement_load_s": 19.6,
        "replacement_bound_s": 29.6,
        "control_plane_s": 0.2,
        "requests": {"lone": 900, "shared": 4000},
        "outcomes": {"lone": {"OK": 820, "UNAVAILABLE TRITON_UNAVAILABLE": 80}, "shared": {"OK": 4000}},
    }
    table = failover.render(data)
    assert "| the node's lease ran out (lease 10 s, renewed every third of it) | 8.1 |" in table
    assert "| the registry announced the node LOST | 8.2 |" in table
    assert "| that node's loader started the load | 8.3 |" in table
    assert (
        "| lone (MiniLM) is READY on the other node (load 19.6 s: FETCHING 0.4, VERIFYING 0.3, CONVERTING 15.0, "
        "STAGED 0.1, LOADING 3.8) | **27.9** |"
    ) in table
    assert "| the target: lease + the load of that copy | 29.6 |" in table
    assert "| the old target: lease + the first load in this run, before the traffic (16.5 s) | 26.5 |" in table
    overhead = "Control plane (neither the lease's wait nor the load: LOST recorded, placed, load started): **0.20 s**"
    assert overhead in table
    assert failover.target(data) == (
        "a lost node's models READY elsewhere within lease + load time",
        "27.9 s vs 29.6 s (lease 10 + the replacement's load 19.6; control plane 0.20 s; against the first load "
        "16.5: 26.5 s)",
        "met",
    )
    assert failover.target(data | {"ready_s": 30.0})[2] == "**missed**"
    summary = failover.summary_line(data)
    assert "lease ran out 8.10, LOST announced 8.15, placed 8.20, load started 8.30, READY 27.90 s" in summary
    assert "control plane 0.20 s" in summary
