"""Run the paged decode kernel a few times per format at one shape, for a profiler.

    ncu --clock-control none -k regex:_paged_decode_kernel --launch-skip 2 --launch-count 1 \
        --section WarpStateStats ... python benchmarks/ncu_decode.py --fmt int4 [--B 8 --L 131072]

Builds the same paged arena as benchmarks/decode_kernel.py (random permutation of
slots, every block in one format) and calls the kernel with its launch defaults.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from benchmarks.decode_kernel import D, G, H, HQ, T, _build_arena  # noqa: E402
from engine.kernels.paged_decode_triton import paged_decode_triton  # noqa: E402
from engine.layout import BlockGeometry, KVFormat  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fmt", default="int4")
    ap.add_argument("--B", type=int, default=8)
    ap.add_argument("--L", type=int, default=131072)
    ap.add_argument("--calls", type=int, default=4)
    ap.add_argument("--words", action="store_true", help="word_codes=True (int32 code loads)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)
    k = torch.randn(a.B, H, a.L, D, device=dev, dtype=torch.float16, generator=gen)
    v = torch.randn(a.B, H, a.L, D, device=dev, dtype=torch.float16, generator=gen)
    q = torch.randn(a.B, HQ, D, device=dev, dtype=torch.float16, generator=gen)
    geom = BlockGeometry(T, H, D, torch.float16, value_group=G)
    fmt = KVFormat.parse(a.fmt)
    arena, tables = _build_arena(geom, fmt, k, v, 1, torch.Generator().manual_seed(0), dev)
    del k, v
    NB = a.L // T
    kb = torch.full((a.B, NB), fmt.k_code, dtype=torch.int32, device=dev)
    vb = torch.full((a.B, NB), fmt.v_code, dtype=torch.int32, device=dev)
    nt = torch.full((a.B, NB), T, dtype=torch.int32, device=dev)
    for _ in range(a.calls):
        paged_decode_triton(q, arena, tables[0], kb, vb, nt, geom, 1 / math.sqrt(D), fmt=fmt,
                            word_codes=a.words)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
