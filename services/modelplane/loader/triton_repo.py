"""Triton's model repository: config.pbtxt generation and atomic writes of model entries.

An entry is built in a staging directory beside the repository (same filesystem, outside the
directory Triton scans) and renamed into place, so Triton never reads a half-written entry.
"""

from __future__ import annotations

import os
import shutil
import uuid
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TensorConfig:
    name: str
    data_type: str  # Triton's TYPE_* name
    dims: tuple[int, ...]
    allow_ragged_batch: bool = False
    optional: bool = False


@dataclass(frozen=True)
class WarmupSample:
    """A request Triton runs through the model before it reports it READY, so the first real
    request does not pay for lazy initialisation (onnxruntime's arena, TensorRT's contexts)."""

    name: str
    batch_size: int
    inputs: dict[str, tuple[str, tuple[int, ...]]]  # tensor name → (TYPE_*, dims), zero-filled


@dataclass
class TritonModelConfig:
    name: str
    inputs: list[TensorConfig]
    outputs: list[TensorConfig]
    backend: str = ""
    platform: str = ""
    max_batch_size: int = 0
    preferred_batch_sizes: list[int] = field(default_factory=list)
    max_queue_delay_microseconds: int | None = None
    dynamic_batching: bool = True
    instance_count: int = 1
    instance_kind: str = "KIND_CPU"
    decoupled: bool = False
    parameters: dict[str, str] = field(default_factory=dict)
    default_model_filename: str = ""
    warmup: list[WarmupSample] = field(default_factory=list)


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _tensor(tensor: TensorConfig) -> str:
    fields = [
        f"name: {_quote(tensor.name)}",
        f"data_type: {tensor.data_type}",
        f"dims: [ {', '.join(str(d) for d in tensor.dims)} ]",
    ]
    if tensor.allow_ragged_batch:
        fields.append("allow_ragged_batch: true")
    if tensor.optional:
        fields.append("optional: true")
    return "  {\n    " + "\n    ".join(fields) + "\n  }"


def render_config(config: TritonModelConfig) -> str:
    """config.pbtxt text, in the protobuf text format of Triton's model_config.proto."""
    lines = [f"name: {_quote(config.name)}"]
    if config.backend:
        lines.append(f"backend: {_quote(config.backend)}")
    if config.platform:
        lines.append(f"platform: {_quote(config.platform)}")
    if config.default_model_filename:
        lines.append(f"default_model_filename: {_quote(config.default_model_filename)}")
    lines.append(f"max_batch_size: {config.max_batch_size}")
    if config.inputs:
        lines.append("input [\n" + ",\n".join(_tensor(t) for t in config.inputs) + "\n]")
    if config.outputs:
        lines.append("output [\n" + ",\n".join(_tensor(t) for t in config.outputs) + "\n]")
    if config.dynamic_batching and config.max_batch_size > 0:
        batching = []
        if config.preferred_batch_sizes:
            batching.append(f"preferred_batch_size: [ {', '.join(map(str, config.preferred_batch_sizes))} ]")
        if config.max_queue_delay_microseconds is not None:
            batching.append(f"max_queue_delay_microseconds: {config.max_queue_delay_microseconds}")
        lines.append("dynamic_batching {" + ("\n  " + "\n  ".join(batching) + "\n" if batching else " ") + "}")
    lines.append(
        f"instance_group [\n  {{\n    count: {config.instance_count}\n    kind: {config.instance_kind}\n  }}\n]"
    )
    if config.decoupled:
        lines.append("model_transaction_policy {\n  decoupled: true\n}")
    for key, value in sorted(config.parameters.items()):
        lines.append(f"parameters {{\n  key: {_quote(key)}\n  value: {{ string_value: {_quote(value)} }}\n}}")
    for sample in config.warmup:
        inputs = "".join(
            f"\n    inputs {{\n      key: {_quote(name)}\n      value {{ data_type: {kind} "
            f"dims: [ {', '.join(map(str, dims))} ] zero_data: true }}\n    }}"
            for name, (kind, dims) in sample.inputs.items()
        )
        header = f"name: {_quote(sample.name)}\n    batch_size: {sample.batch_size}"
        lines.append(f"model_warmup [\n  {{\n    {header}{inputs}\n  }}\n]")
    text = "\n".join(lines) + "\n"
    parse_config(text)
    return text


def parse_config(text: str) -> Any:
    """config.pbtxt text as Triton reads it: parsed into model_config.proto's ModelConfig (from
    tritonclient), which refuses unknown fields and wrong types as Triton does."""
    from google.protobuf import text_format  # noqa: PLC0415
    from tritonclient.grpc import model_config_pb2  # noqa: PLC0415

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def python_model_source(model_kind: str) -> Path:
    """The model.py of one of the python-backend models shipped in modelplane.loader.triton_models."""
    return Path(str(resources.files("modelplane.loader.triton_models") / model_kind / "model.py"))


@dataclass(frozen=True)
class BuiltEntry:
    """A model's repository entry built beside the repository, not yet in place."""

    name: str
    path: Path


class ModelRepository:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.staging = root.parent / f".{root.name}-staging"
        self.trash = root.parent / f".{root.name}-trash"
        for directory in (self.root, self.staging, self.trash):
            directory.mkdir(parents=True, exist_ok=True)

    def entry_path(self, name: str) -> Path:
        return self.root / name

    def write(self, config: TritonModelConfig, version: int, files: dict[str, Path]) -> Path:
        """Writes `<name>/config.pbtxt` and `<name>/<version>/<file>` for each file, then swaps the
        entry in. Large files are hard-linked from the cache when both share a filesystem."""
        built = self.build(config, version, files)
        try:
            self.discard(self.swap_in(built))
        finally:
            self.discard(built.path)
        return self.entry_path(config.name)

    def build(self, config: TritonModelConfig, version: int, files: dict[str, Path]) -> BuiltEntry:
        """Builds an entry beside the repository, where Triton does not look: swap it in later."""
        build = self.staging / f"{config.name}-{uuid.uuid4().hex[:8]}"
        version_dir = build / str(version)
        version_dir.mkdir(parents=True)
        try:
            (build / "config.pbtxt").write_text(render_config(config))
            for name, source in files.items():
                _link_or_copy(source, version_dir / name)
        except BaseException:
            shutil.rmtree(build, ignore_errors=True)
            raise
        return BuiltEntry(config.name, build)

    def swap_in(self, built: BuiltEntry) -> Path | None:
        """Puts a built entry in place; returns the entry it replaced, set aside (None if none)."""
        final = self.entry_path(built.name)
        retired = None
        if final.exists():
            retired = self.trash / f"{built.name}-{uuid.uuid4().hex[:8]}"
            final.rename(retired)
        built.path.rename(final)
        return retired

    def restore(self, name: str, retired: Path | None) -> None:
        """Puts back the entry a swap set aside (none: removes the entry)."""
        self.remove(name)
        if retired is not None:
            retired.rename(self.entry_path(name))

    def discard(self, path: Path | None) -> None:
        """Deletes a built entry that was not swapped in, or one a swap set aside."""
        if path is not None and path.exists():
            shutil.rmtree(path, ignore_errors=True)

    def remove(self, name: str) -> None:
        final = self.entry_path(name)
        if final.exists():
            retired = self.trash / f"{name}-{uuid.uuid4().hex[:8]}"
            final.rename(retired)
            shutil.rmtree(retired, ignore_errors=True)


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copyfile(source, destination)
