from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
    FINISH_REASON_ERROR: _ClassVar[FinishReason]
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason
FINISH_REASON_ERROR: FinishReason

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class ChatMessages(_message.Message):
    __slots__ = ("messages",)
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    max_tokens: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ..., max_tokens: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "messages", "prompt_ids", "sampling", "priority", "strategy", "seq_id", "session_id", "kv_format")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KV_FORMAT_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    messages: ChatMessages
    prompt_ids: TokenIds
    sampling: SamplingParams
    priority: int
    strategy: str
    seq_id: str
    session_id: str
    kv_format: str
    def __init__(self, prompt: _Optional[str] = ..., messages: _Optional[_Union[ChatMessages, _Mapping]] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., priority: _Optional[int] = ..., strategy: _Optional[str] = ..., seq_id: _Optional[str] = ..., session_id: _Optional[str] = ..., kv_format: _Optional[str] = ...) -> None: ...

class Started(_message.Message):
    __slots__ = ("seq_id", "num_prompt_tokens")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    num_prompt_tokens: int
    def __init__(self, seq_id: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ...) -> None: ...

class TokenDelta(_message.Message):
    __slots__ = ("seq_id", "token_id", "text", "index")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    token_id: int
    text: str
    index: int
    def __init__(self, seq_id: _Optional[str] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., index: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "total_tokens", "cached_tokens")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., cached_tokens: _Optional[int] = ...) -> None: ...

class Finished(_message.Message):
    __slots__ = ("seq_id", "reason", "text", "token_ids", "usage", "kv_bytes_by_tier", "kv_bytes_by_format", "strategy_changes", "error", "seconds")
    class KvBytesByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class KvBytesByFormatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_BY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_CHANGES_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SECONDS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    reason: FinishReason
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    usage: Usage
    kv_bytes_by_tier: _containers.ScalarMap[str, int]
    kv_bytes_by_format: _containers.ScalarMap[str, int]
    strategy_changes: _containers.RepeatedScalarFieldContainer[str]
    error: str
    seconds: float
    def __init__(self, seq_id: _Optional[str] = ..., reason: _Optional[_Union[FinishReason, str]] = ..., text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., kv_bytes_by_tier: _Optional[_Mapping[str, int]] = ..., kv_bytes_by_format: _Optional[_Mapping[str, int]] = ..., strategy_changes: _Optional[_Iterable[str]] = ..., error: _Optional[str] = ..., seconds: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("started", "token", "finished")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    started: Started
    token: TokenDelta
    finished: Finished
    def __init__(self, started: _Optional[_Union[Started, _Mapping]] = ..., token: _Optional[_Union[TokenDelta, _Mapping]] = ..., finished: _Optional[_Union[Finished, _Mapping]] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class CancelResponse(_message.Message):
    __slots__ = ("seq_id", "cancelled")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    cancelled: bool
    def __init__(self, seq_id: _Optional[str] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ("fresh",)
    FRESH_FIELD_NUMBER: _ClassVar[int]
    fresh: bool
    def __init__(self, fresh: _Optional[bool] = ...) -> None: ...

class GpuInfo(_message.Message):
    __slots__ = ("available", "reason", "name", "memory_used_bytes", "memory_total_bytes", "utilization_pct", "pcie_tx_bytes_per_s", "pcie_rx_bytes_per_s", "pcie_generation", "pcie_width")
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    UTILIZATION_PCT_FIELD_NUMBER: _ClassVar[int]
    PCIE_TX_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PCIE_RX_BYTES_PER_S_FIELD_NUMBER: _ClassVar[int]
    PCIE_GENERATION_FIELD_NUMBER: _ClassVar[int]
    PCIE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    available: bool
    reason: str
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    utilization_pct: int
    pcie_tx_bytes_per_s: int
    pcie_rx_bytes_per_s: int
    pcie_generation: int
    pcie_width: int
    def __init__(self, available: _Optional[bool] = ..., reason: _Optional[str] = ..., name: _Optional[str] = ..., memory_used_bytes: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., utilization_pct: _Optional[int] = ..., pcie_tx_bytes_per_s: _Optional[int] = ..., pcie_rx_bytes_per_s: _Optional[int] = ..., pcie_generation: _Optional[int] = ..., pcie_width: _Optional[int] = ...) -> None: ...

class HostInfo(_message.Message):
    __slots__ = ("memory_total_bytes", "memory_available_bytes", "process_rss_bytes", "num_cpus")
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AVAILABLE_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESS_RSS_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CPUS_FIELD_NUMBER: _ClassVar[int]
    memory_total_bytes: int
    memory_available_bytes: int
    process_rss_bytes: int
    num_cpus: int
    def __init__(self, memory_total_bytes: _Optional[int] = ..., memory_available_bytes: _Optional[int] = ..., process_rss_bytes: _Optional[int] = ..., num_cpus: _Optional[int] = ...) -> None: ...

class Tier(_message.Message):
    __slots__ = ("name", "device", "capacity_bytes", "used_bytes", "block_bytes", "free_bytes", "cached_bytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    FREE_BYTES_FIELD_NUMBER: _ClassVar[int]
    CACHED_BYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    device: str
    capacity_bytes: int
    used_bytes: int
    block_bytes: int
    free_bytes: int
    cached_bytes: int
    def __init__(self, name: _Optional[str] = ..., device: _Optional[str] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ..., block_bytes: _Optional[int] = ..., free_bytes: _Optional[int] = ..., cached_bytes: _Optional[int] = ...) -> None: ...

class SequenceCounts(_message.Message):
    __slots__ = ("waiting", "running", "stalled", "total", "preempted")
    WAITING_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    STALLED_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    PREEMPTED_FIELD_NUMBER: _ClassVar[int]
    waiting: int
    running: int
    stalled: int
    total: int
    preempted: int
    def __init__(self, waiting: _Optional[int] = ..., running: _Optional[int] = ..., stalled: _Optional[int] = ..., total: _Optional[int] = ..., preempted: _Optional[int] = ...) -> None: ...

class PrefixCache(_message.Message):
    __slots__ = ("hit_tokens", "queried_tokens", "indexed_blocks", "cached_blocks", "shared_slots", "cached_evicted")
    HIT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUERIED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEXED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    CACHED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    SHARED_SLOTS_FIELD_NUMBER: _ClassVar[int]
    CACHED_EVICTED_FIELD_NUMBER: _ClassVar[int]
    hit_tokens: int
    queried_tokens: int
    indexed_blocks: int
    cached_blocks: int
    shared_slots: int
    cached_evicted: int
    def __init__(self, hit_tokens: _Optional[int] = ..., queried_tokens: _Optional[int] = ..., indexed_blocks: _Optional[int] = ..., cached_blocks: _Optional[int] = ..., shared_slots: _Optional[int] = ..., cached_evicted: _Optional[int] = ...) -> None: ...

class EngineCounters(_message.Message):
    __slots__ = ("preemptions", "step_failures", "cuda_graphs", "graph_replays", "eager_decode_steps", "graph_capture_seconds", "graph_capture_bytes", "overlapped_steps", "step_times", "paused")
    class StepTimesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    PREEMPTIONS_FIELD_NUMBER: _ClassVar[int]
    STEP_FAILURES_FIELD_NUMBER: _ClassVar[int]
    CUDA_GRAPHS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_REPLAYS_FIELD_NUMBER: _ClassVar[int]
    EAGER_DECODE_STEPS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CAPTURE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    GRAPH_CAPTURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    OVERLAPPED_STEPS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMES_FIELD_NUMBER: _ClassVar[int]
    PAUSED_FIELD_NUMBER: _ClassVar[int]
    preemptions: int
    step_failures: int
    cuda_graphs: int
    graph_replays: int
    eager_decode_steps: int
    graph_capture_seconds: float
    graph_capture_bytes: int
    overlapped_steps: int
    step_times: _containers.ScalarMap[str, float]
    paused: int
    def __init__(self, preemptions: _Optional[int] = ..., step_failures: _Optional[int] = ..., cuda_graphs: _Optional[int] = ..., graph_replays: _Optional[int] = ..., eager_decode_steps: _Optional[int] = ..., graph_capture_seconds: _Optional[float] = ..., graph_capture_bytes: _Optional[int] = ..., overlapped_steps: _Optional[int] = ..., step_times: _Optional[_Mapping[str, float]] = ..., paused: _Optional[int] = ...) -> None: ...

class NodeStatus(_message.Message):
    __slots__ = ("hostname", "version", "model", "device", "mode", "uptime_s", "draining", "gpu", "host", "tiers", "policy", "counts", "pressure_bytes", "tokens_per_s", "step", "block_size", "sampled_at", "sequences", "budget_used_fraction", "engine", "prefix", "sessions", "predictor")
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    PRESSURE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    BLOCK_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_AT_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    BUDGET_USED_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    hostname: str
    version: str
    model: str
    device: str
    mode: str
    uptime_s: float
    draining: bool
    gpu: GpuInfo
    host: HostInfo
    tiers: _containers.RepeatedCompositeFieldContainer[Tier]
    policy: Policy
    counts: SequenceCounts
    pressure_bytes: int
    tokens_per_s: float
    step: int
    block_size: int
    sampled_at: float
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    budget_used_fraction: float
    engine: EngineCounters
    prefix: PrefixCache
    sessions: int
    predictor: PredictorInfo
    def __init__(self, hostname: _Optional[str] = ..., version: _Optional[str] = ..., model: _Optional[str] = ..., device: _Optional[str] = ..., mode: _Optional[str] = ..., uptime_s: _Optional[float] = ..., draining: _Optional[bool] = ..., gpu: _Optional[_Union[GpuInfo, _Mapping]] = ..., host: _Optional[_Union[HostInfo, _Mapping]] = ..., tiers: _Optional[_Iterable[_Union[Tier, _Mapping]]] = ..., policy: _Optional[_Union[Policy, _Mapping]] = ..., counts: _Optional[_Union[SequenceCounts, _Mapping]] = ..., pressure_bytes: _Optional[int] = ..., tokens_per_s: _Optional[float] = ..., step: _Optional[int] = ..., block_size: _Optional[int] = ..., sampled_at: _Optional[float] = ..., sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ..., budget_used_fraction: _Optional[float] = ..., engine: _Optional[_Union[EngineCounters, _Mapping]] = ..., prefix: _Optional[_Union[PrefixCache, _Mapping]] = ..., sessions: _Optional[int] = ..., predictor: _Optional[_Union[PredictorInfo, _Mapping]] = ...) -> None: ...

class PredictorInfo(_message.Message):
    __slots__ = ("kind", "detail", "priced", "fallbacks")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    PRICED_FIELD_NUMBER: _ClassVar[int]
    FALLBACKS_FIELD_NUMBER: _ClassVar[int]
    kind: str
    detail: str
    priced: int
    fallbacks: int
    def __init__(self, kind: _Optional[str] = ..., detail: _Optional[str] = ..., priced: _Optional[int] = ..., fallbacks: _Optional[int] = ...) -> None: ...

class Block(_message.Message):
    __slots__ = ("index", "num_tokens", "format", "tier", "nbytes", "mass")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    MASS_FIELD_NUMBER: _ClassVar[int]
    index: int
    num_tokens: int
    format: str
    tier: str
    nbytes: int
    mass: float
    def __init__(self, index: _Optional[int] = ..., num_tokens: _Optional[int] = ..., format: _Optional[str] = ..., tier: _Optional[str] = ..., nbytes: _Optional[int] = ..., mass: _Optional[float] = ...) -> None: ...

class Sequence(_message.Message):
    __slots__ = ("seq_id", "state", "num_prompt_tokens", "num_tokens", "num_generated", "priority", "decode_mode", "top_k", "bytes_by_tier", "bytes_by_format", "entropy", "sink_mass", "recent_mass", "pinned_strategy", "strategy", "num_blocks", "blocks")
    class BytesByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesByFormatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    NUM_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    NUM_GENERATED_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    DECODE_MODE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    ENTROPY_FIELD_NUMBER: _ClassVar[int]
    SINK_MASS_FIELD_NUMBER: _ClassVar[int]
    RECENT_MASS_FIELD_NUMBER: _ClassVar[int]
    PINNED_STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    NUM_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    state: str
    num_prompt_tokens: int
    num_tokens: int
    num_generated: int
    priority: int
    decode_mode: str
    top_k: int
    bytes_by_tier: _containers.ScalarMap[str, int]
    bytes_by_format: _containers.ScalarMap[str, int]
    entropy: float
    sink_mass: float
    recent_mass: float
    pinned_strategy: str
    strategy: str
    num_blocks: int
    blocks: _containers.RepeatedCompositeFieldContainer[Block]
    def __init__(self, seq_id: _Optional[str] = ..., state: _Optional[str] = ..., num_prompt_tokens: _Optional[int] = ..., num_tokens: _Optional[int] = ..., num_generated: _Optional[int] = ..., priority: _Optional[int] = ..., decode_mode: _Optional[str] = ..., top_k: _Optional[int] = ..., bytes_by_tier: _Optional[_Mapping[str, int]] = ..., bytes_by_format: _Optional[_Mapping[str, int]] = ..., entropy: _Optional[float] = ..., sink_mass: _Optional[float] = ..., recent_mass: _Optional[float] = ..., pinned_strategy: _Optional[str] = ..., strategy: _Optional[str] = ..., num_blocks: _Optional[int] = ..., blocks: _Optional[_Iterable[_Union[Block, _Mapping]]] = ...) -> None: ...

class ListSequencesRequest(_message.Message):
    __slots__ = ("state",)
    STATE_FIELD_NUMBER: _ClassVar[int]
    state: str
    def __init__(self, state: _Optional[str] = ...) -> None: ...

class ListSequencesResponse(_message.Message):
    __slots__ = ("sequences",)
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    sequences: _containers.RepeatedCompositeFieldContainer[Sequence]
    def __init__(self, sequences: _Optional[_Iterable[_Union[Sequence, _Mapping]]] = ...) -> None: ...

class GetSequenceRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class PinEntry(_message.Message):
    __slots__ = ("seq_id", "strategy")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    strategy: str
    def __init__(self, seq_id: _Optional[str] = ..., strategy: _Optional[str] = ...) -> None: ...

class Policy(_message.Message):
    __slots__ = ("profile", "budget_bytes", "high_watermark", "low_watermark", "pins")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    LOW_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    PINS_FIELD_NUMBER: _ClassVar[int]
    profile: str
    budget_bytes: int
    high_watermark: float
    low_watermark: float
    pins: _containers.RepeatedCompositeFieldContainer[PinEntry]
    def __init__(self, profile: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., high_watermark: _Optional[float] = ..., low_watermark: _Optional[float] = ..., pins: _Optional[_Iterable[_Union[PinEntry, _Mapping]]] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SetPolicyRequest(_message.Message):
    __slots__ = ("profile", "budget_bytes", "high_watermark", "low_watermark")
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    HIGH_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    LOW_WATERMARK_FIELD_NUMBER: _ClassVar[int]
    profile: str
    budget_bytes: int
    high_watermark: float
    low_watermark: float
    def __init__(self, profile: _Optional[str] = ..., budget_bytes: _Optional[int] = ..., high_watermark: _Optional[float] = ..., low_watermark: _Optional[float] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("seq_id", "strategy")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    strategy: str
    def __init__(self, seq_id: _Optional[str] = ..., strategy: _Optional[str] = ...) -> None: ...

class UnpinRequest(_message.Message):
    __slots__ = ("seq_id",)
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    def __init__(self, seq_id: _Optional[str] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("seq_id", "strategy", "previous")
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    seq_id: str
    strategy: str
    previous: str
    def __init__(self, seq_id: _Optional[str] = ..., strategy: _Optional[str] = ..., previous: _Optional[str] = ...) -> None: ...

class WatchDecisionsRequest(_message.Message):
    __slots__ = ("history",)
    HISTORY_FIELD_NUMBER: _ClassVar[int]
    history: int
    def __init__(self, history: _Optional[int] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("id", "time", "kind", "seq_id", "action", "reason", "predicted_cost", "freed_bytes", "profile")
    ID_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_COST_FIELD_NUMBER: _ClassVar[int]
    FREED_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROFILE_FIELD_NUMBER: _ClassVar[int]
    id: int
    time: float
    kind: str
    seq_id: str
    action: str
    reason: str
    predicted_cost: float
    freed_bytes: int
    profile: str
    def __init__(self, id: _Optional[int] = ..., time: _Optional[float] = ..., kind: _Optional[str] = ..., seq_id: _Optional[str] = ..., action: _Optional[str] = ..., reason: _Optional[str] = ..., predicted_cost: _Optional[float] = ..., freed_bytes: _Optional[int] = ..., profile: _Optional[str] = ...) -> None: ...

class EstimateCapacityRequest(_message.Message):
    __slots__ = ("num_tokens", "format", "prompt_ids", "session_id")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_IDS_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    format: str
    prompt_ids: TokenIds
    session_id: str
    def __init__(self, num_tokens: _Optional[int] = ..., format: _Optional[str] = ..., prompt_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., session_id: _Optional[str] = ...) -> None: ...

class EstimateCapacityResponse(_message.Message):
    __slots__ = ("can_admit", "bytes_needed", "bytes_free", "budget_bytes", "reason", "predicted_seconds", "tokens_per_s", "reused_tokens")
    CAN_ADMIT_FIELD_NUMBER: _ClassVar[int]
    BYTES_NEEDED_FIELD_NUMBER: _ClassVar[int]
    BYTES_FREE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_BYTES_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_S_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    can_admit: bool
    bytes_needed: int
    bytes_free: int
    budget_bytes: int
    reason: str
    predicted_seconds: float
    tokens_per_s: float
    reused_tokens: int
    def __init__(self, can_admit: _Optional[bool] = ..., bytes_needed: _Optional[int] = ..., bytes_free: _Optional[int] = ..., budget_bytes: _Optional[int] = ..., reason: _Optional[str] = ..., predicted_seconds: _Optional[float] = ..., tokens_per_s: _Optional[float] = ..., reused_tokens: _Optional[int] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "turns", "idle_s", "age_s", "active", "num_tokens", "reused_tokens", "bytes_by_tier", "bytes_by_format", "seq_id")
    class BytesByTierEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    class BytesByFormatEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    IDLE_S_FIELD_NUMBER: _ClassVar[int]
    AGE_S_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REUSED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_TIER_FIELD_NUMBER: _ClassVar[int]
    BYTES_BY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    SEQ_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    turns: int
    idle_s: float
    age_s: float
    active: str
    num_tokens: int
    reused_tokens: int
    bytes_by_tier: _containers.ScalarMap[str, int]
    bytes_by_format: _containers.ScalarMap[str, int]
    seq_id: str
    def __init__(self, session_id: _Optional[str] = ..., turns: _Optional[int] = ..., idle_s: _Optional[float] = ..., age_s: _Optional[float] = ..., active: _Optional[str] = ..., num_tokens: _Optional[int] = ..., reused_tokens: _Optional[int] = ..., bytes_by_tier: _Optional[_Mapping[str, int]] = ..., bytes_by_format: _Optional[_Mapping[str, int]] = ..., seq_id: _Optional[str] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions",)
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ...) -> None: ...

class DropSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class DropSessionResponse(_message.Message):
    __slots__ = ("session_id", "dropped")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    dropped: bool
    def __init__(self, session_id: _Optional[str] = ..., dropped: _Optional[bool] = ...) -> None: ...
