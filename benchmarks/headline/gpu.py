"""The headline suite, speed side (issue 15): a mixed workload whose full-precision KV
demand is ``--pressure`` x the GPU KV budget, run by kvctl's engine with the daemon's
policy loop, per config:

* ``none``        — no controller: the engine alone, which preempts the lowest-priority
  sequence when one stalls for a block (swap to the host tier, else drop and recompute:
  vLLM-style preemption);
* ``<strategy>``  — the policy loop with every request pinned to one registry strategy
  (an operator pin, set before the request is submitted): a fixed strategy;
* ``adaptive:<profile>`` — the policy loop with the profile, no pins;
  ``adaptive:<profile>/<format>`` the same with room for waiting requests bought only
  with formats at least that good and no eviction (``PolicyLoop.admission_floor``);
  ``adaptive:<profile>/<number>`` with at most that predicted accuracy cost paid by each
  running sequence, in all, for that room (``PolicyLoop.admission_ceiling``).

    python -m benchmarks.headline.gpu --model random:llama3-8b --device cuda \\
        --dtype bfloat16 --kv-budget-gb 20 --pressure 4 --out gpu-out      # a GPU
    python -m benchmarks.headline.gpu --smoke                              # CPU, seconds

Runs on GPUs are in docs/BENCHMARKS.md (H100, sections "Speed side ...").

What the moves cost in output (``--fidelity``): the same requests run first with no
pressure (no controller, a budget twice the demand), and each config's greedy outputs
are compared with those: per request, the share of its tokens before the first one that
differs, and the share of requests identical throughout. Meaningful with real weights
and text prompts (``--model default --text``: the default model on the stdlib's
``pydoc_data.topics``, CPU-sized with ``--max-context 2048``); on random weights a
perturbed cache flips near-uniform argmaxes at once.

Workload: requests drawn from a fixed-seed mix until their prompt + output tokens at
full precision reach ``pressure`` x the budget: chat (50%: 3-6% of --max-context prompt,
256-512 new at 32K), documents (35%: 12-25%), long context (15%: 50-100%, 128-256 new).
Random token ids, greedy, ``ignore_eos``; all submitted at once (a burst). The daemon's
wiring: ``Telemetry`` samples every ``--tick-s`` (NVML on a GPU) and calls
``Controller.tick(snapshot, gpu_sample)``; default watermarks 0.90 / 0.75 of the
engine's GPU tier. Each config gets a fresh engine (same seed, so the same weights)
with prefix caching off (the same prompts must not hit a previous config's cache).

Reported per config: generated tokens/s over the burst, time per output token (gaps
between a request's tokens, stalls and preemptions included) p50/p99, time to first
token p50/p99, preemptions, OOMs (engine steps retried or failed for memory, requests
refused at submit), lost requests (no finish event by ``--timeout-s``, or finished in
error), the most sequences running at once, bus GB/s (NVML PCIe RX+TX on a GPU; on the
CPU no bus: the offloaded bytes exact decode reads per second instead, labelled).
"""
from __future__ import annotations

import argparse
import cProfile
import collections
import gc
import io
import json
import os
import platform
import pstats
import random
import sys
import threading
import time
from pathlib import Path

import torch

MIX = (  # share, prompt (fraction of --max-context), new tokens (fraction of it)
    (0.50, (0.03, 0.06), (0.008, 0.016)),
    (0.35, (0.12, 0.25), (0.008, 0.016)),
    (0.15, (0.50, 1.00), (0.004, 0.008)),
)


def workload(max_context: int, demand_bytes: int, token_bytes: int, vocab: int,
             seed: int, new_scale: float = 1.0) -> list[tuple[list[int], int]]:
    """(prompt ids, new tokens) until their full-precision KV reaches ``demand_bytes``."""
    rng = random.Random(seed)
    out, total = [], 0
    while total < demand_bytes:
        share = rng.random()
        for frac, (p0, p1), (n0, n1) in MIX:
            if share < frac:
                break
            share -= frac
        n_prompt = max(16, int(max_context * rng.uniform(p0, p1)))
        n_new = max(8, int(max_context * rng.uniform(n0, n1) * new_scale))
        n_prompt = min(n_prompt, max_context - n_new)
        out.append(([rng.randrange(vocab) for _ in range(n_prompt)], n_new))
        total += (n_prompt + n_new) * token_bytes
    return out


def text_prompts(reqs: list[tuple[list[int], int]], model: str, seed: int
                 ) -> list[tuple[list[int], int]]:
    """``reqs`` with each prompt replaced by a window of the stdlib's pydoc_data.topics
    of the same length (tokenized by ``model``'s tokenizer), at a seeded offset."""
    import pydoc_data.topics as t
    from transformers import AutoTokenizer

    from engine.models import DEFAULT_MODEL, default_model_dir
    path = default_model_dir() if model == DEFAULT_MODEL else model
    ids = AutoTokenizer.from_pretrained(str(path))(" ".join(t.topics.values()))["input_ids"]
    rng = random.Random(seed)
    out = []
    for p, n in reqs:
        if len(p) >= len(ids):
            raise SystemExit(f"a {len(p)}-token prompt is longer than the text "
                             f"({len(ids)} tokens): lower --max-context")
        at = rng.randrange(len(ids) - len(p))
        out.append((ids[at:at + len(p)], n))
    return out


def fidelity(outputs: dict[str, list[int]], reference: dict[str, list[int]]) -> dict:
    """How far each request's greedy output follows the unpressured one: the mean share
    of its tokens before the first difference, and the share identical throughout."""
    shares, same = [], 0
    for sid, ref in reference.items():
        got = outputs.get(sid)
        if not ref or got is None:
            continue
        k = next((i for i, (x, y) in enumerate(zip(got, ref)) if x != y), min(len(got), len(ref)))
        shares.append(k / len(ref))
        same += got == ref
    n = len(shares)
    return dict(requests=n, prefix_share=sum(shares) / n if n else float("nan"),
                identical=same / n if n else float("nan"))


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def controller_for(a, cfg: str, engine):
    """(PolicyState, Controller or None) for a config: 'none' has no controller; a
    registry strategy is pinned per request by the caller; 'adaptive:<profile>' sets the
    profile."""
    from controller.policy import Controller, DecisionLog, PolicyState
    policy = PolicyState(a.profile_default)
    if cfg == "none":
        return policy, None
    # 'adaptive:<profile>/<format>': room for waiting requests bought only with formats
    # at least that good, no eviction (PolicyLoop.admission_floor, an experiment)
    profile, _, floor = (cfg.split(":", 1)[1] if cfg.startswith("adaptive:")
                         else a.profile_default).partition("/")
    policy.update(profile=profile)
    ctl = Controller(policy, DecisionLog(), engine.handle)
    if floor:
        # a number: the accuracy cost a running sequence may pay in all for room for
        # waiting requests (PolicyLoop.admission_ceiling); a format: the floor
        try:
            ctl.loop.admission_ceiling = float(floor)
        except ValueError:
            ctl.loop.admission_floor = floor
    return policy, ctl


def release_engine() -> None:
    """Free the last run's engine now: its model, arena and graph pool sit in reference
    cycles (engine, runner, callbacks) that only the cycle collector frees; a fresh
    engine per run otherwise stacks them up (a GPU ran out of memory at the 4th)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def pin_request(policy, ctl, cfg: str, seq_id: str) -> str | None:
    """A fixed strategy ``cfg`` pinned to ``seq_id`` as an operator pins it, and the
    format its prompt is then written in (what the daemon does for a request that names
    the strategy: controller/convert.py); None for adaptive or no controller."""
    from controller.strategies import fill_format_of
    if ctl is None or cfg.startswith("adaptive:"):
        return None
    policy.pin(seq_id, cfg)
    return fill_format_of(cfg)


def run_config(a, cfg: str, reqs: list[tuple[list[int], int]], budget: int) -> dict:
    from controller.telemetry import Telemetry
    from engine.api import FinishEvent, OutOfBlocks, Overloaded, Request, SamplingParams
    from engine.engine import Engine, EngineConfig
    from engine.kernels.jit_count import compiled_keys

    e = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                            kv_budget_bytes=budget, host_budget_bytes=a.host_bytes,
                            max_batch_tokens=a.max_batch_tokens, prefix_caching=False,
                            num_threads=a.threads, seed=a.seed))
    policy, ctl = controller_for(a, cfg, e)
    prof = _profile_moves(e) if getattr(a, "profile_moves", False) else None
    counter = None
    if ctl is not None:     # the moves priced, and how many the learned model left over
        from benchmarks.headline.kvctl_side import Counted, CountedProxy
        counter = Counted(ctl.loop.predictor)
        ctl.loop.predictor = CountedProxy(ctl.loop.predictor, counter)
    tele = Telemetry(e.handle.snapshot, a.tick_s)
    seen = dict(max_running=0, bus=[], offload_read=[], last=None, timeline=[], ticks=[])
    t_start = time.perf_counter()

    def on_sample(s) -> None:
        snap = s.snapshot
        if snap is None:
            return
        tick_ms = 0.0
        if ctl is not None:
            # the controller's own time (its thread holds the GIL the engine's thread
            # launches kernels with)
            t_tick = time.perf_counter()
            ctl.tick(snap, s.gpu)
            tick_ms = (time.perf_counter() - t_tick) * 1e3
            seen["ticks"].append(tick_ms)
        seen["max_running"] = max(seen["max_running"], snap.num_running)
        if s.gpu is not None and s.gpu.available:
            seen["bus"].append(s.gpu.pcie_rx_bytes_per_s + s.gpu.pcie_tx_bytes_per_s)
        per_step = sum(v.bytes_by_tier.get("host", 0) for v in snap.sequences
                       if v.decode_mode == "exact" and v.state == "decode")
        last, seen["last"] = seen["last"], (snap.time, snap.step)
        if last is not None and snap.time > last[0]:
            seen["offload_read"].append(per_step * (snap.step - last[1]) / (snap.time - last[0]))
        # one point a tick: what the steps cost against what they stream (a run that is
        # slower than its peers says why: rows, bytes on each tier and decode mode, steps
        # a second, captures)
        dec = [v for v in snap.sequences if v.state == "decode"]
        g = snap.graphs or {}
        seen["timeline"].append(dict(
            t=round(time.perf_counter() - t_start, 3), step=snap.step,
            running=snap.num_running, waiting=snap.num_waiting, stalled=snap.num_stalled,
            decoding=len(dec), gpu_bytes=snap.tiers["gpu"].used_bytes,
            host_exact=sum(v.bytes_by_tier.get("host", 0) for v in dec
                           if v.decode_mode == "exact"),
            host_topk=sum(v.bytes_by_tier.get("host", 0) for v in dec
                          if v.decode_mode == "topk"),
            topk_rows=sum(v.decode_mode == "topk" and v.bytes_by_tier.get("host", 0) > 0
                          for v in dec),
            replay_step_ms=round(g.get("replay_step_s", 0.0) * 1e3, 2),
            captures=g.get("num_graphs", 0), capture_s=round(g.get("capture_seconds", 0.0), 2),
            compiles=g.get("kernel_compiles", 0),
            pressure=snap.pressure_bytes, tick_ms=round(tick_ms, 2),
            # the engine thread's seconds so far by part: a stall between two points
            # says where it went (moves applied, admissions, launches)
            laps={k: round(snap.step_times.get(k, 0.0), 3)
                  for k in ("moves", "moves_publish", "admit", "launch", "sample", "publish")}))
    tele.on_sample.append(on_sample)

    lock = threading.Lock()
    stamps: dict[str, list[float]] = collections.defaultdict(list)
    finished: dict[str, FinishEvent] = {}
    submitted: dict[str, float] = {}
    done = threading.Event()

    def on_event(ev) -> None:
        now = time.perf_counter()
        with lock:
            if isinstance(ev, FinishEvent):
                finished[ev.seq_id] = ev
                if len(finished) == len(submitted) and len(submitted) == want[0]:
                    done.set()
            else:
                stamps[ev.seq_id].append(now)

    t_start0 = time.perf_counter()
    e.start()                   # on a GPU, after its warm-up (EngineConfig.warmup_formats)
    warmup_s = time.perf_counter() - t_start0
    warmup_compiles = e.handle.snapshot().graphs.get("kernel_compiles", 0)
    pre0, oom0, fail0 = e.num_preemptions, e.num_oom_retries, e.num_step_failures
    paused0 = e.num_paused
    keys0 = compiled_keys()
    snap0 = e.handle.snapshot()
    step0, laps0, graphs0 = snap0.step, snap0.step_times, snap0.graphs
    want = [len(reqs)]
    refused = 0
    tele.start()
    t0, t0_wall = time.perf_counter(), time.time()
    for i, (ids, n_new) in enumerate(reqs):
        sid = f"w{i}"
        kv_format = pin_request(policy, ctl, cfg, sid)
        while True:
            try:
                with lock:
                    submitted[sid] = time.perf_counter()
                e.submit(Request(prompt_ids=ids, seq_id=sid, kv_format=kv_format,
                                 sampling=SamplingParams(max_tokens=n_new, ignore_eos=True)),
                         on_event, prompt_ids=ids)
                break
            except Overloaded as err:
                with lock:
                    submitted.pop(sid)
                time.sleep(err.retry_after_s)
            except OutOfBlocks:
                with lock:
                    submitted.pop(sid)
                refused += 1
                want[0] -= 1
                break
    if want[0] == 0:
        done.set()
    done.wait(a.timeout_s)
    wall = time.perf_counter() - t0
    tele.stop()
    with lock:
        lost = [s for s in submitted if s not in finished]
        errors = [s for s, ev in finished.items() if ev.reason == "error"]
        reasons = collections.Counter(ev.reason for ev in finished.values())
        gaps = [b - a_ for ts in stamps.values() for a_, b in zip(ts, ts[1:])]
        # the ten longest waits between two tokens of one sequence: which, and when (s
        # after the burst began; moves carry wall time, t0_wall aligns them)
        worst = sorted(((b - a_, s, a_ - t0) for s, ts in stamps.items()
                        for a_, b in zip(ts, ts[1:])), reverse=True)[:10]
        ttft = [ts[0] - submitted[s] for s, ts in stamps.items() if ts]
        tokens = sum(len(ts) for ts in stamps.values())
    for s in lost:
        e.cancel(s)
    # CUDA graphs: how many were captured (and the seconds that took) and how many steps
    # ran eager, and why: a run's step times depend on them
    last = e.handle.snapshot()
    # counts since the run began (the warm-up's graphs and compiles not in them); step
    # times are the engine's moving averages
    counts = ("num_graphs", "num_replays", "num_eager", "capture_seconds", "capture_bytes",
              "kernel_compiles", "compile_steps", "compile_steps_s")
    graphs = {k: v - graphs0.get(k, 0) if k in counts else v
              for k, v in last.graphs.items()
              if k in counts + ("eager_reasons", "replay_step_s", "eager_step_s",
                                "topk_step_s", "topk_rows")}
    # the run's slowest steps one by one (the engine keeps its last 1,024): what kind, how
    # many decode rows and prompt chunks (tokens, longest sequence), kernels compiled
    steps = [r for r in list(e.laps.recent) if r.start >= t0]   # idle steps included
    slowest = sorted(steps, key=lambda r: -r.seconds)[:12]
    # which specializations the run compiled that the warm-up (or an earlier config in
    # this process) had not: kernel name and Triton's key (constexprs, integer alignment)
    new_keys = sorted(compiled_keys() - keys0)
    e.stop()
    out = dict(config=cfg, graphs=graphs, run_compiled=[list(k) for k in new_keys],
               predictor_calls=counter.calls if counter else 0,
               predictor_fallbacks=counter.fallbacks if counter else 0,
               predictor=counter.pred.name if counter else "",
               warmup_s=round(warmup_s, 2), warmup_compiles=warmup_compiles,
               budget_bytes=budget, requests=len(reqs), refused=refused,
               finished=dict(reasons), lost=len(lost) + len(errors), unfinished=len(lost),
               errors=len(errors), wall_s=wall, steps=last.step - step0,
               outputs={sid: list(ev.token_ids) for sid, ev in finished.items()},
               tokens=tokens, tokens_per_s=tokens / wall if wall else 0.0,
               tpot_p50_ms=_pct(gaps, 0.5) * 1e3, tpot_p99_ms=_pct(gaps, 0.99) * 1e3,
               ttft_p50_s=_pct(ttft, 0.5), ttft_p99_s=_pct(ttft, 0.99),
               preemptions=e.num_preemptions - pre0, paused=e.num_paused - paused0,
               ooms=e.num_oom_retries - oom0 + refused,
               step_failures=e.num_step_failures - fail0, max_running=seen["max_running"],
               decisions=dict(collections.Counter(d.kind for d in ctl.log.recent()))
               if ctl is not None else {},
               # what each move was (the first 400), and the run tick by tick
               moves=[dict(t=round(d.time, 3), kind=d.kind, seq=d.seq_id, action=d.action,
                           freed=d.freed_bytes, cost=d.predicted_cost, why=d.reason[:240])
                      for d in ctl.log.recent()[:400]] if ctl is not None else [],
               # the engine thread's seconds by part of a step, and steps by kind
               step_times={k: round(v - laps0.get(k, 0), 3)
                           for k, v in last.step_times.items()},
               timeline=seen["timeline"], t0_wall=round(t0_wall, 3),
               ticks=dict(n=len(seen["ticks"]), s=round(sum(seen["ticks"]) / 1e3, 3),
                          max_ms=round(max(seen["ticks"], default=0.0), 1)),
               worst_gaps=[dict(seq=s, at_s=round(at, 3), ms=round(g * 1e3, 1))
                           for g, s, at in worst],
               slowest_steps=[dict(kind=r.kind, ms=round(r.seconds * 1e3, 1),
                                   decode_rows=r.rows, chunks=len(r.chunks),
                                   chunk_tokens=sum(c[0] for c in r.chunks),
                                   longest=max((c[1] for c in r.chunks), default=0),
                                   compiled=r.compiled)
                              for r in slowest],
               # every step of the run (the engine keeps its last 1,024): when it began (s
               # after the burst), kind, ms, decode rows, prompt tokens written, replayed,
               # top-k rows, kernels compiled, and ms by part (launch, sample, post, ...)
               step_log=[[round(r.start - t0, 3), r.kind, round(r.seconds * 1e3, 2), r.rows,
                       sum(c[0] for c in r.chunks), int(r.replayed), r.topk_rows, r.compiled,
                       {k: round(v * 1e3, 2) for k, v in r.parts.items()}]
                      for r in steps])
    if seen["bus"]:
        out["bus_gb_s"] = sum(seen["bus"]) / len(seen["bus"]) / 1e9
        out["bus_source"] = "NVML PCIe RX+TX, mean over samples"
    else:
        xs = seen["offload_read"]
        out["bus_gb_s"] = sum(xs) / len(xs) / 1e9 if xs else 0.0
        out["bus_source"] = "no bus (CPU): offloaded bytes exact decode read per second"
    if prof is not None:
        name = cfg.replace(":", "_").replace("/", "_")
        path = Path(a.out) / f"moves-profile-{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf)
        stats.sort_stats("tottime").print_stats(30)
        stats.sort_stats("cumulative").print_stats(30)
        path.write_text(buf.getvalue())
        out["moves_profile"] = str(path)
    del e
    return out


def _profile_moves(e) -> cProfile.Profile:
    """cProfile over the engine thread's moves and admissions (``Engine._drain_inbox``,
    ``Engine._admit``: the laps "moves" and "admit"), accumulated over the run. A wait
    for the GPU shows as the time of the call that waited."""
    prof = cProfile.Profile()

    def wrap(fn):
        def run(*args, **kw):
            prof.enable()
            try:
                return fn(*args, **kw)
            finally:
                prof.disable()
        return run
    e._drain_inbox = wrap(e._drain_inbox)
    e._admit = wrap(e._admit)
    return prof


def markdown(meta: dict, rows: list[dict]) -> str:
    out = [f"# Headline suite — speed side ({meta['model']}, {meta['dtype']}, {meta['device']})",
           "", f"`{meta['command']}`", "",
           f"{meta['date']}, {meta['machine']}, torch {meta['torch']}. Workload: "
           f"{meta['requests']} requests, full-precision KV demand {meta['demand_gb']:.3f} GB "
           f"= {rows[0]['pressure']:g}x the budget ({rows[0]['budget_bytes'] / 1e9:.3f} GB).",
           "",
           "| config | tok/s | TPOT p50 ms | TPOT p99 ms | TTFT p50 s | TTFT p99 s | "
           "preemptions | paused | OOMs | lost (unfinished in time / error) | max running | "
           "bus GB/s | decisions |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['config']} | {r['tokens_per_s']:.1f} | {r['tpot_p50_ms']:.1f} | "
                   f"{r['tpot_p99_ms']:.1f} | {r['ttft_p50_s']:.2f} | {r['ttft_p99_s']:.2f} | "
                   f"{r['preemptions']} | {r.get('paused', 0)} | {r['ooms']} | {r['lost']} "
                   f"({r['unfinished']} / "
                   f"{r['errors']}) | {r['max_running']} | "
                   f"{r['bus_gb_s']:.3f} | {r['decisions'] or '-'} |")
    ok = [r for r in rows if r["ooms"] == 0 and r["lost"] == 0]
    fixed = [r for r in ok if r["config"] not in ("none",) and
             not r["config"].startswith("adaptive:")]
    out.append("")
    for r in rows:
        if not r["config"].startswith("adaptive:"):
            continue
        if not fixed:
            out.append(f"- {r['config']}: no fixed strategy ran with 0 OOM and 0 lost")
            continue
        best = max(fixed, key=lambda x: x["tokens_per_s"])
        dom = r in ok and r["tokens_per_s"] >= best["tokens_per_s"]
        out.append(f"- {r['config']}: {r['tokens_per_s']:.1f} tok/s vs the fastest fixed "
                   f"strategy meeting the budget ({best['config']}, {best['tokens_per_s']:.1f}), "
                   f"OOM {r['ooms']}, lost {r['lost']}: "
                   + ("Pareto-dominates" if dom else "does NOT dominate"))
    for r in rows:
        f = r.get("fidelity")
        if f:
            out.append(f"- {r['config']}: greedy outputs against the unpressured run: "
                       f"{f['prefix_share']:.1%} of a request's tokens before its first "
                       f"difference (mean of {f['requests']}), {f['identical']:.1%} of "
                       "requests identical")
    for r in rows:
        if r.get("predictor_calls") and r.get("predictor") == "heuristic":
            # the shipped artifacts are trained on a real model's traces; a random-weight
            # model has none, so every move is the heuristic's: not the metric
            out.append(f"- {r['config']}: heuristic predictor ({r['predictor_calls']} moves "
                       "priced; no learned artifact for this model, so the < 5% fallback "
                       "metric is measured on the accuracy side)")
        elif r.get("predictor_calls"):
            out.append(f"- {r['config']}: learned-predictor fallbacks "
                       f"{r['predictor_fallbacks']} of {r['predictor_calls']} moves priced "
                       f"({r['predictor_fallbacks'] / r['predictor_calls']:.1%}; goal < 5%)")
    out.append(f"\nBus: {rows[0]['bus_source'] if rows else '-'}.")
    out += ["", "Where the engine thread's time went (seconds; steps by kind, parts of a "
            "step, graph captures, steps that compiled Triton kernels: kernels, steps "
            "(their seconds)):", "",
            "| config | wall | prefill steps | decode steps | idle steps | moves (of which "
            "the snapshot after them) | admit | "
            "launch | sample | publish | captures | kernel compiles | "
            "controller ticks (s, max ms) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, g = r.get("step_times", {}), r.get("graphs", {})

        def kind(k):
            return f"{int(t.get(k + '_steps', 0))} ({t.get(k + '_s', 0.0):.1f})"
        out.append(f"| {r['config']} | {r['wall_s']:.1f} | {kind('prefill')} | "
                   f"{kind('decode')} | {kind('idle')} | "
                   + f"{t.get('moves', 0.0) + t.get('moves_publish', 0.0):.1f} "
                   f"({t.get('moves_publish', 0.0):.1f}) | "
                   + " | ".join(f"{t.get(p, 0.0):.1f}" for p in
                                ("admit", "launch", "sample", "publish"))
                   + f" | {g.get('num_graphs', 0)} ({g.get('capture_seconds', 0.0):.1f}) | "
                   + (f"{g['kernel_compiles']}, {g['compile_steps']} "
                      f"({g['compile_steps_s']:.1f}) | " if "kernel_compiles" in g else "- | ")
                   + (f"{r['ticks']['n']} ({r['ticks']['s']:.1f}, {r['ticks']['max_ms']:.0f}) |"
                      if r.get("ticks", {}).get("n") else "- |"))
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    from controller.strategies import registry

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-budget-gb", type=float, default=20.0)
    ap.add_argument("--pressure", default="4",
                    help="full-precision KV demand / budget; a comma list sweeps the budget "
                         "(the workload stays the one sized for the first and the budget)")
    ap.add_argument("--max-context", type=int, default=32768)
    ap.add_argument("--host-gb", type=float, default=64.0, help="host tier (0: none)")
    ap.add_argument("--configs", default="none,adaptive:balanced," + ",".join(registry()))
    ap.add_argument("--new-scale", type=float, default=1.0,
                    help="multiplies the new tokens of every request")
    ap.add_argument("--tick-s", type=float, default=0.25, help="telemetry interval (daemon's)")
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--timeout-s", type=float, default=1800.0, help="per config")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="headline-gpu-out")
    ap.add_argument("--fidelity", action="store_true",
                    help="run the requests unpressured first and compare every config's "
                         "greedy outputs with those (module docstring)")
    ap.add_argument("--text", action="store_true",
                    help="prompts from pydoc_data.topics instead of random ids (a real "
                         "model: --model default)")
    ap.add_argument("--profile-moves", action="store_true",
                    help="cProfile the engine thread's moves and admissions; top functions "
                         "to OUT/moves-profile-<config>.txt")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run in seconds: random:tiny, 512-token context, 2 MiB KV "
                         "budget, 10 MiB host tier")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.device, a.dtype, a.max_context = "random:tiny", "cpu", "float32", 512
        a.kv_budget_gb, a.host_gb, a.max_batch_tokens, a.tick_s = 2 / 1024, 0.01, 512, 0.05
        a.timeout_s, a.threads = min(a.timeout_s, 300.0), a.threads or 1
        a.new_scale = 8.0       # 32-64 new tokens: running sequences outgrow the budget
    a.profile_default = "balanced"
    a.host_bytes = int(a.host_gb * (1 << 30))
    pressures = [float(x) for x in a.pressure.split(",") if x]
    budget = int(a.kv_budget_gb * (1 << 30))
    from engine.layout import FULL, BlockGeometry
    from engine.models import RANDOM_CONFIGS, resolve_dtype
    from engine.models import DEFAULT_MODEL
    shape = (RANDOM_CONFIGS[a.model.split(":", 1)[1]] if a.model.startswith("random:") else
             RANDOM_CONFIGS["smollm2-135m"] if a.model == DEFAULT_MODEL else None)
    if shape is None:
        raise SystemExit("the speed side runs random-weight shapes (random:llama3-8b) or "
                         "the default model (--model default)")
    geom = BlockGeometry(32, shape["num_key_value_heads"], shape["head_dim"],
                         resolve_dtype(a.dtype, torch.device(a.device)))
    token_bytes = geom.slot_bytes(FULL) * shape["num_hidden_layers"] // 32
    reqs = workload(a.max_context, int(pressures[0] * budget), token_bytes,
                    shape["vocab_size"], a.seed, a.new_scale)
    if a.text:
        reqs = text_prompts(reqs, a.model, a.seed)
    demand = sum(len(p) + n for p, n in reqs) * token_bytes
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    reference = None
    if a.fidelity:          # the same requests with no pressure: what the outputs should be
        t0 = time.time()
        ref = run_config(a, "none", reqs, 2 * demand)
        release_engine()
        reference = ref["outputs"]
        print(f"[{time.time() - t0:.0f}s] reference (no pressure): {len(reference)} of "
              f"{len(reqs)} finished, {ref['tokens_per_s']:.1f} tok/s", file=sys.stderr,
              flush=True)
    for pr in pressures:
        for cfg in [c for c in a.configs.split(",") if c]:
            t0 = time.time()
            rows.append(run_config(a, cfg, reqs, int(demand / pr)) | dict(pressure=pr))
            release_engine()
            r = rows[-1]
            if reference is not None:
                r["fidelity"] = fidelity(r["outputs"], reference)
            print(f"[{time.time() - t0:.0f}s] {pr}x {cfg}: {r['tokens_per_s']:.1f} tok/s, "
                  f"TPOT p99 {r['tpot_p99_ms']:.1f} ms, preemptions {r['preemptions']}, "
                  f"OOMs {r['ooms']}, lost {r['lost']}, warm-up {r['warmup_s']} s "
                  f"({r['warmup_compiles']} kernels), graphs {r['graphs']}, step times "
                  f"{r['step_times']}, paused {r['paused']}, predictor {r['predictor']}: "
                  f"fallbacks {r['predictor_fallbacks']} of {r['predictor_calls']} moves "
                  f"priced, compiled in the run (by kernel) "
                  f"{dict(collections.Counter(k for k, _ in r['run_compiled']))}",
                  file=sys.stderr, flush=True)
    meta = dict(command="python -m benchmarks.headline.gpu " + " ".join(
        argv if argv is not None else sys.argv[1:]), date=time.strftime("%Y-%m-%d"),
        machine=f"{platform.machine()}, {os.cpu_count()} cores"
        + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        torch=torch.__version__, model=a.model, dtype=a.dtype, device=a.device,
        requests=len(reqs), demand_gb=demand / 1e9, pressures=pressures)
    (out / "gpu.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    md = "".join(markdown(meta, [r for r in rows if r["pressure"] == pr]) for pr in pressures)
    (out / "gpu.md").write_text(md)
    try:
        plot(rows, out / "throughput_vs_budget.png")
        plot_timelines(rows, out / "timeline.png")
    except ImportError as e:
        print(f"no plot (pip install '.[bench]' for matplotlib): {e}", file=sys.stderr)
    print(md)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 5))
    for cfg in dict.fromkeys(r["config"] for r in rows):
        rs = sorted((r for r in rows if r["config"] == cfg), key=lambda r: r["budget_bytes"])
        style = "-s" if cfg.startswith("adaptive") else "--x" if cfg == "none" else "-o"
        ax.plot([r["budget_bytes"] / 1e9 for r in rs], [r["tokens_per_s"] for r in rs],
                style, lw=2.5 if cfg.startswith("adaptive") else 1, label=cfg)
    ax.set_xlabel("GPU KV budget, GB (the workload's full-precision demand fixed)")
    ax.set_ylabel("generated tokens / s")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_timelines(rows: list[dict], path: Path) -> None:
    """One column per config (first pressure): sequences running and waiting, GPU-tier
    and offloaded bytes, and decode steps a second, over the run."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rs = [r for r in rows if r["pressure"] == rows[0]["pressure"] and r.get("timeline")]
    if not rs:
        return
    fig, axes = plt.subplots(3, len(rs), figsize=(4.2 * len(rs), 8), squeeze=False,
                             sharex="col")
    for j, r in enumerate(rs):
        tl = r["timeline"]
        t = [p["t"] for p in tl]
        a = axes[0][j]
        a.plot(t, [p["running"] for p in tl], label="running")
        a.plot(t, [p["waiting"] for p in tl], label="waiting")
        a.set_title(r["config"], fontsize=9)
        a.set_ylabel("sequences")
        a = axes[1][j]
        a.plot(t, [p["gpu_bytes"] / 1e9 for p in tl], label="GPU tier")
        a.plot(t, [(p["host_exact"] + p["host_topk"]) / 1e9 for p in tl],
               label="offloaded, decoding")
        a.axhline(r["budget_bytes"] / 1e9, color="grey", lw=0.8, ls=":")
        a.set_ylabel("GB")
        a = axes[2][j]
        rate = [0.0] + [(q["step"] - p["step"]) / (q["t"] - p["t"]) if q["t"] > p["t"] else 0.0
                        for p, q in zip(tl, tl[1:])]
        a.plot(t, rate)
        a.set_ylabel("steps / s")
        a.set_xlabel("s")
        for a in (axes[0][j], axes[1][j]):
            a.legend(fontsize=7)
        for a in (axes[0][j], axes[1][j], axes[2][j]):
            a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    main()
