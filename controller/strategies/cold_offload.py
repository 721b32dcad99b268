"""Offload the coldest blocks to host memory: exact (every block streamed back per step,
lossless) or top-k pages (Quest, Tang et al. 2024: only the k most promising blocks)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from engine.actions import Offload, SetDecodeMode
from controller.strategies.base import ScoredStrategy, movable, stream_bytes


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
        # no more than the host tier has room for (none without a host tier), and no
        # more than one step's staging buffer streams beside what the other sequences
        # stream: all offloaded blocks in exact mode, k of them in top-k mode (past it
        # sequences take turns: on the 2-core box top-k sequences waited ~0.6 s between
        # two tokens, skipped 3 steps in 4, when top-k offloads ignored it)
        host_room = ctx.host_free_bytes if ctx.host_free_bytes is not None else float("inf")
        stage_room = ctx.staging_left(seq.seq_id)
        host = [b for b in seq.blocks if b.tier == "host"]
        # what the sequence would stream a step, kept as blocks are added
        total, largest = sum(b.nbytes for b in host), max((b.nbytes for b in host), default=0)
        mode = "topk" if self.top_k_fraction else "exact"
        by_index = {b.index: b for b in seq.blocks}
        ranked = sorted(cand.blocks, key=lambda i: (self.score(seq, by_index[i]), i))
        keep = []
        for i in ranked:
            b = by_index[i]
            n, total_b, largest_b = len(host) + len(keep) + 1, total + b.nbytes, \
                max(largest, b.nbytes)
            streamed = stream_bytes(mode, self.k_for(n), n, total_b, largest_b, ctx.num_layers)
            if b.nbytes > host_room or streamed > stage_room:
                break
            keep.append(i)
            total, largest = total_b, largest_b
            host_room -= b.nbytes
        if not keep:
            return None
        if len(keep) == len(cand.blocks):
            return cand
        blocks = tuple(sorted(keep))
        return replace(cand, blocks=blocks, actions=self.actions(seq, blocks),
                       freed_bytes=sum(by_index[i].nbytes for i in blocks))

    def k_for(self, offloaded: int) -> int:
        """Top-k mode's k for a sequence with this many blocks offloaded."""
        return max(1, round(offloaded * self.top_k_fraction))

    def actions(self, seq, blocks):
        if not self.top_k_fraction:
            return (SetDecodeMode(seq.seq_id, "exact"), Offload(seq.seq_id, blocks))
        offloaded = len(blocks) + sum(b.tier == "host" for b in seq.blocks)
        return (SetDecodeMode(seq.seq_id, "topk", self.k_for(offloaded)),
                Offload(seq.seq_id, blocks))
