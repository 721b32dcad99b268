"""How often the shipped learned predictor falls back to the heuristic right after a
prefill (no decode step yet), on the default model.

    python -m benchmarks.prefill_fallbacks

Prefills of 300, 700 and 1,500 tokens of stdlib text as held sequences; every strategy
in the registry proposes moves at 10%, 30% and 60% of the sequence's GPU bytes; the
learned predictor prices them in one batch. Prints the statistics the snapshot shows
and the fallback count (issue 15: before statistics were seeded from the prompt, every
call fell back).
"""
from __future__ import annotations


def main() -> None:
    import pydoc_data.topics as t

    from controller.predictors.learned import predictor_for
    from controller.strategies import Context, registry
    from engine.engine import Engine, EngineConfig

    e = Engine(EngineConfig(model="default", device="cpu", dtype="float32",
                            kv_budget_bytes=512 << 20, host_budget_bytes=256 << 20))
    ids = e.tokenizer(" ".join(list(t.topics.values())[20:60]))["input_ids"]
    learned = predictor_for(e.model_name)
    total = fell = 0
    for n in (300, 700, 1500):
        sid = f"p{n}"
        e.prefill(sid, ids[:n])
        snap = e.handle.snapshot()
        seq = next(v for v in snap.sequences if v.seq_id == sid)
        ctx = Context.from_snapshot(snap)
        items = [(seq, c) for s in registry().values() for f in (0.1, 0.3, 0.6)
                 if (c := s.propose(seq, int(f * seq.bytes_by_tier.get("gpu", 0)), ctx))]
        before = learned.num_fallbacks
        learned.predict_many(items)
        total += len(items)
        fell += learned.num_fallbacks - before
        print(f"{n} tokens: entropy {seq.entropy:.3f}, sink {seq.sink_mass:.3f}, "
              f"recent {seq.recent_mass:.3f}")
        e.release(sid)
    print(f"learned predictor fell back on {fell} of {total} candidates")


if __name__ == "__main__":
    main()
