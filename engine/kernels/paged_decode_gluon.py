"""Gluon flash-decoding over int4 blocks: one warp per block, codes loaded straight into
the tensor-core operand layout (issue 14).

Why: the Triton kernel (engine/kernels/paged_decode_triton.py) serves the 4 query heads
of a kv head as 16 padded MMA rows split over 4 warps, so each iteration stages the
dequantized tiles through shared memory into the operand layout and passes the
probabilities between warps; its int4 loop ran ~15 instructions per code element and
read int4 blocks at ~40% of SDPA's bandwidth (H100, docs/BENCHMARKS.md). Here (Gluon's
explicit layouts, triton >= 3.6) each warp owns whole blocks and attends them alone:

* logits transposed, ``S^T = K q^T``: the block's 32 tokens are the MMA's M side and the
  query heads its N side (8, not 16, padded rows); ``O^T = V^T P^T`` the same way.
* every thread loads the codes its operand fragment needs as int64 words (16-byte key
  loads) and turns them into fp16 in registers (PTX: two nibbles under an fp16 exponent
  with one lop3, one packed fma per two codes). Nothing goes through shared memory; the
  values' loads are issued before the keys' work, so that they are in flight during it.
* the operand's reduction axis is permuted (a bijection of the channels, applied to q
  and the key scales too), so that each thread's codes are contiguous bytes; the output
  channels are permuted back at the store.
* each warp keeps its own running (max, sum, output); the 4 warps merge once at the end.

On one H100 (docs/BENCHMARKS.md, "The Gluon int4 kernel"): 1.66-2.50x SDPA against the
Triton kernel's 1.20-1.23x; at batch 8 / 128K its slot bytes read at 76-78% of SDPA's
bandwidth.

Same slot layout, outputs and split contract as the Triton kernel (per-block partials,
per-split running state reduced by split_reduce_triton), for the one format it handles:
int4 keys and values, block_size 32, head_dim 128, value groups of 32 channels, at most
8 query heads per kv head, 16-bit stores (fp16 scales), fp16 dot operands. CUDA only (the
interpreter cannot run Gluon): its tests run on a GPU. Reached through
``paged_decode_triton``, which routes int4 launches here (``GLUON_INT4``).
"""
from __future__ import annotations

import torch

from engine.layout import KVFormat

try:  # Gluon: triton >= 3.5
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2
    HAVE_GLUON = True
except ImportError:  # pragma: no cover - older triton
    HAVE_GLUON = False

LOG2E = 1.4426950408889634

# Integer codes become fp16 without a conversion instruction, under an fp16 exponent:
# exact: 0x6400 | c is 1024 + c, one sub.f16x2 per two codes removes the 1024 (the Triton
# kernel's way). c16: 0x3C00 | c << 6 is 1 + c / 16, so c * s + z = 16 (x s + z / 16 - s)
# with x that value: no subtraction (the factor 16 goes on q and p, z / 16 - s is computed
# once a block). Its extra rounding, of z / 16 - s in fp16, is at most (|z| + 16 s) 2^-11
# in a key or value (s the step of the int4 grid): about as much as the fp16 fma's own
# rounding of the result (|x| <= |z| + 15 s), far below int4's error (up to s / 2).
def _nib(src: str, shift: int, c16: bool) -> str:
    """PTX: the nibbles at bits ``shift`` .. + 3 of both 16-bit halves of ``src`` -> x as
    fp16 codes (exact: + 1024; c16: 1 + c / 16; see above)."""
    if c16:
        sh = 6 - shift
        mv = (f" shl.b32 x, {src}, {sh};" if sh > 0 else f" shr.b32 x, {src}, {-sh};")
        return mv + " lop3.b32 x, x, 0x03C003C0, m, 0xEA;"
    mv = f" shr.b32 x, {src}, {shift};" if shift else f" mov.b32 x, {src};"
    return mv + " lop3.b32 x, x, 0x000F000F, m, 0xEA; sub.f16x2 x, x, m;"


def k_asm(c16: bool) -> str:
    """A token's int64 word of key codes (16 nibbles: channel k in bits 4k..4k+3) and the
    (scale, zero) pairs of its channels (2j, 2j + 1) -> its 16 dequantized keys (c16:
    divided by 16, the zero pairs being z / 16 - s), output k = channel k. prmt puts two
    bytes of the word and of the word shifted by 4 side by side, so that one lop3 puts
    channels 2j and 2j + 1 under the fp16 exponent; one fma.rn.f16x2 dequantizes them."""
    m = "0x3C003C00" if c16 else "0x64006400"
    return (
        f"{{ .reg .b32 lo, hi, w4, y, x, m; mov.b64 {{lo, hi}}, $16; mov.b32 m, {m};"
        + "".join(
            f" shr.b32 w4, {w}, 4;"
            + "".join(
                f" prmt.b32 y, {w}, w4, {sel};"
                + "".join(
                    _nib("y", 8 * k, c16)
                    + f" fma.rn.f16x2 x, x, ${17 + 4 * i + 2 * j + k}, ${25 + 4 * i + 2 * j + k};"
                    + f" mov.b32 {{${8 * i + 4 * j + 2 * k}, ${8 * i + 4 * j + 2 * k + 1}}}, x;"
                    for k in range(2))
                for j, sel in enumerate(("0x5410", "0x7632")))
            for i, w in enumerate(("lo", "hi")))
        + " }")


def v_asm(c16: bool) -> str:
    """Two tokens' int64 words of value codes (the same 16 channels) + their (scale, zero)
    pairs -> 16 fp16 pairs (token a, token b) of dequantized values (c16: divided by 16),
    output k = channel k: prmt puts two bytes of each token side by side, one lop3 one
    nibble of each under the fp16 exponent."""
    m = "0x3C003C00" if c16 else "0x64006400"
    return (
        "{ .reg .b32 a0, a1, b0, b1, x, y, m; mov.b64 {a0, a1}, $16; mov.b64 {b0, b1}, $17;"
        f" mov.b32 m, {m};"
        + "".join(
            f" prmt.b32 y, a{i}, b{i}, {sel};"
            + "".join(_nib("y", 4 * k, c16) + f" fma.rn.f16x2 ${8 * i + 4 * j + k}, x, $18, $19;"
                      for k in range(4))
            for i in range(2) for j, sel in enumerate(("0x5410", "0x7632")))
        + " }")


# the PTX strings of both conversions, built once (kernel_call runs every layer of a step)
_ASM = {c16: (k_asm(c16), v_asm(c16)) for c16 in (False, True)}
_INT4 = KVFormat(4, 4)

# (z, s) fp16 pairs -> z / 16 - s (the c16 zero pairs), for the keys' int32 pairs
_ZS_ASM = ("{ .reg .b32 t, m; mov.b32 m, 0x2C002C00; neg.f16x2 t, $2;"
           " fma.rn.f16x2 $0, $1, m, t; }")


if HAVE_GLUON:

    @gluon.jit
    def _idx3(N0: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr, L: gl.constexpr):
        """Index tensors [N0, 1, 1], [1, N1, 1], [1, 1, N2] of a rank-3 layout L."""
        i0 = gl.arange(0, N0, layout=gl.SliceLayout(1, gl.SliceLayout(2, L)))
        i1 = gl.arange(0, N1, layout=gl.SliceLayout(0, gl.SliceLayout(2, L)))
        i2 = gl.arange(0, N2, layout=gl.SliceLayout(0, gl.SliceLayout(1, L)))
        return (gl.expand_dims(gl.expand_dims(i0, 1), 2), gl.expand_dims(gl.expand_dims(i1, 0), 2),
                gl.expand_dims(gl.expand_dims(i2, 0), 1))

    @gluon.jit
    def _join4(a, b, c, d):
        """[..., 2, 2]: element [i, j] is (a, b, c, d)[i + 2 j]."""
        return gl.join(gl.join(a, b), gl.join(c, d))

    @gluon.jit
    def _split8(x, L: gl.constexpr):
        """[NW, W, 8] -> 8 tensors [NW, 1, W] in L (entry j = x[..., j]), for broadcasting
        against [NW, T, W] tensors in L."""
        a, b = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], 2, 2, 2]))   # j0
        a0, a1 = gl.split(a)                                                 # j1
        b0, b1 = gl.split(b)
        e0, e4 = gl.split(a0)                                                # j2
        e2, e6 = gl.split(a1)
        e1, e5 = gl.split(b0)
        e3, e7 = gl.split(b1)
        S: gl.constexpr = gl.SliceLayout(1, L)
        return (_bcast(e0, S), _bcast(e1, S), _bcast(e2, S), _bcast(e3, S),
                _bcast(e4, S), _bcast(e5, S), _bcast(e6, S), _bcast(e7, S))

    @gluon.jit
    def _bcast(x, S: gl.constexpr):
        """[NW, W] -> [NW, 1, W] in the parent layout of S (a layout-only conversion)."""
        return gl.expand_dims(gl.convert_layout(x, S), 1)

    @gluon.jit
    def _zs(z, s, ZS_ASM: gl.constexpr):
        return gl.inline_asm_elementwise(ZS_ASM, "=r,r,r", [z, s], dtype=gl.int32,
                                         is_pure=True, pack=1)

    @gluon.jit
    def _holes(bmax_ptr, bsum_ptr, perm_ptr, b, kvh, lo, hi, NB, HQ: gl.constexpr,
               GQ: gl.constexpr, PERM: gl.constexpr):
        """Partials (-inf, 0) of row b's entries lo .. hi (PERM: at their columns perm)."""
        L: gl.constexpr = gl.BlockedLayout([1, 1], [8, 4], [1, 4], [1, 0])
        h = gl.expand_dims(gl.arange(0, 8, layout=gl.SliceLayout(1, L)), 1)
        j = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(0, L)), 0)
        for c0 in range(lo, hi, 16):
            pos = c0 + j
            ok = pos < hi
            if PERM:
                cols = gl.load(perm_ptr + b * NB + pos, mask=ok, other=0).to(gl.int32)
            else:
                cols = pos
            at = (b * HQ + kvh * GQ + h) * NB + cols
            m = ok & (h < GQ)
            gl.store(bmax_ptr + at, gl.full([8, 16], float("-inf"), gl.float32, L), mask=m)
            gl.store(bsum_ptr + at, gl.zeros([8, 16], gl.float32, L), mask=m)

    @gluon.jit
    def _split_range(b, kvh, sp, NB, blocks_per_split, rstart_ptr, rlen_ptr, bmax_ptr, bsum_ptr,
                     perm_ptr, FILL, HQ: gl.constexpr, GQ: gl.constexpr, NW: gl.constexpr,
                     ROWLEN: gl.constexpr, DYN: gl.constexpr):
        """This split's entries (start, end) of row b in the Triton kernel's table modes
        (engine/kernels/paged_decode_triton.py): ROWLEN, a run of each row of a grouped
        table (entries rstart .. + rlen, partials at the entries' columns perm), with FILL
        the (-inf, 0) partials of the entries past the row's runs; DYN, each row's own
        length (rlen), the columns past it holes. Runs are whole iterations of NW blocks."""
        nsp = gl.num_programs(2)
        if ROWLEN:
            rs = gl.load(rstart_ptr + b)
            n = gl.load(rlen_ptr + b)
            per = gl.cdiv(gl.cdiv(n, nsp), NW) * NW
            start = rs + sp * per
            end = gl.minimum(start + per, rs + n)
            if FILL != 0:
                # entries past the row's runs, shared by the splits: (-inf, 0)
                past = rs + n
                per3 = gl.cdiv(NB - past, nsp)
                _holes(bmax_ptr, bsum_ptr, perm_ptr, b, kvh, past + sp * per3,
                       gl.minimum(past + sp * per3 + per3, NB), NB, HQ, GQ, True)
        elif DYN:
            n = gl.load(rlen_ptr + b)
            per = gl.cdiv(gl.cdiv(n, nsp), NW) * NW
            start = sp * per
            end = gl.minimum(start + per, n)
            # this split's share of the table past the row: (-inf, 0)
            _holes(bmax_ptr, bsum_ptr, perm_ptr, b, kvh,
                   gl.maximum(sp * blocks_per_split, n),
                   gl.minimum(sp * blocks_per_split + blocks_per_split, NB), NB, HQ, GQ, False)
        else:
            start = sp * blocks_per_split
            end = gl.minimum(start + blocks_per_split, NB)
        return start, end

    @gluon.jit
    def _block_partials(s, t_s, h_st, bst, okst, ntst, row, b, kvh, NB, perm_ptr, bmax_ptr,
                        bsum_ptr, m_i, l_i, HQ: gl.constexpr, GQ: gl.constexpr,
                        ROWLEN: gl.constexpr):
        """Logits s [NW, T, N] (log2 units) of a block a warp (entries bst, its rows' tokens
        t_s, ntst tokens; heads h_st) -> (p, m_i, l_i, alpha, wb): the block's (max, sum)
        partials stored at its column, the warp's running state updated; p = exp2(s -
        block max)."""
        mma: gl.constexpr = s.type.layout
        valid = gl.expand_dims(gl.expand_dims(t_s, 0), 2) < gl.expand_dims(
            gl.expand_dims(gl.convert_layout(ntst, gl.SliceLayout(1, gl.SliceLayout(2, mma))),
                           1), 2)
        s = gl.where(valid, s, float("-inf"))
        mb = gl.max(s, axis=1)                                          # [NW, N]
        mb_safe = gl.where(mb == float("-inf"), 0.0, mb)
        p = gl.exp2(s - gl.expand_dims(mb_safe, 1))
        lb = gl.sum(p, axis=1)
        hmask = gl.expand_dims(h_st, 0) < GQ
        if ROWLEN:
            col = gl.load(perm_ptr + row + bst, mask=okst, other=0).to(gl.int32)
        else:
            col = bst
        st = (b * HQ + kvh * GQ + gl.expand_dims(h_st, 0)) * NB + gl.expand_dims(col, 1)
        stm = hmask & gl.expand_dims(okst, 1)
        gl.store(bmax_ptr + st, mb * 0.6931471805599453, mask=stm)
        gl.store(bsum_ptr + st, lb, mask=stm)
        m_new = gl.maximum(m_i, mb)
        m_new_safe = gl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = gl.exp2(m_i - m_new_safe)
        wb = gl.exp2(mb - m_new_safe)
        l_i = l_i * alpha + lb * wb
        return p, m_new, l_i, alpha, wb

    @gluon.jit
    def _merge_warps(m_i, l_i, pm_ptr, pl_ptr, b, kvh, sp, S0, STOT, HQ: gl.constexpr,
                     GQ: gl.constexpr):
        """The warps' running states [NW, N] -> this split's (max, sum) partials, stored;
        returns each warp's weight [NW, N] for its output."""
        m = gl.max(m_i, axis=0)                                             # [N]
        m_safe = gl.where(m == float("-inf"), 0.0, m)
        sw = gl.exp2(m_i - gl.expand_dims(m_safe, 0))                       # [NW, N]
        l_tot = gl.sum(l_i * sw, axis=0)
        h1 = gl.arange(0, m_i.shape[1], layout=gl.SliceLayout(0, m_i.type.layout))
        part = (b * HQ + kvh * GQ + h1) * STOT + S0 + sp
        gl.store(pm_ptr + part, m, mask=h1 < GQ)
        gl.store(pl_ptr + part, l_tot, mask=h1 < GQ)
        return sw

    @gluon.jit
    def _bit(x, i: gl.constexpr):
        return (x >> i) & 1

    @gluon.jit(do_not_specialize=["NB", "blocks_per_split", "S0", "STOT"])
    def _int4_decode_kernel(
        q_ptr, arena_u8, arena_md, off_ptr, ntok_ptr, perm_ptr, rstart_ptr, rlen_ptr,
        bmax_ptr, bsum_ptr, pm_ptr, pl_ptr, pacc_ptr, NB, blocks_per_split, qk_scale, S0, STOT,
        HQ: gl.constexpr, H: gl.constexpr, GQ: gl.constexpr, T: gl.constexpr,
        D: gl.constexpr, G: gl.constexpr, MSIZE: gl.constexpr, VOFF: gl.constexpr,
        K_ASM: gl.constexpr, V_ASM: gl.constexpr, ZS_ASM: gl.constexpr, C16: gl.constexpr,
        # the Triton kernel's table modes (engine/kernels/paged_decode_triton.py): ROWLEN, a
        # run of each row of a grouped table (entries rstart .. + rlen, partials at the
        # entries' columns perm), with FILL the (-inf, 0) partials of the entries past the
        # row's runs; DYN, each row's own length (rlen), the columns past it holes
        ROWLEN: gl.constexpr = False, DYN: gl.constexpr = False, FILL=0,
    ):
        NW: gl.constexpr = 4
        N: gl.constexpr = 8                 # query heads of a kv head, padded (MMA N)
        W8: gl.constexpr = D // 16          # int64 words of codes a token row (8)
        NG: gl.constexpr = D // G
        KCODE: gl.constexpr = (H * T * D // 2 + 15) // 16 * 16
        KMETA: gl.constexpr = (H * D * MSIZE + 15) // 16 * 16
        VCODE: gl.constexpr = (H * T * D // 2 + 15) // 16 * 16
        VMETA: gl.constexpr = (H * T * NG * MSIZE + 15) // 16 * 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1],
                                                      instr_shape=[1, 16, 8])
        opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        opb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # key words [NW, T, W8]: a thread holds 2 adjacent words (16 bytes) of 4 tokens
        lk: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 8, 0], [0, 16, 0]],
            lane_bases=[[0, 0, 2], [0, 0, 4], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, T, W8])
        # value words [NW, T, W8]: a thread holds one word of 8 tokens, token pairs adjacent
        lv: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 8, 0], [0, 16, 0]],
            lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, T, W8])
        # key scales / zeros as int32 pairs [NW, W8, 8]: a thread holds the 32 channels of
        # its key words (two 16-byte loads each)
        ls: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 0, 4], [0, 1, 0]],
            lane_bases=[[0, 2, 0], [0, 4, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, W8, 8])
        stat: gl.constexpr = gl.SliceLayout(1, mma)          # [NW, N] per warp and head

        b = gl.program_id(0)
        kvh = gl.program_id(1)
        sp = gl.program_id(2)
        row = b * NB
        start, end = _split_range(b, kvh, sp, NB, blocks_per_split, rstart_ptr, rlen_ptr,
                                  bmax_ptr, bsum_ptr, perm_ptr, FILL, HQ, GQ, NW, ROWLEN, DYN)

        # q^T [NW, D, N] in the keys' channel order, fp16 (each warp its own copy)
        wq, dq, hq = _idx3(NW, D, N, opb)
        pq = (16 * (_bit(dq, 6) + 2 * _bit(dq, 1) + 4 * _bit(dq, 2)) + _bit(dq, 0)
              + 2 * _bit(dq, 3) + 4 * _bit(dq, 4) + 8 * _bit(dq, 5))
        # the logit scale (log2 units) on q; c16: the keys are read divided by 16
        qt = gl.load(q_ptr + (b * HQ + kvh * GQ + hq) * D + pq + 0 * wq, mask=hq < GQ,
                     other=0.0).to(gl.float32)
        qt = (qt * (qk_scale * 16.0 if C16 else qk_scale)).to(gl.float16)

        wk, tk, jk = _idx3(NW, T, W8, lk)
        wv, tv, jv = _idx3(NW, T, W8, lv)
        ws, js, ns = _idx3(NW, W8, 8, ls)
        w_st = gl.arange(0, NW, layout=gl.SliceLayout(1, stat))
        h_st = gl.arange(0, N, layout=gl.SliceLayout(0, stat))
        t_s = gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma)))
        a64 = arena_u8.to(gl.pointer_type(gl.int64), bitcast=True)
        a32 = arena_u8.to(gl.pointer_type(gl.int32), bitcast=True)

        m_i = gl.full([NW, N], float("-inf"), gl.float32, stat)
        l_i = gl.zeros([NW, N], gl.float32, stat)
        acc = gl.zeros([NW, D, N], gl.float32, mma)
        for blk0 in range(start, end, NW):
            # the values' loads first: in flight while the keys are converted and dotted
            bv = blk0 + wv
            okv = bv < end
            ntv = gl.load(ntok_ptr + row + bv, mask=okv, other=0)
            offv = gl.multiple_of(gl.load(off_ptr + row + bv, mask=okv, other=0) + VOFF,
                                  [16, 16, 16])
            vw = gl.load(a64 + gl.multiple_of(offv // 8, [2, 2, 2]) + kvh * (T * W8)
                         + tv * W8 + jv, mask=ntv > 0)
            mv = (gl.multiple_of((offv + VCODE) // MSIZE, [8, 8, 8]) + kvh * (T * NG)
                  + tv * NG + (16 * jv) // G)
            tok = tv < ntv
            vs = gl.load(arena_md + mv, mask=tok, other=0.0).to(gl.float16)
            vz = gl.load(arena_md + mv + VMETA // MSIZE, mask=tok, other=0.0).to(gl.float16)
            # ---- keys: codes [NW, T, D] in the A operand layout, dequantized in fp16
            bk = blk0 + wk
            okk = bk < end
            ntk = gl.load(ntok_ptr + row + bk, mask=okk, other=0)
            offk = gl.multiple_of(gl.load(off_ptr + row + bk, mask=okk, other=0), [16, 16, 16])
            # slot offsets are multiples of 16 bytes (engine/layout.py): 16-byte loads
            kw = gl.load(a64 + gl.multiple_of(offk // 8, [2, 2, 2]) + kvh * (T * W8)
                         + tk * W8 + jk, mask=ntk > 0)
            bs = blk0 + ws
            oks = bs < end
            offs = gl.multiple_of(gl.load(off_ptr + row + bs, mask=oks, other=0), [16, 16, 16])
            nts = gl.load(ntok_ptr + row + bs, mask=oks, other=0)
            m0 = gl.multiple_of((offs + KCODE) // 4, [4, 4, 4]) + kvh * (D // 2) + js * 8 + ns
            sc = _split8(gl.load(a32 + m0, mask=nts > 0), lk)
            zr = _split8(gl.load(a32 + m0 + KMETA // 4, mask=nts > 0), lk)
            if C16:
                zr = (_zs(zr[0], sc[0], ZS_ASM), _zs(zr[1], sc[1], ZS_ASM),
                      _zs(zr[2], sc[2], ZS_ASM), _zs(zr[3], sc[3], ZS_ASM),
                      _zs(zr[4], sc[4], ZS_ASM), _zs(zr[5], sc[5], ZS_ASM),
                      _zs(zr[6], sc[6], ZS_ASM), _zs(zr[7], sc[7], ZS_ASM))
            c = gl.inline_asm_elementwise(
                K_ASM, "=h," * 16 + "l" + ",r" * 16,
                [kw, sc[0], sc[1], sc[2], sc[3], sc[4], sc[5], sc[6], sc[7],
                 zr[0], zr[1], zr[2], zr[3], zr[4], zr[5], zr[6], zr[7]],
                dtype=(gl.float16,) * 16, is_pure=True, pack=1)
            # channel n = n0 + 2 n1 + 4 n2 + 8 n3 of word j: joins n1 (inner) .. n0 (outer)
            kc = gl.join(gl.join(_join4(c[0], c[2], c[4], c[6]),
                                 _join4(c[8], c[10], c[12], c[14])),
                         gl.join(_join4(c[1], c[3], c[5], c[7]),
                                 _join4(c[9], c[11], c[13], c[15])))
            # [NW, T, W8, n1, n2, n3, n0]
            kc = gl.reshape(kc, [NW, T, 2, 2, 2, 2, 2, 2, 2])  # w: b2 b1 b0
            kc = gl.permute(kc, [0, 1, 4, 7, 6, 5, 2, 3, 8])   # d: b0 n3 n2 n1 b2 b1 n0
            k = gl.convert_layout(gl.reshape(kc, [NW, T, D]), opa)
            s = mma_v2(k, qt, gl.zeros([NW, T, N], gl.float32, mma))     # [NW, T, N]

            # ---- per-block partials (log2 units) and the warp's running state
            bst = blk0 + w_st
            okst = bst < end
            ntst = gl.load(ntok_ptr + row + bst, mask=okst, other=0)
            p, m_i, l_i, alpha, wb = _block_partials(
                s, t_s, h_st, bst, okst, ntst, row, b, kvh, NB, perm_ptr, bmax_ptr, bsum_ptr,
                m_i, l_i, HQ, GQ, ROWLEN)
            if C16:
                wb16 = wb * 16.0      # the values are read divided by 16
            else:
                wb16 = wb
            pt = gl.convert_layout((p * gl.expand_dims(wb16, 1)).to(gl.float16), opb)

            # ---- values: V^T [NW, D, T] in the A operand layout, dequantized in the PTX
            if C16:
                vz = vz * 0.0625 - vs
            c = gl.inline_asm_elementwise(V_ASM, "=r," * 16 + "l,l,r,r", [vw, vs, vz],
                                          dtype=(gl.float16,) * 16, is_pure=True, pack=2)
            vc = gl.join(gl.join(_join4(c[0], c[1], c[2], c[3]), _join4(c[4], c[5], c[6], c[7])),
                         gl.join(_join4(c[8], c[9], c[10], c[11]),
                                 _join4(c[12], c[13], c[14], c[15])))
            # [NW, T, W8, k0, k1, k2, k3]
            vc = gl.permute(vc, [0, 6, 5, 4, 3, 2, 1])       # [NW, k3, k2, k1, k0, W8, T]
            vt = gl.convert_layout(gl.reshape(vc, [NW, D, T]), opa)
            acc = acc * gl.expand_dims(alpha, 1)
            acc = mma_v2(vt, pt, acc)                                       # [NW, D, N]

        # ---- merge the warps' states, store this split's partials
        sw = _merge_warps(m_i, l_i, pm_ptr, pl_ptr, b, kvh, sp, S0, STOT, HQ, GQ)
        o = gl.sum(acc * gl.expand_dims(sw, 1), axis=0)                     # [D, N]
        ol: gl.constexpr = gl.SliceLayout(0, mma)
        do = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(1, ol)), 1)
        ho = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, ol)), 0)
        po = 16 * (do % 8) + do // 8
        gl.store(pacc_ptr + ((b * HQ + kvh * GQ + ho) * STOT + S0 + sp) * D + po, o,
                 mask=ho < GQ)


def supports(geom, num_q_heads: int) -> str | None:
    """Why the Gluon int4 kernel cannot serve this geometry (None: it can)."""
    if not HAVE_GLUON:
        return "triton has no Gluon (triton >= 3.5 needed)"
    if geom.block_size != 32 or geom.head_dim != 128:
        return f"block_size 32 and head_dim 128 only (got {geom.block_size}, {geom.head_dim})"
    if geom.value_group != 32:
        # (the indexing serves any group of 16 channels or more; only 32, the engine's,
        # has run on a GPU)
        return f"value_group 32 only (got {geom.value_group})"
    if geom.meta_elem != 2:
        return "fp16 scales only (a 16-bit store)"
    H = geom.num_kv_heads
    if num_q_heads % H or num_q_heads // H > 8:
        return f"at most 8 query heads a kv head (got {num_q_heads} over {H})"
    return None


# the launch settings measured best (docs/BENCHMARKS.md, "The Gluon int4 kernel"; H100,
# batch 8 / 128K): 1 + c / 16 codes (2% faster than exact), 168 registers (3 programs an
# SM: 550 us against 673 at 188)
C16 = True
MAXNREG = 168


def kernel_consts(geom, num_q_heads: int, *, rowlen: bool = False, dyn: bool = False,
                  c16: bool | None = None) -> dict:
    """The kernel's compile-time arguments for a geometry and table mode."""
    c16 = C16 if c16 is None else c16
    k, v = _ASM[c16]
    H = geom.num_kv_heads
    return dict(HQ=num_q_heads, H=H, GQ=num_q_heads // H, T=geom.block_size,
                D=geom.head_dim, G=geom.value_group, MSIZE=geom.meta_elem,
                VOFF=geom.sections(_INT4)["v_codes"][0], K_ASM=k, V_ASM=v, ZS_ASM=_ZS_ASM,
                C16=c16, ROWLEN=rowlen, DYN=dyn)


def kernel_call(q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm, pl, pacc, bps,
                sm_scale, s0, stot, geom, *, rowlen=False, dyn=False, fill=False, c16=None,
                maxnreg=None):
    """(kernel, args, constexprs, options) of one launch over grid (B, H, splits): the
    Triton kernel's argument contract (``paged_decode_triton._Launch.run``). On the decode
    path (every layer of a step): nothing here is rebuilt per call but the argument tuple."""
    consts = kernel_consts(geom, q.shape[1], rowlen=rowlen, dyn=dyn, c16=c16)
    return launch_parts(_int4_decode_kernel, consts, MAXNREG if maxnreg is None else maxnreg,
                        fill, (q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm,
                               pl, pacc, bps, sm_scale, s0, stot), geom)


def launch_parts(kernel, consts: dict, maxnreg: int, fill: bool, call: tuple, geom):
    """(kernel, args, constexprs, options) of a Gluon decode kernel's launch, from
    kernel_call's arguments ``call`` (q .. stot): the argument contract both Gluon kernels
    share (paged_decode_gluon8.py too)."""
    (q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm, pl, pacc, bps, sm_scale,
     s0, stot) = call
    n = arena_row.numel() // 2 * 2
    args = (q, arena_row, arena_row[:n].view(geom.meta_dtype), offs, ntok, perm, rstart, rlen,
            bmax, bsum, pm, pl, pacc, offs.shape[1], bps, float(sm_scale) * LOG2E, s0, stot)
    opts = dict(num_warps=4, **({"maxnreg": maxnreg} if maxnreg else {}))
    if consts["ROWLEN"]:
        consts["FILL"] = int(fill)        # a runtime argument, passed by name
    return kernel, args, consts, opts
