"""Time to first token per turn of a multi-turn chat, with and without prefix reuse,
against the time to prefill the turn's own new tokens over the stored history (issue 16).

    python -m benchmarks.multiturn                      # default model, CPU: 5 turns to ~3K
    python -m benchmarks.multiturn --model random:llama3-8b --device cuda --dtype bfloat16 \\
        --chats 8 --turn-tokens 6000 --turns 5 --kv-budget-gb 20        # GPU: 8 chats to ~32K

Each turn's prompt is the conversation so far (token ids: earlier prompts, the replies
the engine generated, the new user tokens: stdlib text), sent with a session id. Three
numbers per turn, all in this process on one engine each (sequentially, never two
engines computing at once):

* ``reuse``  — TTFT with prefix caching (the session's KV from the last turn);
* ``full``   — TTFT of the same prompt on an engine with prefix caching off;
* ``floor``  — the new tokens alone: the history prefilled into a held sequence, then
  ``extend`` with the turn's new tokens (and the tail the cache cannot hold: the partial
  last block of the history), with the prompt-time statistics every prefill computes
  over its last chunk. The issue's goal: reuse <= 1.2 x floor from turn 2 on.

With ``--chats N`` the N chats run their turns concurrently (turn k of every chat
submitted together; the TTFT is each request's own; the median over the chats is
reported), which is the GPU scenario; ``floor`` is then measured for one chat, and
``queue_floor`` adds the median time at which each chat would have its first token if
the engine prefilled every chat's new tokens over its stored history one after another
(the floor of a perfect cache serving N chats that arrive together).

``--budget-mb B`` instead runs the chats one turn at a time, round robin (one active, the
others idle between their turns), under a controller whose GPU-tier budget is ``B`` MB
(ticking every 50 ms as the daemon's telemetry does): the bytes idle sessions and the
active turn hold on each tier over time, and what the controller did with the idle
sessions (parked on host, quantized, dropped).
"""
from __future__ import annotations

import argparse
import json
import statistics
import threading
import time


def _text_ids(tok, n_total: int, vocab: int = 1000) -> list[int]:
    import pydoc_data.topics as t
    text = " ".join(t.topics.values())
    ids = tok(text)["input_ids"] if tok is not None else []
    while len(ids) < n_total:     # a random-weight model has no tokenizer: any ids
        ids = ids + ids if ids else list(range(3, min(1000, vocab)))
    return ids[:n_total]


def _engine(args, prefix: bool):
    from engine.engine import Engine, EngineConfig
    cfg = EngineConfig(model=args.model, device=args.device, dtype=args.dtype,
                       kv_budget_bytes=int(args.kv_budget_gb * (1 << 30)),
                       host_budget_bytes=int(args.host_budget_gb * (1 << 30)),
                       max_batch_tokens=args.max_batch_tokens, prefix_caching=prefix,
                       max_running=max(8, args.chats), prefill_cut_tokens=args.prefill_cut)
    e = Engine(cfg)
    e.start()
    return e


def _turn(e, prompts: list[list[int]], sessions: list[str | None], max_tokens: int):
    """Submit one turn of every chat at once; (ttft_s, FinishEvent) per chat."""
    from engine.api import FinishEvent, Request, SamplingParams, TokenEvent
    done = threading.Event()
    out: dict[int, list] = {}
    lock = threading.Lock()

    def sink(i, t0):
        def on(ev):
            with lock:
                r = out.setdefault(i, [None, None])
                if isinstance(ev, TokenEvent) and r[0] is None:
                    r[0] = time.perf_counter() - t0
                if isinstance(ev, FinishEvent):
                    r[1] = ev
                    if len(out) == len(prompts) and all(x[1] for x in out.values()):
                        done.set()
        return on
    for i, (p, s) in enumerate(zip(prompts, sessions)):
        t0 = time.perf_counter()
        e.submit(Request(prompt_ids=p, session_id=s, sampling=SamplingParams(
            max_tokens=max_tokens, ignore_eos=True)), sink(i, t0))
    if not done.wait(3600):
        raise TimeoutError("a turn never finished")
    return [tuple(out[i]) for i in range(len(prompts))]


def floor_seconds(e, history: list[int], new: list[int], reps: int) -> float:
    """Seconds to prefill ``new`` over a stored ``history`` (what reuse cannot avoid):
    the history's partial last block is recomputed too, as the cache holds full blocks."""
    T = e.store.block_size
    keep = len(history) // T * T
    best = float("inf")
    for r in range(reps):
        sid = f"floor-{r}-{time.monotonic_ns()}"
        if keep:
            e.prefill(sid, history[:keep], observe=False)
            if e.device.type == "cuda":
                # the history's prefill may still run on the device: not the floor's time
                # (unsynchronized, the twelfth session's floors exceeded the turns' own
                # prompt steps, 0.49 s against 0.36 at turn 2)
                import torch
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            e.extend(sid, history[keep:] + new, logits="last", observe=True)
        else:                                   # the first turn: its whole prompt
            t0 = time.perf_counter()
            e.prefill(sid, new)
        if e.device.type == "cuda":
            import torch
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
        e.release(sid)
    return best


def _steps_run(e) -> int:
    """Steps the engine has run (every kind), from its laps."""
    return int(sum(v for k, v in dict(e.laps.seconds).items() if k.endswith("_steps")))


def _queue_floor(e, hists: list[list[int]], news: list[list[int]]) -> list[float]:
    """With several chats arriving together: each chat's new tokens prefilled over its
    stored history one chat after another, and the time at which each would have its
    first token (the sum of the floors up to it). What a perfect cache still costs when
    one engine prefills the chats in turn; its median is what the chats' median TTFT is
    compared with."""
    done, t = [], 0.0
    for h, n in zip(hists, news):
        t += floor_seconds(e, h, n, 1)
        done.append(t)
    return done


def _under_budget(args) -> None:
    from controller.policy import Controller, DecisionLog, PolicyState
    e = _engine(args, prefix=True)
    budget = int(args.budget_mb * (1 << 20))
    policy = PolicyState(profile=args.profile, budget_bytes=budget)
    log = DecisionLog()
    ctl = Controller(policy, log, e.handle)
    ctl.loop.min_interval_s = 0.2
    timeline, stop = [], threading.Event()
    t0 = time.perf_counter()

    def tick():
        while not stop.is_set():
            snap = e.handle.snapshot()
            ctl.tick(snap)
            row = {"t": time.perf_counter() - t0, "idle_gpu": 0, "idle_host": 0,
                   "active_gpu": 0, "active_host": 0}
            for v in snap.sequences:
                who = "idle" if v.state == "idle" else "active"
                for tier in ("gpu", "host"):
                    row[f"{who}_{tier}"] += v.bytes_by_tier.get(tier, 0)
            timeline.append(row)
            stop.wait(0.05)
    th = threading.Thread(target=tick, daemon=True)
    th.start()
    need = args.first_tokens + args.turns * args.turn_tokens
    text = _text_ids(e.tokenizer, need * args.chats + 7 * args.chats, e.vocab_size)
    hists = [[] for _ in range(args.chats)]
    rows = []
    for k in range(args.turns):
        for c in range(args.chats):
            n = args.first_tokens if k == 0 else args.turn_tokens
            off = c * need + 7 * c + len(hists[c])
            p = hists[c] + text[off:off + n]
            (ttft, ev), = _turn(e, [p], [f"chat-{c}"], args.reply_tokens)
            rows.append({"turn": k + 1, "chat": c, "prompt_tokens": len(p),
                         "cached_tokens": ev.cached_tokens, "ttft_s": ttft})
            hists[c] = p + ev.token_ids
            print(json.dumps(rows[-1]), flush=True)
    stop.set()
    th.join()
    kinds: dict[str, int] = {}
    for d in log.recent(10_000) if hasattr(log, "recent") else []:
        key = d.action.split()[0] if d.action else d.kind
        kinds[key] = kinds.get(key, 0) + 1
    peak = max(r["idle_gpu"] + r["active_gpu"] for r in timeline)
    print(f"\nbudget {budget / 2**20:.1f} MiB; peak GPU-tier bytes held by sequences "
          f"{peak / 2**20:.1f} MiB; decisions: {kinds}; sessions dropped by the engine: "
          f"{e.num_sessions_dropped}")
    for frac in (0.25, 0.5, 0.75, 1.0):
        r = timeline[min(len(timeline) - 1, int(frac * (len(timeline) - 1)))]
        print(f"t={r['t']:.1f}s idle gpu {r['idle_gpu'] / 2**20:.1f} MiB host "
              f"{r['idle_host'] / 2**20:.1f} MiB | active gpu {r['active_gpu'] / 2**20:.1f} MiB "
              f"host {r['active_host'] / 2**20:.1f} MiB")
    later = [r for r in rows if r["turn"] > 1]
    if later:
        print(f"turns 2+: {sum(r['cached_tokens'] > 0 for r in later)}/{len(later)} reused "
              f"a prefix; median TTFT {statistics.median(r['ttft_s'] for r in later) * 1e3:.0f} ms")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows, "timeline": timeline,
                       "decisions": kinds}, fh, indent=1)
    e.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--chats", type=int, default=1)
    ap.add_argument("--first-tokens", type=int, default=600, help="first prompt's tokens")
    ap.add_argument("--turn-tokens", type=int, default=500, help="new user tokens a turn")
    ap.add_argument("--reply-tokens", type=int, default=32)
    ap.add_argument("--kv-budget-gb", type=float, default=1.0)
    ap.add_argument("--host-budget-gb", type=float, default=1.0)
    ap.add_argument("--max-batch-tokens", type=int, default=512)
    ap.add_argument("--floor-reps", type=int, default=3)
    ap.add_argument("--prefill-cut", type=int, default=None,
                    help="engine.prefill_cut_tokens (default: the engine's; 0 packs steps)")
    ap.add_argument("--json", default="", help="write the rows here too")
    ap.add_argument("--budget-mb", type=float, default=0.0,
                    help="round-robin chats under a controller with this GPU budget")
    ap.add_argument("--profile", default="multi-turn")
    ap.add_argument("--mode", choices=("both", "reuse", "full"), default="both",
                    help="one engine per process on a GPU: run the modes apart")
    args = ap.parse_args()
    if args.budget_mb:
        _under_budget(args)
        return

    rows = []
    for mode in (("reuse", "full") if args.mode == "both" else (args.mode,)):
        e = _engine(args, prefix=mode == "reuse")
        need = args.first_tokens + args.turns * args.turn_tokens
        text = _text_ids(e.tokenizer, need * args.chats + 7 * args.chats, e.vocab_size)
        hists = [[] for _ in range(args.chats)]
        for k in range(args.turns):
            news = []
            for c in range(args.chats):
                n = args.first_tokens if k == 0 else args.turn_tokens
                off = c * need + 7 * c + len(hists[c])
                news.append(text[off:off + n])
            prompts = [h + n for h, n in zip(hists, news)]
            sess = [f"chat-{c}" if mode == "reuse" else None for c in range(args.chats)]
            before = e.handle.snapshot()
            n0 = _steps_run(e)
            res = _turn(e, prompts, sess, args.reply_tokens)
            after = e.handle.snapshot()
            # the turn's prompt-writing steps one by one: seconds, decode rows, and per
            # chunk (tokens written, the sequence's tokens after it); the engine thread
            # ran only this turn's steps meanwhile
            ran = _steps_run(e) - n0
            prefill_steps = [[round(r.seconds, 4), r.rows, [list(c) for c in r.chunks],
                              r.compiled]
                             for r in (list(e.laps.recent)[-ran:] if ran else [])
                             if r.kind == "prefill"]
            # where the turn's time went: the engine's step parts, steps by kind, graphs
            # captured meanwhile (a capture holds every chat's step)
            spent = {k: round(v - before.step_times.get(k, 0), 3)
                     for k, v in after.step_times.items()}
            for g in ("num_graphs", "capture_seconds", "kernel_compiles", "compile_steps_s"):
                if g in after.graphs:
                    spent[g] = round(after.graphs[g] - before.graphs.get(g, 0), 3)
            floor = floor_seconds(e, hists[0], news[0], args.floor_reps) if mode == "reuse" else 0.0
            queue = _queue_floor(e, hists, news) if mode == "reuse" and args.chats > 1 \
                else None
            ttfts = [r[0] for r in res]
            rows.append({"mode": mode, "turn": k + 1, "prompt_tokens": len(prompts[0]),
                         "new_tokens": len(news[0]),
                         "cached_tokens": res[0][1].cached_tokens,
                         "ttft_s": statistics.median(ttfts), "ttft_max_s": max(ttfts),
                         "floor_s": floor,
                         **({"queue_floor_s": statistics.median(queue),
                             "queue_floor_max_s": max(queue)} if queue else {}),
                         "step_times": spent, "prefill_step_log": prefill_steps})
            hists = [p + r[1].token_ids for p, r in zip(prompts, res)]
            print(json.dumps(rows[-1]), flush=True)
        e.stop()
        del e
        import gc
        gc.collect()
        if args.device.startswith("cuda"):
            import torch
            torch.cuda.empty_cache()
    if args.mode != "both":
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "rows": rows}, fh, indent=1)
        return
    reuse = [r for r in rows if r["mode"] == "reuse"]
    full = {r["turn"]: r for r in rows if r["mode"] == "full"}
    print()
    print(f"| turn | prompt tokens | new | reused | TTFT reuse | TTFT no reuse | new tokens' "
          f"prefill | reuse / floor | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in reuse:
        f = full[r["turn"]]
        ratio = r["ttft_s"] / r["floor_s"] if r["floor_s"] else float("nan")
        print(f"| {r['turn']} | {r['prompt_tokens']} | {r['new_tokens']} | "
              f"{r['cached_tokens']} | {r['ttft_s'] * 1e3:.0f} ms | {f['ttft_s'] * 1e3:.0f} ms | "
              f"{r['floor_s'] * 1e3:.0f} ms | {ratio:.2f}x | {f['ttft_s'] / r['ttft_s']:.2f}x |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
