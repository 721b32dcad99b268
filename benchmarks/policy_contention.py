"""What a relief plan on the policy thread costs the engine thread beside it, on one
interpreter: engine steps of a many-layer toy model (random:thin30, CPU: ~1,500 torch
ops a step, each giving the interpreter up and taking it back) alone, then while another
thread plans reliefs back to back on a synthetic snapshot (benchmarks/policy_tick.py),
then alone again.

    python -m benchmarks.policy_contention --steps 150 --duty 0.25

``--duty``: PolicyLoop.duty, the share of the time a plan holds the interpreter (1.0: no
rests between slices, the behaviour before 2026-12-07). Not a test: a measurement.
"""
from __future__ import annotations

import argparse
import sys
import threading
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--duty", type=float, default=0.25)
    ap.add_argument("--sequences", type=int, default=128)
    ap.add_argument("--blocks", type=int, default=1000)
    ap.add_argument("--switch-s", type=float, default=0.0,
                    help="sys.setswitchinterval (0: the interpreter's default, 5 ms)")
    a = ap.parse_args()
    if a.switch_s:
        sys.setswitchinterval(a.switch_s)
    import benchmarks.profile_step  # noqa: F401  (registers random:thin30)
    from benchmarks.policy_tick import snapshot
    from controller.loop import PolicyLoop
    from controller.predictors.bus import Bus
    from engine.api import Request, SamplingParams
    from engine.engine import Engine, EngineConfig

    e = Engine(EngineConfig(model="random:thin30", device="cpu", dtype="float32",
                            kv_budget_bytes=64 << 20, max_batch_tokens=512, num_threads=1,
                            host_budget_bytes=0, prefix_caching=False))
    for i in range(8):
        e.submit(Request(prompt_ids=[(i * 7 + j) % 500 + 1 for j in range(64)],
                         sampling=SamplingParams(max_tokens=10**6, ignore_eos=True)),
                 lambda ev: None)
    for _ in range(20):
        e.step()

    def steps() -> float:
        t = time.perf_counter()
        for _ in range(a.steps):
            e.step()
        return (time.perf_counter() - t) / a.steps * 1e3

    alone = steps()
    snap, used = snapshot(a.sequences, a.blocks)
    stop, plans = threading.Event(), []

    def policy() -> None:
        bus = Bus(55.3e9, 0.0, "a GPU's PCIe")
        while not stop.is_set():
            t = time.perf_counter()
            PolicyLoop(duty=a.duty).plan_relief(snap, used // 4, "balanced", {}, bus,
                                                used // 8)
            plans.append(time.perf_counter() - t)

    th = threading.Thread(target=policy, daemon=True)
    th.start()
    time.sleep(0.5)
    beside = steps()
    stop.set()
    th.join()
    again = steps()
    done = f"{len(plans)} plans, {sum(plans) / len(plans):.2f} s each" if plans else \
        "no plan finished meanwhile"
    print(f"engine step: {alone:.1f} ms alone, {beside:.1f} ms beside reliefs planned "
          f"back to back ({a.sequences} x {a.blocks} blocks, duty {a.duty}; {done}), "
          f"{again:.1f} ms alone again")


if __name__ == "__main__":
    main()
