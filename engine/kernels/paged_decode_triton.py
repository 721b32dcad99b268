"""Triton flash-decoding over paged, mixed-format KV blocks (semantics of paged_decode_ref).

Grid ``(B, H, num_splits)``: a program owns one sequence, one kv head and a contiguous
range of its block table, and serves all ``Hq // H`` query heads of that kv head at
once (padded to 16 rows so QK^T and PV run as ``tl.dot``). Per block it writes the
flash-decoding partials ``block_max`` / ``block_sumexp``; per split it writes a running
(max, sumexp, unnormalized output) that a second kernel reduces (Dao et al., 2023,
"Flash-Decoding for long-context inference").

Quantized blocks are read as codes plus scale/zero (fewer bytes: the point of
quantizing) and dequantized in registers; codes become floats with the magic-number
trick (``0x4B000000 | c`` read as fp32 is ``2^23 + c``) instead of slow int->float
conversions. Formats are either one per launch (``fmt=``: compile-time, several blocks
per loop iteration) or read per block from ``block_kbits`` / ``block_vbits`` (runtime
branches, one block per iteration).

``fold=True`` (experimental, slower as measured so far: docs/BENCHMARKS.md) folds the key
dequantization out of the inner loop instead — ``q.k = (q*s).c + q.z`` per block, codes
fed to ``tl.dot`` as exact fp16 — and converts codes with a few PTX instructions per four
bytes (``prmt`` under an fp16 exponent) on CUDA.

Every arithmetic operation is fp32; tiles are fed to ``tl.dot`` in the store dtype
(fp16 / bf16, fp32 with IEEE precision for fp32 stores). Slot offsets must be multiples
of 16 bytes (engine/layout.py guarantees it).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.layout import BlockGeometry, KVFormat

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, acc=None):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _code_f32(c):
    # int code (< 2^23) -> fp32 without an int->float conversion: bits 0x4B000000 | c
    # read as fp32 are 2^23 + c exactly
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _codes_to(c, DT: tl.constexpr):
    """Integer codes (0..255, any int dtype) -> DT, exactly. fp16: 0x6400 | c read as fp16
    is 1024 + c (no int->float conversion instruction); others: the fp32 magic number."""
    if DT == tl.float16:
        return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return _code_f32(c.to(tl.int32)).to(DT)


def _u8_asm(shift: int, bits: int) -> str:
    """PTX: four uint8 in $2 -> four fp16 codes ((byte >> shift) & mask) in $0, $1."""
    pre = "mov.b32 x, $2;" if bits == 8 else \
        f"shr.b32 x, $2, {shift}; and.b32 x, x, {((1 << bits) - 1) * 0x01010101};"
    return ("{ .reg .b32 x, t0, t1, m; " + pre +
            " mov.b32 m, 0x64646464; prmt.b32 t0, x, m, 0x4140; prmt.b32 t1, x, m, 0x4342;"
            " mov.b32 m, 0x64006400; sub.f16x2 $0, t0, m; sub.f16x2 $1, t1, m; }")


_ASM_U8 = tl.constexpr((_u8_asm(0, 8),))
_ASM_U4 = tl.constexpr(tuple(_u8_asm(4 * j, 4) for j in range(2)))
_ASM_U2 = tl.constexpr(tuple(_u8_asm(2 * j, 2) for j in range(4)))


@triton.jit
def _u8_codes(raw, SHIFT: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
              ASM: tl.constexpr):
    """Codes ``(raw >> SHIFT) & (2^BITS - 1)`` of a uint8 tile, as DT (exact).

    ASM (CUDA, fp16): PTX on four bytes at once: shift/mask, then prmt puts each byte
    under an fp16 exponent (0x64XX is 1024 + XX) and one packed subtraction removes the
    1024 — two instructions per two codes instead of byte extraction, packing and
    conversion one by one. Otherwise plain Triton (the interpreter cannot run PTX)."""
    if ASM:
        if BITS == 8:
            asm: tl.constexpr = _ASM_U8[0]
        elif BITS == 4:
            asm: tl.constexpr = _ASM_U4[SHIFT // 4]
        else:
            asm: tl.constexpr = _ASM_U2[SHIFT // 2]
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [raw], dtype=tl.float16,
                                         is_pure=True, pack=4)
    else:
        if BITS == 8:
            c = raw
        else:
            c = (raw >> SHIFT) & ((1 << BITS) - 1)
        return _codes_to(c, DT)


_ASM_W8 = tl.constexpr(
    "{ .reg .b32 t0, t1, m; mov.b32 m, 0x64646464; prmt.b32 t0, $4, m, 0x4140;"
    " prmt.b32 t1, $4, m, 0x4342; mov.b32 m, 0x64006400; sub.f16x2 t0, t0, m;"
    " sub.f16x2 t1, t1, m; mov.b32 {$0, $1}, t0; mov.b32 {$2, $3}, t1; }")
_ASM_W4 = tl.constexpr(
    "{ .reg .b32 x, t0, t1, t2, t3, m, s; and.b32 x, $8, 0x0F0F0F0F; mov.b32 m, 0x64646464;"
    " prmt.b32 t0, x, m, 0x4140; prmt.b32 t1, x, m, 0x4342; shr.b32 x, $8, 4;"
    " and.b32 x, x, 0x0F0F0F0F; prmt.b32 t2, x, m, 0x4140; prmt.b32 t3, x, m, 0x4342;"
    " mov.b32 s, 0x64006400; sub.f16x2 t0, t0, s; sub.f16x2 t1, t1, s; sub.f16x2 t2, t2, s;"
    " sub.f16x2 t3, t3, s; mov.b32 {$0, $1}, t0; mov.b32 {$2, $3}, t1;"
    " mov.b32 {$4, $5}, t2; mov.b32 {$6, $7}, t3; }")


@triton.jit
def _word_codes(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words [..., W] of packed codes -> exact fp16 codes [..., W * 32 / BITS], in
    memory order (BITS 8: byte k of word i is element 4 i + k; BITS 4: the low nibble of
    byte k is element 8 i + 2 k, the high one 8 i + 2 k + 1). ASM: PTX per word (prmt
    under an fp16 exponent, one sub.f16x2 per two codes); else plain Triton."""
    # the order of the PTX outputs is checked by tests/kernels/test_ptx_strings.py
    if BITS == 8:
        if ASM:
            e0, e1, e2, e3 = tl.inline_asm_elementwise(
                _ASM_W8, "=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
        else:
            e0 = _codes_to(w & 255, tl.float16)
            e1 = _codes_to((w >> 8) & 255, tl.float16)
            e2 = _codes_to((w >> 16) & 255, tl.float16)
            e3 = _codes_to((w >> 24) & 255, tl.float16)
        # join(x, y) adds a minor axis: element 2 i + j of the pair axis is join level j
        # (outer) of level i (inner), so the inner joins pair elements two apart
        c = tl.join(tl.join(e0, e2), tl.join(e1, e3))
        return tl.reshape(c, c.shape[:-3] + (c.shape[-3] * 4,))
    else:
        if ASM:
            e0, e2, e4, e6, e1, e3, e5, e7 = tl.inline_asm_elementwise(
                _ASM_W4, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 8,
                is_pure=True, pack=1)
        else:
            e0 = _codes_to(w & 15, tl.float16)
            e1 = _codes_to((w >> 4) & 15, tl.float16)
            e2 = _codes_to((w >> 8) & 15, tl.float16)
            e3 = _codes_to((w >> 12) & 15, tl.float16)
            e4 = _codes_to((w >> 16) & 15, tl.float16)
            e5 = _codes_to((w >> 20) & 15, tl.float16)
            e6 = _codes_to((w >> 24) & 15, tl.float16)
            e7 = _codes_to((w >> 28) & 15, tl.float16)
        c = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)),
                    tl.join(tl.join(e1, e5), tl.join(e3, e7)))
        return tl.reshape(c, c.shape[:-4] + (c.shape[-4] * 8,))


@triton.jit
def _byte_codes(raw, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """uint8 tile [..., C] of packed codes -> exact DT codes [..., C, 8 // BITS] in memory
    order (BITS 8: [..., C]); the caller reshapes the last two axes into one."""
    if BITS == 8:
        c = _u8_codes(raw, 0, 8, DT, ASM)
    elif BITS == 4:
        c = tl.join(_u8_codes(raw, 0, 4, DT, ASM), _u8_codes(raw, 4, 4, DT, ASM))
    else:
        c = tl.join(tl.join(_u8_codes(raw, 0, 2, DT, ASM), _u8_codes(raw, 4, 2, DT, ASM)),
                    tl.join(_u8_codes(raw, 2, 2, DT, ASM), _u8_codes(raw, 6, 2, DT, ASM)))
    return c


@triton.jit
def _split_codes(raw, BITS: tl.constexpr):
    """raw [..., C] uint8 -> int32 [..., C, 8 // BITS] codes (low bits first); BITS 8: [..., C]."""
    x = raw.to(tl.int32)
    if BITS == 8:
        out = x
    elif BITS == 4:
        out = tl.join(x & 15, x >> 4)
    else:
        out = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6))
    return out


@triton.jit
def _unpack(raw, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr, FAST: tl.constexpr):
    """uint8 tile [..., C] of packed codes -> codes [..., C, 8 // BITS] in memory order
    (BITS 8: [..., C]): exact DT when FAST (_byte_codes), else int32 (_split_codes)."""
    if FAST:
        c = _byte_codes(raw, BITS, DT, ASM)
    else:
        c = _split_codes(raw, BITS)
    return c


@triton.jit
def _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh,
            BITS: tl.constexpr, NBI: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
            H: tl.constexpr, ESIZE: tl.constexpr, MSIZE: tl.constexpr,
            DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
            FAST: tl.constexpr = False, ASM: tl.constexpr = False, WORDS: tl.constexpr = 0):
    """q.k of NBI blocks' keys: [GP, NBI * T] fp32 (unscaled; invalid tokens unmasked).

    FAST (fp16 dot operands): codes become exact fp16 (PTX when ASM) and are dequantized
    with one packed fp16 fma per two elements, as the values are; else fp32 arithmetic."""
    t3 = tl.arange(0, T)[None, :, None]                            # [1, T, 1]
    off3 = off[:, None, None]                                      # [NBI, 1, 1] slot bytes
    valid3 = t3 < ntok[:, None, None]                              # [NBI, T, 1]
    if BITS == 0:
        d3 = tl.arange(0, D)[None, None, :]
        e0 = tl.multiple_of(off // ESIZE, 16 // ESIZE)                   # [NBI] elements
        e = e0[:, None, None] + kvh * T * D + t3 * D + d3
        k = tl.load(arena_st + e, mask=valid3, other=0.0)            # [NBI, T, D]
        if UPCAST:
            k = k.to(tl.float32).to(DT)
    else:
        PER: tl.constexpr = 8 // BITS
        DB: tl.constexpr = D // PER                                  # code bytes per row
        CODE_BYTES: tl.constexpr = (H * T * DB + 15) // 16 * 16
        META_BYTES: tl.constexpr = (H * D * MSIZE + 15) // 16 * 16
        j3 = tl.arange(0, DB)[None, None, :]
        d3 = tl.arange(0, D)[None, None, :]
        has = ntok[:, None, None] > 0
        m0 = tl.multiple_of((off + CODE_BYTES) // MSIZE, 16 // MSIZE)    # [NBI] elements
        m_el = m0[:, None, None] + kvh * D + d3
        # masked per block only (holes), not per token: a mask constant over the tile keeps
        # the loads 16 bytes wide. Codes of tokens past ntok are inside the slot; their
        # logits are masked by the caller
        sc = tl.load(arena_md + m_el, mask=has, other=0.0)                         # [NBI,1,D]
        zr = tl.load(arena_md + m_el + META_BYTES // MSIZE, mask=has, other=0.0)
        if WORDS % 2 == 1 and FAST and BITS >= 4:
            # codes read and converted as int32 words (no byte unpacking)
            w3 = tl.arange(0, DB // 4)[None, None, :]
            arena_w = arena_u8.to(tl.pointer_type(tl.int32), bitcast=True)
            wd = tl.load(arena_w + (off // 4)[:, None, None] + kvh * T * (DB // 4)
                         + t3 * (DB // 4) + w3, mask=has, other=0)
            k = _word_codes(wd, BITS, ASM) * sc.to(DT) + zr.to(DT)
        else:
            raw = tl.load(arena_u8 + off3 + kvh * T * DB + t3 * DB + j3, mask=has, other=0)
            c = tl.reshape(_unpack(raw, BITS, DT, ASM, FAST), (NBI, T, D))
            if FAST:
                k = c * sc.to(DT) + zr.to(DT)
            else:
                k = (_code_f32(c) * sc.to(tl.float32) + zr.to(tl.float32)).to(DT)
    k2 = tl.reshape(k, (NBI * T, D))
    return _dot(qd, tl.trans(k2), IEEE)


@triton.jit
def _scores_fold(qd, q_ptr, qrow, hmask, arena_u8, arena_md, off, ntok, kvh,
                 BITS: tl.constexpr, T: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
                 MSIZE: tl.constexpr, DT: tl.constexpr, IEEE: tl.constexpr,
                 ASM: tl.constexpr):
    """q.k of one quantized block (off, ntok: [1]) with the dequantization folded out:
    k[t, d] = c[t, d] * s[d] + z[d]  =>  q.k_t = sum_d (q_d s_d) c[t, d] + sum_d q_d z_d.
    The codes go to tl.dot as they are (integers <= 255 are exact in fp16); per sub-channel
    j of a byte (channels b * PER + j) one dot of q' [GP, D / PER] with those codes, so
    packed codes need no interleave. Returns [GP, T] fp32 (unscaled; invalid tokens
    unmasked)."""
    PER: tl.constexpr = 8 // BITS
    DB: tl.constexpr = D // PER
    CODE_BYTES: tl.constexpr = (H * T * DB + 15) // 16 * 16
    META_EL: tl.constexpr = (H * D * MSIZE + 15) // 16 * 16 // MSIZE
    t2 = tl.arange(0, T)[:, None]
    bcol = tl.arange(0, DB)
    off2 = off[:, None]                                                  # [1, 1]
    raw = tl.load(arena_u8 + off2 + kvh * T * DB + t2 * DB + bcol[None, :],
                  mask=t2 < ntok[:, None], other=0)                      # [T, DB] uint8
    has = ntok[:, None] > 0
    m0 = tl.multiple_of((off + CODE_BYTES) // MSIZE, 16 // MSIZE)[:, None] + kvh * D
    # sum_d q_d z_d on the tensor cores: q times z broadcast over the T columns
    dcol = tl.arange(0, D)
    zr = tl.load(arena_md + m0 + META_EL + dcol[:, None], mask=has, other=0.0)   # [D, 1]
    s = _dot(qd, tl.broadcast_to(zr.to(DT), (D, T)), IEEE)
    for j in tl.static_range(PER):
        ch = bcol[None, :] * PER + j                                     # [1, DB]
        sc = tl.load(arena_md + m0 + ch, mask=has, other=0.0).to(tl.float32)
        qj = tl.load(q_ptr + qrow[:, None] + ch, mask=hmask[:, None], other=0.0).to(tl.float32)
        cj = _u8_codes(raw, j * BITS, BITS, DT, ASM)
        s = _dot((qj * sc).to(DT), tl.trans(cj), IEEE, s)
    return s


@triton.jit
def _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh,
            BITS: tl.constexpr, NBI: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
            G: tl.constexpr, H: tl.constexpr, ESIZE: tl.constexpr, MSIZE: tl.constexpr,
            DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
            ASM: tl.constexpr, WORDS: tl.constexpr = 0):
    """p [GP, NBI * T] fp32 times NBI blocks' values -> [GP, D] fp32. voff: V section bytes.

    8-bit value codes are channel-major in the slot (``[H, D, T]``, engine/layout.py): the
    PV operand is then read along its reduction axis (tokens), as the keys are."""
    if BITS == 0:
        t3 = tl.arange(0, T)[None, :, None]
        d3 = tl.arange(0, D)[None, None, :]
        valid3 = t3 < ntok[:, None, None]
        e0 = tl.multiple_of(voff // ESIZE, 16 // ESIZE)                  # [NBI] elements
        e = e0[:, None, None] + kvh * T * D + t3 * D + d3
        v = tl.load(arena_st + e, mask=valid3, other=0.0)            # [NBI, T, D]
        if UPCAST:
            v = v.to(tl.float32).to(DT)
    else:
        PER: tl.constexpr = 8 // BITS
        NG: tl.constexpr = D // G
        GB: tl.constexpr = G // PER                                  # code bytes per group
        CODE_BYTES: tl.constexpr = (H * T * (D // PER) + 15) // 16 * 16
        META_BYTES: tl.constexpr = (H * T * NG * MSIZE + 15) // 16 * 16
        off4 = voff[:, None, None, None]                             # [NBI, 1, 1, 1]
        t4 = tl.arange(0, T)[None, :, None, None]
        g4 = tl.arange(0, NG)[None, None, :, None]
        j4 = tl.arange(0, GB)[None, None, None, :]
        # masked per block only (holes; keeps the loads wide); tokens past ntok read codes
        # inside the slot and get scale = zero = 0
        if BITS == 8:
            # channel-major codes [D, T] (engine/layout.py values_channel_major)
            d3v = tl.arange(0, D)[None, :, None]
            t3v = tl.arange(0, T)[None, None, :]
            raw = tl.load(arena_u8 + voff[:, None, None] + kvh * D * T + d3v * T + t3v,
                          mask=ntok[:, None, None] > 0, other=0)     # [NBI, D, T]
            ct = _unpack(raw, BITS, DT, ASM, FAST)
            c = tl.reshape(tl.permute(ct, (0, 2, 1)), (NBI, T, NG, G))
        elif WORDS // 2 == 1 and FAST and BITS >= 4:
            # codes read and converted as int32 words (no byte unpacking)
            DW: tl.constexpr = D // PER // 4                         # words per row
            w3 = tl.arange(0, DW)[None, None, :]
            t3w = tl.arange(0, T)[None, :, None]
            arena_w = arena_u8.to(tl.pointer_type(tl.int32), bitcast=True)
            wd = tl.load(arena_w + (voff // 4)[:, None, None] + kvh * T * DW + t3w * DW + w3,
                         mask=ntok[:, None, None] > 0, other=0)
            c = tl.reshape(_word_codes(wd, BITS, ASM), (NBI, T, NG, G))
        else:
            raw = tl.load(arena_u8 + off4 + kvh * T * (D // PER) + t4 * (D // PER)
                          + g4 * GB + j4, mask=ntok[:, None, None, None] > 0, other=0)
            c = tl.reshape(_unpack(raw, BITS, DT, ASM, FAST), (NBI, T, NG, G))
        m0 = tl.multiple_of((voff + CODE_BYTES) // MSIZE, 16 // MSIZE)   # [NBI] elements
        # scale / zero as [NBI, T, NG] tiles (contiguous along NG), then a size-1 axis
        t3 = tl.arange(0, T)[None, :, None]
        g3 = tl.arange(0, NG)[None, None, :]
        m_el = m0[:, None, None] + kvh * T * NG + t3 * NG + g3
        valid3 = t3 < ntok[:, None, None]
        sc = tl.expand_dims(tl.load(arena_md + m_el, mask=valid3, other=0.0), 3).to(tl.float32)
        zr = tl.expand_dims(tl.load(arena_md + m_el + META_BYTES // MSIZE, mask=valid3,
                                    other=0.0), 3).to(tl.float32)
        if FAST:
            # in the dot dtype: codes convert exactly, one fma per element
            v = c * sc.to(DT) + zr.to(DT)
        else:
            v = (_code_f32(c) * sc + zr).to(DT)
    v2 = tl.reshape(v, (NBI * T, D))
    return _dot(p.to(DT), v2, IEEE)


@triton.jit
def _k_section_end(kb, T: tl.constexpr, D: tl.constexpr, H: tl.constexpr,
                   ESIZE: tl.constexpr, MSIZE: tl.constexpr):
    """Byte offset of the V section in a slot whose keys have kb bits (runtime kb)."""
    META: tl.constexpr = 2 * ((H * D * MSIZE + 15) // 16 * 16)
    E0: tl.constexpr = (H * T * D * ESIZE + 15) // 16 * 16
    E8: tl.constexpr = (H * T * D + 15) // 16 * 16 + META
    E4: tl.constexpr = (H * T * D // 2 + 15) // 16 * 16 + META
    E2: tl.constexpr = (H * T * D // 4 + 15) // 16 * 16 + META
    return tl.where(kb == 0, E0, tl.where(kb == 8, E8, tl.where(kb == 4, E4, E2)))


@triton.jit
def _paged_decode_kernel(
    q_ptr,         # [B, Hq, D] query (any float dtype)
    arena_u8,      # [bytes] uint8: one layer's arena row
    arena_st,      # [bytes / ESIZE] store dtype view of the same storage
    arena_md,      # [bytes / MSIZE] meta dtype view of the same storage
    off_ptr,       # [B, NB] int64 slot byte offsets
    kbits_ptr,     # [B, NB] int32 key bits (read only when KB < 0)
    vbits_ptr,     # [B, NB] int32 value bits (read only when VB < 0)
    ntok_ptr,      # [B, NB] int32 valid tokens (0 = hole)
    perm_ptr,      # [B, NB] int64 original column of each entry (read only when ROWLEN)
    rstart_ptr,    # [B] int32 first entry of this launch's run in each row (ROWLEN)
    rlen_ptr,      # [B] int32 entries in that run (ROWLEN)
    bmax_ptr,      # [B, Hq, NB] fp32 out: per-block max logit
    bsum_ptr,      # [B, Hq, NB] fp32 out: per-block sum of exp(logit - max)
    pm_ptr,        # [B, Hq, S] fp32 out: split max (log2 units)
    pl_ptr,        # [B, Hq, S] fp32 out: split sum of exp2
    pacc_ptr,      # [B, Hq, S, D] fp32 out: split unnormalized output
    NB, blocks_per_split, qk_scale, S0, STOT,
    HQ: tl.constexpr, H: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr,
    T: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    ESIZE: tl.constexpr, MSIZE: tl.constexpr, KB: tl.constexpr, VB: tl.constexpr,
    NBI: tl.constexpr, DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    FOLD: tl.constexpr, ASM: tl.constexpr, FAST: tl.constexpr, ROWLEN: tl.constexpr,
    WORDS: tl.constexpr = 0,      # code words (int32 loads): 1 keys, 2 values (4-bit), 3 both
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    rows = tl.arange(0, GP)
    hmask = rows < GQ
    head = kvh * GQ + rows
    d = tl.arange(0, D)
    qrow = (b * HQ + head) * D
    q = tl.load(q_ptr + (b * HQ + head)[:, None] * D + d[None, :], mask=hmask[:, None],
                other=0.0).to(tl.float32)
    qd = q.to(DT)
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if ROWLEN:
        # this launch covers one run of each row (the blocks of one format)
        rs = tl.load(rstart_ptr + b)
        start = rs + sp * blocks_per_split
        end = tl.minimum(start + blocks_per_split, rs + tl.load(rlen_ptr + b))
    else:
        start = sp * blocks_per_split
        end = tl.minimum(start + blocks_per_split, NB)
    tcol = tl.arange(0, T)
    for blk0 in range(start, end, NBI):
        bi = blk0 + tl.arange(0, NBI)
        bmask = bi < end
        ntok = tl.load(ntok_ptr + b * NB + bi, mask=bmask, other=0)           # [NBI]
        off = tl.multiple_of(tl.load(off_ptr + b * NB + bi, mask=bmask, other=0), 16)
        # ---- logits [GP, NBI * T]
        if KB > 0 and FOLD:
            s = _scores_fold(qd, q_ptr, qrow, hmask, arena_u8, arena_md, off, ntok, kvh, KB, T,
                             D, H, MSIZE, DT, IEEE, ASM)
            voff = off + _k_section_end(KB, T, D, H, ESIZE, MSIZE)
        elif KB >= 0:
            s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, KB, NBI, T, D, H,
                        ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM, WORDS)
            voff = off + _k_section_end(KB, T, D, H, ESIZE, MSIZE)
        else:
            kb = tl.load(kbits_ptr + b * NB + blk0)
            if kb == 0:
                s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, 0, NBI, T, D,
                            H, ESIZE, MSIZE, DT, UPCAST, IEEE)
            elif kb == 8:
                if FOLD:
                    s = _scores_fold(qd, q_ptr, qrow, hmask, arena_u8, arena_md, off, ntok, kvh,
                                     8, T, D, H, MSIZE, DT, IEEE, ASM)
                else:
                    s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, 8, NBI,
                                T, D, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            elif kb == 4:
                if FOLD:
                    s = _scores_fold(qd, q_ptr, qrow, hmask, arena_u8, arena_md, off, ntok, kvh,
                                     4, T, D, H, MSIZE, DT, IEEE, ASM)
                else:
                    s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, 4, NBI,
                                T, D, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            else:
                if FOLD:
                    s = _scores_fold(qd, q_ptr, qrow, hmask, arena_u8, arena_md, off, ntok, kvh,
                                     2, T, D, H, MSIZE, DT, IEEE, ASM)
                else:
                    s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, 2, NBI,
                                T, D, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            voff = off + _k_section_end(kb, T, D, H, ESIZE, MSIZE)
        voff = tl.multiple_of(voff, 16)
        # ---- per-block softmax partials (log2 units)
        s3 = tl.reshape(s * qk_scale, (GP, NBI, T))
        tok_ok = tcol[None, None, :] < tl.reshape(ntok, (1, NBI, 1))
        s3 = tl.where(tok_ok, s3, float("-inf"))
        mb = tl.max(s3, axis=2)                                              # [GP, NBI]
        mb_safe = tl.where(mb == float("-inf"), 0.0, mb)
        p3 = tl.exp2(s3 - mb_safe[:, :, None])
        lb = tl.sum(p3, axis=2)                                          # [GP, NBI]
        if ROWLEN:
            col = tl.load(perm_ptr + b * NB + bi, mask=bmask, other=0).to(tl.int32)
        else:
            col = bi
        st_ptr = (b * HQ + head)[:, None] * NB + col[None, :]
        st_mask = hmask[:, None] & bmask[None, :]
        tl.store(bmax_ptr + st_ptr, mb * LN2, mask=st_mask)
        tl.store(bsum_ptr + st_ptr, lb, mask=st_mask)
        # ---- merge into the running state
        m_new = tl.maximum(m_i, tl.max(mb, axis=1))
        m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_new_safe)
        w = tl.exp2(mb - m_new_safe[:, None])                                # [GP, NBI]
        p = tl.reshape(p3 * w[:, :, None], (GP, NBI * T))
        l_i = l_i * alpha + tl.sum(lb * w, axis=1)
        if VB >= 0:
            pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, VB, NBI, T, D, G, H,
                         ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM, WORDS)
        else:
            vb = tl.load(vbits_ptr + b * NB + blk0)
            if vb == 0:
                pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, 0, NBI, T, D,
                             G, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            elif vb == 8:
                pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, 8, NBI, T, D,
                             G, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            elif vb == 4:
                pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, 4, NBI, T, D,
                             G, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
            else:
                pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, 2, NBI, T, D,
                             G, H, ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    part = (b * HQ + head) * STOT + S0 + sp
    tl.store(pm_ptr + part, m_i, mask=hmask)
    tl.store(pl_ptr + part, l_i, mask=hmask)
    tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=hmask[:, None])


@triton.jit
def _reduce_kernel(
    pm_ptr,        # [B * Hq, S] fp32 split max (log2 units)
    pl_ptr,        # [B * Hq, S] fp32 split sumexp
    pacc_ptr,      # [B * Hq, S, D] fp32 split unnormalized output
    out_ptr,       # [B * Hq, D] output dtype
    S, SP: tl.constexpr, D: tl.constexpr,
):
    r = tl.program_id(0)
    s = tl.arange(0, SP)
    d = tl.arange(0, D)
    smask = s < S
    m = tl.load(pm_ptr + r * S + s, mask=smask, other=float("-inf"))
    l = tl.load(pl_ptr + r * S + s, mask=smask, other=0.0)
    acc = tl.load(pacc_ptr + (r * S + s)[:, None] * D + d[None, :], mask=smask[:, None], other=0.0)
    gm = tl.max(m, axis=0)
    gm = tl.where(gm == float("-inf"), 0.0, gm)
    w = tl.where(l > 0, tl.exp2(m - gm), 0.0)
    den = tl.maximum(tl.sum(w * l, axis=0), 1e-30)
    out = tl.sum(acc * w[:, None], axis=0) / den
    tl.store(out_ptr + r * D + d, out.to(out_ptr.dtype.element_ty))


# KVCTL_TRITON_PTX=0 turns the PTX code conversion off (plain Triton conversion instead)
_PTX = os.environ.get("KVCTL_TRITON_PTX", "1") != "0"


MAX_FORMAT_LAUNCHES = 8


def _launch(fn, grid, args: tuple, consts: dict, options: dict, cache: dict | None):
    """``fn[grid](*args, **consts, **options)``; returns the compiled kernel.

    With ``cache`` (a dict that lives for one engine step, CUDA): the compiled kernel of an
    earlier launch whose arguments specialize the same way (same scalars, constexprs and
    options; tensors of the same dtype, device and 16-byte alignment) is launched
    directly, without Triton's per-call argument binding and cache lookup. The layers of a
    step launch with the same table and scalars, so only the first layer pays for that."""
    if cache is None:
        return fn[grid](*args, **consts, **options)
    spec = ("triton-launch", fn, grid) + tuple(
        (a.dtype, a.device, a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor) else a
        for a in args) + tuple(consts.items()) + tuple(options.items())
    hit = cache.get(spec)
    if hit is None:
        ck = fn[grid](*args, **consts, **options)
        tail = tuple(consts[p.name] if p.name in consts else p.default
                     for p in fn.params[len(args):])
        cache[spec] = (ck, tail)
        return ck
    ck, tail = hit
    ck[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)   # the runner takes 3 dims
    return ck


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: few programs, each is ~1 ms of Python


# programs of one compiled decode kernel that fit on an SM at once, from its registers and
# shared memory (found after its first launch; keyed by its compile-time configuration)
_RESIDENT: dict[tuple, int] = {}
MIN_ITERS = 8


def _resident_programs(ck, device: torch.device) -> int | None:
    """How many programs of compiled kernel ``ck`` an SM holds at once (None: unknown)."""
    try:
        props = torch.cuda.get_device_properties(device)
        warps = ck.metadata.num_warps
        regs = max(1, ck.n_regs) * 32 * warps
        by_regs = props.regs_per_multiprocessor // regs
        smem = ck.metadata.shared + 1024          # the driver reserves 1 KB a block
        by_smem = props.shared_memory_per_multiprocessor // max(1, smem)
        by_warps = props.max_threads_per_multi_processor // (32 * warps)
        return max(1, min(by_regs, by_smem, by_warps))
    except (AttributeError, RuntimeError, TypeError):
        return None


def _launch_config(B: int, H: int, NB: int, device: torch.device, uniform: bool,
                   num_splits: int | None, blocks_per_iter: int | None,
                   num_warps: int | None, num_stages: int | None,
                   resident: int | None = None) -> tuple[int, int, int, int, int]:
    """(num_splits, blocks_per_split, blocks_per_iter, num_warps, num_stages).

    Heuristics instead of autotuning (decode shapes change every step): enough programs
    for a few waves over the SMs, each with a run of blocks long enough to hide the
    per-program setup and the split reduction; several blocks per loop iteration when
    the format is fixed, so more bytes are in flight per program.
    """
    nbi = blocks_per_iter or (2 if uniform else 1)
    if not uniform:
        nbi = 1  # runtime format dispatch is per block
    if num_splits is None:
        sms = _num_sms(device)
        target = 8 * sms                # 8 x SMs was best of 2/4/8 x in the H200 sweep
        # at least MIN_ITERS loop iterations a program: shorter runs are mostly prologue
        # (b1/32K on the H200: 4 iterations a program 45.9 us, 11 iterations 42.1)
        most = max(1, -(-NB // (MIN_ITERS * nbi)))
        if resident:
            # whole waves: a last, partial wave of programs leaves SMs idle at the end
            # (ncu on the H200: 2.75 waves at b8/128K); the whole number of waves nearest
            # the target, no more than the runs allow, as many programs as fit in them
            wave = resident * sms
            waves = max(1, min(round(target / wave), most * B * H // wave))
            num_splits = max(1, min(waves * wave // (B * H), most))
        else:
            num_splits = max(1, min(-(-target // (B * H)), most))
    num_splits = max(1, min(num_splits, NB))
    bps = -(-NB // num_splits)
    bps = -(-bps // nbi) * nbi          # whole iterations per split
    num_splits = -(-NB // bps)
    # 2 stages lets Triton prefetch the next iteration's tiles (cp.async); the format
    # defaults in _Launch pick 3 where the H200 sweeps found it faster
    stages = num_stages or (2 if uniform else 1)
    return num_splits, bps, nbi, num_warps or 4, stages


def paged_decode_triton(q: torch.Tensor, arena_row: torch.Tensor, block_offsets: torch.Tensor,
                        block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                        block_ntok: torch.Tensor, geom: BlockGeometry, sm_scale: float, *,
                        fmt: KVFormat | None = None, num_splits: int | None = None,
                        blocks_per_iter: int | None = None, num_warps: int | None = None,
                        num_stages: int | None = None, fold: bool = False,
                        fast: bool | None = None, maxnreg: int | None = None,
                        formats: list[KVFormat] | tuple[KVFormat, ...] | None = None,
                        groups: "FormatGroups | None" = None,
                        word_codes: bool | str | None = None, launch_cache: dict | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract and results as ``paged_decode_ref`` (see engine/kernels/paged_decode.py).

    q [B, Hq, D]; arena_row [bytes] uint8; block_offsets [B, NB] int64;
    block_kbits / block_vbits / block_ntok [B, NB] int32.
    returns out [B, Hq, D] (q.dtype), block_max / block_sumexp [B, Hq, NB] fp32.

    ``fmt``: promise that every non-hole block has this format (compiles it in, reads no
    bits tensors, several blocks per iteration); None reads each block's format.
    ``formats``: without ``fmt``, the formats the table may hold (the caller knows them
    from its block list). Then each format gets its own compiled-in launch over its blocks
    (at most MAX_FORMAT_LAUNCHES formats) instead of the runtime-dispatch
    kernel, which is 5-15x slower (docs/BENCHMARKS.md).
    ``groups``: the same from the caller's host-side grouping (FormatGroups.from_rows;
    sizes each launch by its longest run, no sort on the device).
    ``word_codes``: int8/int4 codes read as int32 words and converted per word (fp16
    operands only): True (keys and 4-bit values), "k", "v", False; None (default): keys
    of int8 tables on CUDA, where the H200 measured it faster (docs/BENCHMARKS.md).
    ``num_splits`` / ``blocks_per_iter`` / ``num_warps`` / ``num_stages`` override the
    launch heuristics.
    ``launch_cache``: a dict that lives for one engine step (CUDA): launch plans and
    compiled kernels are reused across the step's layers (``_launch``).
    ``fold``: experimental, off by default because it measured slower on the H200
    (docs/BENCHMARKS.md): key scales folded into q, codes straight into tl.dot, one block
    an iteration, fp16 dequantization of values; PTX code conversion on CUDA with fp16.
    Only for head_dim >= 64 (its per-sub-channel dots need D / 4 >= 16) and with a
    ``fmt`` hint (mixed-format tables gave wrong results on the H200 with triton 3.6,
    2026-11-28, though right in the interpreter); ignored otherwise.
    """
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    B, Hq, D = q.shape
    H, T, G = geom.num_kv_heads, geom.block_size, geom.value_group
    if D != geom.head_dim:
        raise ValueError(f"q head_dim {D} != geometry head_dim {geom.head_dim}")
    if Hq % H:
        raise ValueError(f"query heads {Hq} not a multiple of kv heads {H}")
    if not (_pow2(T) and T >= 16 and _pow2(D) and D >= 16 and _pow2(G)):
        raise ValueError(f"Triton paged decode needs power-of-two block_size >= 16, head_dim "
                         f">= 16 and value_group; got T={T}, D={D}, G={G}")
    if q.dtype not in _TL_DTYPE or geom.store_dtype not in _TL_DTYPE:
        raise ValueError(f"unsupported dtypes q={q.dtype}, store={geom.store_dtype}")
    if arena_row.dim() != 1 or arena_row.dtype != torch.uint8 or not arena_row.is_contiguous():
        raise ValueError("arena_row must be a contiguous 1-D uint8 tensor (one layer's row)")
    if arena_row.storage_offset() % 16:
        raise ValueError("arena_row must start on a 16-byte boundary")
    if block_offsets.dtype != torch.int64:
        raise ValueError(f"block_offsets must be int64, got {block_offsets.dtype}")
    for name, t in (("block_kbits", block_kbits), ("block_vbits", block_vbits),
                    ("block_ntok", block_ntok)):
        if t.dtype != torch.int32:
            raise ValueError(f"{name} must be int32, got {t.dtype}")
    for name, t in (("block_offsets", block_offsets), ("block_kbits", block_kbits),
                    ("block_vbits", block_vbits), ("block_ntok", block_ntok)):
        if t.dim() != 2 or t.shape[0] != B:
            raise ValueError(f"{name} must be [B={B}, NB], got {tuple(t.shape)}")
        if t.shape != block_offsets.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != {tuple(block_offsets.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} on {t.device}, q on {q.device}")
    if arena_row.device != q.device:
        raise ValueError(f"arena_row on {arena_row.device}, q on {q.device}")
    NB = block_offsets.shape[1]
    dev = q.device
    if not q.is_cuda:
        launch_cache = None   # the interpreter has no compiled kernels to reuse
    out = torch.empty(B, Hq, D, dtype=q.dtype, device=dev)
    bmax = torch.empty(B, Hq, NB, dtype=torch.float32, device=dev)
    bsum = torch.empty(B, Hq, NB, dtype=torch.float32, device=dev)
    if NB == 0 or B == 0:
        out.zero_()
        return out, bmax, bsum
    q = q.contiguous()
    offs, kbits = block_offsets.contiguous(), block_kbits.contiguous()
    vbits, ntok = block_vbits.contiguous(), block_ntok.contiguous()
    kw = dict(num_splits=num_splits, blocks_per_iter=blocks_per_iter, num_warps=num_warps,
              num_stages=num_stages, fold=fold, fast=fast, maxnreg=maxnreg,
              word_codes=word_codes)
    if fmt is None and groups is None and formats is not None \
            and 0 < len(formats) <= MAX_FORMAT_LAUNCHES:
        groups = FormatGroups.from_table(kbits, vbits, formats)
    if fmt is None and groups is not None:
        # one compiled-in launch per format over that format's run of each (grouped) row;
        # per-block partials go to the blocks' own columns, split partials to one buffer
        offs_g = offs.gather(1, groups.perm)
        ntok_g = ntok.gather(1, groups.perm)
        bmax.fill_(float("-inf"))   # columns in no run (holes, padding) stay (-inf, 0)
        bsum.zero_()
        launches = []
        for i, f in enumerate(groups.formats):
            n = groups.max_length[i] if groups.max_length else NB
            if n > 0:
                launches.append(_plan_launch(q, geom, f, B, n, kw, launch_cache))
        stot = sum(x.S for x in launches) or 1
        pm = torch.empty(B, Hq, stot, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hq, stot, D, dtype=torch.float32, device=q.device)
        if not launches:
            pm.fill_(float("-inf"))
            pl.zero_()
            pacc.zero_()
        s0 = 0
        for x in launches:
            i = groups.formats.index(x.fmt)
            x.run(q, arena_row, offs_g, kbits, vbits, ntok_g, bmax, bsum, pm, pl, pacc, s0,
                  stot, run=(groups.perm, groups.start[i], groups.length[i]), sm_scale=sm_scale,
                  cache=launch_cache)
            s0 += x.S
    else:
        x = _plan_launch(q, geom, fmt, B, NB, kw, launch_cache)
        pm = torch.empty(B, Hq, x.S, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hq, x.S, D, dtype=torch.float32, device=q.device)
        x.run(q, arena_row, offs, kbits, vbits, ntok, bmax, bsum, pm, pl, pacc, 0, x.S,
              run=None, sm_scale=sm_scale, cache=launch_cache)
    # one program per (sequence, query head); the split axis fits in registers
    S = pm.shape[2]
    _launch(_reduce_kernel, (B * Hq,), (pm, pl, pacc, out, S),
            dict(SP=triton.next_power_of_2(S), D=D), dict(num_warps=4), launch_cache)
    return out, bmax, bsum


@dataclass(frozen=True)
class FormatGroups:
    """A mixed-format block table's columns grouped by format, for one launch per format.

    ``perm [B, NB]`` int64: row ``b`` of the grouped table is ``table[b, perm[b]]``; the
    blocks of ``formats[i]`` are its entries ``start[i, b] .. start[i, b] + length[i, b]``
    (``start`` / ``length`` [F, B] int32, on the table's device). ``max_length``: per
    format, the longest run over the rows when known on the host (sizes the launch); None:
    the table width. Columns in no run are not attended.
    """
    formats: tuple[KVFormat, ...]
    perm: torch.Tensor
    start: torch.Tensor
    length: torch.Tensor
    max_length: tuple[int, ...] | None = None

    @classmethod
    def from_table(cls, kbits: torch.Tensor, vbits: torch.Tensor,
                   formats) -> "FormatGroups":
        """On the device (no sync): a stable sort of the columns by format."""
        formats = tuple(formats)
        code = kbits * 16 + vbits
        order = torch.full_like(code, len(formats))
        for i, f in enumerate(formats):
            order = torch.where(code == f.k_bits * 16 + f.v_bits, i, order)
        perm = torch.sort(order, dim=1, stable=True)[1]
        counts = torch.stack([(order == i).sum(1, dtype=torch.int32)
                              for i in range(len(formats))])
        start = (torch.cumsum(counts, 0, dtype=torch.int32) - counts).contiguous()
        return cls(formats, perm.contiguous(), start, counts.contiguous())

    @classmethod
    def from_rows(cls, rows: list[list[tuple[int, KVFormat]]], width: int,
                  device: torch.device) -> "FormatGroups":
        """On the host: ``rows[b]`` lists (column, format) of row b's attended entries."""
        formats = tuple(sorted({f for r in rows for _, f in r},
                               key=lambda f: (f.k_bits, f.v_bits)))
        index = {f: i for i, f in enumerate(formats)}
        F, B = len(formats), len(rows)
        perm, start, length = [], [[0] * B for _ in range(F)], [[0] * B for _ in range(F)]
        for b, r in enumerate(rows):
            by = [[] for _ in range(F)]
            for col, f in r:
                by[index[f]].append(col)
            row = []
            for i in range(F):
                start[i][b], length[i][b] = len(row), len(by[i])
                row += by[i]
            seen = set(row)
            row += [c for c in range(width) if c not in seen]
            perm.append(row)
        t = lambda x, dt: torch.tensor(x, dtype=dt).to(device, non_blocking=True)  # noqa: E731
        return cls(formats, t(perm, torch.int64).reshape(B, width),
                   t(start, torch.int32).reshape(F, B), t(length, torch.int32).reshape(F, B),
                   tuple(max(x) if x else 0 for x in length))


def _plan_launch(q, geom, fmt, B, NB, kw: dict, cache: dict | None) -> "_Launch":
    """_Launch(q, geom, fmt, B, NB, **kw), shared by the layers of a step via ``cache``."""
    if cache is None:
        return _Launch(q, geom, fmt, B, NB, **kw)
    key = ("triton-plan", q.shape, q.dtype, q.device, geom, fmt, B, NB, tuple(kw.items()))
    x = cache.get(key)
    if x is None:
        x = cache[key] = _Launch(q, geom, fmt, B, NB, **kw)
    return x


class _Launch:
    """One decode-kernel launch: its configuration (from the format and the launch
    heuristics) and ``run``, which writes split partials at ``s0`` of buffers ``stot``
    wide."""

    def __init__(self, q, geom, fmt, B, NB, *, num_splits, blocks_per_iter, num_warps,
                 num_stages, fold, fast, maxnreg, word_codes):
        Hq, D = q.shape[1], q.shape[2]
        H, T = geom.num_kv_heads, geom.block_size
        dev = q.device
        self.fmt = fmt
        fold = fold and D >= 64 and fmt is not None
        if fold and fmt is not None and fmt.k_bits > 0:
            blocks_per_iter = 1  # folded key scales are per block: one block an iteration
        # tl.dot operands: the store dtype; fp32 (IEEE) for fp32 stores and for head_dim
        # < 64, where fp16 operands from unpacked 4/2-bit codes gave wrong results on the
        # H200 (triton 3.6; head_dim 64 and 128 were right; cause not isolated). The
        # runtime-dispatch kernel (no fmt) takes fp32 operands too: a K2V8/K8V4/full mix at
        # head_dim 64 in fp16 failed on the H200 for some random inputs (2026-11-28).
        small = D < 64 or fmt is None
        self.dot_dtype = torch.float32 if small else geom.store_dtype
        # fp16 operands: codes -> exact fp16 and one packed fma per two elements (PTX code
        # conversion on CUDA); otherwise dequantization in fp32
        f16 = self.dot_dtype == torch.float16
        fast = f16 if fast is None else fast and f16
        same = fmt is not None and fmt.k_bits == fmt.v_bits
        if fmt is not None and (blocks_per_iter, num_stages, maxnreg) == (None, None, None):
            # launch sweeps on the H200 (docs/BENCHMARKS.md): int8 and int4 tiles 2 blocks
            # an iteration, 2 stages, 128 registers (4 programs an SM); fp16 and int2 2
            # blocks, 2 stages; other mixes 4 blocks, 3 stages (2 with 8-bit codes), 168
            # registers
            wide = max(fmt.k_bits, fmt.v_bits) >= 4
            if same and fmt.k_bits in (8, 4):
                blocks_per_iter, num_stages = 2, 2
                maxnreg = 128 if q.is_cuda else None
            else:
                blocks_per_iter = 4 if wide else 2
                num_stages = 3 if wide and fmt.k_bits != 8 and fmt.v_bits != 8 else 2
                maxnreg = 168 if q.is_cuda and (wide or fmt.is_full) else None
        if word_codes is None:
            # int8 keys as int32 words: measured faster on the H200 (0.94x -> 0.96x of SDPA
            # at batch 8 / 128K); int4 words were slower (more shared-memory traffic)
            word_codes = "k" if same and fmt.k_bits == 8 and q.is_cuda else False
        if (fast and not fold and fmt is not None and not fmt.is_full
                and (blocks_per_iter or 2) * T < 32):
            # tiles of fewer than 32 tokens (16-token blocks one at a time) gave wrong int4
            # results on the H200 (triton 3.6, 2026-11-28; right in the interpreter, with
            # and without the PTX conversion): at least 32 tokens an iteration
            blocks_per_iter = 32 // T
        if isinstance(word_codes, str):
            if word_codes not in ("k", "v", "kv"):
                raise ValueError(f"word_codes must be a bool, 'k', 'v' or 'kv', not {word_codes!r}")
            words = ("k" in word_codes) + 2 * ("v" in word_codes)
        else:
            words = 3 if word_codes else 0
        self.words = words if fast and not fold else 0
        self.key = (dev, fmt, T, D, geom.value_group, H, Hq, geom.store_dtype,
                    blocks_per_iter, num_warps, num_stages, maxnreg, fold, fast, self.words)
        self.S, self.bps, self.nbi, self.warps, self.stages = _launch_config(
            B, H, NB, dev, fmt is not None, num_splits, blocks_per_iter, num_warps,
            num_stages, _RESIDENT.get(self.key))
        self.fold, self.fast, self.maxnreg, self.geom = fold, fast, maxnreg, geom

    def run(self, q, arena_row, offs, kbits, vbits, ntok, bmax, bsum, pm, pl, pacc, s0, stot,
            *, run, sm_scale, cache=None):
        geom, fmt = self.geom, self.fmt
        B, Hq, D = q.shape
        H, T, G = geom.num_kv_heads, geom.block_size, geom.value_group
        n = arena_row.numel() // 4 * 4
        arena_st = arena_row[:n].view(geom.store_dtype)
        arena_md = arena_row[:n].view(geom.meta_dtype)
        perm, rstart, rlen = run if run is not None else (offs, ntok, ntok)  # unread
        f16 = self.dot_dtype == torch.float16
        ck = _launch(_paged_decode_kernel, (B, H, self.S), (
            q, arena_row, arena_st, arena_md, offs, kbits, vbits, ntok, perm, rstart, rlen,
            bmax, bsum, pm, pl, pacc, offs.shape[1], self.bps, float(sm_scale) * LOG2E, s0, stot
        ), dict(
            HQ=Hq, H=H, GQ=Hq // H, GP=max(16, triton.next_power_of_2(Hq // H)), T=T, D=D,
            G=G, ESIZE=geom.store_elem, MSIZE=geom.meta_elem,
            KB=-1 if fmt is None else fmt.k_bits, VB=-1 if fmt is None else fmt.v_bits,
            NBI=self.nbi, DT=_TL_DTYPE[self.dot_dtype],
            UPCAST=geom.store_dtype == torch.bfloat16 or geom.store_dtype != self.dot_dtype,
            IEEE=self.dot_dtype == torch.float32, FOLD=self.fold,
            ASM=_PTX and q.is_cuda and f16 and (self.fast or self.fold),
            FAST=self.fast or self.fold, ROWLEN=run is not None, WORDS=self.words,
        ), dict(num_warps=self.warps, num_stages=self.stages,
                **({"maxnreg": self.maxnreg} if self.maxnreg else {})), cache)
        if q.is_cuda and self.key not in _RESIDENT:
            res = _resident_programs(ck, q.device)
            if res:
                _RESIDENT[self.key] = res


def slot_bytes_read(geom: BlockGeometry, fmt: KVFormat) -> int:
    """Bytes the kernel reads for one full block (all kv heads), alignment padding excluded."""
    H, T, D, G = geom.num_kv_heads, geom.block_size, geom.head_dim, geom.value_group
    k = H * T * D * geom.store_elem if fmt.k_bits == 0 else \
        H * T * D * fmt.k_bits // 8 + 2 * H * D * geom.meta_elem
    v = H * T * D * geom.store_elem if fmt.v_bits == 0 else \
        H * T * D * fmt.v_bits // 8 + 2 * H * T * (D // G) * geom.meta_elem
    return k + v


