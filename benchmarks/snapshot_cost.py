"""What publishing engine snapshots costs the engine thread at a GPU run's scale, with and
without the start-up ``gc.freeze`` (EngineConfig.gc_freeze): N held sequences of B blocks
on a random tiny model (CPU), then snapshots built one after another, the engine keeping
the latest, as it does after each step with a structural change. Reports the builds'
time and the garbage collector's, by generation; then, apart, what a reader that looks at
every block of every sequence pays on its own thread (block views are made on first
read: engine.snapshot.BlockViews).

    python -m benchmarks.snapshot_cost --sequences 49 --blocks 700 [--no-freeze]
"""
from __future__ import annotations

import argparse
import gc
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=49)
    ap.add_argument("--blocks", type=int, default=700)
    ap.add_argument("--builds", type=int, default=60)
    ap.add_argument("--no-freeze", action="store_true")
    a = ap.parse_args()
    from engine import snapshot
    from engine.engine import Engine, EngineConfig
    T = 4
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=T,
                            kv_budget_bytes=4 << 30, max_batch_tokens=8192, max_running=64,
                            gc_freeze=not a.no_freeze))
    n = a.blocks * T
    if n > e.max_positions:
        raise SystemExit(f"--blocks {a.blocks} x {T} tokens exceeds the model's context")
    for i in range(a.sequences):
        e.prefill(f"s{i}", [(7 * i + j) % 250 + 1 for j in range(n)], observe=False)
    e.start()                            # freezes the heap unless --no-freeze
    spent = {0: 0.0, 1: 0.0, 2: 0.0}
    count = {0: 0, 1: 0, 2: 0}
    t_gc: list = [None]

    def cb(phase, info):
        if phase == "start":
            t_gc[0] = time.perf_counter()
        elif t_gc[0] is not None:          # (one already running when counting began)
            spent[info["generation"]] += time.perf_counter() - t_gc[0]
            count[info["generation"]] += 1
            t_gc[0] = None
    gc.callbacks.append(cb)
    keep = None
    t = time.perf_counter()
    for r in range(a.builds):
        keep = snapshot.build(e, 10_000 + r)
    wall = time.perf_counter() - t
    gc.callbacks.remove(cb)
    blocks = sum(len(s.blocks) for s in keep.sequences)
    reads = min(a.builds, 10)
    snaps = [snapshot.build(e, 20_000 + r) for r in range(reads)]
    t = time.perf_counter()
    for snap in snaps:
        for s in snap.sequences:
            list(s.blocks)          # the first read makes the block views
    read = (time.perf_counter() - t) / reads
    e.stop()
    print(f"{a.sequences} sequences, {blocks} blocks, gc_freeze={not a.no_freeze}: "
          f"{a.builds} builds {wall:.3f} s ({wall / a.builds * 1e3:.1f} ms each); collections "
          + ", ".join(f"gen {g} {count[g]} ({spent[g]:.3f} s)" for g in (0, 1, 2))
          + f"; a reader's first pass over every block {read * 1e3:.1f} ms a snapshot")


if __name__ == "__main__":
    main()
