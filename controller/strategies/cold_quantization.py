"""KIVI-style quantization (Liu et al. 2024) of the coldest full-precision blocks, all
into one format, or fp8 (e4m3, one scale per block and head, as vLLM / SGLang /
TensorRT-LLM store KV)."""
from __future__ import annotations

from dataclasses import dataclass

from controller.strategies.base import ScoredStrategy, movable
from engine.actions import KVFormat, Quantize


@dataclass
class ColdQuantization(ScoredStrategy):
    kind = "quantize"
    bits: int = 4
    v_bits: int | None = None
    fp8: bool = False       # the 8-bit sides as fp8 e4m3 ('quantize_fp8')

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"quantize_{self.fmt.name}"

    @property
    def fmt(self) -> KVFormat:
        return KVFormat(self.bits, self.bits if self.v_bits is None else self.v_bits, self.fp8)

    @property
    def fill_formats(self) -> tuple[str, ...]:
        return (self.fmt.name,)

    def eligible(self, seq, ctx):
        # full-precision blocks only: a lossy block is never quantized again from its
        # lossy codes (the errors compound; controller/strategies/mixed_precision.py)
        return [b for b in movable(seq, ctx, keep_sinks=False) if b.fmt == "full"]

    def score(self, seq, block):
        return block.mass

    def freed(self, block, ctx):
        return block.nbytes - ctx.format_bytes[self.fmt.name]

    def actions(self, seq, blocks):
        return (Quantize.to(seq.seq_id, blocks, self.fmt),)
