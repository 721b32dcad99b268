"""Triton block quantize / dequantize (KIVI, Liu et al. 2024), matching engine/kernels/quant.py.

Keys are quantized per channel over a block's T tokens, values per token over groups of
G channels; codes pack ``8 // bits`` channels per byte, low bits first (engine/layout.py).
One program handles one (block, kv head) tile. Tiles are addressed as
``[rows, bytes, 8 // bits]`` so that packing and unpacking is a shift per lane and a sum
over the last axis (no in-register shuffles). Codes round half up (``floor(x + 0.5)``)
where torch rounds half to even: ties may differ by one step.

Shapes: ``[N, H, T, D]`` blocks, like the references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.quant import CLIP_STEP, CLIP_STEPS, KEY_WEIGHT_EPS, LS_ITERS, REFINED_BITS

_META = (torch.float16, torch.float32)


@triton.jit
def _gred(x, OP: tl.constexpr, KEYS: tl.constexpr):
    """Reduce over the quantization group, keeping dims: keys tiles are
    ``[TP, DB, PER]`` grouped over axis 0 (tokens), value tiles ``[RB, GB, PER]`` over
    axes 1 and 2 (a row's channels). OP: 0 sum, 1 min, 2 max."""
    if KEYS:
        if OP == 0:
            r = tl.sum(x, axis=0)[None, :, :]
        elif OP == 1:
            r = tl.min(x, axis=0)[None, :, :]
        else:
            r = tl.max(x, axis=0)[None, :, :]
    else:
        if OP == 0:
            r = tl.sum(tl.sum(x, axis=2), axis=1)[:, None, None]
        elif OP == 1:
            r = tl.min(tl.min(x, axis=2), axis=1)[:, None, None]
        else:
            r = tl.max(tl.max(x, axis=2), axis=1)[:, None, None]
    return r


@triton.jit
def _div(a, b):
    # IEEE divisions (div_rn): '/' on the GPU is approximate, and the fp32 scale must
    # equal torch's bit for bit where no choice between candidates intervenes
    return tl.math.div_rn(a, b + tl.zeros_like(a))


@triton.jit
def _assign(x, w, scale, zero, QMAX: tl.constexpr, KEYS: tl.constexpr):
    """Nearest codes (fp32) for meta-rounded scale/zero, and the group's weighted squared
    error (``w``: the fit's weights, 0 for padding)."""
    s = tl.where(scale > 0, scale, 1.0)  # constant group: every code 0
    c = tl.floor(_div(x - zero, s) + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    e = c * scale + zero - x
    return c, _gred(w * e * e, 0, KEYS)


@triton.jit
def _better(c, scale, zero, err, c2, s2, z2, e2):
    """Per group, the candidate (codes, scale, zero, error) with the lower error."""
    m = e2 < err
    return (tl.where(m, c2, c), tl.where(m, s2, scale), tl.where(m, z2, zero),
            tl.where(m, e2, err))


@triton.jit
def _fit(x, w, QMAX: tl.constexpr, MD: tl.constexpr, KEYS: tl.constexpr,
         CLIP_STEPS: tl.constexpr, CLIP_STEP: tl.constexpr, LS_ITERS: tl.constexpr):
    """Codes (fp32), scale, zero (fp32, meta-rounded) of each group: min/max, then (if
    CLIP_STEPS > 1) the best of the clipped ranges, then LS_ITERS least-squares steps,
    each kept where it lowers the ``w``-weighted squared error (quant.py, fit_groups).
    Min/max ignore elements of weight 0 (padding)."""
    lo = _gred(tl.where(w > 0, x, float("inf")), 1, KEYS)
    hi = _gred(tl.where(w > 0, x, float("-inf")), 2, KEYS)
    scale = _div(hi - lo, QMAX).to(MD).to(tl.float32)
    zero = lo.to(MD).to(tl.float32)
    c, err = _assign(x, w, scale, zero, QMAX, KEYS)
    if CLIP_STEPS > 1:
        r = hi - lo
        for ia in tl.static_range(CLIP_STEPS):
            for ib in tl.static_range(CLIP_STEPS):
                if ia + ib > 0:
                    l2 = lo + (ia * CLIP_STEP) * r
                    h2 = hi - (ib * CLIP_STEP) * r
                    s2 = _div(h2 - l2, QMAX).to(MD).to(tl.float32)
                    z2 = l2.to(MD).to(tl.float32)
                    c2, e2 = _assign(x, w, s2, z2, QMAX, KEYS)
                    c, scale, zero, err = _better(c, scale, zero, err, c2, s2, z2, e2)
    if LS_ITERS > 0:
        sw = _gred(w, 0, KEYS)
        xm = _div(_gred(w * x, 0, KEYS), sw)
        for _ in tl.static_range(LS_ITERS):
            cm = _div(_gred(w * c, 0, KEYS), sw)
            dc = c - cm
            var = _gred(w * dc * dc, 0, KEYS)
            cov = _gred(w * dc * (x - xm), 0, KEYS)
            ok = var > 0
            s2 = tl.maximum(tl.where(ok, _div(cov, tl.where(ok, var, 1.0)), scale), 0.0)
            z2 = tl.where(ok, xm - s2 * cm, zero)
            s2 = s2.to(MD).to(tl.float32)
            z2 = z2.to(MD).to(tl.float32)
            c2, e2 = _assign(x, w, s2, z2, QMAX, KEYS)
            c, scale, zero, err = _better(c, scale, zero, err, c2, s2, z2, e2)
    return c, scale, zero


@triton.jit
def _fit_anchored(x, w, x0, QMAX: tl.constexpr, MD: tl.constexpr):
    """Keys only: the grid with token 0 (``x0`` [1, DB, PER]) on a code level
    (engine/kernels/quant.py, fit_anchored)."""
    lo = _gred(tl.where(w > 0, x, float("inf")), 1, True)
    hi = _gred(tl.where(w > 0, x, float("-inf")), 2, True)
    best_s = tl.full(lo.shape, float("inf"), tl.float32)
    best_z = x0
    for c0 in tl.static_range(QMAX + 1):
        s = tl.zeros_like(lo)
        if c0 > 0:
            s = tl.maximum(s, _div(x0 - lo, c0 * 1.0))
        else:
            s = tl.where(x0 > lo, float("inf"), s)
        if c0 < QMAX:
            s = tl.maximum(s, _div(hi - x0, (QMAX - c0) * 1.0))
        else:
            s = tl.where(x0 < hi, float("inf"), s)
        m = s < best_s
        best_z = tl.where(m, x0 - c0 * tl.where(m, s, 0.0), best_z)   # (no 0 * inf)
        best_s = tl.where(m, s, best_s)
    scale = best_s.to(MD).to(tl.float32)
    zero = best_z.to(MD).to(tl.float32)
    c, _e = _assign(x, w, scale, zero, QMAX, True)
    return c, scale, zero


@triton.jit
def _quantize_keys_kernel(
    x_ptr,       # [N * H, T, D] input (any float dtype)
    anchor_ptr,  # [N] int8: 1 = the block's token 0 is the sequence's first (2 bits)
    codes_ptr,   # [N * H, T, D // PER] uint8 out
    scale_ptr,   # [N * H, D] meta dtype out
    zero_ptr,    # [N * H, D] meta dtype out
    T, H, TP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, MD: tl.constexpr,
    CLIP_STEPS: tl.constexpr, CLIP_STEP: tl.constexpr, LS_ITERS: tl.constexpr,
    KEY_WEIGHT_EPS: tl.constexpr, ANCHOR: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    nh = tl.program_id(0)
    t = tl.arange(0, TP)[:, None, None]
    j = tl.arange(0, DB)[None, :, None]
    i = tl.arange(0, PER)[None, None, :]
    tmask = t < T
    x = tl.load(x_ptr + nh * T * D + t * D + j * PER + i, mask=tmask, other=0.0).to(tl.float32)
    w = tl.where(tmask, 1.0, 0.0)
    if LS_ITERS > 0:
        # key_weights (quant.py): distance from the channel mean in units of its mean
        n = _gred(w, 0, True)
        dev = tl.abs(x - _div(_gred(x * w, 0, True), n)) * w
        mad = _div(_gred(dev, 0, True), n)
        w = (_div(dev, tl.where(mad > 0, mad, 1.0)) + KEY_WEIGHT_EPS) * w
    c, scale, zero = _fit(x, w, QMAX, MD, True, CLIP_STEPS, CLIP_STEP, LS_ITERS)
    if ANCHOR:
        x0 = tl.load(x_ptr + nh * T * D + j * PER + i).to(tl.float32)           # [1, DB, PER]
        ca, sa, za = _fit_anchored(x, w, x0, QMAX, MD)
        a = tl.load(anchor_ptr + nh // H) != 0
        c = tl.where(a, ca, c)
        scale = tl.where(a, sa, scale)
        zero = tl.where(a, za, zero)
    packed = tl.sum(c.to(tl.int32) << (i * BITS), axis=2).to(tl.uint8)      # [TP, DB]
    tt = tl.arange(0, TP)[:, None]
    jj = tl.arange(0, DB)[None, :]
    tl.store(codes_ptr + nh * T * DB + tt * DB + jj, packed, mask=tt < T)
    tl.store(scale_ptr + nh * D + j * PER + i, scale.to(MD))
    tl.store(zero_ptr + nh * D + j * PER + i, zero.to(MD))


@triton.jit
def _quantize_rows_kernel(
    x_ptr,       # [N * H * T * NG, G] input: value groups as rows
    codes_ptr,   # [N * H * T * NG, G // PER] uint8 out
    scale_ptr,   # [N * H * T * NG] meta dtype out
    zero_ptr,    # [N * H * T * NG] meta dtype out
    R, RB: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr, MD: tl.constexpr,
    CLIP_STEPS: tl.constexpr, CLIP_STEP: tl.constexpr, LS_ITERS: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    r = tl.program_id(0) * RB + tl.arange(0, RB)[:, None, None]
    j = tl.arange(0, GB)[None, :, None]
    i = tl.arange(0, PER)[None, None, :]
    rmask = r < R
    x = tl.load(x_ptr + r * G + j * PER + i, mask=rmask, other=0.0).to(tl.float32)
    w = tl.full(x.shape, 1.0, tl.float32)   # masked rows are whole groups: never stored
    c, scale, zero = _fit(x, w, QMAX, MD, False, CLIP_STEPS, CLIP_STEP, LS_ITERS)
    packed = tl.sum(c.to(tl.int32) << (i * BITS), axis=2).to(tl.uint8)      # [RB, GB]
    rr = tl.program_id(0) * RB + tl.arange(0, RB)
    tl.store(codes_ptr + rr[:, None] * GB + tl.arange(0, GB)[None, :], packed,
             mask=rr[:, None] < R)
    tl.store(scale_ptr + rr, tl.reshape(scale, (RB,)).to(MD), mask=rr < R)
    tl.store(zero_ptr + rr, tl.reshape(zero, (RB,)).to(MD), mask=rr < R)


@triton.jit
def _dequantize_kernel(
    codes_ptr,   # [rows, C // PER] uint8, rows = N*H*T, C = D
    scale_ptr,   # keys: [N * H, D]; values: [N * H * T, D // G] (meta dtype)
    zero_ptr,    # same shape as scale_ptr
    out_ptr,     # [rows, C] out dtype
    ROWS, T, RB: tl.constexpr, C: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
    PER_CHANNEL: tl.constexpr,
):
    PER: tl.constexpr = 8 // BITS
    CB: tl.constexpr = C // PER
    r = tl.program_id(0) * RB + tl.arange(0, RB)[:, None, None]
    j = tl.arange(0, CB)[None, :, None]
    i = tl.arange(0, PER)[None, None, :]
    rmask = r < ROWS
    raw = tl.load(codes_ptr + r * CB + j, mask=rmask, other=0).to(tl.int32)   # [RB, CB, 1]
    c = ((raw >> (i * BITS)) & ((1 << BITS) - 1)).to(tl.float32)              # [RB, CB, PER]
    d = j * PER + i
    if PER_CHANNEL:
        m = (r // T) * C + d                      # keys: scale per (block, head, channel)
    else:
        m = r * (C // G) + d // G                 # values: scale per (token, group)
    sc = tl.load(scale_ptr + m, mask=rmask, other=0.0).to(tl.float32)
    zr = tl.load(zero_ptr + m, mask=rmask, other=0.0).to(tl.float32)
    x = c * sc + zr
    tl.store(out_ptr + r * C + d, x.to(out_ptr.dtype.element_ty), mask=rmask)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _check(x: torch.Tensor, name: str, bits: int, group: int | None = None) -> None:
    if x.dim() != 4:
        raise ValueError(f"{name} must be [N, H, T, D], got {tuple(x.shape)}")
    if bits not in (8, 4, 2):
        raise ValueError(f"bits must be 8, 4 or 2, got {bits}")
    D = x.shape[-1] if name != "codes" else x.shape[-1] * 8 // bits
    if not _pow2(D) or (group is not None and (not _pow2(group) or D % group)):
        raise ValueError(f"Triton quant needs power-of-two head_dim / group, got D={D}, "
                         f"group={group}")


def _meta_dt(meta_dtype: torch.dtype):
    if meta_dtype not in _META:
        raise ValueError(f"meta dtype must be fp16 or fp32, got {meta_dtype}")
    return tl.float16 if meta_dtype == torch.float16 else tl.float32


def quantize_keys_triton(k: torch.Tensor, bits: int, meta_dtype: torch.dtype,
                         anchor: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [N, H, T, D] -> codes [N, H, T, D*bits/8] uint8, scale/zero [N, H, D] meta.

    ``anchor``: [N] bool, blocks whose token 0 is the sequence's first (quant.py)."""
    _check(k, "k", bits)
    N, H, T, D = k.shape
    if anchor is not None and tuple(anchor.shape) != (N,):
        raise ValueError(f"anchor must be [N] = [{N}], got {tuple(anchor.shape)}")
    k = k.contiguous()
    codes = torch.empty(N, H, T, D * bits // 8, dtype=torch.uint8, device=k.device)
    scale = torch.empty(N, H, D, dtype=meta_dtype, device=k.device)
    zero = torch.empty_like(scale)
    refine = bits in REFINED_BITS
    use_anchor = refine and anchor is not None
    flags = (anchor.to(device=k.device, dtype=torch.int8).contiguous() if use_anchor
             else torch.zeros(1, dtype=torch.int8, device=k.device))
    if k.numel():
        # one program per (block, head): the whole [T, D] tile, the fit over T in registers
        _quantize_keys_kernel[(N * H,)](k, flags, codes, scale, zero, T, H,
                                        TP=triton.next_power_of_2(T), D=D, BITS=bits,
                                        MD=_meta_dt(meta_dtype),
                                        CLIP_STEPS=CLIP_STEPS if refine else 1,
                                        CLIP_STEP=CLIP_STEP, LS_ITERS=LS_ITERS if refine else 0,
                                        KEY_WEIGHT_EPS=KEY_WEIGHT_EPS, ANCHOR=use_anchor,
                                        num_warps=4)
    return codes, scale, zero


def quantize_values_triton(v: torch.Tensor, bits: int, group: int, meta_dtype: torch.dtype
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """v [N, H, T, D] -> codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group]."""
    _check(v, "v", bits, group)
    N, H, T, D = v.shape
    v = v.contiguous()
    codes = torch.empty(N, H, T, D * bits // 8, dtype=torch.uint8, device=v.device)
    scale = torch.empty(N, H, T, D // group, dtype=meta_dtype, device=v.device)
    zero = torch.empty_like(scale)
    R = N * H * T * (D // group)
    if R:
        RB = 64  # 64 groups a program: a 16 KiB fp32 tile at G = 64
        refine = bits in REFINED_BITS
        _quantize_rows_kernel[(triton.cdiv(R, RB),)](
            v, codes, scale, zero, R, RB=RB, G=group, BITS=bits, MD=_meta_dt(meta_dtype),
            CLIP_STEPS=CLIP_STEPS if refine else 1, CLIP_STEP=CLIP_STEP,
            LS_ITERS=LS_ITERS if refine else 0, num_warps=4)
    return codes, scale, zero


def _dequantize(codes, scale, zero, bits, out_dtype, group, per_channel):
    _check(codes, "codes", bits, group)
    N, H, T, CB = codes.shape
    D = CB * 8 // bits
    out = torch.empty(N, H, T, D, dtype=out_dtype, device=codes.device)
    rows = N * H * T
    if rows:
        RB = 32  # rows (tokens) a program
        _dequantize_kernel[(triton.cdiv(rows, RB),)](
            codes.contiguous(), scale.contiguous(), zero.contiguous(), out, rows, T, RB=RB,
            C=D, G=group or D, BITS=bits, PER_CHANNEL=per_channel, num_warps=4)
    return out


def dequantize_keys_triton(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                           bits: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, D] -> [N, H, T, D]."""
    N, H, T, _ = codes.shape
    if scale.shape != (N, H, codes.shape[-1] * 8 // bits) or zero.shape != scale.shape:
        raise ValueError(f"scale/zero must be [N, H, D], got {tuple(scale.shape)}")
    return _dequantize(codes, scale, zero, bits, out_dtype, None, True)


def dequantize_values_triton(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor,
                             bits: int, group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """codes [N, H, T, D*bits/8], scale/zero [N, H, T, D/group] -> [N, H, T, D]."""
    N, H, T, CB = codes.shape
    if scale.shape != (N, H, T, CB * 8 // bits // group) or zero.shape != scale.shape:
        raise ValueError(f"scale/zero must be [N, H, T, D/group], got {tuple(scale.shape)}")
    return _dequantize(codes, scale, zero, bits, out_dtype, group, False)
