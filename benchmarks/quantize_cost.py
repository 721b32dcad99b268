"""What converting a batch of full-precision blocks to a quantized format costs: the torch
path the engine takes (``read_blocks`` to dense fp32, then ``write_blocks``) against the
Triton slot conversion (engine/kernels/quantize_slots_triton.py), on one arena, the same
blocks, alternating, median of ``--reps``; both results compared byte for byte (the share
of equal bytes where they differ: 2-bit values' fits may break ties otherwise). Reports
milliseconds a batch (device time, synchronized), host milliseconds to queue a batch
(what the engine thread spends), and the bytes moved (full slots read, new slots
written) per second.

    python -m benchmarks.quantize_cost --device cuda                 # 8B shape, 64 blocks
    python -m benchmarks.quantize_cost --device cpu --layers 2 --no-fused   # torch path only
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.kernels.slots import read_blocks, write_blocks
from engine.layout import FULL, BlockGeometry, KVFormat


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--block", type=int, default=32)
    ap.add_argument("--blocks", type=int, default=64, help="a batch (engine.moves.BATCH)")
    ap.add_argument("--formats", default="int8,int4,fp8,k8v4,k4v2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--no-fused", action="store_true", help="time the torch path only")
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    geom = BlockGeometry(a.block, a.kv_heads, a.head_dim, getattr(torch, a.dtype))
    n = a.blocks
    full = geom.slot_bytes(FULL)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    print(f"{a.layers} layers x {n} blocks of {a.block} tokens, {a.kv_heads} kv heads x "
          f"{a.head_dim}, {a.dtype}, {dev}"
          + (f" ({torch.cuda.get_device_name(dev)})" if dev.type == "cuda" else ""))
    for name in a.formats.split(","):
        fmt = KVFormat.parse(name)
        new = geom.slot_bytes(fmt)
        arena = torch.empty(a.layers, n * full + n * new, dtype=torch.uint8, device=dev)
        arena[:, : n * full].view(geom.store_dtype).normal_()
        src = torch.arange(n, device=dev) * full
        dst = n * full + torch.arange(n, device=dev) * new
        moved = n * (full + new) * a.layers

        def torch_path():
            k, v = read_blocks(arena, src, geom, FULL, torch.float32)
            write_blocks(arena, dst, geom, fmt, k, v)

        ways = {"torch": torch_path}
        if not a.no_fused:
            from engine.kernels.quantize_slots_triton import quantize_slots, supported
            if supported(geom, fmt):
                ways["triton"] = lambda: quantize_slots(arena, src, dst, geom, fmt)
        out = {}
        for w, fn in ways.items():
            fn()                                          # compile / warm up
            sync()
            out[w] = arena[:, n * full:].clone()
        # 2-bit values: the same fit up to ties in a sum's last bits, so nearly all bytes
        same = min(float((out["torch"] == o).float().mean()) for o in out.values())
        times = {w: [] for w in ways}
        host = {w: [] for w in ways}
        for _ in range(a.reps):
            for w, fn in ways.items():
                sync()
                t = time.perf_counter()
                fn()
                host[w].append(time.perf_counter() - t)
                sync()
                times[w].append(time.perf_counter() - t)
        row = []
        for w in ways:
            ms = statistics.median(times[w]) * 1e3
            row.append(f"{w} {ms:.2f} ms (host {statistics.median(host[w]) * 1e3:.2f} ms, "
                       f"{moved / ms / 1e6:.1f} GB/s)")
        ratio = (f"; triton {statistics.median(times['torch']) / statistics.median(times['triton']):.1f}x"
                 if "triton" in ways else "")
        print(f"{fmt.name}: " + "; ".join(row) + ratio
              + f"; same bytes: {'yes' if same == 1.0 else f'{same:.2%}'}")
        del arena, out


if __name__ == "__main__":
    main()
