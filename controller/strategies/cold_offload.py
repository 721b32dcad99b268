"""Offload the coldest blocks to host memory: exact (every block streamed back per step,
lossless) or top-k pages (Quest, Tang et al. 2024: only the k most promising blocks)."""
from __future__ import annotations

from dataclasses import dataclass, replace

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

    def propose(self, seq, target_bytes, ctx):
        cand = super().propose(seq, target_bytes, ctx)
        if cand is None:
            return None
        # no more than the host tier has room for (none without a host tier), and in
        # exact mode no more than one step's staging buffer streams beside what the other
        # sequences stream (past it they take turns: each decodes every other step)
        host_room = ctx.host_free_bytes if ctx.host_free_bytes is not None else float("inf")
        exact = not self.top_k_fraction and ctx.staging_bytes
        per_layer = lambda b: b.nbytes // ctx.num_layers  # noqa: E731
        stage_room = (ctx.staging_left(seq.seq_id) - sum(
            per_layer(b) for b in seq.blocks if b.tier == "host")) if exact else float("inf")
        by_index = {b.index: b for b in seq.blocks}
        ranked = sorted(cand.blocks, key=lambda i: (self.score(seq, by_index[i]), i))
        keep = []
        for i in ranked:
            b = by_index[i]
            if b.nbytes > host_room or per_layer(b) > stage_room:
                break
            keep.append(i)
            host_room -= b.nbytes
            stage_room -= per_layer(b)
        if not keep:
            return None
        if len(keep) == len(cand.blocks):
            return cand
        blocks = tuple(sorted(keep))
        return replace(cand, blocks=blocks, actions=self.actions(seq, blocks),
                       freed_bytes=sum(by_index[i].nbytes for i in blocks))

    def actions(self, seq, blocks):
        if not self.top_k_fraction:
            return (SetDecodeMode(seq.seq_id, "exact"), Offload(seq.seq_id, blocks))
        offloaded = len(blocks) + sum(b.tier == "host" for b in seq.blocks)
        k = max(1, round(offloaded * self.top_k_fraction))
        return (SetDecodeMode(seq.seq_id, "topk", k), Offload(seq.seq_id, blocks))
