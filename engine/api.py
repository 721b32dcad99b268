"""Requests and the events the engine streams back for them; the KV event records the
engine hands its KV-events sink (docs/KV_EVENTS.md)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field


class Overloaded(RuntimeError):
    """The engine's waiting queue is full: retry after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class OutOfBlocks(RuntimeError):
    """No room in the KV store for the requested blocks."""


class EngineStopped(RuntimeError):
    """The engine is stopping or stopped and takes no more work."""


@dataclass
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy."""

    temperature: float = 0.0
    top_k: int = 0            # 0 = off
    top_p: float = 1.0        # 1 = off
    seed: int | None = None
    max_tokens: int = 128
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number, got {getattr(self, name)}")
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        self.stop = tuple(s for s in self.stop if s)


@dataclass
class Request:
    """One generation. Give ``prompt`` (raw text), ``messages`` (chat, rendered with the
    model's chat template) or ``prompt_ids``."""

    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: int = 0
    seq_id: str | None = None      # assigned by the engine when None
    strategy: str | None = None    # operator/request pin for the controller (opaque here)
    session_id: str | None = None  # multi-turn: the finished turn's KV is kept for the next
    # the format this sequence's blocks take as they fill, its prompt's included ('int4',
    # 'int8', 'fp8', 'k4v2', ...: the newest block stays full precision); admission then
    # counts the prompt at that format plus one prefill chunk at full precision. None:
    # full precision until a move says otherwise
    kv_format: str | None = None

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.prompt, self.messages, self.prompt_ids))
        if given != 1:
            raise ValueError("give exactly one of prompt, messages, prompt_ids")
        if self.messages is not None:
            for m in self.messages:
                if not isinstance(m, dict) or "role" not in m or "content" not in m:
                    raise ValueError("each chat message needs 'role' and 'content'")


@dataclass
class TokenEvent:
    seq_id: str
    token_id: int
    text: str                      # text delta (may be '' while a character is incomplete)
    index: int                     # 0-based index among generated tokens


@dataclass
class FinishEvent:
    seq_id: str
    reason: str                    # 'stop' (EOS / stop string), 'length', 'cancelled', 'error'
    text: str                      # full generated text
    token_ids: list[int]
    num_prompt_tokens: int
    num_generated: int
    kv_bytes_by_tier: dict[str, int]
    kv_bytes_by_format: dict[str, int]
    moves: list[str]               # strategy changes the sequence went through
    error: str = ""
    cached_tokens: int = 0         # prompt tokens whose KV was reused, not prefilled


Event = TokenEvent | FinishEvent


# ---------------------------------------------------------------- KV events
# Records of what the engine holds, for cluster routers: the engine hands a list of them
# to its sink once per step (set_kv_event_sink; controller/kv_events.py publishes them in
# vLLM's wire format). As vLLM's block pool emits them:
# * BlockStored when full blocks become present in a medium: their cumulative hashes in
#   prefix order (engine/block_hash.py), the hash of the block before the first (None at
#   a sequence's start), and the tokens of exactly those blocks;
# * BlockRemoved when the last copy of a block leaves a medium;
# * AllBlocksCleared when the engine forgets every block.
# A move between tiers is a removal from one medium and a store on the other; a block
# shared by several sequences is stored once and removed once; partial blocks never appear.
MEDIUM_GPU = "GPU"             # vLLM's spelling (MEDIUM_GPU / MEDIUM_CPU in its kv_events)
MEDIUM_CPU = "CPU"
# kvctl tier -> medium: host, parked and swapped blocks all sit in host memory; evicted
# blocks are gone (removed), they have no medium
MEDIUM_OF_TIER = {"gpu": MEDIUM_GPU, "host": MEDIUM_CPU, "parked": MEDIUM_CPU,
                  "swapped": MEDIUM_CPU}
MEDIA = (MEDIUM_GPU, MEDIUM_CPU)


def medium_of(tier: str) -> str:
    """The KV-events medium of a kvctl tier; ValueError for ``evicted`` (no medium)."""
    try:
        return MEDIUM_OF_TIER[tier]
    except KeyError:
        raise ValueError(f"tier {tier!r} has no KV-events medium; known: "
                         f"{', '.join(MEDIUM_OF_TIER)} (evicted blocks are removed)") from None


def _check_medium(medium: str) -> None:
    if medium not in MEDIA:
        raise ValueError(f"medium must be one of {', '.join(MEDIA)}, got {medium!r}")


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]          # cumulative hashes (external 64-bit form), prefix order
    parent_block_hash: int | None    # hash of the block before block_hashes[0]; None at start
    token_ids: list[int]             # the tokens of exactly these blocks
    block_size: int
    medium: str = MEDIUM_GPU

    def __post_init__(self) -> None:
        _check_medium(self.medium)
        if not self.block_hashes:
            raise ValueError("BlockStored needs at least one block hash")
        if self.block_size < 1 or len(self.token_ids) != len(self.block_hashes) * self.block_size:
            raise ValueError(f"BlockStored of {len(self.block_hashes)} blocks of "
                             f"{self.block_size} tokens carries {len(self.token_ids)} tokens")


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM_GPU

    def __post_init__(self) -> None:
        _check_medium(self.medium)
        if not self.block_hashes:
            raise ValueError("BlockRemoved needs at least one block hash")


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared
