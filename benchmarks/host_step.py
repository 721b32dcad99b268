"""Host work of whole engine decode steps, the model run stubbed (CPU).

    python -m benchmarks.host_step [--batch 64] [--context 1040] [--steps 200] [--profile]

What a GPU step leaves serial with its replay: scheduling (reserve, staging check), the
step's plan (block tables, built on the host as the graph path does), statistics from
the step's block shares, sampling, token events, KV-index upkeep and snapshots. The
model run is replaced by a stub that builds the plan and returns fixed logits and
random shares, so what is timed is the engine around the GPU. ms per step, and with
``--profile`` the functions that take it (cProfile, own time).
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

import torch


def main(argv=None) -> None:
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    from engine.plan import build_plan
    from engine.runner import StepOutput

    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=1040)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--block-size", type=int, default=32,
                    help="tokens a block (smaller: more blocks a sequence at the tiny model's 4K context)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=a.block_size,
                            kv_budget_bytes=1 << 30, max_batch_tokens=8192, num_threads=1,
                            max_running=max(256, a.batch)))
    st, L = e.store, e.num_layers
    vocab = e.model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    sink = []
    sids = [e.submit(Request(prompt_ids=[(i * 7 + j) % 500 + 1 for j in range(a.context)],
                             sampling=SamplingParams(max_tokens=a.steps + 50, ignore_eos=True)),
                     sink.append) for i in range(a.batch)]
    while any(e.seqs[s].state != "decode" for s in sids):
        e.step()                                    # real prefill

    def stub(decode, chunks):
        plan = build_plan(st, decode, [], L, torch.device("cpu"))
        n, nb = plan.decode.offsets.shape
        plan.shares = torch.rand(n, nb, generator=g)
        return StepOutput(plan, torch.zeros(n, vocab))
    e.runner.run = stub
    for _ in range(5):
        e.step()
    prof = cProfile.Profile() if a.profile else None
    t0 = time.perf_counter()
    if prof:
        prof.enable()
    for _ in range(a.steps):
        e.step()
    if prof:
        prof.disable()
    dt = (time.perf_counter() - t0) / a.steps * 1e3
    print(f"host work per decode step: {dt:.2f} ms at batch {a.batch}, context "
          f"~{a.context + 5} tokens ({a.steps} steps, model run stubbed, 1 torch thread)")
    if prof:
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    e.stop()


if __name__ == "__main__":
    main()
