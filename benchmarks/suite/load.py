"""Workload 1: model load. Fetch + verify against the SHA-256 floor; cold and warm loads through
the running stack's loader, per phase; what a user does without modelplane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_fetch import TARGET, bench_package
from benchmarks.suite.context import GEMMA, MINILM, Context, bundled_gguf, gemma_gguf, llama_python
from benchmarks.suite.measure import fmt, median

GENERATED = "generated-1gib"
PHASES = ("FETCHING", "VERIFYING", "CONVERTING", "LOADING")


async def run_fetch(ctx: Context) -> dict:
    """Fetch + verify of each package, from a local disk (linked, and copied), HTTP and S3, against
    reading the same bytes through SHA-256 and against what each way is bounded by."""
    packages: list[tuple[str, Path]] = [("MiniLM (bundled)", ctx.minilm)]
    notes = []
    gguf, why = gemma_gguf(ctx)
    if ctx.sizes.fetch_only_minilm:
        notes.append("Only MiniLM is measured in this run (--quick).")
    elif gguf is not None:
        packages.append(("Gemma 3 270M GGUF", gguf))
    else:
        notes.append(f"Gemma's GGUF is not measured: {why}.")
    if not ctx.sizes.fetch_only_minilm:
        generated = ctx.generated_package()
        packages.append((f"generated BERT ({_mib(generated):.0f} MiB)", generated))
    rows = []
    for label, path in packages:
        remote = _mib(path) * 2**20 <= ctx.sizes.fetch_remote_up_to_bytes
        ways = tuple(w for w in ctx.sizes.fetch_ways if remote or w not in ("http", "s3"))
        if not remote:
            notes.append(f"{label} is fetched from the local disk only (HTTP and S3 rows: the smaller packages).")
        ctx.say(f"fetch + verify: {label} ({', '.join(ways)})")
        for row in await bench_package(label, path, ctx.sizes.fetch_repeats, ctx.work / "fetch", ways):
            runs = row["runs"]
            fetch = median(runs["fetch_verify_s"])
            floors = {k: median(runs[k]) for k in ("sha256sum_s", "hashlib_s", "copy_fsync_s")}
            transfer = median(runs["transfer_s"]) if runs["transfer_s"] else None
            bound = _bound(row["source"], floors, transfer)
            rows.append(
                {
                    **{k: row[k] for k in ("package", "source", "bytes", "files", "linked", "peak_rss_mib")},
                    **floors,
                    "transfer_s": transfer,
                    "bound_s": bound,
                    "fetch_verify_s": fetch,
                    "ratio_to_floor": fetch / min(floors["sha256sum_s"], floors["hashlib_s"]),
                    "ratio_to_hashlib": fetch / floors["hashlib_s"],
                    "ratio_to_bound": fetch / bound,
                    "runs": runs,
                }
            )
    return {"status": "ran", "rows": rows, "notes": notes, "repeats": ctx.sizes.fetch_repeats}


def _bound(way: str, floors: dict[str, float], transfer: float | None) -> float:
    """What the way cannot beat: hashing the bytes, and for a copy writing them to the disk, for a
    remote source receiving them."""
    if way == "local":
        return floors["hashlib_s"]
    if way == "copied":
        return max(floors["hashlib_s"], floors["copy_fsync_s"])
    return max(floors["hashlib_s"], transfer or 0.0)


def _mib(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


async def _timed_load(loader, name: str) -> dict:
    started = time.perf_counter()
    final = None
    async for update in loader.load(name, reason="benchmark", timeout_seconds=1800):
        final = update
    seconds = time.perf_counter() - started
    if final is None or final.model is None or final.model.status.state.name != "READY":
        state = final.model.status if final is not None and final.model is not None else None
        raise RuntimeError(f"{name} did not load: {state}")
    phases = {d.phase.name: d.duration.total_seconds() for d in final.phase_durations}
    return {"total_s": seconds, "phases": phases}


async def run_load(ctx: Context) -> dict:
    """Cold (empty cache) and warm (cached, converted) loads through the stack's loader; then the
    same models loaded the way a user loads them without modelplane, in a fresh process each."""
    from modelplane.bundled import bundled_models  # noqa: PLC0415
    from modelplane.common.types import ModelSpec, Task  # noqa: PLC0415
    from modelplane.loader.client import LoaderClient  # noqa: PLC0415
    from modelplane.registry.client import RegistryClient  # noqa: PLC0415

    assert ctx.stack is not None
    specs = {spec.name: spec for spec in bundled_models()}
    notes = []
    models = [specs[MINILM]]
    if GEMMA in specs:
        models.append(specs[GEMMA])
    else:
        notes.append(
            "Gemma through modelplane is not measured: this build of modelplane does not bundle a GGUF model "
            "(chat serving, issue 5, has not landed on this branch)."
        )
    models.append(ModelSpec(name=GENERATED, task=Task.EMBEDDING, source_uri=str(ctx.generated_package())))
    rows = []
    async with RegistryClient(ctx.stack.registry) as registry, LoaderClient(ctx.stack.loader) as loader:
        for spec in models:
            await registry.register(spec)
            ctx.say(f"cold load: {spec.name}")
            cold = await _timed_load(loader, spec.name)
            warm = []
            for _ in range(ctx.sizes.warm_loads):
                await loader.unload(spec.name, reason="benchmark")
                warm.append(await _timed_load(loader, spec.name))
            ctx.say(f"  cold {cold['total_s']:.1f} s, warm {median([w['total_s'] for w in warm]):.1f} s")
            if spec.name == GENERATED:
                await loader.unload(spec.name, reason="benchmark")  # its memory is not needed again
            rows.append({"model": spec.name, "cold": cold, "warm": warm})
    baselines = _baselines(ctx)
    return {"status": "ran", "rows": rows, "baselines": baselines, "notes": notes}


_ST_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from sentence_transformers import SentenceTransformer
t1 = time.perf_counter()
model = SentenceTransformer(sys.argv[1], device="cpu")
t2 = time.perf_counter()
model.encode(["warm-up"])
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2}))
"""

_LLAMA_SNIPPET = """
import json, sys, time
t0 = time.perf_counter()
from llama_cpp import Llama
t1 = time.perf_counter()
llm = Llama(model_path=sys.argv[1], n_ctx=4096, verbose=False)
t2 = time.perf_counter()
llm.create_completion("Once upon a time", max_tokens=1, temperature=0.0)
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "first_call_s": t3 - t2}))
"""


def _fresh_process(python: Path | str, snippet: str, path: Path, repeats: int) -> list[dict]:
    runs = []
    for _ in range(repeats):
        out = subprocess.run(
            [str(python), "-c", snippet, str(path)],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"},
        )
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return runs


def _baselines(ctx: Context) -> list[dict]:
    """`SentenceTransformer(path)` and `Llama(model_path)` in a fresh process (warm page cache)."""
    rows = []
    for label, path in (("MiniLM", ctx.minilm), (GENERATED, ctx.generated_package())):
        ctx.say(f"without modelplane: SentenceTransformer({label})")
        runs = _fresh_process(sys.executable, _ST_SNIPPET, path, ctx.sizes.baseline_loads)
        rows.append({"model": label, "how": "SentenceTransformer(path)", "runs": runs})
    python, why = llama_python(ctx)
    gguf = bundled_gguf() or (gemma_gguf(ctx)[0] if python else None)
    if python is not None and gguf is not None:
        ctx.say("without modelplane: Llama(model_path)")
        runs = _fresh_process(python, _LLAMA_SNIPPET, gguf, ctx.sizes.baseline_loads)
        rows.append({"model": GEMMA, "how": "Llama(model_path)", "runs": runs})
    else:
        rows.append({"model": GEMMA, "how": "Llama(model_path)", "runs": [], "skipped": why})
    return rows


# --- report -----------------------------------------------------------------------------------


def render_fetch(data: dict) -> str:
    lines = [
        "| package | source | size MiB | files | hashlib s | `cat \\| sha256sum` s | bound s | fetch + verify s "
        f"| / hashlib (target ≤ {TARGET:.1f}× for local) | / bound | peak memory MiB |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        source = r["source"] + ("" if r["linked"] or r["source"] != "local" else " (not linked: copied)")
        lines.append(
            f"| {r['package']} | {source} | {r['bytes'] / 2**20:.0f} | {r['files']} | {r['hashlib_s']:.3f} | "
            f"{r['sha256sum_s']:.3f} | {r['bound_s']:.3f} ({_bound_name(r['source'])}) | {r['fetch_verify_s']:.3f} | "
            f"**{r['ratio_to_hashlib']:.2f}×** | {r['ratio_to_bound']:.2f}× | +{r['peak_rss_mib']:.0f} |"
        )
    return "\n".join(lines)


def _bound_name(way: str) -> str:
    return {"local": "hashlib", "copied": "hashlib or copy + fsync"}.get(way, "hashlib or the transfer alone")


def render_load(data: dict) -> str:
    lines = [
        "| model | cold s | fetch | verify | convert | Triton load | warm s (median) | cold / warm |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in data["rows"]:
        phases = r["cold"]["phases"]
        warm = median([w["total_s"] for w in r["warm"]])
        lines.append(
            f"| {r['model']} | {r['cold']['total_s']:.1f} | "
            + " | ".join(fmt(phases.get(p, float("nan")), 2) for p in PHASES)
            + f" | {warm:.2f} | {r['cold']['total_s'] / warm:.1f}× |"
        )
    lines += [
        "",
        "| without modelplane | model | import s | load s | first call s | fresh process total s "
        "| modelplane warm load s | modelplane warm / (load + first call) | / fresh process total |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    warm_by_model = {r["model"]: median([w["total_s"] for w in r["warm"]]) for r in data["rows"]}
    warm_by_model["MiniLM"] = warm_by_model.get(MINILM, float("nan"))
    for b in data["baselines"]:
        if not b["runs"]:
            lines.append(f"| `{b['how']}` | {b['model']} | not run: {b.get('skipped', '')} | | | | | | |")
            continue
        load = median([r["load_s"] for r in b["runs"]])
        first = median([r["first_call_s"] for r in b["runs"]])
        warm = warm_by_model.get(b["model"], float("nan"))
        imported = median([r["import_s"] for r in b["runs"]])
        total = imported + load + first
        lines.append(
            f"| `{b['how']}` | {b['model']} | {imported:.2f} | {load:.2f} | {first:.2f} | {total:.2f} | "
            f"{fmt(warm, 2)} | {_times(warm / (load + first))} | {_times(warm / total)} |"
        )
    return "\n".join(lines)


def _times(ratio: float) -> str:
    return "n/a" if ratio != ratio else f"{ratio:.1f}×"


def plot_load(data: dict, fetch: dict | None, path: Path) -> None:
    import matplotlib.pyplot as plt  # noqa: PLC0415

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    names = [r["model"] for r in data["rows"]]
    bottom = [0.0] * len(names)
    for phase in PHASES:
        values = [r["cold"]["phases"].get(phase, 0.0) for r in data["rows"]]
        axes[0].barh(names, values, left=bottom, label=f"cold: {phase.lower()}")
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    warm = [median([w["total_s"] for w in r["warm"]]) for r in data["rows"]]
    axes[0].barh([f"{n} (warm)" for n in names], warm, color="grey", label="warm load")
    axes[0].set_xlabel("seconds")
    axes[0].set_title("load through modelplane, per phase")
    axes[0].legend(fontsize=7)
    if fetch:
        labels = [f"{r['package']}\n{r['source']}" for r in fetch["rows"]]
        x = range(len(labels))
        axes[1].bar([i - 0.2 for i in x], [r["ratio_to_hashlib"] for r in fetch["rows"]], 0.4, label="/ hashlib")
        axes[1].bar([i + 0.2 for i in x], [r["ratio_to_bound"] for r in fetch["rows"]], 0.4, label="/ its bound")
        axes[1].axhline(TARGET, color="red", linestyle="--", linewidth=1, label=f"target {TARGET:.1f}× (local)")
        axes[1].set_xticks(list(x), labels, fontsize=6, rotation=60)
        axes[1].set_ylabel("fetch + verify, × the floor")
        axes[1].set_title("fetch + verify against hashing the same bytes")
        axes[1].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
