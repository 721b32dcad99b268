"""Strategies: which blocks of a sequence to move, and how. An explicit registry."""
from __future__ import annotations

from controller.strategies.base import Candidate, Context, ScoredStrategy, Strategy
from controller.strategies.cold_offload import ColdOffload
from controller.strategies.cold_quantization import ColdQuantization
from controller.strategies.heavy_hitter_eviction import HeavyHitterEviction
from controller.strategies.mixed_precision import MixedPrecision
from controller.strategies.sink_window_eviction import SinkWindowEviction
from controller.strategies.snapkv_eviction import SnapKVEviction


def registry() -> dict[str, Strategy]:
    """Every strategy the controller may use, by name (fresh instances)."""
    items: list[Strategy] = [
        SinkWindowEviction(), HeavyHitterEviction(), SnapKVEviction(),
        ColdQuantization(8), ColdQuantization(4), ColdQuantization(2),
        ColdQuantization(4, 2), ColdQuantization(8, fp8=True), MixedPrecision(),
        # the same plan with values never below 4 bits: past int4 the coldest blocks go
        MixedPrecision(formats=("int8", "int4"), variant="int4"),
        ColdOffload(),
        ColdOffload(top_k_fraction=0.125),
    ]
    return {s.name: s for s in items}


__all__ = ["Candidate", "Context", "ScoredStrategy", "Strategy", "registry",
           "ColdOffload", "ColdQuantization", "HeavyHitterEviction", "MixedPrecision",
           "SinkWindowEviction", "SnapKVEviction"]
