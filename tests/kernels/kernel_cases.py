"""Kernel test helpers: which Triton modules run where, and random paged KV tables."""
from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch


def kernel_module(device: str) -> ModuleType:
    """engine.kernels.paged_decode_triton running on ``device``.

    'cuda': the compiled kernels (skipped without a GPU); 'cpu': the interpreter, which
    conftest.py set up (skipped on a CUDA machine, where the 'cuda' variant runs).
    """
    if device == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("CUDA not available")
    elif torch.cuda.is_available():
        pytest.skip("interpreter variant: runs on machines without CUDA")
    pdt = importlib.import_module("engine.kernels.paged_decode_triton")
    if device == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        from engine.kernels import codes_triton, split_reduce_triton
        for kern in (pdt._paged_decode_kernel, codes_triton.fp8_to,
                     split_reduce_triton._reduce_splits_kernel):
            assert isinstance(kern, InterpretedFunction), \
                "triton was imported before tests/conftest.py could enable the interpreter"
    return pdt


# "cpu" runs the Triton interpreter; "cuda" the compiled kernels
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


def seed_of(request) -> int:
    """A fresh, reproducible seed per test id."""
    import zlib
    return zlib.crc32(request.node.nodeid.encode())


def make_table(geom, ctx_lens: list[int], fmts, gen: torch.Generator, holes: float = 0.0,
               device: str = "cpu"):
    """Random KV written into a scattered arena: (arena, offsets, kbits, vbits, ntok).

    ``fmts``: a KVFormat for every block, a list to draw each block's format from, or a
    function (row, block, the row's blocks) -> KVFormat.
    Blocks are placed at shuffled, gapped offsets over an arena of random bytes; holes
    (ntok 0) get an offset far outside the arena and junk bits, which must be ignored.
    Tokens past ntok in full-precision slots are NaN, which must be ignored too.
    """
    from engine.kernels.slots import write_blocks

    T, H, D = geom.block_size, geom.num_kv_heads, geom.head_dim
    B = len(ctx_lens)
    NB = max(-(-n // T) for n in ctx_lens)
    choices = fmts if isinstance(fmts, (list, tuple)) else [fmts]
    entries = []  # (b, j, fmt, ntok)
    for b, n in enumerate(ctx_lens):
        for j in range(NB):
            ntok = max(0, min(T, n - j * T))
            fmt = fmts(b, j, -(-n // T)) if callable(fmts) else \
                choices[int(torch.randint(len(choices), (1,), generator=gen))]
            if ntok and holes and j < NB - 1 and float(torch.rand(1, generator=gen)) < holes:
                ntok = 0
            entries.append((b, j, fmt, ntok))
    order = torch.randperm(len(entries), generator=gen).tolist()
    offsets = torch.zeros(B, NB, dtype=torch.int64)
    pos = 0
    for i in order:
        b, j, fmt, ntok = entries[i]
        pos += 16 * int(torch.randint(3, (1,), generator=gen))   # gaps
        offsets[b, j] = pos
        pos += geom.slot_bytes(fmt)
    arena = torch.randint(0, 256, (pos + 64,), dtype=torch.uint8, generator=gen)
    kbits = torch.zeros(B, NB, dtype=torch.int32)
    vbits = torch.zeros_like(kbits)
    ntoks = torch.zeros_like(kbits)
    for b, j, fmt, ntok in entries:
        kbits[b, j], vbits[b, j], ntoks[b, j] = fmt.k_code, fmt.v_code, ntok
        if ntok == 0:
            offsets[b, j] = 1 << 40
            kbits[b, j], vbits[b, j] = 3, 5          # junk: must not be read
            continue
        k = torch.randn(1, H, T, D, generator=gen) * 1.5
        v = torch.randn(1, H, T, D, generator=gen)
        k[..., :, int(torch.randint(D, (1,), generator=gen))] *= 8   # an outlier channel
        write_blocks(arena, offsets[b, j:j + 1], geom, fmt, k.to(geom.store_dtype),
                     v.to(geom.store_dtype))
        if ntok < T:
            s = geom.sections(fmt)
            es = geom.store_elem
            for name in ("k", "v"):
                if name in s:
                    o = int(offsets[b, j]) + s[name][0]
                    view = arena[o:o + s[name][1]].view(H, T, D * es)
                    view[:, ntok:] = 0xFF                     # NaN in fp16 / fp32
    dev = torch.device(device)
    return (arena.to(dev), offsets.to(dev), kbits.to(dev), vbits.to(dev), ntoks.to(dev))


def all_formats(fp8: bool = False):
    """Every format with int sides (16), or with fp8 in place of int8 (fp8=True: 16)."""
    from engine.layout import KVFormat
    return [KVFormat(k, v, fp8=fp8 and 8 in (k, v)) for k in (0, 8, 4, 2) for v in (0, 8, 4, 2)]
