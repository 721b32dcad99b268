"""The narrow handle between controller and engine: actions in, snapshots out.

Actions are plain data. The engine validates each one fully before touching anything,
then applies it between decode steps; an illegal action raises ``ActionError`` and
changes nothing. Block ids in actions are *logical* block indices of the sequence
(block ``i`` holds token positions ``[i*T, (i+1)*T)``), stable under eviction.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple, Union


VALID_BITS = (0, 8, 4, 2)  # 0 = full precision (the store dtype)
FP8_CODE = 24  # a side's table code when its 8 bits are float8 e4m3: 16 (float) | 8 (bits)


def _side_code(bits: int, fp8: bool) -> int:
    return FP8_CODE if fp8 and bits == 8 else bits


def _side_bits(code: int) -> int:
    return 8 if code == FP8_CODE else code


def _side_name(code: int) -> str:
    return "full" if code == 0 else "fp8" if code == FP8_CODE else str(code)


def _parse_side(s: str) -> int:
    return 0 if s == "full" else FP8_CODE if s == "fp8" else int(s)


@dataclass(frozen=True)
class KVFormat:
    """A block's storage format; keys and values may differ (e.g. K4V2).

    ``k_bits`` / ``v_bits``: 0 (full precision), 8, 4 or 2 bits an element. ``fp8``: the
    8-bit sides hold float8 e4m3 values with one scale per (block, kv head) instead of
    int8 codes with scale and zero per channel / group (engine/layout.py); a 4- or 2-bit
    side of the same format stays integer (e.g. 'kfp8v4')."""

    k_bits: int = 0
    v_bits: int = 0
    fp8: bool = False

    def __post_init__(self) -> None:
        for b in (self.k_bits, self.v_bits):
            if b not in VALID_BITS:
                raise ValueError(f"bits must be one of 8, 4, 2 (or 0 = full precision), got {b}")
        if self.fp8 and 8 not in (self.k_bits, self.v_bits):
            raise ValueError("fp8 applies to 8-bit keys or values; this format has none")

    @property
    def is_full(self) -> bool:
        return self.k_bits == 0 and self.v_bits == 0

    @property
    def k_fp8(self) -> bool:
        return self.fp8 and self.k_bits == 8

    @property
    def v_fp8(self) -> bool:
        return self.fp8 and self.v_bits == 8

    @cached_property
    def k_code(self) -> int:
        """The keys' code in block tables (``block_kbits``): their bits, or FP8_CODE."""
        return _side_code(self.k_bits, self.fp8)

    @cached_property
    def v_code(self) -> int:
        return _side_code(self.v_bits, self.fp8)

    @cached_property
    def code(self) -> int:
        """One int per format (``k_code * 32 + v_code``): grouping tables by format."""
        return self.k_code * 32 + self.v_code

    # hashed and compared by its code (unique per format): the engine's host work puts
    # every block's format in a set each decode step (8,000 blocks at batch 8 / 32K), and
    # the generated methods hashed and compared field tuples (~3 ms a step on the 2-core
    # box). Defined here, dataclass(frozen=True) keeps them
    def __hash__(self) -> int:
        return self.code

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not KVFormat:
            return NotImplemented
        return self.code == other.code

    @staticmethod
    def from_codes(k_code: int, v_code: int) -> KVFormat:
        """The format of a block table entry (``k_code`` / ``v_code`` as above)."""
        fp8 = FP8_CODE in (k_code, v_code)
        if fp8 and 8 in (k_code, v_code):
            raise ValueError("a format's 8-bit sides are either all int8 or all fp8")
        return KVFormat(_side_bits(k_code), _side_bits(v_code), fp8)

    @staticmethod
    def from_code(code: int) -> KVFormat:
        return KVFormat.from_codes(*divmod(code, 32))

    @cached_property
    def name(self) -> str:
        if self.k_code == self.v_code:
            return "full" if self.k_bits == 0 else "fp8" if self.fp8 else f"int{self.k_bits}"
        return f"k{_side_name(self.k_code)}v{_side_name(self.v_code)}"

    @staticmethod
    def parse(name: str) -> KVFormat:
        """'full', 'int8', 'int4', 'int2', 'fp8', or 'k4v2'-style mixes ('kfp8v4',
        'kfullvfp8': a side is full, fp8 or its bits)."""
        name = name.strip().lower()
        if name in ("full", "fp", "fp16", "bf16", "fp32"):
            return FULL
        if name in ("fp8", "fp8_e4m3", "e4m3"):
            return KVFormat(8, 8, fp8=True)
        if name.startswith("int") and name[3:].isdigit():
            b = int(name[3:])
            return KVFormat(b, b)
        if name.startswith("k") and "v" in name:
            k, v = name[1:].split("v", 1)
            try:
                return KVFormat.from_codes(_parse_side(k), _parse_side(v))
            except ValueError as e:
                raise ValueError(f"unknown KV format {name!r}: {e}") from None
        raise ValueError(f"unknown KV format {name!r}; use full, int8, int4, int2, fp8 or "
                         "kXvY (X, Y: full, fp8, 8, 4, 2)")

    def precision_rank(self) -> tuple[int, int]:
        """(keys, values), higher = more precise: full > int8 > fp8 > int4 > int2.
        int8 keeps 256 levels per channel (keys) or group (values); e4m3 has 3 mantissa
        bits under one scale per block and head."""
        return _RANK[self.k_code], _RANK[self.v_code]


_RANK = {0: 5, 8: 4, FP8_CODE: 3, 4: 2, 2: 1}
FULL = KVFormat(0, 0)
FP8 = KVFormat(8, 8, fp8=True)


def parse_fill_format(name: str | None) -> KVFormat:
    """A request's ``kv_format`` (engine/api.py) as the format its blocks fill into:
    full precision for None, else a format of 8-, 4- or 2-bit sides; ValueError naming
    the field and the formats for anything else."""
    if name is None:
        return FULL
    try:
        fmt = KVFormat.parse(name)
    except ValueError as e:
        raise ValueError(f"kv_format {name!r}: {e}") from None
    if not fmt.is_full and 0 in (fmt.k_bits, fmt.v_bits):
        raise ValueError(f"kv_format {name!r}: both keys and values need 8, 4 or 2 bits "
                         "(or 'full')")
    return fmt


class ActionError(ValueError):
    """An action the engine refuses; nothing was changed."""


@dataclass(frozen=True)
class Quantize:
    """Re-store blocks at ``bits`` (8/4/2); ``v_bits`` defaults to ``bits``. ``fp8``: the
    8-bit sides as float8 e4m3 instead of int8 (``Quantize(seq, blocks, 8, fp8=True)`` is
    the 'fp8' format; ``Quantize.to(seq, blocks, KVFormat.parse(name))`` for any name)."""

    seq_id: str
    blocks: tuple[int, ...]
    bits: int
    v_bits: int | None = None
    fp8: bool = False

    @classmethod
    def to(cls, seq_id: str, blocks: tuple[int, ...], fmt: KVFormat) -> Quantize:
        return cls(seq_id, tuple(blocks), fmt.k_bits, fmt.v_bits, fmt.fp8)


@dataclass(frozen=True)
class SetFillFormat:
    """Format a sequence's blocks take as they fill (the tail stays full precision)."""

    seq_id: str
    bits: int = 0           # 0 = keep full precision
    v_bits: int | None = None
    fp8: bool = False       # 8-bit sides as float8 e4m3 (as in Quantize)


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


@dataclass(frozen=True)
class Pause:
    """Take a decoding sequence off the GPU until there is room again: every GPU block
    swapped to the host tier (exact, nothing lost) and the sequence back in the queue,
    resumed (swapped in, in arrival order) as soon as its blocks and one more fit. The
    engine's own swap preemption, asked for where it costs less than moves that slow
    every step (streaming blocks from host memory). Refused, nothing changed, without a
    host tier with room for the blocks, or for a sequence that runs alone."""

    seq_id: str


Action = Union[Quantize, SetFillFormat, Offload, Fetch, Evict, Restore, SetDecodeMode,
               DropSession, Pause]


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
    fmt: str              # 'full', 'int8', 'int4', 'int2', 'fp8', 'k4v2', ...
    tier: str             # 'gpu' | 'host' | 'evicted' | 'parked'
    nbytes: int           # bytes this block holds (all layers), 0 when evicted
    mass: float           # decayed share of attention (mean over layers and heads)
    observed: float = 0.0 # prompt-time SnapKV score: share of the last W prompt queries
    shared: int = 0       # holders of its slot when shared with other sequences (prefix
                          # reuse; 0 = its own): a move copies it and frees nothing
    distinct: float = 0.0 # prompt-time KeyDiff share: how far its keys stand from the
                          # sequence's mean key, as a share of the blocks that stand out


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
    blocks: Sequence[BlockView]   # in a snapshot: engine.snapshot.BlockViews
    entropy: float        # entropy (nats) of the block-level attention distribution
    sink_mass: float      # share of attention on the first block
    recent_mass: float    # share on the newest ``recent_blocks`` blocks
    num_preemptions: int = 0
    fill_format: str = "full"   # the format its blocks take as they fill (SetFillFormat)
    # bytes by (tier, format) together, and how many of its blocks share their slot with
    # other sequences (a reader summing bytes over sequences counts those apart)
    bytes_by_place: dict[tuple[str, str], int] = field(default_factory=dict)
    num_shared_blocks: int = 0


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
                          # and admit the next waiting request
    tokens_per_s: float
    format_bytes: dict[str, int] = field(default_factory=dict)  # one block, all layers
    num_sink_blocks: int = 1
    version: int = 0      # publication counter: a later snapshot has a larger one
    max_positions: int = 0  # the model's context (tokens)
    num_preemptions: int = 0  # since start: sequences swapped out or dropped for room
    num_paused: int = 0       # since start: running sequences paused by a Pause move
    stalled_bytes: int = 0    # of pressure_bytes, what the stalled sequences need (a block
                              # to grow into; a prompt's least chunk): the queue's aside
    num_step_failures: int = 0  # steps that raised (their sequences ended in error)
    staging_bytes: int = 0  # per layer: what one step may stream of offloaded blocks
    graphs: dict = field(default_factory=dict)  # CUDA graph counters (engine/cuda_graphs.py)
    prefix: dict = field(default_factory=dict)  # prefix reuse counters (engine/prefix.py)
    sessions: list = field(default_factory=list)  # engine.sessions.session_views()
    # seconds of the engine's steps by part, and steps and seconds by kind, since start
    # (engine.engine.Laps): 'moves', 'admit', 'schedule', 'launch', 'sample', ...
    step_times: dict = field(default_factory=dict)
    # the waiting request the engine admits next (the one ``pressure_bytes`` counts the
    # admission of), "" when none waits, and what admitting it needs at each fill format
    # (bytes, all layers: its blocks plus one, and a prefill chunk's at full precision
    # for a lossy one) where it is fresh (a preempted one comes back as it was)
    next_admission: str = ""
    admission_bytes: dict = field(default_factory=dict)
