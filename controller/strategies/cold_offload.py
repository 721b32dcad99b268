"""Offload the coldest blocks to host memory: exact (every block streamed back per step,
lossless) or top-k pages (Quest, Tang et al. 2024: only the k most promising blocks)."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import Offload, SetDecodeMode
from controller.strategies.base import ScoredStrategy, movable


@dataclass
class ColdOffload(ScoredStrategy):
    kind = "offload"
    top_k_fraction: float = 0.0          # 0 = exact

    @property
    def name(self) -> str:  # type: ignore[override]
        return "offload_exact" if not self.top_k_fraction else "offload_topk"

    @property
    def lossless(self) -> bool:  # type: ignore[override]
        return not self.top_k_fraction

    def eligible(self, seq, ctx):
        return movable(seq, ctx, keep_sinks=False)

    def score(self, seq, block):
        return block.mass

    def actions(self, seq, blocks):
        if not self.top_k_fraction:
            return (SetDecodeMode(seq.seq_id, "exact"), Offload(seq.seq_id, blocks))
        offloaded = len(blocks) + sum(b.tier == "host" for b in seq.blocks)
        k = max(1, round(offloaded * self.top_k_fraction))
        return (SetDecodeMode(seq.seq_id, "topk", k), Offload(seq.seq_id, blocks))
