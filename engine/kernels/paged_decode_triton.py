"""Triton flash-decoding over paged, mixed-format KV blocks (semantics of paged_decode_ref).

Grid ``(B, H, num_splits)``: a program owns one sequence, one kv head and a contiguous
range of its block table, and serves all ``Hq // H`` query heads of that kv head at
once (padded to 16 rows so QK^T and PV run as ``tl.dot``). Per block it writes the
flash-decoding partials ``block_max`` / ``block_sumexp``; per split it writes a running
(max, sumexp, unnormalized output) that engine/kernels/split_reduce_triton.py reduces
(Dao et al., 2023, "Flash-Decoding for long-context inference").

Every launch compiles its formats in (``KB`` / ``VB``: the key and value codes of
``KVFormat``; a second format ``KB2`` / ``VB2`` beside it), so a mixed table is grouped
by format (``FormatGroups``) and attended by one launch over both runs of each row when
it holds two formats (old blocks quantized, the newest full: the engine's steady state),
one launch per format when it holds more; several blocks per loop iteration. Quantized
blocks are read as codes plus scales (fewer bytes: the point of quantizing) and
dequantized in registers (engine/kernels/codes_triton.py). fp8 blocks have one scale per
(block, kv head): key codes go to ``tl.dot`` as they are and the logits are scaled per
block after it.

Every arithmetic operation is fp32; tiles are fed to ``tl.dot`` in the store dtype
(fp16 / bf16, fp32 with IEEE precision for fp32 stores and head_dim < 64). Slot offsets
must be multiples of 16 bytes (engine/layout.py guarantees it). Launch settings:
engine/kernels/decode_launch.py.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import decode_launch
from engine.kernels import paged_decode_gluon as pdg
from engine.kernels import paged_decode_gluon8 as pdg8
from engine.kernels.codes_triton import code_f32, fp8_to, unpack, word_codes
from engine.kernels.paged_decode import table_codes
from engine.kernels.split_reduce_triton import reduce_splits
from engine.layout import FP8_CODE, FULL, BlockGeometry, KVFormat

LOG2E = 1.4426950408889634
LN2 = tl.constexpr(0.6931471805599453)
FP8 = tl.constexpr(FP8_CODE)    # KB / VB of an fp8 side

_TL_DTYPE = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}

# KVCTL_TRITON_PTX=0 turns the PTX code conversion off (plain Triton conversion instead)
_PTX = os.environ.get("KVCTL_TRITON_PTX", "1") != "0"
# int4 launches by the Gluon kernel (engine/kernels/paged_decode_gluon.py) where it serves
# the geometry (CUDA, block_size 32, head_dim 128, <= 8 query heads a kv head): on an H100
# 2.2-2.5x SDPA at batch 8 against this kernel's 1.2x, an int4 engine step at batch 8 /
# 32K 13.5 ms against 17.8 (docs/BENCHMARKS.md, "The Gluon int4 kernel"). KVCTL_GLUON=0
# turns it off. A grouped int4 + full table then takes one launch per format
GLUON_INT4 = os.environ.get("KVCTL_GLUON", "1") != "0"
# int8 and fp8 launches by the Gluon 8-bit kernel (engine/kernels/paged_decode_gluon8.py),
# same geometry: on an H100 int8 1.32-1.64x SDPA against this kernel's 1.23-1.37x, fp8
# 1.50-1.84x against 1.47-1.63x (docs/BENCHMARKS.md, "The Gluon 8-bit kernel on a GPU").
# KVCTL_GLUON8=0 turns it off (KVCTL_GLUON=0 turns off both Gluon kernels)
GLUON_INT8 = GLUON_FP8 = GLUON_INT4 and os.environ.get("KVCTL_GLUON8", "1") != "0"
# a grouped table's two launches (the Gluon kernel's quantized run, the other format's
# run) on two streams, the smaller one on a side stream: its programs fill SMs the other
# leaves idle instead of running after it (an experiment, off until measured on a GPU;
# KVCTL_OVERLAP_RUNS=1 turns it on). Inside a CUDA graph the two become parallel branches
OVERLAP_RUNS = os.environ.get("KVCTL_OVERLAP_RUNS", "0") == "1"
_SIDE_STREAMS: dict = {}
_INT4 = KVFormat(4, 4)
_INT8 = KVFormat(8, 8)
_FP8 = KVFormat.parse("fp8")


def _gluon_module(fmt: KVFormat, q: torch.Tensor, geom: BlockGeometry):
    """The Gluon kernel module that serves launches of ``fmt`` here, or None."""
    if not q.is_cuda:
        return None
    if fmt == _INT4 and GLUON_INT4:
        mod = pdg
    elif (fmt == _INT8 and GLUON_INT8) or (fmt == _FP8 and GLUON_FP8):
        mod = pdg8
    else:
        return None
    return mod if pdg.supports(geom, q.shape[1]) is None else None


def _gluon_serves(fmt: KVFormat, q: torch.Tensor, geom: BlockGeometry) -> bool:
    return _gluon_module(fmt, q, geom) is not None


@triton.jit
def _dot(a, b, IEEE: tl.constexpr, acc=None):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh,
            KB: tl.constexpr, NBI: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
            H: tl.constexpr, ESIZE: tl.constexpr, MSIZE: tl.constexpr,
            DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
            FAST: tl.constexpr = False, ASM: tl.constexpr = False, WORDS: tl.constexpr = 0):
    """q.k of NBI blocks' keys: [GP, NBI * T] fp32 (unscaled; invalid tokens unmasked).

    FAST (fp16 dot operands): integer codes become exact fp16 (PTX when ASM) and are
    dequantized with one packed fp16 fma per two elements, as the values are; else fp32
    arithmetic. fp8: codes into the dot as they are, the block's scale on the logits."""
    t3 = tl.arange(0, T)[None, :, None]                            # [1, T, 1]
    off3 = off[:, None, None]                                      # [NBI, 1, 1] slot bytes
    valid3 = t3 < ntok[:, None, None]                              # [NBI, T, 1]
    d3 = tl.arange(0, D)[None, None, :]
    has = ntok[:, None, None] > 0
    if KB == 0:
        e0 = tl.multiple_of(off // ESIZE, 16 // ESIZE)                   # [NBI] elements
        e = e0[:, None, None] + kvh * T * D + t3 * D + d3
        k = tl.load(arena_st + e, mask=valid3, other=0.0)            # [NBI, T, D]
        if UPCAST:
            k = k.to(tl.float32).to(DT)
        s = _dot(qd, tl.trans(tl.reshape(k, (NBI * T, D))), IEEE)
    elif KB == FP8:
        FP8_CODE_BYTES: tl.constexpr = (H * T * D + 15) // 16 * 16
        # masked per block only (holes), as the integer codes below
        raw = tl.load(arena_u8 + off3 + kvh * T * D + t3 * D + d3, mask=has, other=0)
        k = fp8_to(raw, DT)                                          # [NBI, T, D]
        s = _dot(qd, tl.trans(tl.reshape(k, (NBI * T, D))), IEEE)   # [GP, NBI * T]
        m0 = tl.multiple_of((off + FP8_CODE_BYTES) // MSIZE, 16 // MSIZE)  # [NBI] elements
        sc = tl.load(arena_md + m0 + kvh, mask=ntok > 0, other=0.0).to(tl.float32)
        GP: tl.constexpr = s.shape[0]
        s = tl.reshape(tl.reshape(s, (GP, NBI, T)) * sc[None, :, None], (GP, NBI * T))
    else:
        PER: tl.constexpr = 8 // KB
        DB: tl.constexpr = D // PER                                  # code bytes per row
        CODE_BYTES: tl.constexpr = (H * T * DB + 15) // 16 * 16
        META_BYTES: tl.constexpr = (H * D * MSIZE + 15) // 16 * 16
        j3 = tl.arange(0, DB)[None, None, :]
        m0 = tl.multiple_of((off + CODE_BYTES) // MSIZE, 16 // MSIZE)    # [NBI] elements
        m_el = m0[:, None, None] + kvh * D + d3
        # masked per block only (holes), not per token: a mask constant over the tile keeps
        # the loads 16 bytes wide. Codes of tokens past ntok are inside the slot; their
        # logits are masked by the caller
        sc = tl.load(arena_md + m_el, mask=has, other=0.0)                         # [NBI,1,D]
        zr = tl.load(arena_md + m_el + META_BYTES // MSIZE, mask=has, other=0.0)
        if WORDS % 2 == 1 and FAST and KB >= 4:
            # codes read and converted as int32 words (no byte unpacking)
            w3 = tl.arange(0, DB // 4)[None, None, :]
            arena_w = arena_u8.to(tl.pointer_type(tl.int32), bitcast=True)
            wd = tl.load(arena_w + (off // 4)[:, None, None] + kvh * T * (DB // 4)
                         + t3 * (DB // 4) + w3, mask=has, other=0)
            k = word_codes(wd, KB, ASM) * sc.to(DT) + zr.to(DT)
        else:
            raw = tl.load(arena_u8 + off3 + kvh * T * DB + t3 * DB + j3, mask=has, other=0)
            c = tl.reshape(unpack(raw, KB, DT, ASM, FAST), (NBI, T, D))
            if FAST:
                k = c * sc.to(DT) + zr.to(DT)
            else:
                k = (code_f32(c) * sc.to(tl.float32) + zr.to(tl.float32)).to(DT)
        s = _dot(qd, tl.trans(tl.reshape(k, (NBI * T, D))), IEEE)
    return s


@triton.jit
def _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh,
            VB: tl.constexpr, NBI: tl.constexpr, T: tl.constexpr, D: tl.constexpr,
            G: tl.constexpr, H: tl.constexpr, ESIZE: tl.constexpr, MSIZE: tl.constexpr,
            DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr, FAST: tl.constexpr,
            ASM: tl.constexpr, WORDS: tl.constexpr = 0):
    """p [GP, NBI * T] fp32 times NBI blocks' values -> [GP, D] fp32. voff: V section bytes.

    8-bit value codes (int8 and fp8) are channel-major in the slot (``[H, D, T]``,
    engine/layout.py): the PV operand is then read along its reduction axis (tokens), as
    the keys are."""
    if VB == 0:
        t3 = tl.arange(0, T)[None, :, None]
        d3 = tl.arange(0, D)[None, None, :]
        valid3 = t3 < ntok[:, None, None]
        e0 = tl.multiple_of(voff // ESIZE, 16 // ESIZE)                  # [NBI] elements
        e = e0[:, None, None] + kvh * T * D + t3 * D + d3
        v = tl.load(arena_st + e, mask=valid3, other=0.0)            # [NBI, T, D]
        if UPCAST:
            v = v.to(tl.float32).to(DT)
    elif VB == FP8:
        FP8_CODE_BYTES: tl.constexpr = (H * T * D + 15) // 16 * 16
        d3v = tl.arange(0, D)[None, :, None]
        t3v = tl.arange(0, T)[None, None, :]
        # masked per block only; tokens past ntok have p == 0 and finite codes
        raw = tl.load(arena_u8 + voff[:, None, None] + kvh * D * T + d3v * T + t3v,
                      mask=ntok[:, None, None] > 0, other=0)         # [NBI, D, T]
        m0 = tl.multiple_of((voff + FP8_CODE_BYTES) // MSIZE, 16 // MSIZE)  # [NBI] elements
        sv = tl.load(arena_md + m0 + kvh, mask=ntok > 0, other=0.0)[:, None, None]
        if DT == tl.float16:
            vt = fp8_to(raw, DT) * sv.to(DT)                         # one packed fp16 mul
        else:
            vt = (fp8_to(raw, tl.float32) * sv.to(tl.float32)).to(DT)
        v = tl.permute(vt, (0, 2, 1))                                # [NBI, T, D]
    else:
        PER: tl.constexpr = 8 // VB
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
        if VB == 8:
            # channel-major codes [D, T] (engine/layout.py values_channel_major)
            d3v = tl.arange(0, D)[None, :, None]
            t3v = tl.arange(0, T)[None, None, :]
            raw = tl.load(arena_u8 + voff[:, None, None] + kvh * D * T + d3v * T + t3v,
                          mask=ntok[:, None, None] > 0, other=0)     # [NBI, D, T]
            ct = unpack(raw, VB, DT, ASM, FAST)
            c = tl.reshape(tl.permute(ct, (0, 2, 1)), (NBI, T, NG, G))
        elif WORDS // 2 == 1 and FAST and VB >= 4:
            # codes read and converted as int32 words (no byte unpacking)
            DW: tl.constexpr = D // PER // 4                         # words per row
            w3 = tl.arange(0, DW)[None, None, :]
            t3w = tl.arange(0, T)[None, :, None]
            arena_w = arena_u8.to(tl.pointer_type(tl.int32), bitcast=True)
            wd = tl.load(arena_w + (voff // 4)[:, None, None] + kvh * T * DW + t3w * DW + w3,
                         mask=ntok[:, None, None] > 0, other=0)
            c = tl.reshape(word_codes(wd, VB, ASM), (NBI, T, NG, G))
        else:
            raw = tl.load(arena_u8 + off4 + kvh * T * (D // PER) + t4 * (D // PER)
                          + g4 * GB + j4, mask=ntok[:, None, None, None] > 0, other=0)
            c = tl.reshape(unpack(raw, VB, DT, ASM, FAST), (NBI, T, NG, G))
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
            v = (code_f32(c) * sc + zr).to(DT)
    v2 = tl.reshape(v, (NBI * T, D))
    return _dot(p.to(DT), v2, IEEE)


@triton.jit
def _run_blocks(qd, m_i, l_i, acc, b, kvh, head, hmask, start, end,
                off_ptr, ntok_ptr, perm_ptr, bmax_ptr, bsum_ptr, arena_u8, arena_st, arena_md,
                NB, qk_scale,
                HQ: tl.constexpr, T: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
                H: tl.constexpr, ESIZE: tl.constexpr, MSIZE: tl.constexpr,
                KB: tl.constexpr, VB: tl.constexpr, VOFF: tl.constexpr, NBI: tl.constexpr,
                DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
                ASM: tl.constexpr, FAST: tl.constexpr, WORDS: tl.constexpr,
                ROWLEN: tl.constexpr):
    """Entries ``start .. end`` of row ``b`` (one format, compiled in), NBI blocks an
    iteration, merged into the running state (m_i, l_i, acc); per-block partials stored."""
    tcol = tl.arange(0, T)
    GP: tl.constexpr = qd.shape[0]
    for blk0 in range(start, end, NBI):
        bi = blk0 + tl.arange(0, NBI)
        bmask = bi < end
        ntok = tl.load(ntok_ptr + b * NB + bi, mask=bmask, other=0)           # [NBI]
        off = tl.multiple_of(tl.load(off_ptr + b * NB + bi, mask=bmask, other=0), 16)
        # ---- logits [GP, NBI * T]
        s = _scores(qd, arena_u8, arena_st, arena_md, off, ntok, kvh, KB, NBI, T, D, H,
                    ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM, WORDS)
        voff = tl.multiple_of(off + VOFF, 16)
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
        pv = _values(p, arena_u8, arena_st, arena_md, voff, ntok, kvh, VB, NBI, T, D, G, H,
                     ESIZE, MSIZE, DT, UPCAST, IEEE, FAST, ASM, WORDS)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def _store_holes(bmax_ptr, bsum_ptr, b, head, hmask, cols, ok, HQ: tl.constexpr, NB):
    """Partials (-inf, 0) of row b's columns ``cols`` (where ``ok``): entries not attended."""
    hp = (b * HQ + head)[:, None] * NB + cols[None, :]
    hm = hmask[:, None] & ok[None, :]
    GP: tl.constexpr = head.shape[0]
    C: tl.constexpr = cols.shape[0]
    tl.store(bmax_ptr + hp, tl.full([GP, C], float("-inf"), tl.float32), mask=hm)
    tl.store(bsum_ptr + hp, tl.zeros([GP, C], tl.float32), mask=hm)


@triton.jit
def _load_q(q_ptr, b, head, hmask, HQ: tl.constexpr, D: tl.constexpr):
    d = tl.arange(0, D)
    return tl.load(q_ptr + (b * HQ + head)[:, None] * D + d[None, :], mask=hmask[:, None],
                   other=0.0).to(tl.float32)


@triton.jit
def _share(rs, n, sp, NBI: tl.constexpr):
    """This split's entries of a row's run of ``n`` entries from ``rs``: the splits share
    it in whole iterations. Returns (start, end, the run's end)."""
    per = tl.cdiv(tl.cdiv(n, tl.num_programs(2)), NBI) * NBI
    start = rs + sp * per
    return start, tl.minimum(start + per, rs + n), rs + n


# runtime integers are not specialized on (Triton compiles a variant per argument that is
# 1 or a multiple of 16): table widths, split counts and partial offsets change from step
# to step, and each new combination stopped a step for a compile (H100, the headline's
# adaptive run: 32 compiles, 38.5 s of steps; docs/BENCHMARKS.md, twelfth session). Nor
# is the 16-byte alignment of the per-row run pointers (one scalar load a program): a
# format's run is row f of FormatGroups' [F, B] tables, at f * B * 4 bytes, so whether it
# is aligned changed with the batch size
@triton.jit(do_not_specialize=["NB", "blocks_per_split", "S0", "STOT", "FILL", "perm_ptr",
                               "rstart_ptr", "rlen_ptr", "rstart2_ptr", "rlen2_ptr"])
def _paged_decode_kernel(
    q_ptr,         # [B, Hq, D] query (any float dtype)
    arena_u8,      # [bytes] uint8: one layer's arena row
    arena_st,      # [bytes / ESIZE] store dtype view of the same storage
    arena_md,      # [bytes / MSIZE] meta dtype view of the same storage
    off_ptr,       # [B, NB] int64 slot byte offsets
    ntok_ptr,      # [B, NB] int32 valid tokens (0 = hole)
    perm_ptr,      # [B, NB] int64 original column of each entry (read only when ROWLEN)
    rstart_ptr,    # [B] int32 first entry of this launch's run in each row (ROWLEN)
    rlen_ptr,      # [B] int32 entries in that run (ROWLEN), or columns the row attends (DYN)
    rstart2_ptr,   # [B] int32 the same for the second format's run (TWO)
    rlen2_ptr,     # [B] int32
    bmax_ptr,      # [B, Hq, NB] fp32 out: per-block max logit
    bsum_ptr,      # [B, Hq, NB] fp32 out: per-block sum of exp(logit - max)
    pm_ptr,        # [B, Hq, S] fp32 out: split max (log2 units)
    pl_ptr,        # [B, Hq, S] fp32 out: split sum of exp2
    pacc_ptr,      # [B, Hq, S, D] fp32 out: split unnormalized output
    NB, blocks_per_split, qk_scale, S0, STOT,
    HQ: tl.constexpr, H: tl.constexpr, GQ: tl.constexpr, GP: tl.constexpr,
    T: tl.constexpr, D: tl.constexpr, G: tl.constexpr,
    ESIZE: tl.constexpr, MSIZE: tl.constexpr,
    KB: tl.constexpr, VB: tl.constexpr,     # key / value code of the format (KVFormat.k_code)
    VOFF: tl.constexpr,                     # byte offset of the value section in a slot
    NBI: tl.constexpr, DT: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
    ASM: tl.constexpr, FAST: tl.constexpr, ROWLEN: tl.constexpr,
    WORDS: tl.constexpr = 0,      # code words (int32 loads): 1 keys, 2 values (4-bit), 3 both
    DYN: tl.constexpr = False,    # splits share each row's own length (rlen), not NB
    # a second format in the same launch (ROWLEN): its run of each row, shared by the
    # splits as the first one's is, into the same running state; its own compiled-in path
    TWO: tl.constexpr = False,
    KB2: tl.constexpr = 0, VB2: tl.constexpr = 0, VOFF2: tl.constexpr = 0,
    NBI2: tl.constexpr = 1, DT2: tl.constexpr = tl.float16, UPCAST2: tl.constexpr = False,
    IEEE2: tl.constexpr = False, ASM2: tl.constexpr = False, FAST2: tl.constexpr = False,
    WORDS2: tl.constexpr = 0,
    # ROWLEN: this launch covers every run of the row, so it also writes the partials of
    # the entries past them (holes, a graph's padding) as (-inf, 0). A runtime flag, not
    # compiled in: which format's launch comes last changes with the formats a step holds
    FILL=0,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    sp = tl.program_id(2)
    rows = tl.arange(0, GP)
    hmask = rows < GQ
    head = kvh * GQ + rows
    m_i = tl.full([GP], float("-inf"), tl.float32)
    l_i = tl.zeros([GP], tl.float32)
    acc = tl.zeros([GP, D], tl.float32)
    if ROWLEN:
        # this launch covers one run of each row (the blocks of one format), shared by
        # the splits in whole iterations: a graph's launch is sized by its table width
        # (twice a row's blocks, at worst), so splits of the width's share left half of
        # them idle and the rest doing twice the work (an H100 step at batch 8 / 32K,
        # int4 + full in a 2,048-column graph: 494 us a layer for its two launches,
        # 314 us in the kernel benchmark, whose launches are sized to the blocks)
        start, end, past = _share(tl.load(rstart_ptr + b), tl.load(rlen_ptr + b), sp, NBI)
    elif DYN:
        # the row's columns (a graph's table is as wide as its bucket, the row often far
        # shorter) shared by the splits in whole iterations; the columns past the row
        # in this split's share of the table are holes: (-inf, 0) partials
        n = tl.load(rlen_ptr + b)
        start, end, _ = _share(0, n, sp, NBI)
        h1 = tl.minimum(sp * blocks_per_split + blocks_per_split, NB)
        for c0 in range(tl.maximum(sp * blocks_per_split, n), h1, 16):
            cols = c0 + tl.arange(0, 16)
            _store_holes(bmax_ptr, bsum_ptr, b, head, hmask, cols, cols < h1, HQ, NB)
    else:
        start = sp * blocks_per_split
        end = tl.minimum(start + blocks_per_split, NB)
    q = _load_q(q_ptr, b, head, hmask, HQ, D)
    m_i, l_i, acc = _run_blocks(
        q.to(DT), m_i, l_i, acc, b, kvh, head, hmask, start, end, off_ptr, ntok_ptr,
        perm_ptr, bmax_ptr, bsum_ptr, arena_u8, arena_st, arena_md, NB, qk_scale,
        HQ, T, D, G, H, ESIZE, MSIZE, KB, VB, VOFF, NBI, DT, UPCAST, IEEE, ASM, FAST, WORDS,
        ROWLEN)
    if TWO:
        # the second format's run (short: the newest full blocks beside old quantized
        # ones) in the same launch, instead of a second launch and its setup per layer.
        # Its loop after the first costs the first registers: at the int4 launch's cap of
        # 128, the sm_90 SASS of the int4 loop reloads 9 spilled values an iteration (0
        # alone; 13-14 with the second run or the fill before it): which way is faster is
        # measured (decode_kernel: grouped against grouped-2launch)
        start2, end2, past2 = _share(tl.load(rstart2_ptr + b), tl.load(rlen2_ptr + b), sp,
                                     NBI2)
        past = tl.maximum(past, past2)      # the runs are the row's first entries
        q2 = _load_q(q_ptr, b, head, hmask, HQ, D)
        m_i, l_i, acc = _run_blocks(
            q2.to(DT2), m_i, l_i, acc, b, kvh, head, hmask, start2, end2, off_ptr, ntok_ptr,
            perm_ptr, bmax_ptr, bsum_ptr, arena_u8, arena_st, arena_md, NB, qk_scale,
            HQ, T, D, G, H, ESIZE, MSIZE, KB2, VB2, VOFF2, NBI2, DT2, UPCAST2, IEEE2, ASM2,
            FAST2, WORDS2, True)
    if ROWLEN:  # (FILL is only ever set with ROWLEN: past is the runs' end)
        if FILL != 0:
            # entries past the row's runs (holes and padding: their permuted positions), shared
            # by the splits: (-inf, 0), so that no fill of the outputs is launched first
            per3 = tl.cdiv(NB - past, tl.num_programs(2))
            p0 = past + sp * per3
            p1 = tl.minimum(p0 + per3, NB)
            for c0 in range(p0, p1, 16):
                pos = c0 + tl.arange(0, 16)
                ok = pos < p1
                cols = tl.load(perm_ptr + b * NB + pos, mask=ok, other=0).to(tl.int32)
                _store_holes(bmax_ptr, bsum_ptr, b, head, hmask, cols, ok, HQ, NB)
    part = (b * HQ + head) * STOT + S0 + sp
    d = tl.arange(0, D)
    tl.store(pm_ptr + part, m_i, mask=hmask)
    tl.store(pl_ptr + part, l_i, mask=hmask)
    tl.store(pacc_ptr + part[:, None] * D + d[None, :], acc, mask=hmask[:, None])


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def table_formats(block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                  block_ntok: torch.Tensor) -> tuple[KVFormat, ...]:
    """The formats of a table's attended entries (one device sync)."""
    codes = torch.unique(table_codes(block_kbits, block_vbits)[block_ntok > 0]).tolist()
    return tuple(KVFormat.from_code(c) for c in codes)


def paged_decode_triton(q: torch.Tensor, arena_row: torch.Tensor, block_offsets: torch.Tensor,
                        block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                        block_ntok: torch.Tensor, geom: BlockGeometry, sm_scale: float, *,
                        fmt: KVFormat | None = None,
                        formats: list[KVFormat] | tuple[KVFormat, ...] | None = None,
                        groups: "FormatGroups | None" = None,
                        num_splits: int | None = None, blocks_per_iter: int | None = None,
                        num_warps: int | None = None, num_stages: int | None = None,
                        fast: bool | None = None, maxnreg: int | None = None,
                        word_codes: bool | str | None = None, launch_cache: dict | None = None,
                        row_len: torch.Tensor | None = None, fuse: bool | None = None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract and results as ``paged_decode_ref`` (see engine/kernels/paged_decode.py).

    q [B, Hq, D]; arena_row [bytes] uint8; block_offsets [B, NB] int64;
    block_kbits / block_vbits (format codes, ``KVFormat.k_code``) / block_ntok [B, NB] int32.
    returns out [B, Hq, D] (q.dtype), block_max / block_sumexp [B, Hq, NB] fp32.

    Each launch has its format compiled in. Which formats the table holds comes from:
    ``fmt``: a promise that every non-hole block has this format (one launch);
    ``groups``: the caller's host-side grouping of a mixed table (FormatGroups.from_rows;
    one launch per format, each sized by its longest run, no sort on the device);
    ``formats``: the formats the table may hold (grouped on the device, no sync);
    none of these: the formats are found here, at the cost of one device sync (the engine
    always passes ``fmt`` or ``groups``: engine/plan.py).
    ``word_codes``: int8/int4 codes read as int32 words and converted per word (fp16
    operands only): True (keys and 4-bit values), "k", "v", False; None (default): keys
    of int8 tables on CUDA (decode_launch.default_word_codes).
    ``fast``: integer codes converted and dequantized in fp16 (default: with fp16 operands).
    ``num_splits`` / ``blocks_per_iter`` / ``num_warps`` / ``num_stages`` / ``maxnreg``
    override the launch heuristics (engine/kernels/decode_launch.py).
    ``launch_cache``: a dict that lives for one engine step (CUDA): launch plans and
    compiled kernels are reused across the step's layers (``decode_launch.launch``).
    ``row_len`` ([B] int32 on q's device): the columns each row attends, the rest of the
    row being holes; the splits of a one-format launch then share each row's own length
    instead of the table's width (a CUDA graph's table is its width bucket).
    ``fuse``: a grouped table of two formats in one launch (each program reads its share of
    both runs) instead of one launch per format; None: ``decode_launch.FUSE_TWO_FORMATS``.
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
    if row_len is not None and (row_len.dtype != torch.int32 or row_len.shape != (B,)
                                or row_len.device != q.device):
        raise ValueError(f"row_len must be [B={B}] int32 on {q.device}, got "
                         f"{tuple(row_len.shape)} {row_len.dtype} on {row_len.device}")
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
              num_stages=num_stages, fast=fast, maxnreg=maxnreg, word_codes=word_codes)
    mine = False
    if fmt is None and groups is None:
        formats = tuple(formats) if formats is not None else table_formats(kbits, vbits, ntok)
        if len(formats) <= 1:
            fmt = formats[0] if formats else FULL     # no formats: every entry is a hole
        else:
            groups = FormatGroups.from_table(kbits, vbits, formats, ntok)
            mine = True
    if fmt is None:
        # the caller's grouping is the step's (the same for every layer): its gathered
        # table is cached with the step's launches; one made here lives for this call
        offs_g, ntok_g = _grouped_table(offs, ntok, groups, None if mine else launch_cache)
        F = len(groups.formats)
        if fuse is None:
            fuse = decode_launch.FUSE_TWO_FORMATS
        ml = groups.max_length
        if F == 2 and fuse and any(_gluon_serves(f, q, geom) for f in groups.formats):
            fuse = False      # the Gluon kernel's int4 launch beside the other format's
        if F == 2 and fuse:
            # one launch: a table of two formats (old quantized blocks, the newest full
            # ones) runs both runs of each row in each program
            i1 = _primary(groups)
            n = min(NB, sum(ml)) if ml else NB
            x = _plan_launch(q, geom, groups.formats[i1], B, max(1, n), kw, launch_cache,
                             fmt2=groups.formats[1 - i1])
            launches = [(i1, x)]
        else:
            # one compiled-in launch per format over that format's run of each (grouped)
            # row; per-block partials go to the blocks' own columns, split partials to one
            # buffer
            launches = [(i, _plan_launch(q, geom, f, B, ml[i] if ml else NB, kw, launch_cache))
                        for i, f in enumerate(groups.formats) if (ml[i] if ml else NB) > 0]
        stot = sum(x.S for _, x in launches) or 1
        pm = torch.empty(B, Hq, stot, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hq, stot, D, dtype=torch.float32, device=dev)
        if not launches:
            bmax.fill_(float("-inf"))
            bsum.zero_()
            pm.fill_(float("-inf"))
            pl.zero_()
            pacc.zero_()
        s0s = list(itertools.accumulate((x.S for _, x in launches), initial=0))

        def run_one(j):
            # the last launch's run ends where the row's runs end (runs are laid out in
            # format order): it also writes the partials of every entry past them (holes,
            # a graph's padding) as (-inf, 0), so that no fill of the outputs runs first.
            # The launches write disjoint columns and split slices: any order, or at once
            i, x = launches[j]
            x.run(q, arena_row, offs_g, ntok_g, bmax, bsum, pm, pl, pacc, s0s[j], stot,
                  run=(groups.perm, groups.start[i], groups.length[i]),
                  run2=((groups.start[1 - i], groups.length[1 - i]) if x.path2 else None),
                  fill=j == len(launches) - 1, sm_scale=sm_scale, cache=launch_cache)

        if OVERLAP_RUNS and q.is_cuda and len(launches) == 2:
            # the launch of fewer splits (the short full run) on the side stream
            small = min((0, 1), key=lambda j: launches[j][1].S)
            main = torch.cuda.current_stream(dev)
            side = _SIDE_STREAMS.get(dev)
            if side is None:
                side = _SIDE_STREAMS[dev] = torch.cuda.Stream(dev)
            side.wait_stream(main)
            with torch.cuda.stream(side):
                run_one(small)
            run_one(1 - small)
            main.wait_stream(side)
        else:
            for j in range(len(launches)):
                run_one(j)
    else:
        x = _plan_launch(q, geom, fmt, B, NB, kw, launch_cache)
        pm = torch.empty(B, Hq, x.S, dtype=torch.float32, device=dev)
        pl = torch.empty_like(pm)
        pacc = torch.empty(B, Hq, x.S, D, dtype=torch.float32, device=dev)
        x.run(q, arena_row, offs, ntok, bmax, bsum, pm, pl, pacc, 0, x.S,
              run=None, sm_scale=sm_scale, cache=launch_cache, row_len=row_len)
    reduce_splits(pm, pl, pacc, out, launch_cache)
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
    def from_table(cls, kbits: torch.Tensor, vbits: torch.Tensor, formats,
                   ntok: torch.Tensor | None = None) -> "FormatGroups":
        """On the device (no sync): a stable sort of the columns by format. With ``ntok``
        the holes (0 tokens) are in no run: a CUDA graph's table is as wide as its bucket,
        and its padding columns (codes 0, as full blocks' are) would otherwise make a run
        of up to a thousand holes per row that the full-precision launch loops over (at
        batch 8 / 32K on an H100: 463 us a layer for int4 + full in the graph against 292
        in the kernel benchmark)."""
        formats = tuple(formats)
        code = table_codes(kbits, vbits)
        if ntok is not None:
            code = torch.where(ntok > 0, code, -1)
        order = torch.full_like(code, len(formats))
        for i, f in enumerate(formats):
            order = torch.where(code == f.code, i, order)
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
                               key=lambda f: f.code))
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




def _grouped_table(offs, ntok, groups: FormatGroups, cache: dict | None):
    """The table's offsets and token counts in grouped order: the same for every layer of
    a step, so gathered once a step (``cache``) instead of once a layer."""
    key = ("grouped", id(groups), id(offs), id(ntok))
    hit = cache.get(key) if cache is not None else None
    if hit is not None:
        return hit[1], hit[2]
    offs_g, ntok_g = offs.gather(1, groups.perm), ntok.gather(1, groups.perm)
    if cache is not None:
        cache[key] = ((groups, offs, ntok), offs_g, ntok_g)   # keeps the ids alive
    return offs_g, ntok_g


def warm_up_pairs(arena_row: torch.Tensor, geom: BlockGeometry, num_q_heads: int,
                  dtype: torch.dtype, formats) -> None:
    """Compile the one-launch kernel of each format beside full-precision blocks with
    either leading. A step's grouped table leads with the format of the longest run
    (``_primary``): full precision where a batch's full-precision runs are the longer
    ones, which the engine's warm-up steps (short requests, decoded in CUDA graphs whose
    tables lead with the quantized format) never make; on the H100 headline that variant
    compiled mid-run, 1.4-2.8 s of a step (docs/BENCHMARKS.md, thirteenth session).
    Formats the Gluon kernel serves also in a one-format table with row lengths.
    Reads slot 0 of ``arena_row`` whatever it holds; the outputs are dropped."""
    dev = arena_row.device
    T = geom.block_size
    q = torch.zeros(2, num_q_heads, geom.head_dim, dtype=dtype, device=dev)
    for f in dict.fromkeys(formats):
        if f.is_full:
            continue
        for long, short in ((f, FULL), (FULL, f)):
            rows = [[(0, long), (1, long)], [(0, short)]]
            kb = torch.tensor([[long.k_code] * 2, [short.k_code, 0]], dtype=torch.int32)
            vb = torch.tensor([[long.v_code] * 2, [short.v_code, 0]], dtype=torch.int32)
            ntok = torch.tensor([[T, T], [T, 0]], dtype=torch.int32)
            paged_decode_triton(q, arena_row, torch.zeros(2, 2, dtype=torch.int64, device=dev),
                                kb.to(dev), vb.to(dev), ntok.to(dev), geom, 1.0,
                                groups=FormatGroups.from_rows(rows, 2, dev))
        if _gluon_serves(f, q, geom):
            # a table of this format alone in a graph (each row's own length): the Gluon
            # kernel compiles that mode apart from the grouped one above
            kb = torch.full((2, 2), f.k_code, dtype=torch.int32, device=dev)
            vb = torch.full((2, 2), f.v_code, dtype=torch.int32, device=dev)
            paged_decode_triton(q, arena_row, torch.zeros(2, 2, dtype=torch.int64, device=dev),
                                kb, vb, torch.full((2, 2), T, dtype=torch.int32, device=dev),
                                geom, 1.0, fmt=f,
                                row_len=torch.tensor([2, 1], dtype=torch.int32, device=dev))


def _primary(groups: FormatGroups) -> int:
    """The format whose launch settings a one-launch grouped table takes: the longest run
    where known, else the first quantized format (old blocks quantized, the newest full:
    the quantized run is the long one)."""
    if groups.max_length:
        return max(range(len(groups.formats)), key=lambda i: groups.max_length[i])
    quant = [i for i, f in enumerate(groups.formats) if not f.is_full]
    return quant[0] if quant else 0


def _plan_launch(q, geom, fmt, B, NB, kw: dict, cache: dict | None,
                 fmt2: KVFormat | None = None) -> "_Launch":
    """_Launch(q, geom, fmt, B, NB, fmt2, **kw), shared by the layers of a step via
    ``cache``."""
    if cache is None:
        return _Launch(q, geom, fmt, B, NB, fmt2, **kw)
    key = ("triton-plan", q.shape, q.dtype, q.device, geom, fmt, fmt2, B, NB,
           tuple(kw.items()))
    x = cache.get(key)
    if x is None:
        x = cache[key] = _Launch(q, geom, fmt, B, NB, fmt2, **kw)
    return x


@dataclass(frozen=True)
class _Path:
    """How one format compiled into a launch is read: ``tl.dot`` operand dtype, fp16
    dequantization, blocks an iteration, int32 code words (bits: 1 keys, 2 values)."""
    fmt: KVFormat
    dot_dtype: torch.dtype
    fast: bool
    nbi: int
    words: int

    @classmethod
    def of(cls, geom: BlockGeometry, fmt: KVFormat, cuda: bool, fast, blocks_per_iter,
           word_codes) -> _Path:
        # tl.dot operands: the store dtype; fp32 (IEEE) for fp32 stores and for head_dim
        # < 64, where fp16 operands from unpacked 4/2-bit codes gave wrong results on the
        # H200 (triton 3.6; head_dim 64 and 128 were right; cause not isolated). Codes
        # beside a bf16 store go to the dot in fp16 too: their scales are fp16
        # (layout.meta_dtype_for) and only fp16 has the exact code conversion and the
        # packed dequantization (bf16 operands took the fp32 path: an H100 step at batch 8
        # / 32K with int4 blocks ran 3x slower than with full ones, 2026-12-06)
        if geom.head_dim < 64 or geom.store_dtype == torch.float32:
            dot_dtype = torch.float32
        elif fmt.is_full:
            dot_dtype = geom.store_dtype
        else:
            dot_dtype = torch.float16
        # fp16 operands: integer codes -> exact fp16 and one packed fma per two elements
        # (PTX code conversion on CUDA); otherwise dequantization in fp32
        f16 = dot_dtype == torch.float16
        fast = f16 if fast is None else fast and f16
        nbi = max(blocks_per_iter or 2,
                  decode_launch.min_blocks_per_iter(fmt, geom.block_size, f16))
        if word_codes is None:
            word_codes = decode_launch.default_word_codes(fmt, cuda)
        if isinstance(word_codes, str):
            if word_codes not in ("k", "v", "kv"):
                raise ValueError("word_codes must be a bool, 'k', 'v' or 'kv', not "
                                 f"{word_codes!r}")
            words = ("k" in word_codes) + 2 * ("v" in word_codes)
        else:
            words = 3 if word_codes else 0
        return cls(fmt, dot_dtype, fast, nbi, words if fast else 0)

    def consts(self, geom: BlockGeometry, cuda: bool, suffix: str = "") -> dict:
        """The kernel's compile-time arguments for this format (names + ``suffix``)."""
        fmt, f16 = self.fmt, self.dot_dtype == torch.float16
        sec = geom.sections(fmt)
        c = dict(KB=fmt.k_code, VB=fmt.v_code,
                 VOFF=sec["v" if fmt.v_bits == 0 else "v_codes"][0],
                 NBI=self.nbi, DT=_TL_DTYPE[self.dot_dtype],
                 UPCAST=(geom.store_dtype == torch.bfloat16
                         or geom.store_dtype != self.dot_dtype),
                 IEEE=self.dot_dtype == torch.float32,
                 ASM=_PTX and cuda and f16 and self.fast, FAST=self.fast, WORDS=self.words)
        return {k + suffix: v for k, v in c.items()}


class _Launch:
    """One decode-kernel launch: its configuration (from the format and the launch
    heuristics) and ``run``, which writes split partials at ``s0`` of buffers ``stot``
    wide. ``fmt2``: a second format compiled into the same launch (its own run of each
    row); the launch settings are ``fmt``'s."""

    def __init__(self, q, geom, fmt, B, NB, fmt2=None, *, num_splits, blocks_per_iter,
                 num_warps, num_stages, fast, maxnreg, word_codes):
        H = geom.num_kv_heads
        cuda = q.is_cuda
        if (blocks_per_iter, num_stages, maxnreg) == (None, None, None):
            blocks_per_iter, num_stages, maxnreg = decode_launch.format_defaults(fmt, cuda)
        self.path = _Path.of(geom, fmt, cuda, fast, blocks_per_iter, word_codes)
        self.path2 = None if fmt2 is None else _Path.of(
            geom, fmt2, cuda, fast, decode_launch.format_defaults(fmt2, cuda)[0], None)
        self.warps, self.stages, self.maxnreg, self.geom = num_warps or 4, num_stages or 2, \
            maxnreg, geom
        # the Gluon kernel: 4 warps, each its own block (4 blocks an iteration)
        self.gluon = None if fmt2 is not None else _gluon_module(fmt, q, geom)
        self.gluon_kw = {"fp8": True} if fmt == _FP8 else {}
        self.key = (q.device, self.path, self.path2, geom, q.shape[1], self.warps,
                    self.stages, maxnreg, self.gluon)
        self.S, self.bps = decode_launch.launch_config(
            B, H, NB, q.device, num_splits, 4 if self.gluon else self.path.nbi,
            decode_launch.RESIDENT.get(self.key))

    def run(self, q, arena_row, offs, ntok, bmax, bsum, pm, pl, pacc, s0, stot, *, run,
            sm_scale, cache=None, row_len=None, run2=None, fill=False):
        geom = self.geom
        B, Hq, D = q.shape
        H, T, G = geom.num_kv_heads, geom.block_size, geom.value_group
        n = arena_row.numel() // 4 * 4
        arena_st = arena_row[:n].view(geom.store_dtype)
        arena_md = arena_row[:n].view(geom.meta_dtype)
        perm, rstart, rlen = run if run is not None else (offs, ntok, ntok)  # unread
        rstart2, rlen2 = run2 if run2 is not None else (rstart, rlen)       # unread
        dyn = run is None and row_len is not None
        if dyn:
            rlen = row_len
        if self.gluon is not None:
            fn, args, consts, opts = self.gluon.kernel_call(
                q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm, pl, pacc,
                self.bps, sm_scale, s0, stot, geom, rowlen=run is not None, dyn=dyn,
                fill=fill and run is not None, **self.gluon_kw)
            ck = _launch(fn, (B, H, self.S), args, consts, opts, cache)
            self._resident(ck, q)
            return
        consts = dict(HQ=Hq, H=H, GQ=Hq // H, GP=max(16, triton.next_power_of_2(Hq // H)),
                      T=T, D=D, G=G, ESIZE=geom.store_elem, MSIZE=geom.meta_elem,
                      ROWLEN=run is not None, DYN=dyn, FILL=int(fill and run is not None),
                      **self.path.consts(geom, q.is_cuda))
        if self.path2 is not None and run2 is not None:
            consts.update(TWO=True, **self.path2.consts(geom, q.is_cuda, "2"))
        ck = _launch(_paged_decode_kernel, (B, H, self.S), (
            q, arena_row, arena_st, arena_md, offs, ntok, perm, rstart, rlen, rstart2, rlen2,
            bmax, bsum, pm, pl, pacc, offs.shape[1], self.bps, float(sm_scale) * LOG2E, s0, stot
        ), consts, dict(num_warps=self.warps, num_stages=self.stages,
                        **({"maxnreg": self.maxnreg} if self.maxnreg else {})), cache)
        self._resident(ck, q)

    def _resident(self, ck, q):
        if q.is_cuda and self.key not in decode_launch.RESIDENT:
            res = decode_launch.resident_programs(ck, q.device)
            if res:
                decode_launch.RESIDENT[self.key] = res


def _launch(fn, grid, args, consts, options, cache):
    """decode_launch.launch, looked up per call (tests and benchmarks/profile_step.py
    replace either)."""
    return decode_launch.launch(fn, grid, args, consts, options, cache)


def slot_bytes_read(geom: BlockGeometry, fmt: KVFormat) -> int:
    """Bytes the kernel reads for one full block (all kv heads), alignment padding excluded."""
    H, T, D, G = geom.num_kv_heads, geom.block_size, geom.head_dim, geom.value_group
    me = geom.meta_elem
    if fmt.k_bits == 0:
        k = H * T * D * geom.store_elem
    elif fmt.k_fp8:
        k = H * T * D + H * me
    else:
        k = H * T * D * fmt.k_bits // 8 + 2 * H * D * me
    if fmt.v_bits == 0:
        v = H * T * D * geom.store_elem
    elif fmt.v_fp8:
        v = H * T * D + H * me
    else:
        v = H * T * D * fmt.v_bits // 8 + 2 * H * T * (D // G) * me
    return k + v
