"""SnapKV (Li et al. 2024): what the prompt's last queries (the observation window)
attend to predicts what generation will need; evict the prompt blocks they ignore."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import Evict
from controller.strategies.base import ScoredStrategy, movable


@dataclass
class SnapKVEviction(ScoredStrategy):
    name = "snapkv"
    kind = "evict"
    park: bool = False

    def eligible(self, seq, ctx):
        T = max((b.num_tokens for b in seq.blocks), default=1)
        prompt_blocks = -(-seq.num_prompt_tokens // T) if T else 0
        # the window itself (the prompt's last block) is what observed: keep it
        return [b for b in movable(seq, ctx) if b.index < prompt_blocks - 1]

    def score(self, seq, block):
        return block.observed

    def actions(self, seq, blocks):
        return (Evict(seq.seq_id, blocks, park=self.park),)
