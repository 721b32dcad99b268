"""The Gluon int4 decode kernel (engine/kernels/paged_decode_gluon.py).

Without a GPU: its PTX strings, run by a small emulator of the instructions they use, give
the dequantized values in channel order (both code conversions); the wrapper refuses what
it cannot serve. On CUDA: the kernel against paged_decode_ref over odd lengths, holes,
split counts, head groups and store dtypes, and through paged_decode_triton's routing.
"""
from __future__ import annotations

import math
import random
import re

import numpy as np
import pytest
import torch

from engine.kernels import paged_decode_gluon as pdg
from engine.kernels.paged_decode import paged_decode_ref
from engine.layout import BlockGeometry, KVFormat
from kernel_cases import make_table

INT4 = KVFormat(4, 4)


def _f16(bits: int) -> float:
    return float(np.array([bits & 0xFFFF], dtype=np.uint16).view(np.float16)[0])


def _bits(x: float) -> int:
    return int(np.array([x], dtype=np.float16).view(np.uint16)[0])


def _pair(f, *regs) -> int:
    """Apply f to the low halves, then to the high halves, of 32-bit fp16 pairs."""
    out = [_bits(f(*(_f16(r >> s) for r in regs))) for s in (0, 16)]
    return out[0] | out[1] << 16


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def run_ptx(text: str, inputs: list[int], n_out: int, out_bits: int) -> list[int]:
    """Run ``text``; inputs are $n_out.. (32- or 64-bit); returns the outputs' bits."""
    regs: dict[str, int] = {f"${n_out + i}": v for i, v in enumerate(inputs)}
    val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
    M = 0xFFFFFFFF
    for ins in (x.strip() for x in text.strip().strip("{}").split(";")):
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        m = re.match(r"\{\s*(\S+),\s*(\S+)\s*\},\s*(\S+)", rest)
        if op in ("mov.b32", "mov.b64") and m:
            lo, hi, src = m.groups()
            w = 16 if op == "mov.b32" else 32
            regs[lo], regs[hi] = val(src) & ((1 << w) - 1), val(src) >> w
            continue
        a = [x.strip() for x in rest.split(",")]
        if op == "mov.b32":
            regs[a[0]] = val(a[1]) & M
        elif op == "shr.b32":
            regs[a[0]] = (val(a[1]) & M) >> val(a[2])
        elif op == "shl.b32":
            regs[a[0]] = (val(a[1]) << val(a[2])) & M
        elif op == "prmt.b32":
            regs[a[0]] = _prmt(val(a[1]), val(a[2]), val(a[3]))
        elif op == "lop3.b32":
            assert val(a[4]) == 0xEA, "emulator knows (a & b) | c only"
            regs[a[0]] = (val(a[1]) & val(a[2])) | val(a[3])
        elif op == "sub.f16x2":
            regs[a[0]] = _pair(lambda x, y: x - y, val(a[1]), val(a[2]))
        elif op == "neg.f16x2":
            regs[a[0]] = _pair(lambda x: -x, val(a[1]))
        elif op == "fma.rn.f16x2":   # one rounding: the product of two fp16 is exact in fp64
            regs[a[0]] = _pair(lambda x, y, z: x * y + z, val(a[1]), val(a[2]), val(a[3]))
        elif op == "cvt.rn.f16x2.e4m3x2":   # two e4m3 bytes (low first) -> their fp16 pair
            src = val(a[1]) & 0xFFFF
            e4 = torch.tensor([src & 255, src >> 8], dtype=torch.uint8).view(torch.float8_e4m3fn)
            regs[a[0]] = _bits(float(e4[0])) | _bits(float(e4[1])) << 16
        else:
            raise AssertionError(f"emulator lacks {op}")
    return [regs[f"${i}"] & ((1 << out_bits) - 1) for i in range(n_out)]


def _h2(lo: float, hi: float) -> int:
    return _bits(lo) | _bits(hi) << 16


@pytest.mark.parametrize("c16", [False, True], ids=["exact", "c16"])
@pytest.mark.parametrize("seed", range(10))
def test_key_string_dequantizes_channels_in_order(seed, c16):
    """k_asm: a word of 16 nibbles (channel k at bits 4k) and the (scale, zero) pairs of
    channels (2j, 2j + 1) -> output k = channel k's key (c16: / 16, zeros z / 16 - s)."""
    rng = random.Random(seed)
    codes = [rng.randrange(16) for _ in range(16)]
    word = sum(c << (4 * k) for k, c in enumerate(codes))
    s = [float(np.float16(rng.uniform(0.01, 0.5))) for _ in range(16)]
    z = [float(np.float16(rng.uniform(-4, 4))) for _ in range(16)]
    sp = [_h2(s[2 * j], s[2 * j + 1]) for j in range(8)]
    zp = [_h2(z[2 * j], z[2 * j + 1]) for j in range(8)]
    if c16:
        zp = [run_ptx(pdg._ZS_ASM, [zp[j], sp[j]], 1, 32)[0] for j in range(8)]
    got = [_f16(o) for o in run_ptx(pdg.k_asm(c16), [word] + sp + zp, 16, 16)]
    want = [(c * sk + zk) / (16 if c16 else 1) for c, sk, zk in zip(codes, s, z)]
    # exact: one fp16 rounding; c16: that and z / 16 - s's (at most (|z| + 16 s) 2^-12 / 16)
    tol = [abs(w) * 2 ** -10 + ((abs(zk) + 16 * sk) * 2 ** -15 if c16 else 0)
           for w, sk, zk in zip(want, s, z)]
    for k in range(16):
        assert abs(got[k] - want[k]) <= tol[k], (k, got[k], want[k])


@pytest.mark.parametrize("c16", [False, True], ids=["exact", "c16"])
@pytest.mark.parametrize("seed", range(10))
def test_value_string_dequantizes_token_pairs_in_order(seed, c16):
    """v_asm: two tokens' words (the same 16 channels) + (scale, zero) pairs (token a,
    token b) -> output k = (a, b) values of channel k."""
    rng = random.Random(seed)
    ca = [rng.randrange(16) for _ in range(16)]
    cb = [rng.randrange(16) for _ in range(16)]
    wa = sum(c << (4 * k) for k, c in enumerate(ca))
    wb = sum(c << (4 * k) for k, c in enumerate(cb))
    s = [float(np.float16(rng.uniform(0.01, 0.5))) for _ in range(2)]
    z = [float(np.float16(rng.uniform(-4, 4))) for _ in range(2)]
    zz = [float(np.float16(zk / 16 - sk)) for zk, sk in zip(z, s)] if c16 else z
    out = run_ptx(pdg.v_asm(c16), [wa, wb, _h2(*s), _h2(*zz)], 16, 32)
    div = 16 if c16 else 1
    for k in range(16):
        for half, c, sk, zk in ((0, ca[k], s[0], z[0]), (1, cb[k], s[1], z[1])):
            want = (c * sk + zk) / div
            tol = abs(want) * 2 ** -10 + ((abs(zk) + 16 * sk) * 2 ** -15 if c16 else 0)
            got = _f16(out[k] >> (16 * half))
            assert abs(got - want) <= tol, (k, half, got, want)


def test_wrapper_refuses_what_it_cannot_serve():
    g = BlockGeometry(16, 2, 128, torch.float16, value_group=32)
    assert "block_size 32" in pdg.supports(g, 8)
    g = BlockGeometry(32, 2, 128, torch.float16, value_group=32)
    assert pdg.supports(g, 32) and "8 query heads" in pdg.supports(g, 32)
    assert "fp16 scales" in pdg.supports(BlockGeometry(32, 2, 128, torch.float32), 8)
    assert "value_group 32" in pdg.supports(BlockGeometry(32, 2, 128, torch.float16,
                                                          value_group=64), 8)
    if pdg.HAVE_GLUON:
        assert pdg.supports(g, 8) is None


def test_int4_on_cpu_stays_on_the_triton_kernel(monkeypatch):
    """The routing needs CUDA: on CPU an int4 table is the Triton kernel's (interpreter)."""
    from engine.kernels import paged_decode_triton as pdt
    monkeypatch.setattr(pdt, "GLUON_INT4", True)
    g = BlockGeometry(32, 2, 128, torch.float16, value_group=32)
    assert not pdt._gluon_serves(INT4, torch.zeros(1, 8, 128), g)


def _routing_spy(monkeypatch):
    """paged_decode_triton with int4 served by a stand-in for the Gluon launch (CPU: the
    interpreter cannot run Gluon): records (kernel, constexprs, grid) of every launch."""
    from engine.kernels import paged_decode_triton as pdt
    monkeypatch.setattr(pdt, "_gluon_module", lambda fmt, q, geom: pdg if fmt == INT4 else None)
    seen, real = [], pdt._launch

    def spy(fn, grid, args, consts, options, cache):
        seen.append((fn, dict(consts), tuple(grid), args))
        if fn is pdg._int4_decode_kernel:
            return None
        return real(fn, grid, args, consts, options, cache)

    monkeypatch.setattr(pdt, "_launch", spy)
    return pdt, seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check of the routing")
@pytest.mark.skipif(not pdg.HAVE_GLUON, reason="no Gluon in this triton")
def test_routing_launch_structure(monkeypatch):
    """Where the Gluon kernel serves int4: a one-format int4 table (a graph's row lengths)
    is one Gluon launch in its row-length mode, splits in whole 4-block iterations; a
    grouped int4 + full table is two launches (never the fused two-format one), the
    Triton kernel's for the full run and the Gluon kernel's for the int4 run, the last
    one filling the holes' partials."""
    pdt, seen = _routing_spy(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    geom = BlockGeometry(32, 2, 128, torch.float16, value_group=32)
    arena, offs, kb, vb, ntok = make_table(geom, [300, 70], INT4, gen)
    q = torch.randn(2, 8, 128, generator=gen).to(torch.float16)
    pdt.paged_decode_triton(q, arena, offs, kb, vb, ntok, geom, 0.1, fmt=INT4,
                            row_len=torch.tensor([10, 3], dtype=torch.int32))
    assert [x[0] for x in seen] == [pdg._int4_decode_kernel]
    _, consts, grid, args = seen[0]
    assert consts["DYN"] and not consts["ROWLEN"] and grid[:2] == (2, 2)
    bps = args[14]                      # blocks a split: whole iterations of 4 blocks
    assert bps % 4 == 0 and grid[2] * bps >= offs.shape[1]
    seen.clear()
    arena, offs, kb, vb, ntok = make_table(geom, [300, 70], _mixed, gen)
    rows = [[(j, INT4 if kb[b, j] == INT4.k_code else KVFormat(0, 0))
             for j in range(offs.shape[1]) if ntok[b, j] > 0] for b in range(2)]
    groups = pdt.FormatGroups.from_rows(rows, offs.shape[1], torch.device("cpu"))
    pdt.paged_decode_triton(q, arena, offs, kb, vb, ntok, geom, 0.1, groups=groups,
                            fuse=True)
    kinds = [("gluon" if fn is pdg._int4_decode_kernel else "triton", c.get("TWO", False))
             for fn, c, _, _ in seen]
    assert sorted(kinds) == [("gluon", False), ("triton", False)]
    last = seen[-1][1]
    assert last["ROWLEN"] and last["FILL"] == 1
    assert all(c["FILL"] == 0 for _, c, _, _ in seen[:-1])


# (B, Hq, H, context lengths, hole fraction)
CASES = [
    (3, 32, 8, [1025, 77, 300], 0.2),
    (2, 16, 2, [2049, 33], 0.1),
    (1, 4, 4, [95], 0.0),
    (4, 12, 2, [31, 1, 513, 4099], 0.3),
]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels run on CUDA only")


# every case in fp16 with the default conversion; the first also in bf16 and exact (each
# combination is a compile of its own: a few seconds each)
VARIANTS = [(c, torch.float16, True) for c in CASES] + [
    (CASES[0], torch.bfloat16, True), (CASES[0], torch.float16, False)]


@cuda
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("case,dtype,c16", VARIANTS, ids=lambda v: str(v).replace(" ", ""))
def test_gluon_matches_reference(monkeypatch, case, dtype, splits, c16):
    from engine.kernels import paged_decode_triton as pdt
    monkeypatch.setattr(pdt, "GLUON_INT4", True)
    monkeypatch.setattr(pdg, "C16", c16)
    check_one_launch(monkeypatch, pdt, case, dtype, INT4, splits, pdg._int4_decode_kernel)


def check_one_launch(monkeypatch, pdt, case, dtype, fmt, splits, kernel):
    """paged_decode_triton over a random table of ``fmt`` blocks (a CASES entry): one
    launch, of ``kernel``, matching paged_decode_ref (output, block partials)."""
    seen = []
    real = pdt._launch
    monkeypatch.setattr(pdt, "_launch", lambda fn, *a: seen.append(fn) or real(fn, *a))
    B, Hq, H, ctx, holes = case
    gen = torch.Generator().manual_seed(hash((B, Hq, H, tuple(ctx), fmt.k_code)) % 2 ** 31)
    geom = BlockGeometry(32, H, 128, dtype, value_group=32)
    arena, offs, kb, vb, ntok = make_table(geom, ctx, fmt, gen, holes=holes)
    q = torch.randn(B, Hq, 128, generator=gen).to(dtype)
    sm = 1.0 / math.sqrt(128)
    want = paged_decode_ref(q, arena, offs, kb, vb, ntok, geom, sm)
    c = lambda t: t.cuda()  # noqa: E731
    got = pdt.paged_decode_triton(c(q), c(arena), c(offs), c(kb), c(vb), c(ntok), geom, sm,
                                  fmt=fmt, num_splits=splits)
    assert seen == [kernel]
    out, bmax, bsum = (t.cpu() for t in got)
    r_out, r_max, r_sum = want
    assert torch.isfinite(out).all()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-2
    torch.testing.assert_close(out.float(), r_out.float(), atol=tol, rtol=tol)
    assert torch.equal(torch.isneginf(bmax), torch.isneginf(r_max))
    fin = torch.isfinite(r_max)
    torch.testing.assert_close(bmax[fin], r_max[fin], atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(bsum, r_sum, atol=2e-2, rtol=2e-2)


def _mixed(b, j, n):
    """Old blocks int4, the row's last two full precision (the engine's steady state)."""
    return KVFormat(0, 0) if j >= n - 2 else INT4


@cuda
@pytest.mark.parametrize("fmt_name", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("mode", ["fmt", "row_len", "groups", "groups-cache", "groups-overlap"])
def test_triton_wrapper_routes_to_gluon(monkeypatch, mode, fmt_name):
    """With the Gluon kernels on, paged_decode_triton's int4 (and int8, fp8: the 8-bit
    kernel) launches (one format, a graph's row lengths, a grouped quantized + full table,
    a step's launch cache, the grouped table's two launches on two streams, eager and
    replayed in a CUDA graph) are the Gluon kernels', and the results match the reference."""
    from engine.kernels import paged_decode_gluon8 as pdg8
    from engine.kernels import paged_decode_triton as pdt
    for flag in ("GLUON_INT4", "GLUON_INT8", "GLUON_FP8"):
        monkeypatch.setattr(pdt, flag, True)
    fmt = KVFormat.parse(fmt_name)
    kernel = pdg._int4_decode_kernel if fmt == INT4 else pdg8._int8_decode_kernel
    seen = []
    real = pdt._launch
    monkeypatch.setattr(pdt, "_launch", lambda fn, *a: seen.append(fn) or real(fn, *a))
    gen = torch.Generator().manual_seed(7)
    geom = BlockGeometry(32, 4, 128, torch.bfloat16, value_group=32)
    ctx = [1000, 65, 2100]
    fmts = (lambda b, j, n: KVFormat(0, 0) if j >= n - 2 else fmt) \
        if mode.startswith("groups") else fmt
    arena, offs, kb, vb, ntok = make_table(geom, ctx, fmts, gen, holes=0.1)
    q = torch.randn(3, 16, 128, generator=gen).to(torch.bfloat16)
    sm = 1.0 / math.sqrt(128)
    want = paged_decode_ref(q, arena, offs, kb, vb, ntok, geom, sm)
    c = lambda t: t.cuda()  # noqa: E731
    kw = {}
    if mode == "fmt":
        kw = dict(fmt=fmt)
    elif mode == "row_len":
        # a graph's table: wider than the rows, its padding columns holes
        pad = lambda t, v: torch.cat([t, torch.full((3, 5), v, dtype=t.dtype)], 1)  # noqa: E731
        offs, kb, vb, ntok = pad(offs, 1 << 40), pad(kb, 0), pad(vb, 0), pad(ntok, 0)
        want = paged_decode_ref(q, arena, offs, kb, vb, ntok, geom, sm)
        kw = dict(fmt=fmt, row_len=c(torch.tensor([32, 3, 66], dtype=torch.int32)))
    else:
        rows = [[(j, fmt if kb[b, j] == fmt.k_code else KVFormat(0, 0))
                 for j in range(offs.shape[1]) if ntok[b, j] > 0] for b in range(3)]
        kw = dict(groups=pdt.FormatGroups.from_rows(rows, offs.shape[1], torch.device("cuda")))
        if mode in ("groups-cache", "groups-overlap"):
            kw["launch_cache"] = {}
        monkeypatch.setattr(pdt, "OVERLAP_RUNS", mode == "groups-overlap")
    args = [c(t) for t in (q, arena, offs, kb, vb, ntok)]
    for it in range(1 if mode in ("fmt", "row_len", "groups") else 2):
        if mode == "groups-overlap" and it == 1:
            # the second time inside a CUDA graph: the side stream a parallel branch
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                got = pdt.paged_decode_triton(*args, geom, sm, **kw)
            for t in got:
                t.fill_(float("nan"))
            graph.replay()
            torch.cuda.synchronize()
        else:
            got = pdt.paged_decode_triton(*args, geom, sm, **kw)
        out, bmax, bsum = (t.cpu() for t in got)
        torch.testing.assert_close(out.float(), want[0].float(), atol=2e-2, rtol=2e-2)
        assert torch.equal(torch.isneginf(bmax), torch.isneginf(want[1]))
        fin = torch.isfinite(want[1])
        torch.testing.assert_close(bmax[fin], want[1][fin], atol=1e-2, rtol=1e-2)
        torch.testing.assert_close(bsum, want[2], atol=2e-2, rtol=2e-2)
    assert any(fn is kernel for fn in seen)
