"""The Gluon int8 decode kernel (engine/kernels/paged_decode_gluon8.py).

Without a GPU: its PTX strings, run by the emulator of test_gluon_int4.py, give the
dequantized values in order (keys: channels of a word; values: four tokens of a
channel). On CUDA: the kernel against paged_decode_ref over odd lengths, holes, split
counts, head groups and store dtypes (its routed table modes: test_gluon_int4.py's
routing test, over every Gluon format).
"""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from engine.kernels import paged_decode_gluon as pdg
from engine.kernels import paged_decode_gluon8 as pdg8
from engine.layout import BlockGeometry, KVFormat
from kernel_cases import make_table
from test_gluon_int4 import CASES, _f16, _h2, check_one_launch, run_ptx

INT8 = KVFormat(8, 8)
FP8 = KVFormat.parse("fp8")


def _e4m3(b: int) -> float:
    return float(torch.tensor([b], dtype=torch.uint8).view(torch.float8_e4m3fn)[0])


def _finite_e4m3(rng) -> int:
    while True:
        b = rng.randrange(256)
        if b & 0x7F != 0x7F:            # the two NaN bytes; the quantizer never writes them
            return b


def _fma16(c, s, z) -> float:
    """c * s + z rounded once to fp16 (what fma.rn.f16x2 computes)."""
    return float(np.float16(c * s + z))


@pytest.mark.parametrize("seed", range(10))
def test_key_string_dequantizes_channels_in_order(seed):
    """K8_ASM: a word of 8 codes (channel k in byte k) and the (scale, zero) pairs of
    channels (2j, 2j + 1) -> output k = channel k's key, c * s + z rounded once."""
    rng = random.Random(seed)
    codes = [rng.randrange(256) for _ in range(8)]
    word = sum(c << (8 * k) for k, c in enumerate(codes))
    s = [float(np.float16(rng.uniform(0.001, 0.05))) for _ in range(8)]
    z = [float(np.float16(rng.uniform(-4, 4))) for _ in range(8)]
    sp = [_h2(s[2 * j], s[2 * j + 1]) for j in range(4)]
    zp = [_h2(z[2 * j], z[2 * j + 1]) for j in range(4)]
    got = [_f16(o) for o in run_ptx(pdg8.K8_ASM, [word] + sp + zp, 8, 16)]
    assert got == [_fma16(c, sk, zk) for c, sk, zk in zip(codes, s, z)]


@pytest.mark.parametrize("seed", range(10))
def test_value_string_dequantizes_four_tokens_in_order(seed):
    """V8_ASM: four tokens' codes of one channel (token i in byte i), each token's entry
    of the scale and zero pairs (tokens (0, 1) twice, then (2, 3) twice) -> two fp16
    pairs, tokens (0, 1) and (2, 3)."""
    rng = random.Random(seed)
    codes = [rng.randrange(256) for _ in range(4)]
    s = [float(np.float16(rng.uniform(0.001, 0.05))) for _ in range(4)]
    z = [float(np.float16(rng.uniform(-4, 4))) for _ in range(4)]
    sp = [_h2(s[0], s[1])] * 2 + [_h2(s[2], s[3])] * 2
    zp = [_h2(z[0], z[1])] * 2 + [_h2(z[2], z[3])] * 2
    out = run_ptx(pdg8.V8_ASM, [sum(c << (8 * i) for i, c in enumerate(codes))] + sp + zp,
                  2, 32)
    got = [_f16(out[i // 2] >> (16 * (i % 2))) for i in range(4)]
    assert got == [_fma16(c, sk, zk) for c, sk, zk in zip(codes, s, z)]


@pytest.mark.parametrize("seed", range(5))
def test_fp8_strings_convert_in_order(seed):
    """K8F_ASM: a word of 8 e4m3 codes -> output k = code k as fp16 (exact); V8F_ASM: four
    tokens' codes of a channel -> pairs (0, 1), (2, 3)."""
    rng = random.Random(seed)
    codes = [_finite_e4m3(rng) for _ in range(8)]
    word = sum(c << (8 * k) for k, c in enumerate(codes))
    got = [_f16(o) for o in run_ptx(pdg8.K8F_ASM, [word], 8, 16)]
    assert got == [_e4m3(c) for c in codes]
    out = run_ptx(pdg8.V8F_ASM, [word & 0xFFFFFFFF], 2, 32)
    assert [_f16(out[i // 2] >> (16 * (i % 2))) for i in range(4)] == \
        [_e4m3(c) for c in codes[:4]]


def test_token_order_is_a_permutation_that_gives_each_lane_eight_adjacent_tokens():
    """The module's token order: MMA position p = e + 2 tq + 8 h + 16 kt holds token
    8 tq + e + 2 h + 4 kt, a bijection on 0..31 under which the 8 positions of quad lane
    tq are its 8 adjacent bytes of a channel row."""
    def sigma(r):
        return 8 * ((r >> 1) & 3) + (r & 1) + 2 * ((r >> 3) & 3)

    assert sorted(sigma(r) for r in range(32)) == list(range(32))
    for tq in range(4):
        pos = [e + 2 * tq + 8 * h + 16 * kt for e in (0, 1) for h in (0, 1) for kt in (0, 1)]
        assert sorted(sigma(p) for p in pos) == list(range(8 * tq, 8 * tq + 8))


def test_int8_on_cpu_and_off_stays_on_the_triton_kernel(monkeypatch):
    from engine.kernels import paged_decode_triton as pdt
    g = BlockGeometry(32, 2, 128, torch.float16, value_group=32)
    monkeypatch.setattr(pdt, "GLUON_INT8", True)
    assert pdt._gluon_module(INT8, torch.zeros(1, 8, 128), g) is None      # CPU
    if torch.cuda.is_available() and pdg.HAVE_GLUON:
        q = torch.zeros(1, 8, 128, device="cuda")
        assert pdt._gluon_module(INT8, q, g) is pdg8
        monkeypatch.setattr(pdt, "GLUON_INT8", False)
        assert pdt._gluon_module(INT8, q, g) is None


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="Gluon kernels run on CUDA only")
# (case, store dtype, format, int8 value scales on P)
VARIANTS = [(c, torch.float16, INT8, False) for c in CASES] + [
    (CASES[0], torch.bfloat16, INT8, False)] + [
    (c, torch.float16, INT8, True) for c in CASES[:2]] + [
    (c, torch.float16, FP8, False) for c in CASES] + [(CASES[0], torch.bfloat16, FP8, False)]


@cuda
@pytest.mark.parametrize("splits", [None, 1, 3])
@pytest.mark.parametrize("case,dtype,fmt,pscale", VARIANTS,
                         ids=lambda v: str(v).replace(" ", ""))
def test_gluon8_matches_reference(monkeypatch, case, dtype, fmt, pscale, splits):
    from engine.kernels import paged_decode_triton as pdt
    monkeypatch.setattr(pdt, "GLUON_INT8", True)
    monkeypatch.setattr(pdt, "GLUON_FP8", True)
    monkeypatch.setattr(pdg8, "PSCALE", pscale)
    check_one_launch(monkeypatch, pdt, case, dtype, fmt, splits, pdg8._int8_decode_kernel)


def _mixed(b, j, n):
    """Old blocks int8, the row's last two full precision."""
    return KVFormat(0, 0) if j >= n - 2 else INT8


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU check of the routing")
@pytest.mark.skipif(not pdg.HAVE_GLUON, reason="no Gluon in this triton")
def test_routing_launch_structure(monkeypatch):
    """Where the Gluon int8 kernel serves int8 (a stand-in for its launch on the CPU): a
    one-format table is one launch of it in whole 4-block iterations; a grouped int8 +
    full table two launches (never the fused one), the int8 run's by the Gluon kernel."""
    from engine.kernels import paged_decode_triton as pdt
    monkeypatch.setattr(pdt, "_gluon_module",
                        lambda fmt, q, geom: pdg8 if fmt == INT8 else None)
    seen, real = [], pdt._launch

    def spy(fn, grid, args, consts, options, cache):
        seen.append((fn, dict(consts), tuple(grid), args))
        if fn is pdg8._int8_decode_kernel:
            return None
        return real(fn, grid, args, consts, options, cache)

    monkeypatch.setattr(pdt, "_launch", spy)
    gen = torch.Generator().manual_seed(4)
    geom = BlockGeometry(32, 2, 128, torch.float16, value_group=32)
    arena, offs, kb, vb, ntok = make_table(geom, [300, 70], INT8, gen)
    q = torch.randn(2, 8, 128, generator=gen).to(torch.float16)
    pdt.paged_decode_triton(q, arena, offs, kb, vb, ntok, geom, 0.1, fmt=INT8)
    assert [x[0] for x in seen] == [pdg8._int8_decode_kernel]
    _, consts, grid, args = seen[0]
    assert consts["K_ASM"] == pdg8.K8_ASM and grid[:2] == (2, 2)
    assert args[14] % 4 == 0 and grid[2] * args[14] >= offs.shape[1]
    seen.clear()
    arena, offs, kb, vb, ntok = make_table(geom, [300, 70], _mixed, gen)
    rows = [[(j, INT8 if kb[b, j] == INT8.k_code else KVFormat(0, 0))
             for j in range(offs.shape[1]) if ntok[b, j] > 0] for b in range(2)]
    groups = pdt.FormatGroups.from_rows(rows, offs.shape[1], torch.device("cpu"))
    pdt.paged_decode_triton(q, arena, offs, kb, vb, ntok, geom, 0.1, groups=groups, fuse=True)
    kinds = sorted(("gluon" if fn is pdg8._int8_decode_kernel else "triton", c.get("TWO", False))
                   for fn, c, _, _ in seen)
    assert kinds == [("gluon", False), ("triton", False)]
