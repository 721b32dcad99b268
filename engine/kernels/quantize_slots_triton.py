"""Triton conversion of full-precision slots to a quantized format in place in the arena:
one launch for a batch of blocks, every layer and head, keys and values.

The torch path (``read_blocks`` to dense fp32, then ``write_blocks``: min/max fits,
rounding, packing, six scatters) runs ~100 kernels over a staging copy of the blocks for
every batch of 64 blocks (~170-240 aten ops for an int4 or int8 batch, counted with a
dispatch mode on the CPU), and a quantize move or a fill format's conversion of a
sequence's filled blocks is that many launches on the engine thread. Here one program
takes one block's head in one layer: it loads the head's keys and values from the full
slot, fits and rounds them as ``engine/kernels/quant.py`` does, and stores codes, scales
and zeros into the new slot.

Same arithmetic as the reference for the formats it takes: integer keys per channel over
the block's tokens and integer values per token over ``value_group`` channels (min/max,
scale and zero rounded to the meta dtype first, IEEE division, round half to even,
codes packed low bits first; 8-bit value codes channel-major), fp8 sides with one scale
per block and head (amax / 448, rounded to the meta dtype; codes saturated to +-448 and
converted to e4m3), full-precision sides copied, and 2-bit values by the refined fit
(clip grid and least-squares steps, ``fit_triton.fit2_tile``: the fit the torch path
runs on CUDA, so the same codes up to ties in a sum's last bits). 2-bit keys (weighted,
sink-anchored fits) are not taken: ``supported`` says no and the caller keeps the torch
path. Sources must be full-precision slots, and destinations must not overlap
the sources (the caller allocates the new slots beside the old ones).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.fit_triton import _meta, _rint, fit2_tile
from engine.kernels.quant import CLIP_STEP, CLIP_STEPS, LS_ITERS
from engine.layout import FULL, BlockGeometry, KVFormat

FP8_MAX = 448.0
_MD = {torch.float16: tl.float16, torch.float32: tl.float32}


@triton.jit
def _codes(x, s, z, QMAX: tl.constexpr):
    sd = tl.where(s > 0, s, 1.0)
    return tl.minimum(tl.maximum(_rint(tl.div_rn(x - z, sd)), 0.0), QMAX)


@triton.jit
def _e4m3(c):
    """fp32 in [-448, 448] -> its float8 e4m3fn byte, rounded to nearest even, in integer
    arithmetic (the interpreter's fp8 conversion rounds otherwise; torch's is RNE). With
    e = max(floor(log2 |c|), -6), the code step there is 2^(e-3); q = rint(|c| / step)
    (8..16 for normals, 0..8 below), and the byte is (e + 6) * 8 + q (a carry to 16 is
    the next binade's first code; below 2^-6, q is the subnormal's bits)."""
    b = c.to(tl.int32, bitcast=True)
    e = tl.maximum(((b >> 23) & 0xFF) - 127, -6)
    step_inv = ((3 - e + 127) << 23).to(tl.float32, bitcast=True)     # 2^(3 - e)
    q = _rint(tl.abs(c) * step_inv).to(tl.int32)
    return (((e + 6) * 8 + q) | ((b >> 24) & 0x80)).to(tl.uint8)


@triton.jit
def _fp8_side(a_u8, a_st, a_md, src_e, codes_b, scale_b, h,
              T: tl.constexpr, D: tl.constexpr, MS: tl.constexpr, MD: tl.constexpr,
              CHANNEL_MAJOR: tl.constexpr):
    """One head's [T, D] tile -> e4m3 codes and one scale (quant.quantize_fp8_ref)."""
    t = tl.arange(0, T)[:, None]
    d = tl.arange(0, D)[None, :]
    x = tl.load(a_st + src_e + t * D + d).to(tl.float32)
    amax = tl.max(tl.max(tl.abs(x), axis=1), axis=0)
    s = tl.div_rn(amax, 448.0).to(MD).to(tl.float32)
    sd = tl.where(s > 0, s, 1.0)
    c = _e4m3(tl.minimum(tl.maximum(tl.div_rn(x, sd), -448.0), 448.0))
    if CHANNEL_MAJOR:       # value codes: [H, D, T]
        tl.store(a_u8 + codes_b + h * (T * D) + d * T + t, c)
    else:                   # key codes: [H, T, D]
        tl.store(a_u8 + codes_b + h * (T * D) + t * D + d, c)
    tl.store(a_md + scale_b // MS + h, s.to(MD))


@triton.jit
def _copy_side(a_st, src_e, dst_e, T: tl.constexpr, D: tl.constexpr):
    t = tl.arange(0, T)[:, None]
    d = tl.arange(0, D)[None, :]
    tl.store(a_st + dst_e + t * D + d, tl.load(a_st + src_e + t * D + d))


@triton.jit
def _int_keys(a_u8, a_st, a_md, src_e, codes_b, scale_b, zero_b, h,
              T: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, MS: tl.constexpr,
              MD: tl.constexpr):
    """Keys per channel over the block's tokens (quant.quantize_keys_ref, min/max)."""
    PER: tl.constexpr = 8 // BITS
    DP: tl.constexpr = D // PER
    QMAX: tl.constexpr = (1 << BITS) - 1
    t = tl.arange(0, T)[:, None]
    j = tl.arange(0, DP)[None, :]
    packed = tl.zeros([T, DP], tl.int32)
    for i in tl.static_range(PER):
        ch = j * PER + i                              # channel i of each code byte
        x = tl.load(a_st + src_e + t * D + ch).to(tl.float32)
        lo = tl.min(x, axis=0)[None, :]
        hi = tl.max(x, axis=0)[None, :]
        s, z = _meta(tl.div_rn(hi - lo, QMAX * 1.0), lo, MD)
        packed = packed | (_codes(x, s, z, QMAX).to(tl.int32) << (i * BITS))
        tl.store(a_md + scale_b // MS + h * D + ch, s.to(MD))
        tl.store(a_md + zero_b // MS + h * D + ch, z.to(MD))
    tl.store(a_u8 + codes_b + h * (T * DP) + t * DP + j, packed.to(tl.uint8))


@triton.jit
def _int_values(a_u8, a_st, a_md, src_e, codes_b, scale_b, zero_b, h,
                T: tl.constexpr, D: tl.constexpr, G: tl.constexpr, BITS: tl.constexpr,
                MS: tl.constexpr, MD: tl.constexpr):
    """Values per token over groups of G channels (quant.quantize_values_ref, min/max);
    8-bit codes channel-major [H, D, T], narrower ones token-major [H, T, D * bits / 8]."""
    PER: tl.constexpr = 8 // BITS
    GP: tl.constexpr = G // PER
    NG: tl.constexpr = D // G
    QMAX: tl.constexpr = (1 << BITS) - 1
    t = tl.arange(0, T)[:, None, None]
    g = tl.arange(0, NG)[None, :, None]
    jj = tl.arange(0, GP)[None, None, :]
    lo = tl.full([T, NG, 1], float("inf"), tl.float32)
    hi = tl.full([T, NG, 1], float("-inf"), tl.float32)
    for i in tl.static_range(PER):        # the group's range over its PER byte lanes
        x = tl.load(a_st + src_e + t * D + g * G + jj * PER + i).to(tl.float32)
        lo = tl.minimum(lo, tl.min(x, axis=2)[:, :, None])
        hi = tl.maximum(hi, tl.max(x, axis=2)[:, :, None])
    s, z = _meta(tl.div_rn(hi - lo, QMAX * 1.0), lo, MD)
    packed = tl.zeros([T, NG, GP], tl.int32)
    for i in tl.static_range(PER):
        x = tl.load(a_st + src_e + t * D + g * G + jj * PER + i).to(tl.float32)
        packed = packed | (_codes(x, s, z, QMAX).to(tl.int32) << (i * BITS))
    if BITS == 8:
        tl.store(a_u8 + codes_b + h * (D * T) + (g * G + jj) * T + t, packed.to(tl.uint8))
    else:
        tl.store(a_u8 + codes_b + h * (T * (D // PER)) + t * (D // PER) + g * GP + jj,
                 packed.to(tl.uint8))
    meta = h * (T * NG) + t * NG + g                   # [H, T, D / G]
    tl.store(a_md + scale_b // MS + meta, s.to(MD))
    tl.store(a_md + zero_b // MS + meta, z.to(MD))


@triton.jit
def _refined_values(a_u8, a_st, a_md, src_e, codes_b, scale_b, zero_b, h,
                    T: tl.constexpr, D: tl.constexpr, G: tl.constexpr, MS: tl.constexpr,
                    MD: tl.constexpr, RB: tl.constexpr, STEPS: tl.constexpr,
                    STEP: tl.constexpr, LS: tl.constexpr):
    """2-bit values: every (token, group) row's refined fit (fit_triton.fit2_tile,
    unweighted: the clip grid and least-squares steps of quant.fit_groups), RB rows at a
    time as ``fit2`` takes them; codes token-major, four channels a byte."""
    NG: tl.constexpr = D // G
    GP: tl.constexpr = G // 4
    for r0 in range(0, T * NG, RB):
        r = r0 + tl.arange(0, RB)[:, None]            # row r: token r // NG, group r % NG
        c = tl.arange(0, G)[None, :]
        x = tl.load(a_st + src_e + r * G + c).to(tl.float32)
        _, s, z = fit2_tile(x, tl.full([RB, G], 1.0, tl.float32), MD, 3, STEPS, STEP, LS)
        j = tl.arange(0, GP)[None, :]
        packed = tl.zeros([RB, GP], tl.int32)
        for i in tl.static_range(4):
            xi = tl.load(a_st + src_e + r * G + j * 4 + i).to(tl.float32)
            packed = packed | (_codes(xi, s, z, 3).to(tl.int32) << (i * 2))
        tl.store(a_u8 + codes_b + h * (T * NG * GP) + r * GP + j, packed.to(tl.uint8))
        tl.store(a_md + scale_b // MS + h * (T * NG) + r, s.to(MD))
        tl.store(a_md + zero_b // MS + h * (T * NG) + r, z.to(MD))


@triton.jit
def _quantize_slots_kernel(
    a_u8, a_st, a_md,          # the arena, all layers flattened: bytes, store dtype, meta dtype
    src_ptr, dst_ptr,          # [N] int64 byte offsets: full-precision slot, new slot
    row_bytes,                 # bytes of one layer's arena row
    SRC_K: tl.constexpr, SRC_V: tl.constexpr,
    K0: tl.constexpr, K1: tl.constexpr, K2: tl.constexpr,     # key sections (bytes)
    V0: tl.constexpr, V1: tl.constexpr, V2: tl.constexpr,     # value sections (bytes)
    T: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr, KF8: tl.constexpr, VF8: tl.constexpr,
    ES: tl.constexpr, MS: tl.constexpr, MD: tl.constexpr, RB: tl.constexpr,
    STEPS: tl.constexpr, STEP: tl.constexpr, LS: tl.constexpr,
):
    n = tl.program_id(0)
    layer = tl.program_id(1)
    h = tl.program_id(2)
    base = layer.to(tl.int64) * row_bytes
    src = tl.load(src_ptr + n) + base
    dst = tl.load(dst_ptr + n) + base
    k_e = (src + SRC_K) // ES + h * (T * D)            # this head's keys, store elements
    v_e = (src + SRC_V) // ES + h * (T * D)
    if KB == 0:
        _copy_side(a_st, k_e, (dst + K0) // ES + h * (T * D), T, D)
    elif KF8:
        _fp8_side(a_u8, a_st, a_md, k_e, dst + K0, dst + K1, h, T, D, MS, MD, False)
    else:
        _int_keys(a_u8, a_st, a_md, k_e, dst + K0, dst + K1, dst + K2, h, T, D, KB, MS, MD)
    if VB == 0:
        _copy_side(a_st, v_e, (dst + V0) // ES + h * (T * D), T, D)
    elif VF8:
        _fp8_side(a_u8, a_st, a_md, v_e, dst + V0, dst + V1, h, T, D, MS, MD, True)
    elif VB == 2:
        _refined_values(a_u8, a_st, a_md, v_e, dst + V0, dst + V1, dst + V2, h, T, D, G, MS,
                        MD, RB, STEPS, STEP, LS)
    else:
        _int_values(a_u8, a_st, a_md, v_e, dst + V0, dst + V1, dst + V2, h, T, D, G, VB,
                    MS, MD)


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def supported(geom: BlockGeometry, fmt: KVFormat) -> bool:
    """Whether ``quantize_slots`` converts full-precision slots to ``fmt``: no 2-bit keys
    (their weighted, sink-anchored fits stay with the torch path), 2-bit values in groups
    of 4-128 channels; power-of-two tokens, head dim and value group (``tl.arange``)."""
    G = geom.value_group
    return (not fmt.is_full and fmt.k_bits != 2 and geom.meta_dtype in _MD
            and _pow2(geom.block_size) and _pow2(geom.head_dim) and _pow2(G)
            and (fmt.v_bits != 2 or 4 <= G <= 128))


def quantize_slots(arena: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                   geom: BlockGeometry, fmt: KVFormat) -> None:
    """Full-precision slots at byte offsets ``src`` -> slots of ``fmt`` at ``dst``, in
    every layer of ``arena`` (uint8 ``[L, bytes]`` or ``[bytes]``, contiguous). ``src``
    and ``dst``: [N] int64 on the arena's device; the new slots must not overlap the
    old ones. The result is ``write_blocks(arena, dst, geom, fmt, *read_blocks(arena,
    src, geom, FULL, torch.float32))``."""
    if not supported(geom, fmt):
        raise ValueError(f"quantize_slots does not take {fmt.name} for this geometry "
                         "(2-bit keys and non-power-of-two shapes take the torch path)")
    if arena.dtype != torch.uint8 or not arena.is_contiguous():
        raise ValueError("arena must be a contiguous uint8 tensor")
    N = src.numel()
    if dst.numel() != N or src.dtype != torch.int64 or dst.dtype != torch.int64:
        raise ValueError(f"src and dst must be int64 of one length, got {src.dtype} x "
                         f"{src.numel()} and {dst.dtype} x {dst.numel()}")
    if N == 0:
        return
    rows = arena.reshape(-1, arena.shape[-1])
    L, row = rows.shape
    full, s = geom.sections(FULL), geom.sections(fmt)
    kk = ("k",) if fmt.k_bits == 0 else ("k_codes", "k_scale") if fmt.k_fp8 \
        else ("k_codes", "k_scale", "k_zero")
    vv = ("v",) if fmt.v_bits == 0 else ("v_codes", "v_scale") if fmt.v_fp8 \
        else ("v_codes", "v_scale", "v_zero")
    ko = [s[n][0] for n in kk] + [0] * (3 - len(kk))
    vo = [s[n][0] for n in vv] + [0] * (3 - len(vv))
    flat = rows.reshape(-1)
    _quantize_slots_kernel[(N, L, geom.num_kv_heads)](
        flat, flat.view(geom.store_dtype), flat.view(geom.meta_dtype), src, dst, row,
        SRC_K=full["k"][0], SRC_V=full["v"][0], K0=ko[0], K1=ko[1], K2=ko[2],
        V0=vo[0], V1=vo[1], V2=vo[2], T=geom.block_size, D=geom.head_dim,
        G=geom.value_group, KB=fmt.k_bits, VB=fmt.v_bits, KF8=fmt.k_fp8, VF8=fmt.v_fp8,
        ES=geom.store_elem, MS=geom.meta_elem, MD=_MD[geom.meta_dtype],
        RB=min(geom.block_size * (geom.head_dim // geom.value_group), 1024 // geom.value_group),
        STEPS=CLIP_STEPS, STEP=CLIP_STEP, LS=LS_ITERS, num_warps=4)
