"""Settings of the loader service (env prefix MODELPLANE_LOADER_)."""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import SettingsConfigDict

from modelplane.common.settings import ServerSettings, modelplane_home
from modelplane.common.types import RuntimeTarget


class LoaderSettings(ServerSettings):
    model_config = SettingsConfigDict(
        env_prefix="MODELPLANE_LOADER_", use_attribute_docstrings=True, extra="ignore", populate_by_name=True
    )

    port: int = 50052
    """TCP port of the loader's gRPC API."""
    registry_address: str = "localhost:50051"
    """host:port of the registry service."""
    cache_dir: Path = Field(default_factory=lambda: modelplane_home() / "cache")
    """The local (hot) cache: verified packages and converted artifacts, content-addressed."""
    cache_budget_bytes: int = 0
    """Most bytes the cache may hold (packages and their converted artifacts). When a fetch needs room,
    the least recently used packages that no loaded or loading model needs are evicted. 0 means no
    budget: only the free space of the cache's disk limits it."""
    link_local_sources: bool = True
    """Hard-link the files of a package on a local disk into the cache when both are on one
    filesystem, and hash them in place: no byte is copied, no disk space used twice. The cache then
    shares each file with its source: a file rewritten in place there (`cp new old`) changes under
    a model that is loaded from it; the cache notices at the file's next load and fetches and
    verifies it again. Replace published files by renaming a new file over them (as rsync and most
    tools do), or set false to copy every file."""
    fetch_concurrency: int = 4
    """Files of one package fetched (and hashed) at the same time: many small files do not wait on
    one round trip after another, several large local files hash on several cores. Large streamed
    files (over download_part_bytes) go one at a time, each in parallel parts."""
    quarantine_keep_seconds: float = 7 * 86400
    """How long packages that failed verification stay in the cache's quarantine/ for a person to
    inspect (7 days); older ones are removed at start and at each new quarantine. 0 keeps them."""
    default_target: RuntimeTarget = RuntimeTarget.EMBEDDED
    """Which Triton the repository entries are written for when a model's hints do not say."""
    load_timeout_seconds: float = 900.0
    """Longest time one whole load (fetch to READY) may take."""
    triton_load_timeout_seconds: float = 300.0
    """Longest time Triton may take to load one model."""
    max_concurrent_loads: int = 2
    """Loads (fetch, convert or Triton load) that run at the same time; more wait their turn."""
    parity_tolerance: float = 1e-4
    """Largest absolute difference allowed between a converted model's outputs and PyTorch's."""
    fp16_parity_tolerance: float = 1e-2
    """Largest absolute difference allowed for an fp16 artifact (precision FP16), against fp32."""
    int8_parity_tolerance: float = 5e-2
    """Largest absolute difference allowed for a dynamically quantised int8 artifact (precision INT8)."""
    max_batch_size: int = 64
    """Default largest batch Triton forms for an encoder model (sequences, not requests)."""
    dynamic_batching: bool = True
    """Let Triton batch the requests for one encoder model that wait while it is busy
    (docs/BATCHING.md); false runs every request on its own."""
    max_queue_delay_microseconds: int = 0
    """Default time a request that finds the model idle waits for others to batch with. Requests that
    arrive while the model is busy are batched anyway, so 0 adds no latency to a lone request."""
    length_buckets: list[int] = Field(default_factory=lambda: [12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])
    """Sequence-length bucket bounds, in tokens, for encoders on the embedded Triton: each batch runs
    one onnxruntime call per bucket, padded to that bucket's longest sequence, so short texts do not
    pay for long ones; an empty list pads every batch to its longest. A JSON list in the environment,
    e.g. `[16, 32, 64, 128, 256]`."""
    bucket_merge_tokens: int = 16
    """What one onnxruntime call costs beyond its tokens, counted in tokens: neighbouring length
    buckets of a batch run as one call when padding the shorter bucket's rows costs fewer tokens
    than this. Each call reads all of the model's weights once, which on CPU costs about as much
    as 16 tokens of all-MiniLM-L6-v2 (docs/BATCHING.md); 0 keeps every bucket apart."""
    onnx_intra_op_threads: int = 0
    """Threads onnxruntime uses inside one inference on the embedded Triton; 0 means all cores."""
    onnx_parallel_runs: int = 2
    """Encoder models on the embedded Triton: how many onnxruntime runs of one execution (its
    length-bucket calls, and the halves of a large one) go at once, each on its share of the cores
    (`onnx_intra_op_threads`, or all cores, divided by this), instead of one after another on all
    of them. Fewer threads per run means fewer hand-offs between them at every operator: on two
    cores, 13-22% less CPU per text and 13-39% more texts/s under concurrent requests, and a lone
    one-text request about 1.5 ms slower (docs/BATCHING.md, section 11). 1 runs one at a time."""
    llm_context_length: int = 4096
    """Context (prompt plus completion, in tokens) a GGUF model is loaded with, unless its hints set
    one; never more than the model was trained for. Each engine slot holds a KV cache this long."""
    speech2text_compute_type: str = "int8"
    """CTranslate2 compute type of speech-to-text (Whisper) models: int8 on a CPU, float16 or
    int8_float16 on a GPU."""
    speech2text_beam_size: int = 5
    """Beam width of speech-to-text decoding; 1 is greedy (faster, slightly less accurate)."""
    llm_engine_slots: int = 2
    """Requests one LLM generates at the same time (each slot its own KV cache; the weights are
    shared). More requests queue in arrival order. On CPU each slot gets cores // slots threads."""
    llm_max_queue_size: int = 64
    """Requests that may wait for a free slot of a GGUF model before new ones are refused (503)."""
    reconcile_interval_seconds: float = 30.0
    """How often the loader compares the registry with Triton and converges them."""

    # The fleet (docs/FLEET.md) -------------------------------------------------------------------
    node_id: str = Field("node-0", validation_alias=AliasChoices("MODELPLANE_NODE_ID", "MODELPLANE_LOADER_NODE_ID"))
    """This node's stable id (MODELPLANE_NODE_ID): a DNS label such as node-1 or the StatefulSet pod
    name. One node needs no configuration: node-0."""
    node_labels: str = Field(
        "", validation_alias=AliasChoices("MODELPLANE_NODE_LABELS", "MODELPLANE_LOADER_NODE_LABELS")
    )
    """This node's labels (MODELPLANE_NODE_LABELS), matched by a model's placement.node_selector:
    `gpu=h100,zone=a`."""
    node_lease_seconds: float = 10.0
    """How long this node's lease lasts without a renewal (renewed every third of it): a node killed
    without a goodbye is LOST, and its models placed elsewhere, this long after its last renewal."""
    advertise_host: str = ""
    """The host other services reach this loader at (its node's loader address); empty means the
    listening host, or this machine's name when it listens on every interface."""
    fleet: bool = False
    """Hold the models the placer places on this node (its placements) rather than every model the
    registry wants loaded, and record their states per node. `modelplane up` sets it when
    MODELPLANE_NODES is 2 or more; a Kubernetes StatefulSet of several nodes sets it too."""

    # Sources ---------------------------------------------------------------------------------
    download_part_bytes: int = 8 * 1024 * 1024
    """Size of one ranged GET when a large S3 object or HTTP file is downloaded in parallel parts."""
    download_concurrency: int = 8
    """Ranged GETs of one file in flight at once (S3, and HTTP servers that take byte ranges);
    memory use is this times the part size."""
    fetch_retries: int = 5
    """Attempts for one request or ranged part before a fetch fails (S3 and HTTP)."""
    fetch_retry_backoff_seconds: float = 0.5
    """First wait between attempts; it doubles with each attempt, with jitter, up to 30 s."""
    s3_endpoint_url: str = ""
    """Endpoint of the S3 service (MinIO: http://minio:9000). Empty means AWS_ENDPOINT_URL or AWS S3."""
    s3_region: str = ""
    """Region of the S3 bucket. Empty means AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""
    s3_access_key_id: SecretStr | None = None
    """S3 access key id. Unset means the standard chain: AWS_ACCESS_KEY_ID, the shared credentials
    file, or the machine's role."""
    s3_secret_access_key: SecretStr | None = None
    """S3 secret access key, with s3_access_key_id."""
    s3_session_token: SecretStr | None = None
    """S3 session token for temporary credentials, with s3_access_key_id."""
    s3_addressing_style: str = "path"
    """`path` (MinIO and most private S3 services) or `virtual` (bucket in the host name)."""
    http_timeout_seconds: float = 60.0
    """Longest wait for an HTTP(S) source to connect or send the next bytes."""
    http_bearer_token: SecretStr | None = None
    """Sent as `Authorization: Bearer …` to HTTP(S) sources that need it."""
    http_ca_bundle: Path | None = None
    """CA certificates for HTTPS sources signed by an internal CA; unset means the system store."""

    # Manifests and signatures ----------------------------------------------------------------
    trusted_signing_keys: list[str] = Field(default_factory=list)
    """Ed25519 public keys whose signature on a package's SHA256SUMS (as SHA256SUMS.sig) is trusted:
    each an OpenSSH line (`ssh-ed25519 AAAA…`), a PEM public key, base64 of the 32 raw bytes, or the
    path of a file holding one. JSON list in the environment."""
    require_signed_manifests: bool = False
    """Refuse every package whose SHA256SUMS is not signed by one of the trusted keys."""
    load_timeout_retries: int = 0
    """Times a load that ran past its timeout is tried again (its partial load undone first) before
    the model is marked FAILED."""

    # Memory budget ---------------------------------------------------------------------------
    host_memory_bytes: int = 0
    """Host memory models may fill on a CPU-only machine, before the safety margin; 0 means the
    machine's total memory."""
    gpu_memory_bytes: int = 0
    """Memory models may fill on each GPU, before the safety margin; 0 means what Triton reports
    (its nv_gpu_memory_total_bytes metric)."""
    memory_safety_margin: float = 0.1
    """Fraction of each device's memory kept free for what is not a model (Triton itself, request
    buffers, estimation error)."""
    triton_metrics_url: str = ""
    """Triton's Prometheus metrics, read for GPU memory; empty means the embedded Triton's metrics
    port on this host. GPUs are budgeted only when this reports nv_gpu_memory_* series."""
    memory_wait_seconds: float = 60.0
    """Longest a load waits for the memory it claimed to be actually free (unloads in flight,
    loads that must finish before they can be evicted) before it is refused."""
    release_wait_seconds: float = 30.0
    """Longest an unload waits for the model's backend processes to exit before its memory is
    counted free anyway."""
    eviction_grace_seconds: float = 1.0
    """Time between marking a model UNLOADING (the inference service stops routing to it) and
    unloading it from Triton, so requests already on their way are served."""
    estimate_overhead_bytes: int = 32 * 2**20
    """Memory a model's backend process holds of its own besides its weights (the interpreter's
    heap, the runtime's state; 28 MiB measured for an ONNX encoder); part of the estimate before
    a model's first load."""
    estimate_runtime_bytes: int = 32 * 2**20
    """Memory of the backend runtime's shared libraries (libpython, onnxruntime: 23-29 MiB
    measured), which every model's process maps and the budget counts once per device; counted
    at this estimate until the first load on the embedded Triton measures it."""
    idle_ttl_seconds: float = 1800.0
    """A loaded model not used for this long is unloaded even without memory pressure, unless its
    spec sets its own idle TTL or it is pinned; 0 means never."""
    statistics_interval_seconds: float = 5.0
    """How often the loader reads request statistics (recency, idle expiry, preloading) and
    re-measures loaded models."""

    # Predictive preloading ---------------------------------------------------------------------
    preload: bool = True
    """Load the models most likely to be requested next into free budget, from request history."""
    preload_horizon_seconds: float = 300.0
    """How far ahead preloading predicts requests."""
    preload_min_expected_requests: float = 1.0
    """A model is preloaded only when at least this many requests for it are expected within the
    horizon."""
    preload_hysteresis: float = 0.5
    """A preload may displace a loaded model only when it is expected to be requested at least
    (1 + this) times as often, so two models of similar heat do not swap back and forth."""
    preload_protect_seconds: float = 5.0
    """A model used (or loaded) within this many seconds is never displaced by a preload. 5 s rather
    than 15 s: on bench_preload's traces (seeds 7 and 11) it avoids 3-4 points more cold starts on
    independent requests and the long tail, for at most 2 points on sessions."""
