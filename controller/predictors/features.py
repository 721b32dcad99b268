"""Features of one (sequence, candidate move) pair: the learned predictor's input.

One function, ``candidate_features``, serves trace recording, training and prediction,
so the three can never disagree. Everything comes from the controller's own view
(``SequenceView``/``BlockView``, engine/actions.py) and the ``Candidate``: the learned
predictor sees exactly what the heuristic one sees.

``SCHEMA`` names the features in vector order; change it (and ``SCHEMA_VERSION``) and
every saved artifact is refused until retrained.
"""
from __future__ import annotations

import math

from controller.strategies import Candidate
from engine.actions import Quantize, SequenceView, SetDecodeMode
from engine.actions import KVFormat

SCHEMA_VERSION = 1
FULL_BITS = 16                   # "bits" of a full-precision block, whatever the dtype
MAX_DIST = 16                    # blocks: distances from the end are capped here

SCHEMA: tuple[str, ...] = (
    "is_evict", "is_quantize", "is_offload", "is_topk",
    "k_bits_after", "v_bits_after",  # bits the touched blocks keep (0 = evicted)
    "topk_keep",                     # top-k pages / offloaded blocks (1 = all attended)
    "mass_frac",                     # attention mass of touched blocks / attended mass
    "max_block_mass",                # heaviest touched block's share
    "observed_frac",                 # SnapKV observation-window share of touched blocks
    "share",                         # touched blocks / attended blocks
    "heat",                          # mass_frac / share: >1 = hotter than average
    "touches_sink",                  # the first block is among the touched
    "log2_tokens",
    "entropy_norm",                  # block-attention entropy / log(#attended blocks)
    "sink_mass", "recent_mass",
    "mean_dist_frac",                # mean distance of touched blocks from the end /
                                     # blocks in the sequence (evicted ones too)
    "min_dist_blocks",               # nearest touched block's distance from the end,
                                     # capped at MAX_DIST (beyond it, all are "old")
    "freed_frac",                    # bytes freed / the sequence's GPU-tier bytes
    "already_lowered",               # touched blocks not at full precision before
)


def _bits(fmt: str) -> tuple[int, int]:
    f = KVFormat.parse(fmt)
    return (f.k_bits or FULL_BITS, f.v_bits or FULL_BITS)


def candidate_features(seq: SequenceView, cand: Candidate) -> dict[str, float]:
    """Features of applying ``cand`` to ``seq`` (see ``SCHEMA``)."""
    touched_ids = set(cand.blocks)
    attended = [b for b in seq.blocks if b.tier in ("gpu", "host")] or seq.blocks
    touched = [b for b in seq.blocks if b.index in touched_ids]
    total_mass = sum(b.mass for b in attended) or 1.0
    total_obs = sum(b.observed for b in attended) or 1.0
    n_att = max(1, len(attended))
    newest = seq.blocks[-1].index if seq.blocks else 0
    mass = sum(b.mass for b in touched) / total_mass
    share = len(touched) / n_att
    dists = [newest - b.index for b in touched] or [0]

    k_bits = v_bits = FULL_BITS
    topk_keep = 1.0
    for a in cand.actions:
        if isinstance(a, Quantize):
            k_bits, v_bits = a.bits, a.bits if a.v_bits is None else a.v_bits
        elif isinstance(a, SetDecodeMode) and a.mode == "topk":
            offloaded = len(touched) + sum(b.tier == "host" for b in seq.blocks
                                           if b.index not in touched_ids)
            topk_keep = min(1.0, a.top_k / max(1, offloaded))
    if cand.kind == "evict":
        k_bits = v_bits = 0
    gpu_bytes = seq.bytes_by_tier.get("gpu", 0) or 1
    return {
        "is_evict": float(cand.kind == "evict"),
        "is_quantize": float(cand.kind == "quantize"),
        "is_offload": float(cand.kind == "offload"),
        "is_topk": float(topk_keep < 1.0),
        "k_bits_after": float(k_bits),
        "v_bits_after": float(v_bits),
        "topk_keep": topk_keep,
        "mass_frac": mass,
        "max_block_mass": max((b.mass for b in touched), default=0.0) / total_mass,
        "observed_frac": sum(b.observed for b in touched) / total_obs,
        "share": share,
        "heat": mass / share if share else 0.0,
        "touches_sink": float(any(b.index == 0 for b in touched)),
        "log2_tokens": math.log2(max(1, seq.num_tokens)),
        "entropy_norm": seq.entropy / math.log(n_att) if n_att > 1 else 0.0,
        "sink_mass": seq.sink_mass,
        "recent_mass": seq.recent_mass,
        # over the sequence's blocks, as the distances are: over the attended ones it
        # passed 1 once a plan had evicted blocks, and every later move fell back
        "mean_dist_frac": sum(dists) / len(dists) / max(1, newest + 1),
        "min_dist_blocks": float(min(min(dists), MAX_DIST)),
        "freed_frac": cand.freed_bytes / gpu_bytes,
        "already_lowered": (sum(_bits(b.fmt) != (FULL_BITS, FULL_BITS) for b in touched)
                            / max(1, len(touched))),
    }


def vector(feats: dict[str, float]) -> list[float]:
    """``feats`` in ``SCHEMA`` order; a missing or extra name is a schema error."""
    if set(feats) != set(SCHEMA):
        missing, extra = set(SCHEMA) - set(feats), set(feats) - set(SCHEMA)
        raise ValueError(f"features do not match schema v{SCHEMA_VERSION}: "
                         f"missing {sorted(missing)}, unexpected {sorted(extra)}")
    return [float(feats[k]) for k in SCHEMA]
