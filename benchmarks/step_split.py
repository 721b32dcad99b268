"""Where a graphed decode step's time goes: the whole engine step against the graph's
replay alone, and the replay's kernels (CUDA).

    python -m benchmarks.step_split --model random:llama3-8b --dtype bfloat16 --batches 1,64

For each batch: ms per engine step (host work + replay + the step's synchronizing
reads), ms per bare replay of the same graph (GPU time of the captured forward), and
the replay's top kernels by total time (torch.profiler; CUPTI sees inside graphs).
"""
from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batches", default="1,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--kv-budget-gb", type=float, default=20)
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--threads", type=int, default=0, help="engine.num_threads (0: default)")
    ap.add_argument("--compile", action="store_true", help="engine.compile_decode")
    ap.add_argument("--kv-formats", default="full",
                    help="each batch per KV format (engine_speed.pin_format after the prefill)")
    ap.add_argument("--host-top", type=int, default=0,
                    help="also the Python profile of engine steps: this many functions")
    a = ap.parse_args()
    from benchmarks.engine_speed import pin_format
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    from engine.layout import KVFormat
    e = Engine(EngineConfig(model=a.model, device="cuda", dtype=a.dtype,
                            max_batch_tokens=4096, num_threads=a.threads,
                            compile_decode=a.compile,
                            kv_budget_bytes=int(a.kv_budget_gb * (1 << 30))))
    vocab = e.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    runs = [(KVFormat.parse(f), int(x)) for f in a.kv_formats.split(",")
            for x in a.batches.split(",")]
    for fmt, b in runs:
        sp = SamplingParams(max_tokens=1_000_000, ignore_eos=True)
        ids = [e.submit(Request(prompt_ids=torch.randint(0, vocab, (a.prompt,), generator=g)
                                .tolist(), sampling=sp), lambda ev: None) for _ in range(b)]
        while any(e.seqs[i].state != "decode" for i in ids):
            e.step()
        pin_format(e, ids, fmt)
        for _ in range(3):
            e.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            e.step()
        torch.cuda.synchronize()
        step_ms = (time.perf_counter() - t0) / a.steps * 1e3
        graphs = e.runner.graphs
        key = graphs.key([(i, 0) for i in ids])
        gr = graphs.graphs[key]
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            gr.graph.replay()
        torch.cuda.synchronize()
        replay_ms = (time.perf_counter() - t0) / a.steps * 1e3
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                gr.graph.replay()
            torch.cuda.synchronize()
        fmts = "+".join(f.name for f in key[2])
        print(f"\n## torch threads {torch.get_num_threads()}, batch {b} (graph {key[0]} rows x "
              f"{key[1]} columns, {fmts}): "
              f"engine step {step_ms:.2f} ms, bare replay {replay_ms:.2f} ms, "
              f"host and reads {step_ms - replay_ms:.2f} ms")
        kern = [x for x in prof.key_averages() if x.device_type == torch.autograd.DeviceType.CUDA]
        print(f"kernels per replay: {sum(x.count for x in kern) / 3:.0f}, GPU time per replay "
              f"{sum(x.device_time_total for x in kern) / 3 / 1e3:.2f} ms")
        if a.top:
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=a.top))
        if a.host_top:
            import cProfile
            import pstats
            pr = cProfile.Profile()
            pr.enable()
            for _ in range(a.steps):
                e.step()
            torch.cuda.synchronize()
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(a.host_top)
        for i in ids:
            e.cancel(i)
        e.step()
    e.stop()


if __name__ == "__main__":
    main()
