"""Triton fit of 2-bit groups: ``quant.fit_groups`` with the clip grid and least-squares
steps (``REFINED_BITS``), every candidate evaluated in registers.

The torch version runs each of its 57 candidates (min/max, 48 clipped ranges, 8
least-squares steps) as ~10 elementwise passes over the whole batch: on an H100 a 2-bit
conversion of a block of an 8B model (1M elements over 32 layers) reads and writes ~4.6
GB, ~1.8 ms a block. A 1,000-block int2 move then held the engine thread for seconds and
a k4v2 prompt's 8,192-token chunk took ~0.5 s more to write (docs/BENCHMARKS.md,
thirteenth session: adaptive's prompt steps 39.4 s against int4's 21.7). Here one
program loads a tile of groups once, tries every candidate on them and writes codes,
scale and zero.

Same arithmetic as the reference (meta-rounded scale/zero, round half to even, IEEE
division, strict improvement); its sums run in another order, so where two candidates'
errors tie to the last bits the other one may be kept (tests compare errors, not codes).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.quant import CLIP_STEP, CLIP_STEPS, LS_ITERS

ROWS = 32         # groups a program fits (fewer for groups over 32: ~1K elements a tile)
_MD = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _rint(y):
    """Round half to even (torch.round)."""
    f = tl.floor(y)
    d = y - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    return tl.where(d > 0.5, f + 1.0, tl.where(d < 0.5, f, tl.where(odd, f + 1.0, f)))


@triton.jit
def _bf16(x):
    """fp32 -> the nearest bf16 (ties to even) as fp32, in integer arithmetic: the same
    on the GPU and in the interpreter (whose bf16 cast truncates)."""
    b = x.to(tl.uint32, bitcast=True)
    b = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) << 16
    return b.to(tl.float32, bitcast=True)


@triton.jit
def _meta(s, z, MD: tl.constexpr):
    if MD == tl.bfloat16:
        return _bf16(s), _bf16(z)
    else:
        return s.to(MD).to(tl.float32), z.to(MD).to(tl.float32)


@triton.jit
def _assign(x, w, s, z, QMAX: tl.constexpr):
    sd = tl.where(s > 0, s, 1.0)
    c = tl.minimum(tl.maximum(_rint(tl.div_rn(x - z, sd)), 0.0), QMAX)
    e = c * s + z - x
    return c, tl.sum(w * e * e, axis=1)[:, None]


@triton.jit
def fit2_tile(x, w, MD: tl.constexpr, QMAX: tl.constexpr, STEPS: tl.constexpr,
              STEP: tl.constexpr, LS: tl.constexpr):
    """The fit of a tile of groups ``x [rows, n]`` (fp32, weights ``w``): codes (fp32
    integers), scale and zero ``[rows, 1]`` (meta-rounded). Also the slot conversion's
    2-bit values (engine/kernels/quantize_slots_triton.py)."""
    lo = tl.min(x, axis=1)[:, None]
    hi = tl.max(x, axis=1)[:, None]
    bs, bz = _meta(tl.div_rn(hi - lo, QMAX * 1.0), lo, MD)
    bc, be = _assign(x, w, bs, bz, QMAX)
    r = hi - lo
    for ia in tl.static_range(STEPS):
        for ib in tl.static_range(STEPS):
            if ia + ib > 0:
                l2 = lo + (ia * STEP) * r
                h2 = hi - (ib * STEP) * r
                s2, z2 = _meta(tl.div_rn(h2 - l2, QMAX * 1.0), l2, MD)
                c2, e2 = _assign(x, w, s2, z2, QMAX)
                m = e2 < be
                bc, bs, bz, be = (tl.where(m, c2, bc), tl.where(m, s2, bs),
                                  tl.where(m, z2, bz), tl.where(m, e2, be))
    sw = tl.sum(w, axis=1)[:, None]
    xm = tl.div_rn(tl.sum(w * x, axis=1)[:, None], sw)
    for _ in tl.static_range(LS):
        cm = tl.div_rn(tl.sum(w * bc, axis=1)[:, None], sw)
        dc = bc - cm
        var = tl.sum(w * dc * dc, axis=1)[:, None]
        cov = tl.sum(w * dc * (x - xm), axis=1)[:, None]
        ok = var > 0
        s2 = tl.maximum(tl.where(ok, tl.div_rn(cov, tl.where(ok, var, 1.0)), bs), 0.0)
        s2, z2 = _meta(s2, tl.where(ok, xm - s2 * cm, bz), MD)
        c2, e2 = _assign(x, w, s2, z2, QMAX)
        m = e2 < be
        bc, bs, bz, be = (tl.where(m, c2, bc), tl.where(m, s2, bs),
                          tl.where(m, z2, bz), tl.where(m, e2, be))
    return bc, bs, bz


@triton.jit
def _fit2_kernel(g_ptr, w_ptr, c_ptr, s_ptr, z_ptr, R,
                 N: tl.constexpr, BR: tl.constexpr, WEIGHTED: tl.constexpr,
                 MD: tl.constexpr, QMAX: tl.constexpr, STEPS: tl.constexpr,
                 STEP: tl.constexpr, LS: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    cols = tl.arange(0, N)
    rm = (rows < R)[:, None]
    off = rows[:, None] * N + cols[None, :]
    x = tl.load(g_ptr + off, mask=rm, other=0.0)
    if WEIGHTED:
        w = tl.load(w_ptr + off, mask=rm, other=1.0)
    else:
        w = tl.full([BR, N], 1.0, tl.float32)
    bc, bs, bz = fit2_tile(x, w, MD, QMAX, STEPS, STEP, LS)
    tl.store(c_ptr + off, bc.to(tl.uint8), mask=rm)
    rmask = rows < R
    tl.store(s_ptr + rows, tl.sum(bs, axis=1), mask=rmask)
    tl.store(z_ptr + rows, tl.sum(bz, axis=1), mask=rmask)


def supported(g: torch.Tensor, bits: int, meta_dtype: torch.dtype) -> bool:
    """Whether ``fit2`` takes these groups (2 bits, power-of-two group length <= 128)."""
    n = g.shape[-1]
    return bits == 2 and meta_dtype in _MD and 1 < n <= 128 and n & (n - 1) == 0


def fit2(g: torch.Tensor, meta_dtype: torch.dtype, w: torch.Tensor | None = None
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``quant.fit_groups(g, 2, meta_dtype, clip=True, ls_iters=LS_ITERS, w=w)``: codes
    (fp32 integers, ``g``'s shape) and fp32 scale/zero ``[..., 1]``."""
    if not supported(g, 2, meta_dtype):
        raise ValueError(f"fit2 takes 2-bit power-of-two groups up to 128, not {g.shape}")
    shape, n = g.shape, g.shape[-1]
    x = g.float().reshape(-1, n).contiguous()
    R = x.shape[0]
    c = torch.empty(R, n, dtype=torch.uint8, device=g.device)
    s = torch.empty(R, dtype=torch.float32, device=g.device)
    z = torch.empty(R, dtype=torch.float32, device=g.device)
    if R:
        wt = x if w is None else w.float().reshape(-1, n).contiguous()
        rows = min(ROWS, 1024 // n)
        _fit2_kernel[(triton.cdiv(R, rows),)](
            x, wt, c, s, z, R, N=n, BR=rows, WEIGHTED=w is not None, MD=_MD[meta_dtype],
            QMAX=3, STEPS=CLIP_STEPS, STEP=CLIP_STEP, LS=LS_ITERS, num_warps=4)
    return (c.reshape(shape).float(), s.reshape(*shape[:-1], 1),
            z.reshape(*shape[:-1], 1))
