"""The policy loop under a KV budget on passkey retrieval (CPU, default model).

    python -m benchmarks.policy_budget --length 2048 --samples 6 --budgets 0.5,0.25,0.125

Each trial prefills a raw-completion passkey prompt (instruction, filler, needle at a
depth, filler, "What is the pass key? The pass key is") as a held sequence, then
hands it to the daemon's policy: ``Controller.tick`` on engine snapshots, with the
engine's handle, a budget of a fraction of the prompt's full-precision KV bytes, no
host tier, and a fake clock advanced one second a tick (so per-sequence rate limits do
not stall the run). Ticks repeat until three in a row decide nothing. Then the answer
(" NNNNN", the key's tokens) is teacher-forced through decode steps with one tick after
each, as the daemon ticks between steps.

Scored per trial: hit = every key token was the argmax when its turn came (greedy
decoding would have written the key at once); NLL of the key tokens (nats/token);
the GPU-tier KV bytes (exact slot bytes) / the same tokens at full precision, at the
answer's first token and at most while the answer is decoded; the bytes attention reads (GPU blocks,
plus offloaded ones streamed in exact decode). Policy behaviour counted from the
decisions and from the blocks' formats between snapshots: moves by kind, lossy blocks
re-quantized, blocks fetched back after an offload, 'unmet' decisions, and how many of
the priced moves the learned predictor left to the heuristic (fallbacks / priced).

References in the same run: ``full`` (no controller) and ``int4`` (every filled block
int4, the newest at full precision: kvctl's fixed int4). Use bfloat16 so the store and
its scales are 16-bit (the bytes of an fp16 cache on a GPU).
"""
from __future__ import annotations

import argparse
import collections
import json
import math
import platform
import sys
import time

import torch

from benchmarks.evaluate import build_passkey_prompt, passkey_keys
from engine.layout import FULL


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _view(engine, sid):
    return next(v for v in engine.handle.snapshot().sequences if v.seq_id == sid)


def _bytes(engine, sid) -> tuple[int, int, int]:
    """(GPU-tier bytes, bytes attention reads, the same tokens at full precision)."""
    v = _view(engine, sid)
    full = engine.store.block_bytes(FULL)
    gpu = v.bytes_by_tier.get("gpu", 0)
    host = v.bytes_by_tier.get("host", 0)
    reads = gpu + (host if v.decode_mode == "exact" else 0)
    return gpu, reads, full * len(v.blocks)


class Watch:
    """Counts policy behaviour between snapshots of one sequence."""

    def __init__(self) -> None:
        self.fmt: dict[int, str] = {}
        self.tier: dict[int, str] = {}
        self.offloaded: set[int] = set()
        self.counts: collections.Counter = collections.Counter()

    def see(self, view) -> None:
        for b in view.blocks:
            old_f, old_t = self.fmt.get(b.index), self.tier.get(b.index)
            if old_f not in (None, "full") and b.fmt != old_f and b.tier == "gpu":
                self.counts["requantized"] += 1
            if old_t == "gpu" and b.tier == "host":
                self.offloaded.add(b.index)
            if old_t == "host" and b.tier == "gpu" and b.index in self.offloaded:
                self.counts["fetched_back"] += 1
            self.fmt[b.index], self.tier[b.index] = b.fmt, b.tier


def trial(engine, prompt, answer: list[int], mode: str, budget: float, profile: str,
          high: float, low: float, max_ticks: int = 60) -> dict:
    from controller.policy import Controller, DecisionLog, PolicyState
    from engine.actions import Quantize, SetFillFormat

    sid = f"pb-{time.monotonic_ns()}"
    logits = engine.prefill(sid, prompt.ids)
    watch, decisions, ctl, clock = Watch(), [], None, FakeClock()
    priced = collections.Counter()
    peak = 0.0

    def tick():
        nonlocal peak
        snap = engine.handle.snapshot()
        v = next(x for x in snap.sequences if x.seq_id == sid)
        watch.see(v)
        out = ctl.tick(snap) if ctl else []
        clock.t += 1.0
        decisions.extend(out)
        g, _, f = _bytes(engine, sid)
        peak = max(peak, g / f)
        return out

    t0 = time.perf_counter()
    if mode == "int4":
        v = _view(engine, sid)
        engine.handle.apply(SetFillFormat(sid, 4))
        engine.handle.apply(Quantize(sid, tuple(b.index for b in v.blocks[:-1]), 4))
    elif mode == "adaptive":
        _, _, full = _bytes(engine, sid)
        policy = PolicyState(profile=profile, budget_bytes=int(budget * full),
                             high_watermark=high, low_watermark=low)
        ctl = Controller(policy, DecisionLog(), engine.handle, clock=clock)
        pred, inner = ctl.loop.predictor, ctl.loop.predictor.predict_many

        def counted(items, bus=None):          # how many moves were priced, by whom
            before = getattr(pred, "num_fallbacks", 0)
            out = inner(items, bus)
            priced["calls"] += len(items)
            priced["fallbacks"] += (getattr(pred, "num_fallbacks", 0) - before
                                    if hasattr(pred, "num_fallbacks") else len(items))
            return out
        ctl.loop.predictor.predict_many = counted
        quiet = 0
        for _ in range(max_ticks):
            quiet = 0 if tick() else quiet + 1
            if quiet >= 3:
                break
    policy_s = time.perf_counter() - t0
    g, reads, full = _bytes(engine, sid)
    at_answer = (g / full, reads / full)
    peak = at_answer[0]            # from here on: while the answer is decoded
    nll, hit = [], True
    for tok in answer:
        lp = torch.log_softmax(logits.float(), -1)
        nll.append(-float(lp[tok]))
        hit &= int(logits.argmax()) == tok
        logits = engine.append([sid], [tok])[0]
        if mode == "int4":
            v = _view(engine, sid)
            todo = tuple(b.index for b in v.blocks[:-1] if b.fmt == "full" and b.tier == "gpu")
            if todo:
                engine.handle.apply(Quantize(sid, todo, 4))
        elif ctl is not None:
            tick()
    kinds = collections.Counter(d.kind for d in decisions)
    g, _, full = _bytes(engine, sid)
    peak = max(peak, g / full)
    engine.release(sid)
    return dict(mode=mode, budget=budget, profile=profile, depth=prompt.depth,
                key=prompt.key, hit=hit, nll=sum(nll) / len(nll),
                gpu_frac=at_answer[0], read_frac=at_answer[1], peak_frac=peak,
                decisions=dict(kinds), unmet_reasons=[d.reason for d in decisions
                                                      if d.kind == "unmet"],
                actions=[d.action for d in decisions if d.action],
                policy_s=policy_s, priced=priced["calls"], fallbacks=priced["fallbacks"],
                **watch.counts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--samples", type=int, default=6, help="needle depths per config")
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--profiles", default="balanced")
    ap.add_argument("--high", type=float, default=1.0)
    ap.add_argument("--low", type=float, default=0.9)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="", help="also write every trial here")
    a = ap.parse_args(argv)
    from engine.engine import Engine, EngineConfig

    e = Engine(EngineConfig(model="default", device="cpu", dtype=a.dtype, num_threads=a.threads,
                            host_budget_bytes=0, max_batch_tokens=1024))
    torch.set_num_threads(a.threads)
    tok = e.tokenizer
    depths = [(i + 0.5) / a.samples for i in range(a.samples)]
    keys = passkey_keys([a.length], depths)
    cfgs = [("full", 1.0, ""), ("int4", 1.0, "")] + [
        ("adaptive", float(b), p) for p in a.profiles.split(",") for b in a.budgets.split(",")]
    rows = []
    t0 = time.time()
    with torch.inference_mode():
        for i, d in enumerate(depths):
            p = build_passkey_prompt(tok, a.length, d, keys[(a.length, i)])
            ans = tok(p.text + " " + p.key)["input_ids"][len(p.ids):]
            for mode, b, prof in cfgs:
                r = trial(e, p, ans, mode, b, prof, a.high, a.low)
                rows.append(r)
                print(f"[{time.time() - t0:.0f}s] depth {d:.2f} {mode} {prof} {b:.3f}: "
                      f"hit {r['hit']} nll {r['nll']:.3f} gpu {r['gpu_frac']:.3f} "
                      f"peak {r['peak_frac']:.3f} {r['decisions']} "
                      f"requant {r.get('requantized', 0)} fetched {r.get('fetched_back', 0)}",
                      file=sys.stderr, flush=True)
    print(f"# policy under a KV budget — default model ({a.dtype}, CPU, {a.threads} thread), "
          f"passkey @{a.length}, {a.samples} depths, no host tier, watermarks "
          f"{a.high:.2f}/{a.low:.2f}; {platform.machine()}, torch {torch.__version__}, "
          f"{time.time() - t0:.0f} s")
    print()
    print("| config | budget | hits | key NLL | GPU bytes at answer | peak | reads | moves "
          "| re-quantized | fetched back | unmet | predictor fallbacks |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for mode, b, prof in cfgs:
        rs = [r for r in rows if (r["mode"], r["budget"], r["profile"]) == (mode, b, prof)]
        moves = collections.Counter()
        for r in rs:
            moves.update({k: v for k, v in r["decisions"].items()
                          if k not in ("pressure", "pressure_cleared", "unmet")})
        label = mode if not prof else f"{mode} ({prof})"
        def mean(k, rs=rs):
            return sum(r[k] for r in rs) / len(rs)
        print(f"| {label} | {b:.1%} | {sum(r['hit'] for r in rs)}/{len(rs)} "
              f"| {mean('nll'):.3f} | {mean('gpu_frac'):.1%} | "
              f"{max(r['peak_frac'] for r in rs):.1%} | {mean('read_frac'):.1%} | "
              f"{dict(moves) or '-'} | {sum(r.get('requantized', 0) for r in rs)} | "
              f"{sum(r.get('fetched_back', 0) for r in rs)} | "
              f"{sum(r['decisions'].get('unmet', 0) for r in rs)} | "
              + (f"{sum(r['fallbacks'] for r in rs)}/{sum(r['priced'] for r in rs)} |"
                 if mode == "adaptive" else "- |"))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    e.stop()
    assert not any(math.isnan(r["nll"]) for r in rows)


if __name__ == "__main__":
    main()
