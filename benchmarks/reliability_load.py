"""Benchmark: nothing accepted is lost under memory pressure (issue 12, "must show").

    python -m benchmarks.reliability_load [--clients 64 --requests 3] [--json out.json]

Starts an in-process daemon (``controller.server.Daemon``, the real engine on
``random:tiny``) whose KV budget is far below what the clients need, so the controller
moves KV and the engine preempts, then drives ``--clients`` streaming gRPC clients (one
channel each, coroutines of one asyncio loop), each sending ``--requests`` greedy
generations back to back (``ignore_eos``, prompts as ``prompt_ids``).

* Phase A (lossless): every request pinned to ``offload_exact``, the only lossless move,
  so preemption (swap or recompute) is the only thing besides it that touches the KV.
  Each request's tokens are compared with the same request run unpressured (an engine
  with a large budget, every request submitted at once); they must be equal, except
  where, run alone, the two tokens at the first difference were a near tie (logits
  within ``TIE_GAP``: another batch composition rounds differently; counted apart).
* Phase B (every move): the same requests, no pins, the ``balanced`` profile (quantize,
  offload, evict all allowed): outputs legitimately differ; only nothing lost is checked.
* Phase C (lossless, no host tier): as A, but with no host tier no move is possible and
  every preemption drops the KV and recomputes it (with a host tier, A's preemptions
  nearly all swap). Compared with the same unpressured tokens.

For each phase: requests sent, accepted (got ``started``), finished by reason, refused
by status code, lost (accepted and then no finish: a status after ``started``, or a
stream that ended without one), cut short (finished with fewer than max_tokens),
internal errors (INTERNAL/UNKNOWN statuses, finish reason error, kvctl ERROR log lines),
preemptions, decisions by kind, slots still allocated once idle (leaks), RSS and wall
time. Prints a markdown table; ``--json PATH`` writes everything. Exit status 1 when a
request was refused, lost, cut short or failed internally, a slot leaked, or (A, C) a
request differs other than at a near tie.

Not a test and never imported by product code. The default (64 x 3) takes about 2
minutes on 2 cores; ``--requests 8`` (about 5) or ``--clients 128`` for a longer run,
``--phases A`` for one phase, ``--host-kib 64`` for a host tier that fills (preemption
falls back to recompute).
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import gc
import json
import logging
import os
import platform
import random
import sys
import tempfile
import time
from dataclasses import dataclass, field

import grpc
import psutil

from controller.aio import new_event_loop
from controller.config import load_config
from controller.server import Daemon
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc

# moves that leave every KV value exact (anything else in a pinned request is a bug)
LOSSLESS_MOVES = ("offload ", "fetch ", "decode mode -> exact", "preempted (", "resumed (")
INTERNAL = ("INTERNAL", "UNKNOWN")
# fp32 logits of random:tiny span ~1; batch compositions differ by a few ulps (~1e-7)
TIE_GAP = 1e-5


@dataclass
class Spec:
    client: int
    index: int
    prompt_ids: list[int]
    max_tokens: int


@dataclass
class Outcome:
    spec: Spec
    seq_id: str = ""
    accepted: bool = False
    reason: str = ""                 # finish reason name, "" when none arrived
    code: str = ""                   # gRPC status code name when the call failed
    details: str = ""
    token_ids: list[int] = field(default_factory=list)    # from the Finished message
    streamed: list[int] = field(default_factory=list)     # from the token messages
    changes: list[str] = field(default_factory=list)      # Finished.strategy_changes


def make_specs(clients: int, per_client: int, seed: int, prompt: tuple[int, int],
               new: tuple[int, int], vocab: int = 512) -> list[list[Spec]]:
    rnd = random.Random(seed)
    return [[Spec(c, i, [rnd.randrange(1, vocab) for _ in range(rnd.randint(*prompt))],
                  rnd.randint(*new)) for i in range(per_client)] for c in range(clients)]


def daemon_config(sock: str, args, host_kib: int | None = None) -> object:
    """The tight daemon: 2 layers x ``gpu_pages`` pages of 2 full 16-token blocks on the
    "GPU" tier (768 tokens at 24 pages), a host tier of ``host_kib`` KiB (1 KiB a token; 0:
    none) and a controller budget of ``budget_pages`` (set in ``run_phase``)."""
    host_kib = args.host_kib if host_kib is None else host_kib
    return load_config(overrides={
        "server.socket": sock, "engine.model": "random:tiny", "engine.device": "cpu",
        "engine.dtype": "float32", "engine.num_threads": args.threads,
        "engine.block_size": 16, "engine.page_bytes": 16384,
        "engine.kv_budget_bytes": 2 * args.gpu_pages * 16384,
        "engine.host_budget_bytes": host_kib << 10,
        "engine.max_batch_tokens": 96, "engine.preempt_after_s": args.preempt_after_s,
        "engine.thread_nice": 0, "telemetry.interval_s": 0.05,
        "log.level": "warning"}, env={})


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


async def drive(sock: str, specs: list[list[Spec]], strategy: str, timeout_s: float
                ) -> list[Outcome]:
    async def client(reqs: list[Spec]) -> list[Outcome]:
        out = []
        ch = grpc.aio.insecure_channel(f"unix:{sock}",
                                       options=[("grpc.use_local_subchannel_pool", 1)])
        stub = kvctl_pb2_grpc.KvctlStub(ch)
        try:
            for spec in reqs:
                o = Outcome(spec)
                out.append(o)
                req = pb.GenerateRequest(
                    prompt_ids=pb.TokenIds(ids=spec.prompt_ids), strategy=strategy,
                    sampling=pb.SamplingParams(max_tokens=spec.max_tokens, ignore_eos=True))
                try:
                    async for msg in stub.Generate(req, timeout=timeout_s):
                        kind = msg.WhichOneof("event")
                        if kind == "started":
                            o.accepted, o.seq_id = True, msg.started.seq_id
                        elif kind == "token":
                            o.streamed.append(msg.token.token_id)
                        elif kind == "finished":
                            f = msg.finished
                            o.reason = pb.FinishReason.Name(f.reason).removeprefix(
                                "FINISH_REASON_").lower()
                            o.token_ids = list(f.token_ids)
                            o.changes = list(f.strategy_changes)
                except grpc.aio.AioRpcError as e:
                    o.code, o.details = e.code().name, e.details() or ""
        finally:
            await ch.close()
        return out

    results = await asyncio.gather(*(client(r) for r in specs))
    return [o for r in results for o in r]


def wait_idle(daemon: Daemon, timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        snap = daemon.engine.handle.snapshot()
        if not snap.sequences and not daemon.service.num_inflight:
            return True
        time.sleep(0.05)
    return False


def run_phase(name: str, args, specs: list[list[Spec]], strategy: str, host_kib: int
              ) -> tuple[dict, list]:
    tmp = tempfile.mkdtemp(prefix="kvrel-")
    sock = f"{tmp}/kvctl.sock"
    errors = ErrorLog()
    logging.getLogger("kvctl").addHandler(errors)
    proc = psutil.Process()
    daemon = Daemon(daemon_config(sock, args, host_kib))
    daemon.start()
    try:
        daemon.policy.update(profile="balanced", budget_bytes=2 * args.budget_pages * 16384)
        gc.collect()        # what earlier phases (the reference engine) left behind
        rss0 = proc.memory_info().rss
        t0 = time.monotonic()
        loop = new_event_loop()
        try:
            outcomes = loop.run_until_complete(drive(sock, specs, strategy, args.timeout))
        finally:
            loop.close()
        wall = time.monotonic() - t0
        idle = wait_idle(daemon, 30)
        time.sleep(0.2)     # a last telemetry tick collects the last decisions
        gc.collect()
        rss1 = proc.memory_info().rss
        eng = daemon.engine
        # a slot still allocated once idle is a leak unless the prefix cache holds it
        # (cached blocks of finished prompts, counted free and given back for room)
        leaked = {tier: eng.store.held_slots(tier) for tier in eng.store.arenas}
        cached = {tier: eng.store.prefix.cached_on(tier) for tier in eng.store.arenas}
        decisions = dict(sorted(daemon.decisions.counts.items()))
        refused_moves = [d.reason.rsplit("; ", 1)[-1] for d in daemon.decisions.recent()
                         if d.kind == "refused"][:3]
        engine_state = {"running": len(eng.running), "waiting": len(eng.waiting),
                        "store_seqs": len(eng.store.seqs), "live_ids": len(eng._live)}
        num_preemptions = eng.num_preemptions
        step_failures, oom_retries = eng.num_step_failures, eng.num_oom_retries
    finally:
        daemon.stop(grace_s=1)
        logging.getLogger("kvctl").removeHandler(errors)

    finished = collections.Counter(o.reason for o in outcomes if o.reason)
    refused = collections.Counter(o.code for o in outcomes if not o.accepted)
    lost = [o for o in outcomes if o.accepted and (not o.reason or o.code)]
    short = [o for o in outcomes if o.reason in ("length", "stop")
             and len(o.token_ids) != o.spec.max_tokens]
    torn = [o for o in outcomes if o.reason and o.streamed != o.token_ids]
    internal = sum(o.code in INTERNAL for o in outcomes) + finished.get("error", 0)
    preempted = collections.Counter(c for o in outcomes for c in o.changes
                                    if c.startswith("preempted ("))
    res = {
        "phase": name, "pin": strategy or None, "profile": "balanced",
        "host_tier_tokens": host_kib,
        "sent": len(outcomes), "accepted": sum(o.accepted for o in outcomes),
        "finished": dict(finished), "refused": dict(refused),
        "lost": len(lost), "lost_examples": [dataclasses.asdict(o) for o in lost[:3]],
        "cut_short": len(short), "stream_differs_from_final": len(torn),
        "internal_errors": internal, "error_log_lines": len(errors.messages),
        "error_log_examples": errors.messages[:5],
        "step_failures": step_failures, "oom_retries": oom_retries,
        "preemptions": num_preemptions,
        "preempted_swap": preempted.get("preempted (swap)", 0),
        "preempted_recompute": preempted.get("preempted (recompute)", 0),
        "requests_preempted": sum(any(c.startswith("preempted (") for c in o.changes)
                                  for o in outcomes),
        "decisions": decisions, "refused_move_examples": refused_moves,
        "idle_after_load": idle, "slots_leaked": leaked, "slots_cached": cached,
        "engine_after": engine_state,
        "rss_before_mib": round(rss0 / 2**20, 1), "rss_after_mib": round(rss1 / 2**20, 1),
        "wall_s": round(wall, 2),
        "tokens_generated": sum(len(o.token_ids) for o in outcomes),
    }
    if strategy:
        res["non_lossless_moves"] = sorted({c for o in outcomes for c in o.changes
                                            if not c.startswith(LOSSLESS_MOVES)})
    return res, outcomes


def reference_tokens(args, specs: list[list[Spec]]) -> dict[tuple[int, int], list[int]]:
    """Every request's tokens without pressure: one engine with room for all of them at
    once (same model, weights, block size and step size as the daemon's), run inline."""
    from engine.api import FinishEvent, Request, SamplingParams
    from engine.engine import Engine

    cfg = daemon_config("/nonexistent", args).engine
    flat = [s for r in specs for s in r]
    room = sum(len(s.prompt_ids) + s.max_tokens + 32 for s in flat) * 1024   # 1 KiB/token
    eng = Engine(dataclasses.replace(cfg, kv_budget_bytes=max(room, 8 << 20),
                                     host_budget_bytes=0, max_running=len(flat) + 1,
                                     max_waiting=len(flat) + 1))
    try:
        fins: dict[str, FinishEvent] = {}

        def on_event(ev) -> None:
            if isinstance(ev, FinishEvent):
                fins[ev.seq_id] = ev
        sids = {eng.submit(Request(prompt_ids=s.prompt_ids, sampling=SamplingParams(
            max_tokens=s.max_tokens, ignore_eos=True)), on_event): (s.client, s.index)
            for s in flat}
        while len(fins) < len(sids):
            eng.step()
        assert eng.num_preemptions == 0, "the reference engine was under pressure"
        return {sids[sid]: ev.token_ids for sid, ev in fins.items()}
    finally:
        eng.stop()


def alone(args, spec: Spec) -> tuple[list[int], list]:
    """One request on an engine of its own, and the logits of each of its tokens: tells
    batch effects (a near tie decided the other way) from a real mismatch."""
    from engine.api import Request, SamplingParams
    from engine.engine import Engine

    cfg = daemon_config("/nonexistent", args).engine
    eng = Engine(dataclasses.replace(cfg, kv_budget_bytes=8 << 20, host_budget_bytes=0))
    logits = []
    eng.on_logits = lambda sids, x: logits.extend(x.float().cpu())
    try:
        return list(eng.generate(Request(prompt_ids=spec.prompt_ids, sampling=SamplingParams(
            max_tokens=spec.max_tokens, ignore_eos=True))))[-1].token_ids, logits
    finally:
        eng.stop()


def compare(args, res: dict, outcomes: list[Outcome], want: dict) -> None:
    """Each finished request's tokens against the unpressured run. A difference is
    explained when, run alone, the two tokens at its first position were a near tie
    (logits within ``TIE_GAP``): another batch composition rounds differently there.
    Only unexplained differences fail the run."""
    done = [o for o in outcomes if o.reason in ("length", "stop")]
    bad = [o for o in done if o.token_ids != want[(o.spec.client, o.spec.index)]]
    res["compared"] = len(done)
    res["differ_from_unpressured"] = len(bad)
    res["differ_and_preempted"] = sum(any(c.startswith("preempted (") for c in o.changes)
                                      for o in bad)
    res["differ_at_near_tie"] = 0
    res["differ_examples"] = []
    for o in bad[:args.explain]:
        ref = want[(o.spec.client, o.spec.index)]
        first = next((i for i, (a, b) in enumerate(zip(o.token_ids, ref)) if a != b),
                     min(len(o.token_ids), len(ref)))
        toks, logits = alone(args, o.spec)
        ex = {"seq_id": o.seq_id, "client": o.spec.client, "index": o.spec.index,
              "prompt_tokens": len(o.spec.prompt_ids), "max_tokens": o.spec.max_tokens,
              "first_difference_at": first, "got": len(o.token_ids), "want": len(ref),
              "changes": o.changes, "reference_equals_alone": toks == ref,
              "got_equals_alone": toks == o.token_ids}
        if toks == ref and first < min(len(o.token_ids), len(logits)):
            row = logits[first]      # run alone: the chosen token's logit minus this one's
            gap = float(row[toks[first]] - row[o.token_ids[first]])
            ex["logit_gap_at_difference"] = gap
            ex["logit_scale"] = float(row.abs().max())
            res["differ_at_near_tie"] += gap < TIE_GAP
        res["differ_examples"].append(ex)
    res["differ_unexplained"] = len(bad) - res["differ_at_near_tie"]


ROWS = [
    ("requests sent", lambda r: r["sent"]),
    ("accepted (got started)", lambda r: r["accepted"]),
    ("finished, by reason", lambda r: _fmt(r["finished"])),
    ("refused, by status", lambda r: _fmt(r["refused"])),
    ("lost (accepted, never finished)", lambda r: r["lost"]),
    ("cut short (< max_tokens)", lambda r: r["cut_short"]),
    ("internal errors", lambda r: r["internal_errors"]),
    ("ERROR log lines", lambda r: r["error_log_lines"]),
    ("preemptions (engine)", lambda r: r["preemptions"]),
    ("  in finished messages: swap / recompute",
     lambda r: f"{r['preempted_swap']} / {r['preempted_recompute']}"),
    ("requests preempted at least once", lambda r: r["requests_preempted"]),
    ("decisions, by kind", lambda r: _fmt(r["decisions"])),
    ("slots held once idle (leaks)", lambda r: _fmt(r["slots_leaked"])),
    ("slots the prefix cache holds once idle", lambda r: _fmt(r["slots_cached"])),
    ("tokens generated", lambda r: r["tokens_generated"]),
    ("RSS before / after load (MiB)", lambda r: f"{r['rss_before_mib']} / {r['rss_after_mib']}"),
    ("wall time of the load (s)", lambda r: r["wall_s"]),
    ("tokens differing from unpressured (requests)",
     lambda r: r.get("differ_from_unpressured", "n/a")),
    ("  at a near tie (alone: logits within 1e-5)", lambda r: r.get("differ_at_near_tie", "n/a")),
    ("  of which preempted", lambda r: r.get("differ_and_preempted", "n/a")),
    ("moves other than lossless ones", lambda r: _fmt(r["non_lossless_moves"])
     if "non_lossless_moves" in r else "n/a"),
]


def _fmt(x) -> str:
    if isinstance(x, dict):
        return ", ".join(f"{k} {v}" for k, v in x.items()) or "none"
    if isinstance(x, list):
        return "; ".join(x) or "none"
    return str(x)


def table(results: list[dict]) -> str:
    head = "| | " + " | ".join(
        f"Phase {r['phase']} ({'pinned ' + r['pin'] if r['pin'] else 'no pins, balanced'}"
        f"{'' if r['host_tier_tokens'] else ', no host tier'})"
        for r in results) + " |"
    lines = [head, "|---" * (len(results) + 1) + "|"]
    lines += ["| " + name + " | " + " | ".join(str(f(r)) for r in results) + " |"
              for name, f in ROWS]
    return "\n".join(lines)


def failures(r: dict) -> list[str]:
    out = [f"{k} {r[k]}" for k in ("lost", "cut_short", "internal_errors", "error_log_lines",
                                    "stream_differs_from_final") if r[k]]
    if r["accepted"] != r["sent"]:
        out.append(f"{r['sent'] - r['accepted']} refused")
    if any(r["slots_leaked"].values()) or not r["idle_after_load"] \
            or any(r["engine_after"].values()):
        out.append(f"leaked {r['slots_leaked']}, left in the engine {r['engine_after']}")
    if r.get("differ_unexplained"):
        out.append(f"{r['differ_unexplained']} differ from unpressured (not at a near tie)")
    if r.get("non_lossless_moves"):
        out.append(f"lossy moves in pinned requests: {r['non_lossless_moves']}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=3, help="requests per client")
    ap.add_argument("--prompt", type=int, nargs=2, default=(16, 200), metavar=("MIN", "MAX"))
    ap.add_argument("--new", type=int, nargs=2, default=(32, 96), metavar=("MIN", "MAX"),
                    help="max_tokens range")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--phases", default="ABC", help="any of A, B, C")
    ap.add_argument("--gpu-pages", type=int, default=24,
                    help="GPU-tier pages per layer (2 blocks of 16 tokens each)")
    ap.add_argument("--budget-pages", type=int, default=16,
                    help="controller budget in pages per layer (moves start above it)")
    ap.add_argument("--host-kib", type=int, default=4096,
                    help="host tier, KiB (a token takes 1 KiB; at least 32)")
    ap.add_argument("--preempt-after-s", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=1, help="engine torch threads")
    ap.add_argument("--timeout", type=float, default=300, help="per request, seconds")
    ap.add_argument("--explain", type=int, default=20,
                    help="differing requests rerun alone to tell near ties apart (the "
                         "rest count as unexplained)")
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args()
    logging.getLogger("kvctl").setLevel(logging.WARNING)

    specs = make_specs(args.clients, args.requests, args.seed, tuple(args.prompt),
                       tuple(args.new))
    results = []
    t_all = time.monotonic()
    phases = args.phases.upper()
    want, ref_s = None, 0.0
    if "A" in phases or "C" in phases:
        t0 = time.monotonic()
        want = reference_tokens(args, specs)
        ref_s = time.monotonic() - t0
    for name in sorted(set(phases) & set("ABC")):
        pin = "" if name == "B" else "offload_exact"
        res, outcomes = run_phase(name, args, specs, pin, 0 if name == "C" else args.host_kib)
        if pin:
            compare(args, res, outcomes, want)
            res["reference_s"] = round(ref_s, 2)
        results.append(res)

    import torch
    machine = {"platform": platform.platform(), "machine": platform.machine(),
               "cpus": os.cpu_count(), "python": platform.python_version(),
               "torch": torch.__version__, "grpcio": grpc.__version__}
    print(table(results))
    print(f"\n{args.clients} clients x {args.requests} requests, prompts {args.prompt[0]}-"
          f"{args.prompt[1]} tokens, max_tokens {args.new[0]}-{args.new[1]}; GPU tier "
          f"{args.gpu_pages * 32} tokens, budget {args.budget_pages * 32}, host "
          f"{args.host_kib} tokens (C: none); reference run {ref_s:.0f} s; "
          f"{time.monotonic() - t_all:.0f} s in all "
          f"({machine['cpus']} CPUs, torch {machine['torch']})")
    bad = {r["phase"]: failures(r) for r in results if failures(r)}
    for phase, what in bad.items():
        print(f"phase {phase} FAILED: {', '.join(what)}", file=sys.stderr)
    for r in results:
        for ex in r.get("differ_examples", []) + r.get("lost_examples", []):
            print(f"phase {r['phase']}: {json.dumps(ex)[:600]}", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "machine": machine, "phases": results}, f, indent=2)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
