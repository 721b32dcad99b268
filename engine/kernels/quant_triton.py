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

_META = (torch.float16, torch.float32)


@triton.jit
def _quant_rows(x, lo, hi, QMAX: tl.constexpr, MD: tl.constexpr):
    """Codes (int32) and rounded scale/zero (fp32) for x given its group min/max."""
    # IEEE divisions (div_rn): '/' on the GPU is approximate, and the fp32 scale must
    # equal torch's bit for bit
    scale = tl.math.div_rn(hi - lo, tl.full(hi.shape, QMAX, tl.float32)).to(MD).to(tl.float32)
    zero = lo.to(MD).to(tl.float32)
    s = tl.where(scale > 0, scale, 1.0)  # constant group: every code 0
    c = tl.floor(tl.math.div_rn(x - zero, s) + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX).to(tl.int32)
    return c, scale, zero


@triton.jit
def _quantize_keys_kernel(
    x_ptr,       # [N * H, T, D] input (any float dtype)
    codes_ptr,   # [N * H, T, D // PER] uint8 out
    scale_ptr,   # [N * H, D] meta dtype out
    zero_ptr,    # [N * H, D] meta dtype out
    T, TP: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, MD: tl.constexpr,
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
    lo = tl.min(tl.where(tmask, x, float("inf")), axis=0)[None, :, :]        # [1, DB, PER]
    hi = tl.max(tl.where(tmask, x, float("-inf")), axis=0)[None, :, :]
    c, scale, zero = _quant_rows(x, lo, hi, QMAX, MD)
    packed = tl.sum(c << (i * BITS), axis=2).to(tl.uint8)                    # [TP, DB]
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
):
    PER: tl.constexpr = 8 // BITS
    GB: tl.constexpr = G // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    r = tl.program_id(0) * RB + tl.arange(0, RB)[:, None, None]
    j = tl.arange(0, GB)[None, :, None]
    i = tl.arange(0, PER)[None, None, :]
    rmask = r < R
    x = tl.load(x_ptr + r * G + j * PER + i, mask=rmask, other=0.0).to(tl.float32)
    lo = tl.min(tl.min(x, axis=2), axis=1)[:, None, None]                     # [RB, 1, 1]
    hi = tl.max(tl.max(x, axis=2), axis=1)[:, None, None]
    c, scale, zero = _quant_rows(x, lo, hi, QMAX, MD)
    packed = tl.sum(c << (i * BITS), axis=2).to(tl.uint8)                    # [RB, GB]
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


def quantize_keys_triton(k: torch.Tensor, bits: int, meta_dtype: torch.dtype
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """k [N, H, T, D] -> codes [N, H, T, D*bits/8] uint8, scale/zero [N, H, D] meta."""
    _check(k, "k", bits)
    N, H, T, D = k.shape
    k = k.contiguous()
    codes = torch.empty(N, H, T, D * bits // 8, dtype=torch.uint8, device=k.device)
    scale = torch.empty(N, H, D, dtype=meta_dtype, device=k.device)
    zero = torch.empty_like(scale)
    if k.numel():
        # one program per (block, head): the whole [T, D] tile, min/max over T in registers
        _quantize_keys_kernel[(N * H,)](k, codes, scale, zero, T, TP=triton.next_power_of_2(T),
                                        D=D, BITS=bits, MD=_meta_dt(meta_dtype), num_warps=4)
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
        _quantize_rows_kernel[(triton.cdiv(R, RB),)](v, codes, scale, zero, R, RB=RB, G=group,
                                                     BITS=bits, MD=_meta_dt(meta_dtype),
                                                     num_warps=4)
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
