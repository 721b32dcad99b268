"""Benchmark: paged decode kernel vs torch SDPA at a Llama-3-8B layer shape.

    python -m benchmarks.decode_kernel [--sweep] [--json PATH]
    python -m benchmarks.decode_kernel --batches 8 --contexts 131072 \
        --formats int8 int4 fp8 --variants default words s3   # named variants only

int4 tables go to the Gluon kernel on CUDA (paged_decode_triton routes them there by
default; `KVCTL_GLUON=0` in the environment times the Triton kernel instead).

32 query heads, 8 KV heads, head_dim 128, block size 32, fp16; batch 1 and 8, context
32K and 128K. SDPA runs over contiguous fp16 K/V; our kernel over a paged arena whose
block table is a random permutation of slots, every block in one format. Each call is
captured in a CUDA graph (no launch gaps) and timed with CUDA events; when one call's
data would fit in L2 the graph cycles over several copies of it (at least 256 MB in
all). Reported: median microseconds, speedup vs SDPA, and GB/s over the bytes the call
actually reads (slot bytes, alignment padding excluded) against 4.46 TB/s.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F

from engine.kernels.paged_decode_triton import (FormatGroups, paged_decode_triton,
                                                slot_bytes_read)
from engine.kernels.quant import quantize_fp8_ref, quantize_keys_ref, quantize_values_ref
from engine.kernels.slots import value_codes_to_slot
from engine.layout import BlockGeometry, KVFormat

HQ, H, D, T, G = 32, 8, 128, 32, 32
PEAK_GBS = 4460.0
ROTATE_BYTES = 256 << 20
FORMATS = ["full", "int8", "int4", "int2", "k4v2", "fp8"]
# (blocks_per_iter, num_warps, num_stages) tried with --sweep
SWEEP = [(2, 4, 2), (1, 4, 2), (2, 4, 1), (4, 4, 2), (4, 8, 2), (2, 8, 2)]
SPLIT_MULTS = [2, 4, 8]   # programs ~ mult * SMs


def _timeit(fn, iters: int, device: torch.device) -> float:
    """Median seconds of fn() (fn launches a whole graph)."""
    if device.type != "cuda":
        ts = []
        for _ in range(max(3, iters // 10)):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(iters)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in ev) / 1e3


def _graphed(calls, device: torch.device):
    """One callable replaying all calls (a CUDA graph on CUDA)."""
    if device.type != "cuda":
        return lambda: [c() for c in calls]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for c in calls:  # warm up: compile, allocate
            c()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in calls:
            c()
    return g.replay


def _build_arena(geom, fmt, k, v, reps, gen_perm, device):
    """Write dense k, v [B, H, L, D] into `reps` copies of paged slots; block tables."""
    B, _, L, _ = k.shape
    NB = L // T
    slot = geom.slot_bytes(fmt)
    n_slots = reps * B * NB
    arena = torch.empty(n_slots * slot, dtype=torch.uint8, device=device)
    a2 = arena.view(n_slots, slot)
    perm = torch.randperm(n_slots, generator=gen_perm).to(device)
    tables = perm.view(reps, B, NB)
    sec = geom.sections(fmt)
    md = geom.meta_dtype

    def put(ids, name, x):
        off, nbytes = sec[name]
        a2[ids, off:off + nbytes] = x.contiguous().view(torch.uint8).reshape(len(ids), nbytes)

    for b in range(B):
        for c0 in range(0, NB, 1024):
            c1 = min(NB, c0 + 1024)
            kb = k[b, :, c0 * T:c1 * T].reshape(H, c1 - c0, T, D).transpose(0, 1)
            vb = v[b, :, c0 * T:c1 * T].reshape(H, c1 - c0, T, D).transpose(0, 1)
            ids = tables[0, b, c0:c1]
            if fmt.k_bits == 0:
                put(ids, "k", kb)
            elif fmt.k_fp8:
                c, s = quantize_fp8_ref(kb, md)
                put(ids, "k_codes", c)
                put(ids, "k_scale", s)
            else:
                c, s, z = quantize_keys_ref(kb, fmt.k_bits, md)
                for n_, x_ in (("k_codes", c), ("k_scale", s), ("k_zero", z)):
                    put(ids, n_, x_)
            if fmt.v_bits == 0:
                put(ids, "v", vb)
            elif fmt.v_fp8:
                c, s = quantize_fp8_ref(vb, md)
                put(ids, "v_codes", value_codes_to_slot(c, 8))
                put(ids, "v_scale", s)
            else:
                c, s, z = quantize_values_ref(vb, fmt.v_bits, G, md)
                c = value_codes_to_slot(c, fmt.v_bits)
                for n_, x_ in (("v_codes", c), ("v_scale", s), ("v_zero", z)):
                    put(ids, n_, x_)
    for r in range(1, reps):
        for b in range(B):
            a2[tables[r, b]] = a2[tables[0, b]]
    return arena, tables.to(torch.int64) * slot


def _bench_mixed(name, B, L, geom, k, v, reps, gen_cpu, device, q, qd, ref, sm_scale, t_sdpa,
                 iters, variants: list[str] | None = None) -> list[dict]:
    """``base+last`` (e.g. int4+full): every block in ``base`` but each sequence's newest
    block in ``last`` (a quantized sequence with its full-precision residual block): one
    launch for both formats (``grouped``, the default), one launch per format
    (``grouped-2launch``), grouped on the host as the engine's plan does, or on the device
    (``per-format``: ``formats=``, one launch for both). ``variants``: the grouped table
    again under each named variant that sets module knobs only (``grouped+ov``; others are
    launch arguments of one-format tables and are skipped here)."""
    base, last = (KVFormat.parse(x) for x in name.split("+"))
    NB = L // T
    arena_a, tab_a = _build_arena(geom, base, k, v, reps, gen_cpu, device)
    arena_b, tab_b = _build_arena(geom, last, k[:, :, -T:], v[:, :, -T:], reps, gen_cpu, device)
    arena = torch.cat([arena_a, arena_b])
    tables = tab_a.clone()
    tables[:, :, -1] = tab_b[:, :, 0] + arena_a.numel()
    del arena_a, arena_b
    kb = torch.full((B, NB), base.k_code, dtype=torch.int32, device=device)
    vb = torch.full((B, NB), base.v_code, dtype=torch.int32, device=device)
    kb[:, -1], vb[:, -1] = last.k_code, last.v_code
    nt = torch.full((B, NB), T, dtype=torch.int32, device=device)
    nbytes = B * ((NB - 1) * slot_bytes_read(geom, base) + slot_bytes_read(geom, last))
    rows = []
    rows_g = [[(j, base) for j in range(NB - 1)] + [(NB - 1, last)] for _ in range(B)]
    groups = FormatGroups.from_rows(rows_g, NB, device)      # as the engine's plan makes it
    runs = [("grouped", {"groups": groups}, {}),
            ("grouped-2launch", {"groups": groups, "fuse": False}, {}),
            ("per-format", {"formats": [base, last]}, {})]
    for vname in variants or []:
        vkw = _variant(vname)
        if vname == "default":
            continue
        if any(key not in _KNOBS for key in vkw):
            print(f"  {name:10s} {vname}: not a module-knob variant, skipped for a grouped table")
            continue
        runs.append((f"grouped+{vname}", {"groups": groups}, vkw))
    for label, kw, vkw in runs:
        with _knobs(dict(vkw)):
            out = paged_decode_triton(qd, arena, tables[0], kb, vb, nt, geom, sm_scale, **kw)[0]
            err = (out.float() - ref.squeeze(2).float()).abs().max().item()
            # one launch cache per table, kept across the timed calls, as the engine keeps
            # one for a step's layers: the grouped table's gathers are made once (outside
            # the graph), not per layer
            calls = [lambda t=t, kw=kw, c={}: paged_decode_triton(
                qd, arena, t, kb, vb, nt, geom, sm_scale, launch_cache=c, **kw) for t in tables]
            t = _timeit(_graphed(calls, device), iters, device) / reps
        rows.append(dict(B=B, L=L, kernel=f"paged-{label}", fmt=name, cfg=label, split_mult=None,
                         us=t * 1e6, speedup=t_sdpa / t, bytes=nbytes, gbs=nbytes / t / 1e9,
                         max_err_vs_sdpa=err))
        print(f"  {name:10s} {label:10s}: {t * 1e6:8.1f} us {t_sdpa / t:5.2f}x  "
              f"{nbytes / t / 1e9:6.0f} GB/s  err {err:.2e}", flush=True)
    return rows


# named launch variants for --variants (kwargs on top of fmt=)
VARIANTS = {
    "default": {}, "w2": dict(num_warps=2),
    "w8": dict(num_warps=8), "s3": dict(num_stages=3), "s1": dict(num_stages=1),
    "nbi1": dict(blocks_per_iter=1), "nbi4": dict(blocks_per_iter=4),
    "x2": dict(split_mult=2), "x4": dict(split_mult=4), "x8": dict(split_mult=8),
    "x16": dict(split_mult=16), "x32": dict(split_mult=32),
    "words": dict(word_codes=True), "nbi2": dict(blocks_per_iter=2),
    "nbi8": dict(blocks_per_iter=8), "s2": dict(num_stages=2), "s4": dict(num_stages=4),
    "r128": dict(maxnreg=128), "r168": dict(maxnreg=168), "wk": dict(word_codes="k"),
    "wv": dict(word_codes="v"), "nowords": dict(word_codes=False),
    # int4 tables: the Gluon kernel (engine/kernels/paged_decode_gluon.py) is the default;
    # "triton" the Triton kernel; Gluon settings: exact codes (1024 + c, then a
    # subtraction) instead of 1 + c / 16, no register cap (168 by default)
    "triton": dict(_gluon=False), "gluon-exact": dict(_c16=False), "gr0": dict(_maxnreg=0),
    # int8 and fp8 tables: the Gluon 8-bit kernel (paged_decode_gluon8.py; KVCTL_GLUON8=1
    # routes to it) on or off, its register cap (168 by default; 0 none), int8 value
    # scales on P or not
    "g8": dict(_gluon8=True, _gluonf8=True), "t8": dict(_gluon8=False, _gluonf8=False),
    "g8r0": dict(_gluon8=True, _gluonf8=True, _maxnreg8=0),
    "g8r192": dict(_gluon8=True, _gluonf8=True, _maxnreg8=192),
    "g8ps": dict(_gluon8=True, _pscale8=True), "g8fma": dict(_gluon8=True, _pscale8=False),
    # grouped tables (int4+full): the two launches on two streams (OVERLAP_RUNS)
    "ov": dict(_overlap=True),
}
# the module settings the private keys above set for one variant's calls
_KNOBS = {"_gluon": ("pdt", "GLUON_INT4"), "_c16": ("pdg", "C16"), "_maxnreg": ("pdg", "MAXNREG"),
          "_gluon8": ("pdt", "GLUON_INT8"), "_gluonf8": ("pdt", "GLUON_FP8"),
          "_maxnreg8": ("pdg8", "MAXNREG"),
          "_pscale8": ("pdg8", "PSCALE"), "_overlap": ("pdt", "OVERLAP_RUNS")}


class _knobs:
    """Sets the module-level kernel settings a variant names, for the duration."""

    def __init__(self, kw: dict):
        from engine.kernels import paged_decode_gluon as pdg
        from engine.kernels import paged_decode_gluon8 as pdg8
        from engine.kernels import paged_decode_triton as pdt
        mods = {"pdt": pdt, "pdg": pdg, "pdg8": pdg8}
        self.sets = [(mods[m], a, kw.pop(k)) for k, (m, a) in _KNOBS.items() if k in kw]
        self.old = []

    def __enter__(self):
        self.old = [(m, a, getattr(m, a)) for m, a, _ in self.sets]
        for m, a, v in self.sets:
            setattr(m, a, v)

    def __exit__(self, *exc):
        for m, a, v in self.old:
            setattr(m, a, v)


def _variant(name: str) -> dict:
    """Named variant, or several joined by '+' (e.g. words+nbi4+s3)."""
    kw = {}
    for part in name.split("+"):
        if part not in VARIANTS:
            raise SystemExit(f"unknown variant {part!r} in {name!r}: one of {sorted(VARIANTS)}")
        kw.update(VARIANTS[part])
    return kw


def _read_floor(name, B, L, nbytes, t_sdpa, iters, device) -> dict:
    """A plain read of ``nbytes`` (torch's sum over fp16 words, rotating copies as the
    kernels' data does, graphed): what a memory-bound kernel of this many bytes gets at
    this size, launch tail and wave quantization included."""
    reps = max(1, math.ceil(ROTATE_BYTES / nbytes)) if device.type == "cuda" else 1
    bufs = [torch.zeros(nbytes // 2, dtype=torch.float16, device=device) for _ in range(reps)]
    calls = [lambda x=x: x.sum(dtype=torch.float32) for x in bufs]
    t = _timeit(_graphed(calls, device), iters, device) / reps
    print(f"  {name:5s} read floor   : {t * 1e6:8.1f} us {t_sdpa / t:5.2f}x  "
          f"{nbytes / t / 1e9:6.0f} GB/s", flush=True)
    return dict(B=B, L=L, kernel="read", fmt=name, cfg="-", split_mult=None, us=t * 1e6,
                speedup=t_sdpa / t, bytes=nbytes, gbs=nbytes / t / 1e9)


def bench_shape(B: int, L: int, formats: list[str], sweep: bool, iters: int,
                device: torch.device, seed: int = 0, variants: list[str] | None = None,
                configs_: list | None = None, mults: list[int] | None = None,
                dtype: torch.dtype = torch.float16, floor: bool = False) -> list[dict]:
    gen = torch.Generator(device=device).manual_seed(seed)
    gen_cpu = torch.Generator().manual_seed(seed)
    NB = L // T
    q = torch.randn(B, HQ, 1, D, device=device, dtype=dtype, generator=gen)
    kv_bytes = 2 * B * H * L * D * 2
    reps = max(1, math.ceil(ROTATE_BYTES / kv_bytes)) if device.type == "cuda" else 1
    k = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(B, H, L, D, device=device, dtype=dtype, generator=gen)
    sm_scale = 1.0 / math.sqrt(D)
    # SDPA over contiguous K/V; `reps` copies so that repeats do not hit in L2
    kvs = [(k, v)] + [(k.clone(), v.clone()) for _ in range(reps - 1)]
    ref = F.scaled_dot_product_attention(q, k, v, scale=sm_scale, enable_gqa=True)
    sdpa_calls = [lambda kk=kk, vv=vv: F.scaled_dot_product_attention(
        q, kk, vv, scale=sm_scale, enable_gqa=True) for kk, vv in kvs]
    t_sdpa = _timeit(_graphed(sdpa_calls, device), iters, device) / reps
    del kvs
    rows = [dict(B=B, L=L, kernel="sdpa", fmt=str(dtype).split(".")[1], us=t_sdpa * 1e6, speedup=1.0,
                 bytes=kv_bytes, gbs=kv_bytes / t_sdpa / 1e9)]
    print(f"B={B} L={L}: sdpa {t_sdpa * 1e6:.1f} us  {kv_bytes / t_sdpa / 1e9:.0f} GB/s "
          f"(rotating {reps})", flush=True)
    geom = BlockGeometry(T, H, D, dtype, value_group=G)
    qd = q.squeeze(2).contiguous()
    sms = torch.cuda.get_device_properties(device).multi_processor_count \
        if device.type == "cuda" else 4
    for name in formats:
        if "+" in name:
            rows += _bench_mixed(name, B, L, geom, k, v, reps, gen_cpu, device, q, qd, ref,
                                 sm_scale, t_sdpa, iters, variants)
            continue
        fmt = KVFormat.parse(name)
        arena, tables = _build_arena(geom, fmt, k, v, reps, gen_cpu, device)
        kb = torch.full((B, NB), fmt.k_code, dtype=torch.int32, device=device)
        vb = torch.full((B, NB), fmt.v_code, dtype=torch.int32, device=device)
        nt = torch.full((B, NB), T, dtype=torch.int32, device=device)
        nbytes = B * NB * slot_bytes_read(geom, fmt)
        if floor:
            rows.append(_read_floor(name, B, L, nbytes, t_sdpa, iters, device))
        # without --sweep: the kernel's own launch defaults (cfg "default")
        configs = [(c, m) for c in (configs_ or SWEEP) for m in (mults or SPLIT_MULTS)] \
            if sweep else [("default", None)]
        if variants:
            configs = [(v, None) for v in variants]
        best = None
        for cfg, mult in configs:
            kw = {"fmt": fmt}
            if isinstance(cfg, str):
                kw.update(_variant(cfg))
                if "split_mult" in kw:
                    kw["num_splits"] = max(1, math.ceil(kw.pop("split_mult") * sms / (B * H)))
            else:
                kw = dict(fmt=fmt, blocks_per_iter=cfg[0], num_warps=cfg[1], num_stages=cfg[2])
                if len(cfg) > 3:
                    kw["maxnreg"] = cfg[3]
                if mult is not None:
                    kw["num_splits"] = max(1, math.ceil(mult * sms / (B * H)))
            knobs = _knobs(kw)
            try:
                with knobs:
                    out = paged_decode_triton(qd, arena, tables[0], kb, vb, nt, geom, sm_scale,
                                              **kw)[0]
                    # bound now: the lambdas outlive this iteration's names (arena is deleted)
                    calls = [lambda t=t, a_=arena, kb_=kb, vb_=vb, nt_=nt, kw_=kw:
                             paged_decode_triton(qd, a_, t, kb_, vb_, nt_, geom, sm_scale, **kw_)
                             for t in tables]
                    t = _timeit(_graphed(calls, device), iters, device) / reps
                err = (out.float() - ref.squeeze(2).float()).abs().max().item()
            except Exception as e:  # report and go on: one bad config must not hide the rest
                print(f"  {name} {cfg} x{mult}: FAILED {type(e).__name__}: {str(e)[:300]}")
                continue
            row = dict(B=B, L=L, kernel="paged", fmt=name,
                       cfg=cfg, split_mult=mult, us=t * 1e6, speedup=t_sdpa / t, bytes=nbytes,
                       gbs=nbytes / t / 1e9, max_err_vs_sdpa=err)
            rows.append(row)
            print(f"  {name:5s} {row['kernel']:13s} cfg={cfg} x{mult}: {t * 1e6:8.1f} us "
                  f"{t_sdpa / t:5.2f}x  {nbytes / t / 1e9:6.0f} GB/s  err {err:.2e}", flush=True)
            if best is None or t < best["us"] / 1e6:
                best = row
        if best is not None:
            best["best"] = True
        del arena
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--sweep", action="store_true", help="try several launch configs")
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--configs", nargs="+", help="with --sweep: nbi,warps,stages triples "
                    "(default: the built-in list)")
    ap.add_argument("--mults", type=int, nargs="+", help="with --sweep: programs = mult x SMs")
    ap.add_argument("--json", help="write all rows here")
    ap.add_argument("--dtype", choices=("float16", "bfloat16"), default="float16",
                    help="the store's (and SDPA's) dtype; bf16 is the engine's on Llama-3")
    ap.add_argument("--floor", action="store_true",
                    help="also time a plain read of each format's bytes (torch sum): the "
                    "bandwidth a memory-bound kernel of that size reaches")
    ap.add_argument("--variants", nargs="+",
                    help=f"time these named launch variants, or several joined by '+' "
                    f"(words+nbi4); the table shows all of them. Names: {', '.join(VARIANTS)}")
    args = ap.parse_args(argv)
    for v in args.variants or []:
        _variant(v)                                  # unknown names fail before any work
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "torch", torch.__version__, flush=True)
    rows = []
    for B in args.batches:
        for L in args.contexts:
            rows += bench_shape(B, L, args.formats, args.sweep, args.iters, device,
                                variants=args.variants, mults=args.mults,
                                dtype=getattr(torch, args.dtype), floor=args.floor,
                                configs_=[tuple(map(int, c.split(","))) for c in args.configs]
                                if args.configs else None)
    print("\n| batch | context | kernel | format | config (nbi, warps, stages) x splits "
          "| us | vs SDPA | GB/s | % of 4.46 TB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["kernel"] == "paged" and not r.get("best") and not args.variants:
            continue
        cfg = f"{r.get('cfg')} x{r.get('split_mult')}" if r["kernel"] == "paged" else "-"
        print(f"| {r['B']} | {r['L'] // 1024}K | {r['kernel']} | {r['fmt']} | {cfg} | "
              f"{r['us']:.1f} | {r['speedup']:.2f}x | {r['gbs']:.0f} | "
              f"{100 * r['gbs'] / PEAK_GBS:.0f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
