"""What the tests of the embedded Triton share: settings on free ports, and a python-backend model
written into a repository."""

from __future__ import annotations

from pathlib import Path

from modelplane.common.settings import TritonSettings
from tests.conftest import free_port

_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: 0
input [{{ name: "x" data_type: TYPE_FP32 dims: [ -1 ] }}]
output [{{ name: "y" data_type: TYPE_FP32 dims: [ -1 ] }}]
instance_group [{{ kind: KIND_CPU count: 1 }}]
"""


def triton_settings(repository: Path, **overrides: object) -> TritonSettings:
    """Settings of a Triton serving `repository` on free loopback ports."""
    ports: dict[str, object] = {
        "grpc_address": f"127.0.0.1:{free_port()}",
        "http_port": free_port(),
        "metrics_port": free_port(),
    }
    return TritonSettings(model_repository=repository, **{**ports, **overrides})


def write_python_model(repository: Path, name: str, source: str) -> None:
    """A python-backend model `name` (an FP32 vector `x` in, `y` out) running `source`."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(_CONFIG.format(name=name))
    (repository / name / "1" / "model.py").write_text(source)
