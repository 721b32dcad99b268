"""Seconds to append a chunk of new tokens to a held sequence (``Engine.extend`` with the
prompt-time statistics, as a prefill computes them), over several history / new-token
sizes: where a multi-turn floor's cost moves with chunk boundaries.

    python -m benchmarks.extend_cost --sizes 1664:480,1664:500,1664:512,1664:544
"""
from __future__ import annotations

import argparse


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--sizes", default="1664:480,1664:500,1664:512,1664:544",
                    help="history:new pairs, comma-separated")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args()
    from benchmarks.multiturn import floor_seconds
    from engine.engine import Engine, EngineConfig
    e = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                            max_batch_tokens=a.max_batch_tokens))
    e.start()
    try:
        pairs = [tuple(int(x) for x in p.split(":")) for p in a.sizes.split(",")]
        ids = [(7 * j) % 3000 + 5 for j in range(max(h + n for h, n in pairs))]
        for hist, new in pairs:
            # the multi-turn floor: a held history (whole blocks; its partial last block
            # is written again with the new tokens), then the new tokens appended
            best = floor_seconds(e, ids[:hist], ids[hist:hist + new], a.reps)
            print(f"history {hist}, new {new}: {best:.3f} s (best of {a.reps})", flush=True)
    finally:
        e.stop()


if __name__ == "__main__":
    main()
