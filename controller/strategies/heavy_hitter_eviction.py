"""H2O (Zhang et al. 2023): keep heavy hitters — the blocks with the most accumulated
(decayed) attention — and a recent window; evict the lightest."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import Evict
from controller.strategies.base import ScoredStrategy, movable


@dataclass
class HeavyHitterEviction(ScoredStrategy):
    name = "heavy_hitter"
    kind = "evict"
    recent_blocks: int = 2
    park: bool = False

    def eligible(self, seq, ctx):
        blocks = movable(seq, ctx)
        newest = seq.blocks[-1].index if seq.blocks else 0
        return [b for b in blocks if b.index < newest - self.recent_blocks + 1]

    def score(self, seq, block):
        return block.mass

    def actions(self, seq, blocks):
        return (Evict(seq.seq_id, blocks, park=self.park),)
