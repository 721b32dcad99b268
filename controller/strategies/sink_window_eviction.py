"""StreamingLLM (Xiao et al. 2024): keep the attention sinks and a recent window; evict
from the oldest end of the middle."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import Evict
from controller.strategies.base import ScoredStrategy, movable


@dataclass
class SinkWindowEviction(ScoredStrategy):
    name = "sink_window"
    kind = "evict"
    park: bool = False

    def eligible(self, seq, ctx):
        return movable(seq, ctx)

    def score(self, seq, block):
        return float(block.index)          # older = evicted first

    def actions(self, seq, blocks):
        return (Evict(seq.seq_id, blocks, park=self.park),)
