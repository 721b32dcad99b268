"""Host-side cost of a decode step's bookkeeping at 64 sequences x 33 blocks (CPU).

    python -m benchmarks.host_cost

Held sequences on the tiny random model (no forward pass worth timing): the plan's
block tables (build_plan), the staging check, the statistics update and one engine
snapshot, each averaged over repeated calls. The per-step host work that CUDA graphs
leave serial with the GPU (docs/BENCHMARKS.md, engine section).
"""
from __future__ import annotations

import time

import torch


def main() -> None:
    from engine.engine import Engine, EngineConfig
    from engine.plan import build_plan
    from engine.snapshot import build
    from engine.staging import staging_need
    from engine.stats import update_batch

    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=32,
                            kv_budget_bytes=512 << 20, max_batch_tokens=4096, num_threads=1))
    sids = [f"s{i}" for i in range(64)]
    for i, sid in enumerate(sids):
        e.prefill(sid, [(i * 7 + j) % 500 + 1 for j in range(1040)])
    st = e.store

    def timed(fn, n: int = 20) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        return (time.perf_counter() - t0) / n * 1e3

    def plan():
        for s in sids:
            st.reserve(s, 1)
        build_plan(st, [(s, 1) for s in sids], [], e.num_layers, torch.device("cpu"))
        for s in sids:
            st.truncate(s, st.seqs[s].num_tokens - 1)

    shares = torch.rand(64, 34)
    shares /= shares.sum(1, keepdim=True)
    print(f"build_plan {timed(plan):.2f} ms, staging_need {timed(lambda: [staging_need(st, s) for s in sids]):.2f} ms, "
          f"update_batch {timed(lambda: update_batch([e.stats[s] for s in sids], shares, [33] * 64)):.2f} ms, "
          f"snapshot {timed(lambda: build(e, 1), 5):.2f} ms  (64 sequences x 33 blocks)")


if __name__ == "__main__":
    main()
