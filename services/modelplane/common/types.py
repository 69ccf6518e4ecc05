"""Domain types shared by every service.

Past the gRPC edge every service works with these, never with protobuf messages. Enums mirror the
protobuf enums of `modelplane.common.v1` number for number, and field names mirror message field
names, so `modelplane.common.converters` converts generically in both directions; the registry
stores the same models as JSON.
"""

from __future__ import annotations

import enum
import re
from datetime import UTC, datetime, timedelta
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer

MODEL_NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


class Task(enum.IntEnum):
    UNSPECIFIED = 0
    EMBEDDING = 1
    RERANK = 2
    GENERATION = 3
    SPEECH2TEXT = 4
    TTS = 5


class ModelFormat(enum.IntEnum):
    UNSPECIFIED = 0
    HUGGINGFACE = 1
    PYTORCH = 2
    ONNX = 3
    TENSORRT_PLAN = 4
    GGUF = 5
    CTRANSLATE2 = 6


class ModelState(enum.IntEnum):
    UNSPECIFIED = 0
    REGISTERED = 1
    FETCHING = 2
    VERIFYING = 3
    CONVERTING = 4
    STAGED = 5
    LOADING = 6
    READY = 7
    UNLOADING = 8
    FAILED = 9


# States in which the loader is doing something to the model.
WORKING_STATES = frozenset(
    {ModelState.FETCHING, ModelState.VERIFYING, ModelState.CONVERTING, ModelState.LOADING, ModelState.UNLOADING}
)
# States in which the model holds memory in Triton.
RESIDENT_STATES = frozenset({ModelState.LOADING, ModelState.READY, ModelState.UNLOADING})


class DesiredState(enum.IntEnum):
    UNSPECIFIED = 0
    LOADED = 1
    UNLOADED = 2
    HELD_UNLOADED = 3  # an operator unloaded it: no preload brings it back


class Priority(enum.IntEnum):
    UNSPECIFIED = 0
    PINNED = 1
    HIGH = 2
    NORMAL = 3
    LOW = 4


class RerankScoring(enum.IntEnum):
    UNSPECIFIED = 0
    CROSS_ENCODER = 1
    EMBEDDING_COSINE = 2


class RuntimeTarget(enum.IntEnum):
    UNSPECIFIED = 0
    EMBEDDED = 1
    ONNXRUNTIME = 2
    TENSORRT = 3


class Precision(enum.IntEnum):
    UNSPECIFIED = 0
    FP32 = 1
    FP16 = 2
    INT8 = 3


def is_valid_model_name(name: str) -> bool:
    """Model names double as directory names in Triton's repository, so they are kept tame."""
    return bool(MODEL_NAME_PATTERN.match(name)) and ".." not in name


def _parse_proto_duration(value: object) -> object:
    if isinstance(value, str) and value.endswith("s"):
        return timedelta(seconds=float(value[:-1]))
    return value


# A google.protobuf.Duration: a timedelta in Python, "1.5s" in protobuf's JSON mapping.
ProtoDuration = Annotated[
    timedelta,
    BeforeValidator(_parse_proto_duration),
    PlainSerializer(lambda d: f"{d.total_seconds():.9f}s", return_type=str, when_used="json"),
]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Record(BaseModel):
    """Base of the domain models: JSON bytes as base64, like protobuf's JSON mapping."""

    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64", extra="ignore")


class FileDigest(Record):
    path: str
    size_bytes: int = 0
    sha256: str = ""


class PackageManifest(Record):
    files: list[FileDigest] = Field(default_factory=list)
    sha256: str = ""


class RuntimeHints(Record):
    target: RuntimeTarget = RuntimeTarget.UNSPECIFIED
    precision: Precision = Precision.UNSPECIFIED
    max_batch_size: int = 0
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_delay_microseconds: int | None = None
    instance_count: int = 0
    max_sequence_length: int = 0
    context_length: int = 0
    chat_template: str = ""
    rerank_scoring: RerankScoring = RerankScoring.UNSPECIFIED
    parity_tolerance: float = 0.0
    default_max_tokens: int = 0


class PlacementPolicy(Record):
    """Where and in how many copies the placer may hold a model across a fleet's nodes."""

    min_copies: int = 0
    max_copies: int = 0
    node_selector: dict[str, str] = Field(default_factory=dict)


class ModelSpec(Record):
    name: str
    task: Task = Task.UNSPECIFIED
    format: ModelFormat = ModelFormat.UNSPECIFIED
    source_uri: str = ""
    expected_sha256: str = ""
    manifest: PackageManifest | None = None
    runtime_hints: RuntimeHints = Field(default_factory=RuntimeHints)
    priority: Priority = Priority.UNSPECIFIED
    memory_estimate_bytes: int = 0
    memory_quota_bytes: int = 0
    idle_ttl: ProtoDuration | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    description: str = ""
    placement: PlacementPolicy | None = None

    @property
    def effective_priority(self) -> Priority:
        return self.priority or Priority.NORMAL


class LoadProgress(Record):
    phase: ModelState = ModelState.UNSPECIFIED
    bytes_done: int = 0
    bytes_total: int = 0
    files_done: int = 0
    files_total: int = 0
    current_file: str = ""
    message: str = ""


class PhaseDuration(Record):
    phase: ModelState
    duration: ProtoDuration


class ModelCapabilities(Record):
    tools: bool = False
    json_schema: bool = False
    reasoning: bool = False
    vision: bool = False


class SpeechProfile(Record):
    sample_rate_hz: int = 0
    voices: list[str] = Field(default_factory=list)
    default_voice: str = ""
    languages: list[str] = Field(default_factory=list)


class ServingProfile(Record):
    triton_model_name: str = ""
    embedding_dimension: int = 0
    max_input_tokens: int = 0
    normalize_embeddings: bool = False
    input_names: list[str] = Field(default_factory=list)
    output_name: str = ""
    tokenizer_sha256: str = ""
    chat_template: str = ""
    context_length: int = 0
    rerank_scoring: RerankScoring = RerankScoring.UNSPECIFIED
    max_batch_size: int = 0
    special_tokens: dict[str, str] = Field(default_factory=dict)
    runtime_memory_bytes: int = 0
    capabilities: ModelCapabilities | None = None
    speech: SpeechProfile | None = None


class ModelAsset(Record):
    name: str
    sha256: str
    content: bytes = b""


class ModelStatus(Record):
    state: ModelState = ModelState.REGISTERED
    reason: str = ""
    progress: LoadProgress | None = None
    manifest: PackageManifest | None = None
    profile: ServingProfile | None = None
    footprint_bytes: int = 0
    last_used_time: datetime | None = None
    update_time: datetime | None = None
    phase_durations: list[PhaseDuration] = Field(default_factory=list)


class Model(Record):
    spec: ModelSpec
    version: int = 1
    desired_state: DesiredState = DesiredState.UNLOADED
    status: ModelStatus = Field(default_factory=ModelStatus)
    create_time: datetime | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def state(self) -> ModelState:
        return self.status.state


class ModelEvent(Record):
    id: int = 0
    model_name: str
    version: int = 0
    from_state: ModelState = ModelState.UNSPECIFIED
    to_state: ModelState = ModelState.UNSPECIFIED
    message: str = ""
    create_time: datetime | None = None
    request_id: str = ""
    node_id: str = ""


class RequestCount(Record):
    """Requests one model served within one reporting interval (inference → registry)."""

    model_name: str
    count: int
    last_request_time: datetime
    cold_starts: int = 0


class Usage(Record):
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens
