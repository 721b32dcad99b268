"""The strategy contract: given one sequence and a byte target, propose moves.

Shaped like kvpress presses: ``Strategy.propose`` is the extension point, and most
strategies only implement ``ScoredStrategy.score`` (higher = more worth keeping as is)
plus which blocks they may touch and what they do to them. Strategies are policy: they
read ``SequenceView`` snapshots and return plain actions; the engine validates them.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

from engine.actions import Action, BlockView, SequenceView


@dataclass(frozen=True)
class Context:
    """What a strategy needs to know about the engine beyond the sequence."""

    format_bytes: dict[str, int]      # bytes of one block (all layers) per format name
    num_sink_blocks: int = 1
    staging_bytes: int = 0            # per layer a step may stream from host; 0 = no limit
    num_layers: int = 1
    host_free_bytes: int | None = None  # room in the host tier (0: none); None = unknown
    # per layer, what decoding sequences stream now: {seq_id: bytes}. One step's staging
    # buffer holds all of them; past it sequences take turns (engine: deferred)
    streaming: dict[str, int] | None = None

    @classmethod
    def from_snapshot(cls, snap) -> "Context":
        host = snap.tiers.get("host")
        layers = max(1, snap.num_layers)
        streaming = {}
        for v in snap.sequences:      # only sequences with offloaded blocks walk them
            total = v.bytes_by_tier.get("host", 0)
            if total and v.state in ("decode", "stalled"):
                sizes = [b.nbytes for b in v.blocks if b.tier == "host"] \
                    if v.decode_mode == "topk" else ()
                streaming[v.seq_id] = stream_bytes(v.decode_mode, v.top_k, len(sizes), total,
                                                   max(sizes, default=0), layers)
        return cls(dict(snap.format_bytes), snap.num_sink_blocks,
                   snap.staging_bytes, layers,
                   host.free_bytes if host is not None else 0, streaming)

    def staging_left(self, seq_id: str) -> float:
        """Per layer, what one step's staging buffer has left for ``seq_id``'s offloaded
        blocks beside the other sequences' (no limit: inf)."""
        if not self.staging_bytes:
            return float("inf")
        others = sum(n for sid, n in (self.streaming or {}).items() if sid != seq_id)
        return self.staging_bytes - others


def stream_bytes(decode_mode: str, top_k: int, count: int, total: int, largest: int,
                 num_layers: int) -> int:
    """Per layer, what one decode step streams through staging of a sequence's ``count``
    offloaded blocks (``total`` bytes, the largest ``largest``, all layers): every one in
    exact mode; in top-k mode k of them, each counted at the largest one's size
    (engine.staging.staging_need)."""
    if decode_mode == "topk":
        return min(top_k, count) * largest // num_layers
    return total // num_layers


@dataclass(frozen=True)
class Candidate:
    """Moves for one sequence with their exact effect on GPU bytes."""

    strategy: str
    seq_id: str
    actions: tuple[Action, ...]
    blocks: tuple[int, ...]
    freed_bytes: int
    lossless: bool                    # reversible without accuracy loss (offload)
    kind: str                         # 'evict' | 'quantize' | 'offload' | 'fill' (a
                                      # prompt not yet written: controller/loop.py)
    # a plan that mixes moves (blocks in several formats, some evicted) lists them as
    # candidates of the single-move strategies they equal, so predictors price each
    # part as they know it and the plan as the sum
    parts: tuple[Candidate, ...] = ()

    @property
    def steps(self) -> list[tuple[Action, ...]]:
        """What the engine applies, each whole or not at all: the parts one by one (an
        irreversible action must end its candidate, and each part is a move alone)."""
        return [p.actions for p in self.parts] if self.parts else [self.actions]


class Strategy(ABC):
    name: ClassVar[str]
    kind: ClassVar[str]
    lossless: ClassVar[bool] = False

    @property
    def fill_formats(self) -> tuple[str, ...]:
        """Formats a prompt not yet written may be written in under this strategy
        (SetFillFormat: its blocks take the format as they fill, never full first);
        none for a strategy that does not quantize."""
        return ()

    @abstractmethod
    def propose(self, seq: SequenceView, target_bytes: int, ctx: Context) -> Candidate | None:
        """Moves that free at least ``target_bytes`` of GPU memory if the sequence has
        them (fewer if not); None when nothing applies."""


class ScoredStrategy(Strategy):
    """Touch the lowest-scored eligible blocks until ``target_bytes`` are freed."""

    @abstractmethod
    def eligible(self, seq: SequenceView, ctx: Context) -> list[BlockView]:
        """Blocks this strategy may touch."""

    @abstractmethod
    def score(self, seq: SequenceView, block: BlockView) -> float:
        """Higher = more worth keeping as it is."""

    def freed(self, block: BlockView, ctx: Context) -> int:
        return block.nbytes

    @abstractmethod
    def actions(self, seq: SequenceView, blocks: tuple[int, ...]) -> tuple[Action, ...]:
        """The engine actions that apply this strategy to ``blocks``."""

    def propose(self, seq: SequenceView, target_bytes: int, ctx: Context) -> Candidate | None:
        picked: list[int] = []
        freed = 0
        ranked = sorted(self.eligible(seq, ctx), key=lambda b: (self.score(seq, b), b.index))
        for b in ranked:
            if freed >= target_bytes:
                break
            gain = self.freed(b, ctx)
            if gain <= 0:
                continue
            picked.append(b.index)
            freed += gain
        if not picked:
            return None
        blocks = tuple(sorted(picked))
        return Candidate(self.name, seq.seq_id, self.actions(seq, blocks), blocks, freed,
                         self.lossless, self.kind)


def movable(seq: SequenceView, ctx: Context, tiers: tuple[str, ...] = ("gpu",),
            keep_sinks: bool = True) -> list[BlockView]:
    """Blocks the engine lets a strategy touch: not the newest, not sinks (if kept), not
    shared with another sequence (moving one copies it: it would free nothing)."""
    if not seq.blocks:
        return []
    newest = seq.blocks[-1].index
    return [b for b in seq.blocks
            if b.index != newest and b.tier in tiers and b.num_tokens > 0 and not b.shared
            and not (keep_sinks and b.index < ctx.num_sink_blocks)]
