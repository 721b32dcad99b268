"""Triton reduction of flash-decoding splits (Dao et al., 2023, "Flash-Decoding for
long-context inference"): the second stage of engine/kernels/paged_decode_triton.py.

Each split of a (sequence, query head) left a running max ``m`` (log2 units), sum of
``exp2(logit - m)`` and an unnormalized output; one program per (sequence, query head)
merges its splits (in tiles of ``SP_TILE``: one compiled kernel for any count). Splits
that saw no token (``l == 0``) weigh nothing; a row with none at all gets a zero output.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import decode_launch


# S (splits) changes from step to step: not specialized on, and read in tiles of SP, so
# that no count of splits compiles a kernel of its own (paged_decode_triton.py)
SP_TILE = 32


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
    gm = tl.full([SP], float("-inf"), tl.float32)
    for s0 in range(0, S, SP):
        s = s0 + tl.arange(0, SP)
        gm = tl.maximum(gm, tl.load(pm_ptr + r * S + s, mask=s < S, other=float("-inf")))
    g = tl.max(gm, axis=0)
    g = tl.where(g == float("-inf"), 0.0, g)
    den = tl.zeros([SP], tl.float32)
    acc = tl.zeros([D], tl.float32)
    for s0 in range(0, S, SP):
        s = s0 + tl.arange(0, SP)
        smask = s < S
        m = tl.load(pm_ptr + r * S + s, mask=smask, other=float("-inf"))
        l = tl.load(pl_ptr + r * S + s, mask=smask, other=0.0)
        a = tl.load(pacc_ptr + (r * S + s)[:, None] * D + d[None, :], mask=smask[:, None],
                    other=0.0)
        w = tl.where(l > 0, tl.exp2(m - g), 0.0)
        den += w * l
        acc += tl.sum(a * w[:, None], axis=0)
    out = acc / tl.maximum(tl.sum(den, axis=0), 1e-30)
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty))


def reduce_splits(pm: torch.Tensor, pl: torch.Tensor, pacc: torch.Tensor, out: torch.Tensor,
                  launch_cache: dict | None = None) -> None:
    """pm, pl [B, Hq, S] fp32, pacc [B, Hq, S, D] fp32 -> out [B, Hq, D] (its dtype)."""
    B, Hq, S = pm.shape
    D = out.shape[-1]
    # one program per (sequence, query head), its splits read SP_TILE at a time
    decode_launch.launch(_reduce_splits_kernel, (B * Hq,), (pm, pl, pacc, out, S),
                         dict(SP=SP_TILE, D=D), dict(num_warps=4),
                         launch_cache)
