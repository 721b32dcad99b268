"""KIVI-style quantization (Liu et al. 2024) of the coldest full-precision blocks, all
into one format."""
from __future__ import annotations

from dataclasses import dataclass

from engine.actions import KVFormat, Quantize
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
        # full-precision blocks only: a lossy block is never quantized again from its
        # lossy codes (the errors compound; controller/strategies/mixed_precision.py)
        return [b for b in movable(seq, ctx, keep_sinks=False) if b.fmt == "full"]

    def score(self, seq, block):
        return block.mass

    def freed(self, block, ctx):
        return block.nbytes - ctx.format_bytes[self.fmt.name]

    def actions(self, seq, blocks):
        return (Quantize(seq.seq_id, blocks, self.fmt.k_bits, self.fmt.v_bits),)
