"""The heuristic accuracy costs of moving one block, shared by the heuristic predictor
(which prices whole candidates) and the mixed-precision strategy (which picks each
block's format with them). Torch-free; units are "perplexity fraction" (0.01 = +1%).

* A format's cost is the PPL increase measured with every block in that format
  (docs/BENCHMARKS.md, "KV quantization accuracy", CPU, SmolLM2, the worse of 2K and
  4K: int8 +0.02%, int4 +0.4%, k4v2 +3.6%, int2 +7.7%; k8v4 between int8 and int4;
  fp8 +0.16% at 2K),
  scaled by the block's importance: the mean of its share of the sequence's attention
  mass and its share of the attended blocks (attention moves, so a cold block is not
  free).
* Evicting a block costs its attention mass, which is gone for good, plus
  ``EVICT_SHARE`` per share of blocks: what the query-agnostic part of eviction loses.
  Evicting half the blocks by attention mass cost +5% (4K) to +31% (2K) PPL and most
  needles at a quarter kept (docs/BENCHMARKS.md, "Compression accuracy"); 0.2 per share
  puts a cold block's eviction above its int2 (0.077 / 2 per share), so eviction comes
  after every format on cold blocks and before the lower formats only on blocks whose
  quantization error would weigh more than their attention.
* Keys at 2 bits also cost ``KEY2_SHARE`` per share of blocks, whatever the block's
  attention so far: the query-agnostic part of 2-bit keys. Perplexity (the format
  cost above) is scored on the next tokens, which look where the prompt looked; a later
  question looks elsewhere, and 2-bit keys lose the needle it looks for: uniform int2
  halves retrieval where keys int4 + values int2 keep nearly int4's (FACTS), and in the
  headline suite's compress-then-ask runs every missed needle sat in a block the plan
  had put at int2 (docs/BENCHMARKS.md, "Headline suite"). Half of eviction's per-share
  price: every block goes to k4v2 before a cold one goes lower. From k4v2 a block's
  step to int2 then frees a quarter of what its eviction frees for more than half of
  its price, so past k4v2 the plan evicts the coldest blocks (a few, each a whole
  block) rather than turning many to int2; the convex hull of each block's ladder
  (strategies/mixed_precision.py) decides it per block.
"""
from __future__ import annotations

FORMAT_COST = {"full": 0.0, "int8": 0.0002, "fp8": 0.0016, "k8v4": 0.002, "int4": 0.004,
               "k4v2": 0.036, "int2": 0.077}
UNKNOWN_FORMAT_COST = 0.25      # a format nobody measured: priced as if near-useless
EVICT_SHARE = 0.2
KEY2_SHARE = EVICT_SHARE / 2


def quantize_cost_terms(fmt: str) -> tuple[float, float]:
    """``fmt``'s cost as (a, b): a x (mass_frac + share) + b x share (quantize_cost)."""
    key2 = KEY2_SHARE if fmt == "int2" or fmt.startswith("k2v") else 0.0   # 2-bit keys
    return FORMAT_COST.get(fmt, UNKNOWN_FORMAT_COST) / 2, key2


def quantize_cost(fmt: str, mass_frac: float, share: float) -> float:
    """Blocks carrying ``mass_frac`` of the attention and ``share`` of the attended
    blocks, all stored in ``fmt``."""
    a, b = quantize_cost_terms(fmt)
    return a * (mass_frac + share) + b * share


def evict_cost(mass_frac: float, share: float) -> float:
    return mass_frac + EVICT_SHARE * share
