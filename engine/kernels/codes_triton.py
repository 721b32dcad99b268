"""Triton device functions that turn stored codes into floats, for the decode kernel.

Integer codes (engine/layout.py: ``8 // bits`` channels a byte, low bits first) become
floats with the magic-number trick (``0x4B000000 | c`` read as fp32 is ``2^23 + c``;
``0x6400 | c`` read as fp16 is ``1024 + c``) instead of slow int->float conversions, and
on CUDA with fp16 operands with a few PTX instructions per four bytes (``prmt`` under an
fp16 exponent, one ``sub.f16x2`` per two codes). fp8 codes are float8 e4m3 bytes: one
conversion each (``cvt`` of a pair on sm_89+).

The PTX strings' element order is checked without a GPU by tests/kernels/test_ptx_strings.py.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def code_f32(c):
    # int code (< 2^23) -> fp32 without an int->float conversion: bits 0x4B000000 | c
    # read as fp32 are 2^23 + c exactly
    return (c | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def codes_to(c, DT: tl.constexpr):
    """Integer codes (0..255, any int dtype) -> DT, exactly. fp16: 0x6400 | c read as fp16
    is 1024 + c (no int->float conversion instruction); others: the fp32 magic number."""
    if DT == tl.float16:
        return (c.to(tl.int16) | 0x6400).to(tl.float16, bitcast=True) - 1024.0
    else:
        return code_f32(c.to(tl.int32)).to(DT)


def u8_asm(shift: int, bits: int) -> str:
    """PTX: four uint8 in $2 -> four fp16 codes ((byte >> shift) & mask) in $0, $1."""
    pre = "mov.b32 x, $2;" if bits == 8 else \
        f"shr.b32 x, $2, {shift}; and.b32 x, x, {((1 << bits) - 1) * 0x01010101};"
    return ("{ .reg .b32 x, t0, t1, m; " + pre +
            " mov.b32 m, 0x64646464; prmt.b32 t0, x, m, 0x4140; prmt.b32 t1, x, m, 0x4342;"
            " mov.b32 m, 0x64006400; sub.f16x2 $0, t0, m; sub.f16x2 $1, t1, m; }")


ASM_U8 = tl.constexpr((u8_asm(0, 8),))
ASM_U4 = tl.constexpr(tuple(u8_asm(4 * j, 4) for j in range(2)))
ASM_U2 = tl.constexpr(tuple(u8_asm(2 * j, 2) for j in range(4)))


@triton.jit
def u8_codes(raw, SHIFT: tl.constexpr, BITS: tl.constexpr, DT: tl.constexpr,
             ASM: tl.constexpr):
    """Codes ``(raw >> SHIFT) & (2^BITS - 1)`` of a uint8 tile, as DT (exact).

    ASM (CUDA, fp16): PTX on four bytes at once: shift/mask, then prmt puts each byte
    under an fp16 exponent (0x64XX is 1024 + XX) and one packed subtraction removes the
    1024 — two instructions per two codes instead of byte extraction, packing and
    conversion one by one. Otherwise plain Triton (the interpreter cannot run PTX)."""
    if ASM:
        if BITS == 8:
            asm: tl.constexpr = ASM_U8[0]
        elif BITS == 4:
            asm: tl.constexpr = ASM_U4[SHIFT // 4]
        else:
            asm: tl.constexpr = ASM_U2[SHIFT // 2]
        return tl.inline_asm_elementwise(asm, "=r,=r,r", [raw], dtype=tl.float16,
                                         is_pure=True, pack=4)
    else:
        if BITS == 8:
            c = raw
        else:
            c = (raw >> SHIFT) & ((1 << BITS) - 1)
        return codes_to(c, DT)


ASM_W8 = tl.constexpr(
    "{ .reg .b32 t0, t1, m; mov.b32 m, 0x64646464; prmt.b32 t0, $4, m, 0x4140;"
    " prmt.b32 t1, $4, m, 0x4342; mov.b32 m, 0x64006400; sub.f16x2 t0, t0, m;"
    " sub.f16x2 t1, t1, m; mov.b32 {$0, $1}, t0; mov.b32 {$2, $3}, t1; }")
ASM_W4 = tl.constexpr(
    "{ .reg .b32 x, t0, t1, t2, t3, m, s; and.b32 x, $8, 0x0F0F0F0F; mov.b32 m, 0x64646464;"
    " prmt.b32 t0, x, m, 0x4140; prmt.b32 t1, x, m, 0x4342; shr.b32 x, $8, 4;"
    " and.b32 x, x, 0x0F0F0F0F; prmt.b32 t2, x, m, 0x4140; prmt.b32 t3, x, m, 0x4342;"
    " mov.b32 s, 0x64006400; sub.f16x2 t0, t0, s; sub.f16x2 t1, t1, s; sub.f16x2 t2, t2, s;"
    " sub.f16x2 t3, t3, s; mov.b32 {$0, $1}, t0; mov.b32 {$2, $3}, t1;"
    " mov.b32 {$4, $5}, t2; mov.b32 {$6, $7}, t3; }")


@triton.jit
def word_codes(w, BITS: tl.constexpr, ASM: tl.constexpr):
    """int32 words [..., W] of packed codes -> exact fp16 codes [..., W * 32 / BITS], in
    memory order (BITS 8: byte k of word i is element 4 i + k; BITS 4: the low nibble of
    byte k is element 8 i + 2 k, the high one 8 i + 2 k + 1). ASM: PTX per word (prmt
    under an fp16 exponent, one sub.f16x2 per two codes); else plain Triton."""
    # the order of the PTX outputs is checked by tests/kernels/test_ptx_strings.py
    if BITS == 8:
        if ASM:
            e0, e1, e2, e3 = tl.inline_asm_elementwise(
                ASM_W8, "=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 4, is_pure=True, pack=1)
        else:
            e0 = codes_to(w & 255, tl.float16)
            e1 = codes_to((w >> 8) & 255, tl.float16)
            e2 = codes_to((w >> 16) & 255, tl.float16)
            e3 = codes_to((w >> 24) & 255, tl.float16)
        # join(x, y) adds a minor axis: element 2 i + j of the pair axis is join level j
        # (outer) of level i (inner), so the inner joins pair elements two apart
        c = tl.join(tl.join(e0, e2), tl.join(e1, e3))
        return tl.reshape(c, c.shape[:-3] + (c.shape[-3] * 4,))
    else:
        if ASM:
            e0, e2, e4, e6, e1, e3, e5, e7 = tl.inline_asm_elementwise(
                ASM_W4, "=h,=h,=h,=h,=h,=h,=h,=h,r", [w], dtype=(tl.float16,) * 8,
                is_pure=True, pack=1)
        else:
            e0 = codes_to(w & 15, tl.float16)
            e1 = codes_to((w >> 4) & 15, tl.float16)
            e2 = codes_to((w >> 8) & 15, tl.float16)
            e3 = codes_to((w >> 12) & 15, tl.float16)
            e4 = codes_to((w >> 16) & 15, tl.float16)
            e5 = codes_to((w >> 20) & 15, tl.float16)
            e6 = codes_to((w >> 24) & 15, tl.float16)
            e7 = codes_to((w >> 28) & 15, tl.float16)
        c = tl.join(tl.join(tl.join(e0, e4), tl.join(e2, e6)),
                    tl.join(tl.join(e1, e5), tl.join(e3, e7)))
        return tl.reshape(c, c.shape[:-4] + (c.shape[-4] * 8,))


@triton.jit
def byte_codes(raw, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr):
    """uint8 tile [..., C] of packed codes -> exact DT codes [..., C, 8 // BITS] in memory
    order (BITS 8: [..., C]); the caller reshapes the last two axes into one."""
    if BITS == 8:
        c = u8_codes(raw, 0, 8, DT, ASM)
    elif BITS == 4:
        c = tl.join(u8_codes(raw, 0, 4, DT, ASM), u8_codes(raw, 4, 4, DT, ASM))
    else:
        c = tl.join(tl.join(u8_codes(raw, 0, 2, DT, ASM), u8_codes(raw, 4, 2, DT, ASM)),
                    tl.join(u8_codes(raw, 2, 2, DT, ASM), u8_codes(raw, 6, 2, DT, ASM)))
    return c


@triton.jit
def split_codes(raw, BITS: tl.constexpr):
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
def unpack(raw, BITS: tl.constexpr, DT: tl.constexpr, ASM: tl.constexpr, FAST: tl.constexpr):
    """uint8 tile [..., C] of packed codes -> codes [..., C, 8 // BITS] in memory order
    (BITS 8: [..., C]): exact DT when FAST (byte_codes), else int32 (split_codes)."""
    if FAST:
        c = byte_codes(raw, BITS, DT, ASM)
    else:
        c = split_codes(raw, BITS)
    return c




@triton.jit
def fp8_to(raw, DT: tl.constexpr):
    """uint8 tile of float8 e4m3 bytes -> DT, exactly (e4m3 values are exact in fp16,
    bf16 and fp32). The quantizer never writes the NaN bytes (0x7F, 0xFF)."""
    x = raw.to(tl.float8e4nv, bitcast=True)
    if DT == tl.float16:
        out = x.to(tl.float16)
    else:
        out = x.to(tl.float32).to(DT)
    return out
