"""Policy profiles: the one record every part of kvctl reads (policy state, the loop,
the config, the CLI). Torch-free: the CLI imports it.

Deployments differ, so the policy's limits come as named profiles an operator sets per
node: which strategies a sequence may be moved with (in the order of preference that
breaks ties) and how much added decode-step latency is worth one unit of accuracy cost.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    strategies: tuple[str, ...]     # controller/strategies registry names
    latency_weight: float           # seconds of added step latency ~ one unit of accuracy
    summary: str


_ALL = (
    # eviction only inside mixed_precision's plans, block by block where it costs less
    # than the next format: whole-sequence evictions priced by a predictor trained on
    # text continuation won against formats and lost needles (docs/BENCHMARKS.md,
    # "The policy under a KV budget"). The second ladder (int4 and better, the coldest
    # quarter evicted past that: mixed_precision_int4) is in the registry, not here: its
    # mean KL was lower on 3 of 4 text windows at 25%, but on a window whose
    # continuation copies an earlier passage it scored KL 1.27 against the full
    # ladder's 0.081 (docs/BENCHMARKS.md, "An evicting ladder's tail")
    Profile("balanced", ("mixed_precision", "offload_exact", "offload_topk"),
            1.0, "per-block precision (evicting only where cheaper), or offload; "
                 "the predictor decides"),
    Profile("accuracy-critical", ("quantize_int8", "offload_exact"), 0.01,
            "no eviction, nothing below int8, exact offload"),
    Profile("streaming", ("sink_window", "quantize_int8", "quantize_int4"), 2.0,
            "attention sinks + recent window first"),
    Profile("long-context", ("offload_topk", "quantize_int4", "offload_exact"), 0.1,
            "top-k pages of offloaded blocks, then int4"),
    Profile("throughput", ("quantize_int4", "heavy_hitter", "quantize_k4v2"), 5.0,
            "int4, then heavy-hitter eviction"),
    Profile("multi-turn", ("offload_exact", "quantize_int8", "quantize_int4"), 0.1,
            "keep a conversation's KV: offload before compressing"),
)

PROFILES: dict[str, Profile] = {p.name: p for p in _ALL}
PROFILE_NAMES: tuple[str, ...] = tuple(PROFILES)
DEFAULT_PROFILE = "balanced"


def get_profile(name: str) -> Profile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"profile must be one of {', '.join(PROFILE_NAMES)}, "
                         f"got {name!r}") from None
