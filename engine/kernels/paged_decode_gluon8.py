"""Gluon flash-decoding over 8-bit blocks (int8, and float8 e4m3 with ``FP8``): one warp
per block, codes loaded straight into the tensor-core operand layout (issue 14). The
sibling of paged_decode_gluon.py (int4; read its docstring first): the same warp-per-block
structure, transposed dots (``S^T = K q^T``, ``O^T = V^T P^T``) and split contract; what
differs is how 8-bit codes reach the operands.

* keys (token-major bytes, per-channel scale and zero): each thread loads 32 contiguous
  bytes of each of its 4 tokens (two 16-byte loads), the 32 channels its A-operand
  fragment needs once the reduction axis is permuted (the same bijection on q's channels
  and on the key scales). PTX: one prmt puts two codes under the fp16 exponent of 1024
  (``0x64 | c``), one sub removes the 1024 exactly, one fma.rn.f16x2 dequantizes the
  pair: the Triton kernel's arithmetic, so the results round the same way. (A 1 + c / 256
  code, the int4 kernel's way around the subtraction, would round the zero's correction
  to about s / 2 in fp16: int8's own error.)
* values (channel-major bytes, per-token scales and zeros of 32-channel groups): each
  thread loads 8 contiguous bytes of each of its 16 channels, which are 8 tokens once the
  block's tokens are permuted; the same permutation orders the keys' rows, so P^T comes
  out of the key dot with its rows in the values' order. Each group of 32 channels is
  two MMA row tiles, so a code's scale depends only on its token and the tile: the
  scales are loaded once per token (8-byte loads) and broadcast.
* the output channels are in natural order (no permutation back at the store).
* fp8: the same loads; one cvt.rn.f16x2.e4m3x2 a pair (exact); the block's key scale on
  its logits, its value scale on P.

Token order: the MMA position ``p`` (bits e + 2 tq + 8 h + 16 kt: pair element, lane in
the quad, 8-row half, 16-row tile) holds physical token ``8 tq + e + 2 h + 4 kt``, so a
thread's 8 positions of a channel are the channel's bytes ``8 tq .. 8 tq + 7``.

Same slot layout, outputs and split contract as the Triton kernel, for int8 or fp8 keys
and values, block_size 32, head_dim 128, value groups of 32 channels, at most 8 query
heads per kv head, 16-bit stores (fp16 scales), fp16 dot operands. CUDA only: its tests
run on a GPU. Reached through ``paged_decode_triton``, which routes int8 and fp8 launches
here with ``GLUON_INT8`` / ``GLUON_FP8`` (on by default; KVCTL_GLUON8=0 turns them off).
"""
from __future__ import annotations

from engine.kernels.paged_decode_gluon import HAVE_GLUON, launch_parts
from engine.layout import KVFormat

if HAVE_GLUON:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import mma_v2

    from engine.kernels.paged_decode_gluon import (_bit, _block_partials, _idx3, _join4,
                                                   _merge_warps, _split_range)


# A token's int64 word of key codes (8 bytes: channel k in byte k) and the (scale, zero)
# fp16 pairs of its channels (2j, 2j + 1) -> its 8 dequantized keys, output k = channel k.
# prmt puts bytes (2j, 2j + 1) of the word under 0x64 (1024 + c as fp16, exact), sub.f16x2
# removes the 1024, fma.rn.f16x2 computes c * s + z with one rounding.
K8_ASM = (
    "{ .reg .b32 lo, hi, x, m, o; mov.b64 {lo, hi}, $8; mov.b32 m, 0x64646464;"
    " mov.b32 o, 0x64006400;"
    + "".join(
        f" prmt.b32 x, {w}, m, {sel}; sub.f16x2 x, x, o;"
        f" fma.rn.f16x2 x, x, ${9 + 2 * i + jj}, ${13 + 2 * i + jj};"
        f" mov.b32 {{${4 * i + 2 * jj}, ${4 * i + 2 * jj + 1}}}, x;"
        for i, w in enumerate(("lo", "hi")) for jj, sel in enumerate(("0x4140", "0x4342")))
    + " }")

# Four tokens' value codes of one channel (a 32-bit register, token i in byte i) and
# their scales and zeros as fp16 pairs (token i's entry: the pair of tokens (i & ~1,
# i | 1), so $3 / $7 serve tokens 0 and 1, $5 / $9 tokens 2 and 3) -> 4 dequantized
# values as two fp16 pairs.
V8_ASM = (
    "{ .reg .b32 x, m, o; mov.b32 m, 0x64646464; mov.b32 o, 0x64006400;"
    " prmt.b32 x, $2, m, 0x4140; sub.f16x2 x, x, o; fma.rn.f16x2 $0, x, $3, $7;"
    " prmt.b32 x, $2, m, 0x4342; sub.f16x2 x, x, o; fma.rn.f16x2 $1, x, $5, $9; }")

# PSCALE: four tokens' value codes of one channel -> the codes as exact fp16 (two pairs)
VC_ASM = (
    "{ .reg .b32 x, m, o; mov.b32 m, 0x64646464; mov.b32 o, 0x64006400;"
    " prmt.b32 x, $2, m, 0x4140; sub.f16x2 $0, x, o;"
    " prmt.b32 x, $2, m, 0x4342; sub.f16x2 $1, x, o; }")
# PSCALE: P is scaled by PF before the value scales go on it (fp16 headroom: P F s stays
# under 65504 for any fp16 value range, and small P F s stay normal)
PF = 64.0

# FP8 (e4m3 blocks, one scale a block and head for each side): a token's word of key codes
# -> its 8 keys unscaled (cvt.rn.f16x2.e4m3x2: one instruction a pair, exact in fp16)
K8F_ASM = (
    "{ .reg .b32 lo, hi, x; .reg .b16 a0, a1, a2, a3; mov.b64 {lo, hi}, $8;"
    " mov.b32 {a0, a1}, lo; mov.b32 {a2, a3}, hi;"
    + "".join(f" cvt.rn.f16x2.e4m3x2 x, a{i}; mov.b32 {{${2 * i}, ${2 * i + 1}}}, x;"
              for i in range(4))
    + " }")
# FP8: four tokens' value codes of one channel -> two fp16 pairs, unscaled
V8F_ASM = ("{ .reg .b16 a, b; mov.b32 {a, b}, $2; cvt.rn.f16x2.e4m3x2 $0, a;"
           " cvt.rn.f16x2.e4m3x2 $1, b; }")

_INT8 = KVFormat(8, 8)
_FP8 = KVFormat.parse("fp8")


if HAVE_GLUON:

    @gluon.jit
    def _split4(x, L: gl.constexpr):
        """[NW, W, 4] -> 4 tensors [NW, 1, W] in L (entry j = x[..., j])."""
        a, b = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], 2, 2]))   # j0
        e0, e2 = gl.split(a)                                             # j1
        e1, e3 = gl.split(b)
        S: gl.constexpr = gl.SliceLayout(1, L)
        return (gl.expand_dims(gl.convert_layout(e0, S), 1),
                gl.expand_dims(gl.convert_layout(e1, S), 1),
                gl.expand_dims(gl.convert_layout(e2, S), 1),
                gl.expand_dims(gl.convert_layout(e3, S), 1))

    @gluon.jit
    def _token_pairs(x, L: gl.constexpr):
        """[NW, NG, T] fp16 -> [NW, NG, 1, T] int32 in L, entry t the fp16 pair of tokens
        (t & ~1, t | 1): packed once per token pair, then broadcast over the channels."""
        ev, od = gl.split(gl.reshape(x, [x.shape[0], x.shape[1], x.shape[2] // 2, 2]))
        pr = gl.inline_asm_elementwise("mov.b32 $0, {$1, $2};", "=r,h,h", [ev, od], dtype=gl.int32,
                                       is_pure=True, pack=1)
        pr = gl.reshape(gl.join(pr, pr), [x.shape[0], x.shape[1], x.shape[2]])
        return gl.expand_dims(gl.convert_layout(pr, gl.SliceLayout(2, L)), 2)

    @gluon.jit
    def _sigma(r):
        """Physical token of MMA position r (module docstring)."""
        return 8 * ((r >> 1) & 3) + (r & 1) + 2 * ((r >> 3) & 3)

    @gluon.jit(do_not_specialize=["NB", "blocks_per_split", "S0", "STOT"])
    def _int8_decode_kernel(
        q_ptr, arena_u8, arena_md, off_ptr, ntok_ptr, perm_ptr, rstart_ptr, rlen_ptr,
        bmax_ptr, bsum_ptr, pm_ptr, pl_ptr, pacc_ptr, NB, blocks_per_split, qk_scale, S0, STOT,
        HQ: gl.constexpr, H: gl.constexpr, GQ: gl.constexpr, T: gl.constexpr,
        D: gl.constexpr, G: gl.constexpr, MSIZE: gl.constexpr, VOFF: gl.constexpr,
        K_ASM: gl.constexpr, V_ASM: gl.constexpr,
        ROWLEN: gl.constexpr = False, DYN: gl.constexpr = False, FILL=0,
        # the value scales on P (one B operand a value group) and the zeros in a dot of
        # their own beside the output, instead of dequantizing each value pair
        PSCALE: gl.constexpr = False, VC_ASM: gl.constexpr = "", PF: gl.constexpr = 64.0,
        # float8 e4m3 blocks: K_ASM / V_ASM convert the codes, the key scale goes on the
        # logits and the value scale on P (one each a block and kv head)
        FP8: gl.constexpr = False,
    ):
        NW: gl.constexpr = 4
        N: gl.constexpr = 8                 # query heads of a kv head, padded (MMA N)
        W: gl.constexpr = D // 8            # int64 words of key codes a token row (16)
        NG: gl.constexpr = D // G           # value groups (4)
        KCODE: gl.constexpr = (H * T * D + 15) // 16 * 16
        KMETA: gl.constexpr = (H * D * MSIZE + 15) // 16 * 16      # (int8)
        VCODE: gl.constexpr = (H * T * D + 15) // 16 * 16
        VMETA: gl.constexpr = (H * T * NG * MSIZE + 15) // 16 * 16
        mma: gl.constexpr = gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[NW, 1, 1],
                                                      instr_shape=[1, 16, 8])
        opa: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        opb: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=mma, k_width=2)
        # key words [NW, T(row), W]: a thread holds 4 adjacent words (32 bytes) of 4 rows
        lk: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 8, 0], [0, 16, 0]],
            lane_bases=[[0, 0, 4], [0, 0, 8], [0, 1, 0], [0, 2, 0], [0, 4, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, T, W])
        # key scales / zeros as int32 pairs [NW, W, 4]: the 16 pairs of a thread's words
        ls: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 1], [0, 0, 2], [0, 1, 0], [0, 2, 0]],
            lane_bases=[[0, 4, 0], [0, 8, 0], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, W, 4])
        # value codes [NW, NG, G, T(physical)]: a thread holds 8 adjacent tokens of 16
        # channels (rows g, g + 8 of each 16-row tile)
        lv: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 0, 0, 1], [0, 0, 0, 2], [0, 0, 0, 4], [0, 0, 8, 0], [0, 0, 16, 0],
                       [0, 1, 0, 0], [0, 2, 0, 0]],
            lane_bases=[[0, 0, 0, 8], [0, 0, 0, 16], [0, 0, 1, 0], [0, 0, 2, 0], [0, 0, 4, 0]],
            warp_bases=[[1, 0, 0, 0], [2, 0, 0, 0]], block_bases=[], shape=[NW, NG, G, T])
        # value scales / zeros [NW, NG, T]: a token's 4 groups in one 8-byte load
        lvs: gl.constexpr = gl.DistributedLinearLayout(
            reg_bases=[[0, 1, 0], [0, 2, 0], [0, 0, 1], [0, 0, 2], [0, 0, 4]],
            lane_bases=[[0, 0, 8], [0, 0, 16], [0, 0, 0], [0, 0, 0], [0, 0, 0]],
            warp_bases=[[1, 0, 0], [2, 0, 0]], block_bases=[], shape=[NW, NG, T])
        stat: gl.constexpr = gl.SliceLayout(1, mma)          # [NW, N] per warp and head

        b = gl.program_id(0)
        kvh = gl.program_id(1)
        sp = gl.program_id(2)
        row = b * NB
        start, end = _split_range(b, kvh, sp, NB, blocks_per_split, rstart_ptr, rlen_ptr,
                                  bmax_ptr, bsum_ptr, perm_ptr, FILL, HQ, GQ, NW, ROWLEN, DYN)

        # q^T [NW, D, N] in the keys' channel order (operand position d -> channel
        # 8 w + k, w = d5 + 2 d6 + 4 d1 + 8 d2, k = d0 + 2 d3 + 4 d4), fp16
        wq, dq, hq = _idx3(NW, D, N, opb)
        pq = (8 * (_bit(dq, 5) + 2 * _bit(dq, 6) + 4 * _bit(dq, 1) + 8 * _bit(dq, 2))
              + _bit(dq, 0) + 2 * _bit(dq, 3) + 4 * _bit(dq, 4))
        qt = gl.load(q_ptr + (b * HQ + kvh * GQ + hq) * D + pq + 0 * wq, mask=hq < GQ,
                     other=0.0).to(gl.float32)
        qt = (qt * qk_scale).to(gl.float16)

        wk, tk, jk = _idx3(NW, T, W, lk)
        tk = _sigma(tk)                               # row -> physical token
        ws, js, ns = _idx3(NW, W, 4, ls)
        # value index tensors [NW, NG, G, T] (codes) and [NW, NG, T] (scales)
        i0 = gl.arange(0, NW, layout=gl.SliceLayout(1, gl.SliceLayout(2, gl.SliceLayout(3, lv))))
        i1 = gl.arange(0, NG, layout=gl.SliceLayout(0, gl.SliceLayout(2, gl.SliceLayout(3, lv))))
        i2 = gl.arange(0, G, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(3, lv))))
        i3 = gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(1, gl.SliceLayout(2, lv))))
        wv = gl.expand_dims(gl.expand_dims(gl.expand_dims(i0, 1), 2), 3)
        gv = gl.expand_dims(gl.expand_dims(gl.expand_dims(i1, 0), 2), 3)
        cv = gl.expand_dims(gl.expand_dims(gl.expand_dims(i2, 0), 1), 3)
        tv = gl.expand_dims(gl.expand_dims(gl.expand_dims(i3, 0), 1), 2)
        wvs, gvs, tvs = _idx3(NW, NG, T, lvs)
        w_st = gl.arange(0, NW, layout=gl.SliceLayout(1, stat))
        h_st = gl.arange(0, N, layout=gl.SliceLayout(0, stat))
        t_s = _sigma(gl.arange(0, T, layout=gl.SliceLayout(0, gl.SliceLayout(2, mma))))
        a64 = arena_u8.to(gl.pointer_type(gl.int64), bitcast=True)
        a32 = arena_u8.to(gl.pointer_type(gl.int32), bitcast=True)

        m_i = gl.full([NW, N], float("-inf"), gl.float32, stat)
        l_i = gl.zeros([NW, N], gl.float32, stat)
        acc = gl.zeros([NW, D, N], gl.float32, mma)
        if PSCALE:
            zacc = gl.zeros([NW, 16, N], gl.float32, mma)    # rows 0 .. NG-1: the zeros'
            # P-side index tensors: token of MMA position p (B operand), z^T rows (A)
            wpb, tpb, npb = _idx3(NW, T, N, opb)
            tpb = _sigma(tpb)
            wza, rza, tza = _idx3(NW, 16, T, opa)
            tza = _sigma(tza)
        for blk0 in range(start, end, NW):
            # the values' loads first: in flight while the keys are converted and dotted
            bv = blk0 + wv
            okv = bv < end
            ntv = gl.load(ntok_ptr + row + bv, mask=okv, other=0)
            # holes and entries past the split read the arena's first slot instead (no
            # predicated loads; what they read is masked below: -inf logits, zero scales)
            offv = gl.load(off_ptr + row + bv, mask=okv, other=0)
            offv = gl.multiple_of(gl.where(ntv > 0, offv, 0) + VOFF, [16, 16, 16, 16])
            if FP8:
                # masked per block: a hole's bytes could be e4m3 NaNs, which P = 0 would
                # not cancel (a written slot's are finite: the quantizer never writes them)
                vcod = gl.load(arena_u8 + offv + kvh * (D * T) + (gv * G + cv) * T + tv,
                               mask=ntv > 0, other=0)
            else:
                vcod = gl.load(arena_u8 + offv + kvh * (D * T) + (gv * G + cv) * T + tv)
            if not FP8 and not PSCALE:
                bvs = blk0 + wvs
                okvs = bvs < end
                ntvs = gl.load(ntok_ptr + row + bvs, mask=okvs, other=0)
                offvs = gl.load(off_ptr + row + bvs, mask=okvs, other=0) + VOFF
                mv = (gl.multiple_of((offvs + VCODE) // MSIZE, [8, 8, 8]) + kvh * (T * NG)
                      + tvs * NG + gvs)
                tok = tvs < ntvs
                vs = gl.load(arena_md + mv, mask=tok, other=0.0).to(gl.float16)
                vz = gl.load(arena_md + mv + VMETA // MSIZE, mask=tok, other=0.0).to(gl.float16)
            # ---- keys: codes [NW, T, D] in the A operand layout, dequantized in fp16
            bk = blk0 + wk
            okk = bk < end
            ntk = gl.load(ntok_ptr + row + bk, mask=okk, other=0)
            offk = gl.load(off_ptr + row + bk, mask=okk, other=0)
            offk = gl.multiple_of(gl.where(ntk > 0, offk, 0), [16, 16, 16])
            kw = gl.load(a64 + gl.multiple_of(offk // 8, [2, 2, 2]) + kvh * (T * W)
                         + tk * W + jk)
            if FP8:
                c = gl.inline_asm_elementwise(K_ASM, "=h," * 8 + "l", [kw],
                                              dtype=(gl.float16,) * 8, is_pure=True, pack=1)
            else:
                bs = blk0 + ws
                oks = bs < end
                offs = gl.load(off_ptr + row + bs, mask=oks, other=0)
                nts = gl.load(ntok_ptr + row + bs, mask=oks, other=0)
                offs = gl.multiple_of(gl.where(nts > 0, offs, 0), [16, 16, 16])
                m0 = (gl.multiple_of((offs + KCODE) // 4, [4, 4, 4]) + kvh * (D // 2)
                      + js * 4 + ns)
                sc = _split4(gl.load(a32 + m0), lk)
                zr = _split4(gl.load(a32 + m0 + KMETA // 4), lk)
                c = gl.inline_asm_elementwise(
                    K_ASM, "=h," * 8 + "l" + ",r" * 8,
                    [kw, sc[0], sc[1], sc[2], sc[3], zr[0], zr[1], zr[2], zr[3]],
                    dtype=(gl.float16,) * 8, is_pure=True, pack=1)
            # byte k = k0 + 2 k1 + 4 k2 of word w: [NW, T, W, k1, k2, k0]
            kc = gl.join(_join4(c[0], c[2], c[4], c[6]), _join4(c[1], c[3], c[5], c[7]))
            kc = gl.reshape(kc, [NW, T, 2, 2, 2, 2, 2, 2, 2])  # w: w3 w2 w1 w0
            kc = gl.permute(kc, [0, 1, 4, 5, 7, 6, 2, 3, 8])   # d: w1 w0 k2 k1 w3 w2 k0
            k = gl.convert_layout(gl.reshape(kc, [NW, T, D]), opa, assert_trivial=True)
            s = mma_v2(k, qt, gl.zeros([NW, T, N], gl.float32, mma))     # [NW, T, N]

            # ---- per-block partials (log2 units) and the warp's running state
            bst = blk0 + w_st
            okst = bst < end
            ntst = gl.load(ntok_ptr + row + bst, mask=okst, other=0)
            if FP8:
                # the block's key scale on its logits, its value scale kept for P
                offst = gl.load(off_ptr + row + bst, mask=okst, other=0)
                oks8 = ntst > 0
                ksc = gl.load(arena_md + (offst + KCODE) // MSIZE + kvh, mask=oks8,
                              other=0.0).to(gl.float32)
                vsc = gl.load(arena_md + (offst + VOFF + VCODE) // MSIZE + kvh, mask=oks8,
                              other=0.0).to(gl.float32)
                s = s * gl.expand_dims(gl.expand_dims(
                    gl.convert_layout(ksc, gl.SliceLayout(1, gl.SliceLayout(2, mma))), 1), 2)
            p, m_i, l_i, alpha, wb = _block_partials(
                s, t_s, h_st, bst, okst, ntst, row, b, kvh, NB, perm_ptr, bmax_ptr, bsum_ptr,
                m_i, l_i, HQ, GQ, ROWLEN)
            if PSCALE:
                pt = gl.convert_layout((p * gl.expand_dims(wb * PF, 1)).to(gl.float16), opb)
                # codes as exact fp16, tokens in MMA order, one [NW, G, T] tile a group
                vd = gl.inline_asm_elementwise(VC_ASM, "=r,=r,r", [vcod], dtype=gl.float16,
                                               is_pure=True, pack=4)
                vd = gl.reshape(vd, [NW, NG, G, 2, 2, 2, 2, 2])
                vd = gl.permute(vd, [0, 2, 5, 6, 3, 4, 7, 1])       # [NW, G, p bits, NG]
                vd = gl.reshape(vd, [NW, G, T, 2, 2])               # g: g1 g0
                ve, vo = gl.split(vd)
                v0, v2 = gl.split(ve)
                v1, v3 = gl.split(vo)
                # each group's scales on P (B operand: token of position p, any head)
                bpb = blk0 + wpb
                okpb = bpb < end
                ntpb = gl.load(ntok_ptr + row + bpb, mask=okpb, other=0)
                offpb = gl.load(off_ptr + row + bpb, mask=okpb, other=0) + VOFF
                mpb = (offpb + VCODE) // MSIZE + kvh * (T * NG) + tpb * NG
                okt = tpb < ntpb
                ae, ao = gl.split(gl.reshape(
                    gl.permute(gl.reshape(acc * gl.expand_dims(alpha, 1), [NW, NG, G, N]),
                               [0, 2, 3, 1]), [NW, G, N, 2, 2]))
                acc0, acc2 = gl.split(ae)
                acc1, acc3 = gl.split(ao)
                a0 = mma_v2(gl.convert_layout(v0, opa, assert_trivial=True),
                            pt * gl.load(arena_md + mpb, mask=okt, other=0.0).to(gl.float16),
                            gl.convert_layout(acc0, mma, assert_trivial=True))
                a1 = mma_v2(gl.convert_layout(v1, opa, assert_trivial=True),
                            pt * gl.load(arena_md + mpb + 1, mask=okt, other=0.0).to(gl.float16),
                            gl.convert_layout(acc1, mma, assert_trivial=True))
                a2 = mma_v2(gl.convert_layout(v2, opa, assert_trivial=True),
                            pt * gl.load(arena_md + mpb + 2, mask=okt, other=0.0).to(gl.float16),
                            gl.convert_layout(acc2, mma, assert_trivial=True))
                a3 = mma_v2(gl.convert_layout(v3, opa, assert_trivial=True),
                            pt * gl.load(arena_md + mpb + 3, mask=okt, other=0.0).to(gl.float16),
                            gl.convert_layout(acc3, mma, assert_trivial=True))
                acc = gl.permute(gl.reshape(gl.join(gl.join(a0, a2), gl.join(a1, a3)),
                                            [NW, G, N, NG]), [0, 3, 1, 2])
                acc = gl.convert_layout(gl.reshape(acc, [NW, D, N]), mma, assert_trivial=True)
                # the zeros: z^T [NW, 16, T] (rows 0 .. NG-1), one dot with P F
                bza = blk0 + wza
                okza = bza < end
                ntza = gl.load(ntok_ptr + row + bza, mask=okza, other=0)
                offza = gl.load(off_ptr + row + bza, mask=okza, other=0) + VOFF
                za = gl.load(arena_md + (offza + VCODE + VMETA) // MSIZE + kvh * (T * NG)
                             + tza * NG + rza, mask=(rza < NG) & (tza < ntza), other=0.0)
                zacc = mma_v2(za.to(gl.float16), pt, zacc * gl.expand_dims(alpha, 1))
            else:
                if FP8:
                    # the value scale on P; the codes converted, unscaled
                    wbv = wb * gl.expand_dims(vsc, 1)
                    pt = gl.convert_layout((p * gl.expand_dims(wbv, 1)).to(gl.float16), opb)
                    vd = gl.inline_asm_elementwise(V_ASM, "=r,=r,r", [vcod], dtype=gl.float16,
                                                   is_pure=True, pack=4)
                else:
                    pt = gl.convert_layout((p * gl.expand_dims(wb, 1)).to(gl.float16), opb)
                    # ---- values: V^T [NW, D, T] in the A operand layout, dequantized in PTX
                    vsb, _c = gl.broadcast(_token_pairs(vs, lv), vcod)
                    vzb, _c = gl.broadcast(_token_pairs(vz, lv), vcod)
                    vd = gl.inline_asm_elementwise(V_ASM, "=r,=r,r" + ",r" * 8,
                                                   [vcod, vsb, vzb], dtype=gl.float16,
                                                   is_pure=True, pack=4)
                # physical token bits (tq1 tq0 kt h e) -> MMA position bits (kt h tq1 tq0 e)
                vd = gl.reshape(vd, [NW, D, 2, 2, 2, 2, 2])
                vd = gl.permute(vd, [0, 1, 4, 5, 2, 3, 6])
                vt = gl.convert_layout(gl.reshape(vd, [NW, D, T]), opa, assert_trivial=True)
                acc = acc * gl.expand_dims(alpha, 1)
                acc = mma_v2(vt, pt, acc)                                   # [NW, D, N]

        # ---- merge the warps' states, store this split's partials
        sw = _merge_warps(m_i, l_i, pm_ptr, pl_ptr, b, kvh, sp, S0, STOT, HQ, GQ)
        o = gl.sum(acc * gl.expand_dims(sw, 1), axis=0)                     # [D, N]
        if PSCALE:
            # + each group's zero term (zacc row g), / PF
            zm = gl.sum(zacc * gl.expand_dims(sw, 1), axis=0)               # [16, N]
            olz: gl.constexpr = gl.SliceLayout(0, mma)
            zr = gl.expand_dims(gl.arange(0, 16, layout=gl.SliceLayout(1, olz)), 1)
            gd = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(1, olz)), 1) // G
            for g in gl.static_range(NG):
                zg = gl.expand_dims(gl.sum(gl.where(zr == g, zm, 0.0), 0), 0)    # [1, N]
                o = o + gl.where(gd == g, zg, 0.0)
            o = o * (1.0 / PF)
        ol: gl.constexpr = gl.SliceLayout(0, mma)
        do = gl.expand_dims(gl.arange(0, D, layout=gl.SliceLayout(1, ol)), 1)
        ho = gl.expand_dims(gl.arange(0, N, layout=gl.SliceLayout(0, ol)), 0)
        gl.store(pacc_ptr + ((b * HQ + kvh * GQ + ho) * STOT + S0 + sp) * D + do, o,
                 mask=ho < GQ)


# measured on an H100 (docs/BENCHMARKS.md, "The Gluon 8-bit kernel on a GPU"): int8
# value scales on P (PSCALE) 0.6-3% slower than an fma a pair, so off
MAXNREG = 168
PSCALE = False


def kernel_consts(geom, num_q_heads: int, *, rowlen: bool = False, dyn: bool = False,
                  pscale: bool | None = None, fp8: bool = False) -> dict:
    """The kernel's compile-time arguments for a geometry, table mode and format (int8,
    or float8 e4m3 with ``fp8``)."""
    H = geom.num_kv_heads
    c = dict(HQ=num_q_heads, H=H, GQ=num_q_heads // H, T=geom.block_size,
             D=geom.head_dim, G=geom.value_group, MSIZE=geom.meta_elem,
             VOFF=geom.sections(_FP8 if fp8 else _INT8)["v_codes"][0],
             K_ASM=K8F_ASM if fp8 else K8_ASM, V_ASM=V8F_ASM if fp8 else V8_ASM,
             ROWLEN=rowlen, DYN=dyn)
    if fp8:
        c["FP8"] = True
    elif PSCALE if pscale is None else pscale:
        c.update(PSCALE=True, VC_ASM=VC_ASM, PF=PF)
    return c


def kernel_call(q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm, pl, pacc, bps,
                sm_scale, s0, stot, geom, *, rowlen=False, dyn=False, fill=False,
                maxnreg=None, fp8=False):
    """(kernel, args, constexprs, options) of one launch over grid (B, H, splits): the
    Triton kernel's argument contract, as paged_decode_gluon.kernel_call."""
    consts = kernel_consts(geom, q.shape[1], rowlen=rowlen, dyn=dyn, fp8=fp8)
    return launch_parts(_int8_decode_kernel, consts, MAXNREG if maxnreg is None else maxnreg,
                        fill, (q, arena_row, offs, ntok, perm, rstart, rlen, bmax, bsum, pm,
                               pl, pacc, bps, sm_scale, s0, stot), geom)
