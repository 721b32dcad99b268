"""Triton reduction of flash-decoding splits (Dao et al., 2023, "Flash-Decoding for
long-context inference"): the second stage of engine/kernels/paged_decode_triton.py.

Each split of a (sequence, query head) left a running max ``m`` (log2 units), sum of
``exp2(logit - m)`` and an unnormalized output; one program per (sequence, query head)
merges its splits (online, in tiles: see ``SP_MAX``). Splits that saw no token
(``l == 0``) weigh nothing; a row with none at all gets a zero output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import decode_launch


# S (splits) changes from step to step: not specialized on. Splits are read in tiles of
# SP = next_power_of_2(S), at most SP_MAX, merged online (running max and rescale): up to
# SP_MAX splits one tile, all loads issued at once; more, a loop. Two passes over tiles of
# 32 (one kernel for any count) cost 2-8 us a step at batch 1 (H100, an A/B in one call:
# docs/BENCHMARKS.md, thirteenth session). The tile sizes are few (1 .. SP_MAX), and
# ``warm_up`` compiles them all before serving.
SP_MAX = 256


@triton.jit(do_not_specialize=["S"])
def _reduce_splits_kernel(
    pm_ptr,        # [B * Hq, S] fp32 split max (log2 units)
    pl_ptr,        # [B * Hq, S] fp32 split sumexp
    pacc_ptr,      # [B * Hq, S, D] fp32 split unnormalized output
    out_ptr,       # [B * Hq, D] output dtype
    S, SP: tl.constexpr, D: tl.constexpr,
):
    r = tl.program_id(0)
    d = tl.arange(0, D)
    g = float("-inf")                   # running max over the splits merged so far
    den = 0.0
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, S, SP):
        s = s0 + tl.arange(0, SP)
        smask = s < S
        m = tl.load(pm_ptr + r * S + s, mask=smask, other=float("-inf"))
        l = tl.load(pl_ptr + r * S + s, mask=smask, other=0.0)
        a = tl.load(pacc_ptr + (r * S + s)[:, None] * D + d[None, :], mask=smask[:, None],
                    other=0.0)
        seen = l > 0
        new = tl.maximum(g, tl.max(tl.where(seen, m, float("-inf")), axis=0))
        base = tl.where(new == float("-inf"), 0.0, new)
        scale = tl.where(g == float("-inf"), 0.0, tl.exp2(g - base))
        w = tl.where(seen, tl.exp2(m - base), 0.0)
        den = den * scale + tl.sum(w * l, axis=0)
        acc = acc * scale + tl.sum(a * w[:, None], axis=0)
        g = new
    out = acc / tl.maximum(den, 1e-30)
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty))


def _tile(S: int) -> int:
    return min(triton.next_power_of_2(max(1, S)), SP_MAX)


def reduce_splits(pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor, out: torch.Tensor,
                  launch_cache: dict | None = None) -> None:
    """pm, pl [B, Hq, S] fp32, pacc [B, Hq, S, D] fp32 -> out [B, Hq, D] (its dtype)."""
    B, Hq, S = pm.shape
    D = out.shape[-1]
    # one program per (sequence, query head)
    decode_launch.launch(_reduce_splits_kernel, (B * Hq,), (pm, pl, pacc, out, S),
                         dict(SP=_tile(S), D=D), dict(num_warps=4), launch_cache)


def warm_up(device: torch.device, D: int, dtype: torch.dtype) -> None:
    """Compile the reduction for every tile size (a few tiny launches), so that no split
    count met while serving stops a step for a compile."""
    sp = 1
    while sp <= SP_MAX:
        pm = torch.zeros(1, 1, sp, device=device)
        reduce_splits(pm, torch.ones_like(pm), torch.zeros(1, 1, sp, D, device=device),
                      torch.empty(1, 1, D, device=device, dtype=dtype))
        sp *= 2
