"""The PTX code-conversion strings of the paged decode kernel (engine/kernels/codes_triton.py),
run by a small emulator of the instructions they use (and/shr/mov/prmt/sub.f16x2), so that
the element order they produce is checked on machines without a GPU. The strings proven on the H200 (the byte
conversions) are checked too, as a check of the emulator."""
from __future__ import annotations

import random
import re

import numpy as np
import pytest

from engine.kernels import codes_triton as ct


def _prmt(a: int, b: int, sel: int) -> int:
    src = [(a >> (8 * i)) & 255 for i in range(4)] + [(b >> (8 * i)) & 255 for i in range(4)]
    return sum(src[(sel >> (4 * i)) & 7] << (8 * i) for i in range(4))


def _f16(bits: int) -> float:
    return float(np.array([bits], dtype=np.uint16).view(np.float16)[0])


def _bits(x: float) -> int:
    return int(np.array([x], dtype=np.float16).view(np.uint16)[0])


def run_ptx(text: str, inputs: list[int], n_out: int, out_bits: int) -> list[int]:
    """Run ``text`` with $n_out.. as 32-bit inputs; returns the outputs' bit patterns."""
    regs: dict[str, int] = {f"${n_out + i}": v for i, v in enumerate(inputs)}
    val = lambda t: regs[t] if t in regs else int(t, 0)  # noqa: E731
    body = text.strip().strip("{}").split(";")
    for ins in (x.strip() for x in body):
        if not ins or ins.startswith(".reg"):
            continue
        op, rest = ins.split(None, 1)
        if op == "mov.b32" and rest.lstrip().startswith("{"):
            m = re.match(r"\{\s*(\S+),\s*(\S+)\s*\},\s*(\S+)", rest)
            lo, hi, src = m.groups()
            regs[lo], regs[hi] = val(src) & 0xFFFF, val(src) >> 16
            continue
        args = [a.strip() for a in rest.split(",")]
        if op == "mov.b32":
            regs[args[0]] = val(args[1])
        elif op == "and.b32":
            regs[args[0]] = val(args[1]) & val(args[2])
        elif op == "shr.b32":
            regs[args[0]] = val(args[1]) >> val(args[2])
        elif op == "prmt.b32":
            regs[args[0]] = _prmt(val(args[1]), val(args[2]), val(args[3]))
        elif op == "sub.f16x2":
            a, b = val(args[1]), val(args[2])
            halves = [_bits(_f16((a >> s) & 0xFFFF) - _f16((b >> s) & 0xFFFF)) for s in (0, 16)]
            regs[args[0]] = halves[0] | halves[1] << 16
        else:
            raise AssertionError(f"emulator lacks {op}")
    return [regs[f"${i}"] & ((1 << out_bits) - 1) for i in range(n_out)]


def _word(rng) -> tuple[int, list[int]]:
    b = [rng.randrange(256) for _ in range(4)]
    return sum(x << (8 * i) for i, x in enumerate(b)), b


@pytest.mark.parametrize("seed", range(20))
def test_byte_strings(seed):
    """The strings proven on the H200: 4 bytes -> 2 registers of 2 fp16 codes, in order."""
    rng = random.Random(seed)
    w, b = _word(rng)
    for bits, strings in ((8, ct.ASM_U8.value), (4, ct.ASM_U4.value), (2, ct.ASM_U2.value)):
        for j, text in enumerate(strings):
            out = run_ptx(text, [w], 2, 32)
            codes = [_f16(o >> s & 0xFFFF) for o in out for s in (0, 16)]
            assert codes == [(x >> (bits * j)) & ((1 << bits) - 1) for x in b]


@pytest.mark.parametrize("seed", range(20))
def test_word_strings_unpack_in_memory_order(seed):
    """ASM_W8 / ASM_W4 and the unpack order in word_codes: outputs are fp16 codes of
    elements (0, 1, 2, 3) and (0, 2, 4, 6, 1, 3, 5, 7) of the word."""
    rng = random.Random(seed)
    w, b = _word(rng)
    out8 = [_f16(o) for o in run_ptx(ct.ASM_W8.value, [w], 4, 16)]
    assert out8 == b                                    # e0, e1, e2, e3
    nib = [(x >> s) & 15 for x in b for s in (0, 4)]    # element 2 k + h: byte k, nibble h
    out4 = [_f16(o) for o in run_ptx(ct.ASM_W4.value, [w], 8, 16)]
    assert out4 == [nib[i] for i in (0, 2, 4, 6, 1, 3, 5, 7)]
