"""What one relief plan costs the policy thread (pure Python, beside the engine thread
on the same interpreter) at a GPU run's scale, on a synthetic snapshot: N decoding
sequences of B full-precision 32-token blocks of Llama-3-8B's size, a quarter of their
bytes to free, the heuristic predictor on a GPU bus. Measured without the rests the
policy takes between slices of a plan (PolicyLoop.duty): its own cost. ``--queued``:
requests wait and none running is stalled (the headline's speed side under its queue),
where moves that add step time are not offered.

    python -m benchmarks.policy_tick --sequences 49 --blocks 210 --profile balanced
"""
from __future__ import annotations

import argparse
import random
import time


def snapshot(n: int, nb: int, seed: int = 0, queued: bool = False):
    from engine.actions import BlockView, EngineSnapshot, SequenceView, TierView
    rng = random.Random(seed)
    full = 32 * 131072                 # 32 tokens x 128 KiB a token, all layers
    fb = {"full": full, "int8": full * 34 // 64, "fp8": full * 34 // 64,
          "k8v4": full * 26 // 64, "int4": full * 18 // 64, "k4v2": full * 14 // 64,
          "int2": full * 10 // 64}
    seqs = []
    for i in range(n):
        blocks = [BlockView(j, 32, "full", "gpu", full, rng.random() / nb, rng.random() / nb,
                            0, rng.random() / nb) for j in range(nb)]
        seqs.append(SequenceView(f"w{i}", "decode", nb * 32 - 40, nb * 32, 40, 0, "exact", 0,
                                 {"gpu": nb * full}, {"full": nb * full}, blocks, 3.0, 0.1,
                                 0.2))
    used = n * nb * full
    tiers = {"gpu": TierView("gpu", "cuda:0", used, used, used, 0, 0),
             "host": TierView("host", "cpu", 32 << 30, 0, 0, 32 << 30, 0)}
    return EngineSnapshot(time.time(), 100, "cuda:0", "random:llama3-8b", 32, 32, tiers,
                          seqs, int(queued), n, int(not queued), full, 300.0, fb, 1,
                          staging_bytes=64 << 20), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sequences", type=int, default=49)
    ap.add_argument("--blocks", type=int, default=210)
    ap.add_argument("--profile", default="balanced")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--queued", action="store_true")
    ap.add_argument("--free", type=float, default=0.25,
                    help="share of the held bytes the plan frees (an admission's room: ~0.02)")
    a = ap.parse_args()
    from controller.loop import PolicyLoop
    from controller.predictors.bus import Bus
    snap, used = snapshot(a.sequences, a.blocks, queued=a.queued)
    bus = Bus(55.3e9, 0.0, "a GPU's PCIe (55.3 GB/s)")
    need = int(used * a.free)
    times, moves = [], []
    for _ in range(a.reps):
        loop = PolicyLoop(duty=1.0)     # the plan's own cost, no rests between slices
        t = time.perf_counter()
        moves = loop.plan_relief(snap, need, a.profile, {}, bus, need // 2)
        times.append(time.perf_counter() - t)
    print(f"{a.sequences} sequences x {a.blocks} blocks, {a.profile}"
          f"{' (queued)' if a.queued else ''}, freeing {a.free:.0%}: plan_relief "
          f"best {min(times) * 1e3:.1f} ms, median {sorted(times)[len(times) // 2] * 1e3:.1f} "
          f"ms of {a.reps}; {len(moves)} moves")


if __name__ == "__main__":
    main()
