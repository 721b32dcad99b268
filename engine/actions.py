"""The narrow handle between controller and engine: actions in, snapshots out.

Actions are plain data. The engine validates each one fully before touching anything,
then applies it between decode steps; an illegal action raises ``ActionError`` and
changes nothing. Block ids in actions are *logical* block indices of the sequence
(block ``i`` holds token positions ``[i*T, (i+1)*T)``), stable under eviction.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple, Union


VALID_BITS = (0, 8, 4, 2)  # 0 = full precision (the store dtype)


@dataclass(frozen=True)
class KVFormat:
    """A block's storage format; keys and values may differ (e.g. K4V2)."""

    k_bits: int = 0
    v_bits: int = 0

    def __post_init__(self) -> None:
        for b in (self.k_bits, self.v_bits):
            if b not in VALID_BITS:
                raise ValueError(f"bits must be one of 8, 4, 2 (or 0 = full precision), got {b}")

    @property
    def is_full(self) -> bool:
        return self.k_bits == 0 and self.v_bits == 0

    @cached_property
    def name(self) -> str:
        if self.k_bits == self.v_bits:
            return "full" if self.k_bits == 0 else f"int{self.k_bits}"
        return f"k{self.k_bits or 'full'}v{self.v_bits or 'full'}"

    @staticmethod
    def parse(name: str) -> "KVFormat":
        """'full', 'int8', 'int4', 'int2', or 'k4v2'-style mixes."""
        name = name.strip().lower()
        if name in ("full", "fp", "fp16", "bf16", "fp32"):
            return FULL
        if name.startswith("int") and name[3:].isdigit():
            b = int(name[3:])
            return KVFormat(b, b)
        if name.startswith("k") and "v" in name:
            k, v = name[1:].split("v", 1)
            conv = lambda s: 0 if s == "full" else int(s)  # noqa: E731
            try:
                return KVFormat(conv(k), conv(v))
            except ValueError as e:
                raise ValueError(f"unknown KV format {name!r}: {e}") from None
        raise ValueError(f"unknown KV format {name!r}; use full, int8, int4, int2 or kXvY")


FULL = KVFormat(0, 0)


class ActionError(ValueError):
    """An action the engine refuses; nothing was changed."""


@dataclass(frozen=True)
class Quantize:
    """Re-store blocks at ``bits`` (8/4/2); ``v_bits`` defaults to ``bits``."""

    seq_id: str
    blocks: tuple[int, ...]
    bits: int
    v_bits: int | None = None


@dataclass(frozen=True)
class SetFillFormat:
    """Format a sequence's blocks take as they fill (the tail stays full precision)."""

    seq_id: str
    bits: int = 0           # 0 = keep full precision
    v_bits: int | None = None


@dataclass(frozen=True)
class Offload:
    """Move blocks to the host tier (lossless)."""

    seq_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Fetch:
    """Bring offloaded blocks back to the GPU tier."""

    seq_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class Evict:
    """Remove blocks from attention; ``park`` keeps a host copy for ``Restore``."""

    seq_id: str
    blocks: tuple[int, ...]
    park: bool = False


@dataclass(frozen=True)
class Restore:
    """Bring parked (evicted-with-copy) blocks back into attention."""

    seq_id: str
    blocks: tuple[int, ...]


@dataclass(frozen=True)
class SetDecodeMode:
    """How a sequence attends over its offloaded blocks: 'exact' or 'topk' (Quest)."""

    seq_id: str
    mode: str = "exact"
    top_k: int = 0


@dataclass(frozen=True)
class DropSession:
    """Forget an idle session's KV (``seq_id`` is its idle sequence, ``session/<id>``):
    the controller's last move on a session under pressure. Irreversible."""

    seq_id: str


Action = Union[Quantize, SetFillFormat, Offload, Fetch, Evict, Restore, SetDecodeMode,
               DropSession]


@dataclass
class ActionResult:
    action: Action
    ok: bool
    freed_bytes: dict[str, int] = field(default_factory=dict)  # tier -> bytes (negative = used)
    message: str = ""
    seconds: float = 0.0


@dataclass
class CandidateResult:
    """What the engine did with one candidate (a strategy's actions on one sequence):
    all of them (``results``) or none (``error`` says why)."""

    actions: tuple[Action, ...]
    results: list[ActionResult] = field(default_factory=list)
    error: str = ""
    snapshot_version: int = 0   # the first published snapshot that shows the outcome

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def freed_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.results:
            for tier, n in r.freed_bytes.items():
                out[tier] = out.get(tier, 0) + n
        return out


class BlockView(NamedTuple):
    """One block as a snapshot shows it (a tuple: snapshots make thousands of them)."""

    index: int            # logical block index
    num_tokens: int
    fmt: str              # 'full', 'int8', 'int4', 'int2', 'k4v2', ...
    tier: str             # 'gpu' | 'host' | 'evicted' | 'parked'
    nbytes: int           # bytes this block holds (all layers), 0 when evicted
    mass: float           # decayed share of attention (mean over layers and heads)
    observed: float = 0.0 # prompt-time SnapKV score: share of the last W prompt queries
    shared: bool = False  # its slot is shared with other sequences (prefix reuse): a move
                          # copies it and frees nothing


@dataclass
class SequenceView:
    seq_id: str
    state: str            # 'waiting' | 'prefill' | 'decode' | 'stalled' | 'preempted' | 'held'
    num_prompt_tokens: int
    num_tokens: int       # tokens written so far (prompt + generated)
    num_generated: int
    priority: int
    decode_mode: str
    top_k: int
    bytes_by_tier: dict[str, int]
    bytes_by_format: dict[str, int]
    blocks: list[BlockView]
    entropy: float        # entropy (nats) of the block-level attention distribution
    sink_mass: float      # share of attention on the first block
    recent_mass: float    # share on the newest ``recent_blocks`` blocks
    num_preemptions: int = 0


@dataclass
class TierView:
    name: str             # 'gpu' (device arena; the CPU arena in CPU mode) | 'host'
    device: str
    capacity_bytes: int   # arena size (all layers)
    used_bytes: int       # pages in use (what capacity is lost to), cached prefix aside
    block_bytes: int      # sum of live blocks' exact slot bytes
    free_bytes: int
    cached_bytes: int = 0  # cached prefix blocks no sequence holds: given back on demand,
                           # so counted as free, not used


@dataclass
class EngineSnapshot:
    time: float
    step: int
    device: str
    model: str
    block_size: int
    num_layers: int
    tiers: dict[str, TierView]
    sequences: list[SequenceView]
    num_waiting: int
    num_running: int
    num_stalled: int
    pressure_bytes: int   # bytes the engine would need now to run every admitted sequence
    tokens_per_s: float
    format_bytes: dict[str, int] = field(default_factory=dict)  # one block, all layers
    num_sink_blocks: int = 1
    version: int = 0      # publication counter: a later snapshot has a larger one
    max_positions: int = 0  # the model's context (tokens)
    num_preemptions: int = 0  # since start: sequences swapped out or dropped for room
    num_step_failures: int = 0  # steps that raised (their sequences ended in error)
    staging_bytes: int = 0  # per layer: what one step may stream of offloaded blocks
    graphs: dict = field(default_factory=dict)  # CUDA graph counters (engine/cuda_graphs.py)
    prefix: dict = field(default_factory=dict)  # prefix reuse counters (engine/prefix.py)
    sessions: list = field(default_factory=list)  # engine.sessions.session_views()
