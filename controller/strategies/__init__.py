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


def fill_format_of(name: str | None) -> str | None:
    """The KV format a sequence pinned to strategy ``name`` is written in as it fills,
    its prompt's included (a request's ``kv_format``, engine/api.py): a fixed format's
    (``quantize_int4`` -> 'int4'), None for every other strategy. Pinned to a format, a
    sequence ends in it at the first pressure anyway; written so from the start it is
    admitted at that format's bytes instead of waiting for room for its prompt at full
    precision (at 32K, a fixed int4 held 1.5x full's sequences on an H100 for that
    reason: docs/BENCHMARKS.md)."""
    strat = registry().get(name) if name else None
    return strat.fmt.name if isinstance(strat, ColdQuantization) else None


__all__ = ["Candidate", "Context", "ScoredStrategy", "Strategy", "registry", "fill_format_of",
           "ColdOffload", "ColdQuantization", "HeavyHitterEviction", "MixedPrecision",
           "SinkWindowEviction", "SnapKVEviction"]
