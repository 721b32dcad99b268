"""Offload benchmark (GPU): decode with a long context on the host tier.

    python -m benchmarks.offload --model random:llama3-8b --context 32768

One run, side by side: all blocks on the GPU; exact offload (every offloaded block
streamed in per layer, overlapped with compute); top-k pages (Quest) at k = 1/8 of the
blocks. Reports step times, PCIe GB/s achieved, the overlap fraction, and the
attention-output error of top-k against exact on the stored keys.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


def timed_steps(eng, n: int) -> float:
    """Median seconds of one engine step (each step ends in a device sync: sampling)."""
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        eng.step()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def profile_step(eng) -> None:
    """Print where one engine step spends CPU and GPU time."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_steps(eng, 1)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=10))


def copy_only(eng, sid: str, reps: int = 5) -> tuple[float, int]:
    """Seconds and bytes to stream one step's offloaded blocks for all layers, alone."""
    from engine.plan import _table
    d = _table(eng.store, [sid], eng.device)
    st = d.stager
    nbytes = sum(n for _, _, n in st.runs) * eng.num_layers
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for layer in range(eng.num_layers):
            st._copy_layer(layer)
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts), nbytes


def gather_alone(eng, k: int, reps: int = 10) -> list[tuple[str, float]]:
    """GB/s of the UVA gather of k scattered offloaded blocks (one layer), per launch
    setting: which one the top-k path should use."""
    from engine.kernels.gather_triton import gather_slots_triton
    from engine.layout import FULL
    host = eng.store.arenas["host"]
    st = eng.store.arenas["gpu"].staging
    slot = eng.geom.slot_bytes(FULL)
    n = host.row_bytes // slot
    g = torch.Generator().manual_seed(0)
    src = (torch.randperm(n, generator=g)[:k] * slot).to(torch.int64).cuda()
    dst = (torch.arange(k) * slot).to(torch.int64).cuda()
    nb = torch.full((k,), slot, dtype=torch.int64).cuda()
    out = []
    for words, warps in ((1024, 4), (2048, 8), (4096, 8), (512, 4), (8192, 16)):
        run = lambda: gather_slots_triton(host.flat, src, st, dst, nb, slot, words, warps)  # noqa: E731
        run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / reps
        out.append((f"words={words} warps={warps}", k * slot / dt / 1e9))
    return out


def topk_attention_error(eng, sid: str, k: int, layer: int = 0) -> float:
    """||o_topk - o_exact|| / ||o_exact|| for random queries over the stored keys."""
    from engine.kernels.paged_decode import paged_decode
    from engine.moves import key_summary
    from engine.plan import _table
    st = eng.store
    kv = st.seqs[sid]
    d = _table(st, [sid], eng.device)            # all on GPU at this point
    Hq = eng.model.config.num_attention_heads
    q = torch.randn(1, Hq, eng.geom.head_dim, device=eng.device, dtype=eng.dtype)
    row = st.arenas["gpu"].row(layer)
    scale = eng.geom.head_dim ** -0.5
    exact, _, _ = paged_decode(q, row, d.offsets, d.kbits, d.vbits, d.ntok, eng.geom, scale)
    cand = [b for b in kv.blocks[:-1]]
    summ = torch.stack([key_summary(st, b)[layer] for b in cand])   # [n, H, 2, D]
    H, D = summ.shape[1], summ.shape[3]
    qq = q[0].float().view(H, -1, D)
    bound = torch.maximum(torch.einsum("hgd,nhd->nhgd", qq, summ[:, :, 0]),
                          torch.einsum("hgd,nhd->nhgd", qq, summ[:, :, 1])).sum(-1).amax((1, 2))
    keep = set(torch.topk(bound, k).indices.tolist())
    nt = d.ntok.clone()
    for i, b in enumerate(cand):
        if i not in keep:
            nt[0, b.index] = 0
    approx, _, _ = paged_decode(q, row, d.offsets, d.kbits, d.vbits, nt, eng.geom, scale)
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--profile", action="store_true", help="profile one exact-offload step")
    ap.add_argument("--profile-topk", action="store_true", help="profile one top-k step")
    a = ap.parse_args()
    from engine.actions import Offload, SetDecodeMode
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    from engine.layout import FULL

    eng = Engine(EngineConfig(model=a.model, device="cuda", dtype=a.dtype,
                              block_size=a.block_size, kv_budget_bytes=12 << 30,
                              host_budget_bytes=8 << 30, staging_bytes=768 << 20,
                              max_batch_tokens=a.context))
    vocab = eng.model.config.vocab_size
    ids = torch.randint(0, vocab, (a.context,), generator=torch.Generator().manual_seed(0))
    sid = eng.submit(Request(prompt_ids=ids.tolist(), sampling=SamplingParams(
        max_tokens=10_000, ignore_eos=True)), lambda ev: None)
    while eng.seqs[sid].state != "decode":
        eng.step()
    timed_steps(eng, 3)
    t_gpu = timed_steps(eng, a.steps)
    nblocks = len(eng.store.seqs[sid].blocks)
    k = max(1, (nblocks - 1) // 8)
    err = topk_attention_error(eng, sid, k)
    eng.handle.apply(Offload(sid, tuple(range(nblocks - 1))))
    t_copy, nbytes = copy_only(eng, sid)
    gathers = gather_alone(eng, k)
    timed_steps(eng, 2)
    t_exact = timed_steps(eng, a.steps)
    if a.profile:
        profile_step(eng)
    eng.handle.apply(SetDecodeMode(sid, "topk", k))
    timed_steps(eng, 2)
    gs = eng.runner.graphs.stats if eng.runner.graphs is not None else None
    before = (gs.num_replays, gs.num_eager) if gs else (0, 0)
    t_topk = timed_steps(eng, a.steps)
    after = (gs.num_replays, gs.num_eager) if gs else (0, 0)
    if a.profile_topk:
        profile_step(eng)
    topk_bytes = k * eng.geom.slot_bytes(FULL) * eng.num_layers
    overlap = (t_gpu + t_copy - t_exact) / min(t_gpu, t_copy)
    print(f"# offload benchmark — {torch.cuda.get_device_name()}, torch {torch.__version__}, "
          f"model {a.model} ({eng.dtype}), context {a.context}, block {a.block_size}, "
          f"{nblocks} blocks, top-k k={k}")
    print()
    print("| mode | step ms | bytes streamed / step | PCIe GB/s achieved |")
    print("|---|---|---|---|")
    print(f"| all on GPU | {t_gpu * 1e3:.2f} | 0 | - |")
    print(f"| copies alone (no compute) | {t_copy * 1e3:.2f} | {nbytes / 2**20:.0f} MiB | "
          f"{nbytes / t_copy / 1e9:.1f} |")
    print(f"| exact offload | {t_exact * 1e3:.2f} | {nbytes / 2**20:.0f} MiB | "
          f"{nbytes / t_exact / 1e9:.1f} |")
    print(f"| top-k pages (k={k}) | {t_topk * 1e3:.2f} | {topk_bytes / 2**20:.0f} MiB | "
          f"{topk_bytes / t_topk / 1e9:.1f} |")
    print()
    print(f"overlap fraction (t_gpu + t_copy - t_exact) / min: {overlap:.2f}")
    print(f"top-k speedup over exact offload: {t_exact / t_topk:.2f}x")
    print(f"top-k steps timed: {after[0] - before[0]} CUDA graph replays, "
          f"{after[1] - before[1]} eager" + (f" ({gs.eager_reasons})" if gs else ""))
    for name, gbs in gathers:
        print(f"UVA gather of {k} scattered blocks, {name}: {gbs:.1f} GB/s")
    print(f"top-k attention-output relative error (layer 0, random queries): {err:.4f}")


if __name__ == "__main__":
    main()
