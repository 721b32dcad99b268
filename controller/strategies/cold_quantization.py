"""KIVI-style quantization (Liu et al. 2024) of the coldest full-precision blocks."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import Quantize
from engine.actions import KVFormat
from controller.strategies.base import ScoredStrategy, movable


@dataclass
class ColdQuantization(ScoredStrategy):
    kind = "quantize"
    bits: int = 4
    v_bits: int | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"quantize_{self.fmt.name}"

    @property
    def fmt(self) -> KVFormat:
        return KVFormat(self.bits, self.bits if self.v_bits is None else self.v_bits)

    def eligible(self, seq, ctx):
        target = self.fmt
        out = []
        for b in movable(seq, ctx, keep_sinks=False):
            cur = KVFormat.parse(b.fmt)
            # only ever lower precision, channel by channel
            if all(c == 0 or c >= t for c, t in ((cur.k_bits, target.k_bits),
                                                (cur.v_bits, target.v_bits))) and cur != target:
                out.append(b)
        return out

    def score(self, seq, block):
        return block.mass

    def freed(self, block, ctx):
        return block.nbytes - ctx.format_bytes[self.fmt.name]

    def actions(self, seq, blocks):
        return (Quantize(seq.seq_id, blocks, self.fmt.k_bits, self.fmt.v_bits),)
