"""Capacity (issue 15): how many long sequences run at once in one fixed GPU KV budget
without a preemption, per config: no controller (full precision), fixed strategies pinned
on every request (e.g. quantize_int4) and adaptive.

    python -m benchmarks.headline.capacity --model random:llama3-8b --device cuda \\
        --dtype bfloat16 --kv-budget-gb 20 --context 32768 --configs none,quantize_int4,adaptive:balanced
    python -m benchmarks.headline.capacity --smoke          # CPU, random:tiny, seconds
    python -m benchmarks.headline.capacity --model default --device cpu --dtype float32 \
        --kv-budget-gb 0.38 --context 4096       # the real default model: learned prices

Per config, N requests of ``--context`` prompt tokens (random ids, each a rotation of one prompt:
no shared prefix) that never end by themselves are submitted at once to a fresh engine
with no host tier (nothing can leave the GPU budget), driven by the daemon's wiring
(telemetry ticks ``Controller.tick``, watermarks 0.90 / 0.75); N grows through
``--counts`` (default: multiples of the number of full-precision sequences the budget
holds) until a count is not met. A count is met when all N have written their prompts and
decode at once, before any preemption, OOM or lost request and before ``--settle-s``
seconds go by with no admission and no prompt written to its end. (Until 2026-12-06 a count was met
when all N were admitted, some prompts possibly still unwritten.) The capacity is the
largest count met; its ratio to the ``none`` config's is the claim's figure (int4 >= 3x,
adaptive >= 4x full). Accuracy at those formats: the accuracy side of the suite.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from benchmarks.headline.gpu import controller_for, pin_request, release_engine

SETTLE_DEFAULT = 20.0   # s without an admission before a count is 'not met'


def run_count(a, cfg: str, prompts: list[list[int]], budget: int) -> dict:
    """Submit every prompt at once (no end: max_tokens unbounded); wait until all run at
    once, a preemption, a lost request, or ``--settle-s`` without a new admission."""
    from controller.telemetry import Telemetry
    from engine.api import FinishEvent, Request, SamplingParams
    from engine.engine import Engine, EngineConfig

    e = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                            kv_budget_bytes=budget, host_budget_bytes=0,
                            max_batch_tokens=a.max_batch_tokens, prefix_caching=False,
                            max_running=max(256, len(prompts)), num_threads=a.threads,
                            seed=a.seed))
    policy, ctl = controller_for(a, cfg, e)
    seen = dict(max_running=0, last_change=time.monotonic(), running=0, decoding=0,
                max_decoding=0)

    def on_sample(smp) -> None:
        snap = smp.snapshot
        if snap is None:
            return
        if ctl is not None:
            ctl.tick(snap, smp.gpu)
        # progress: an admission, or a prompt written to its end
        decoding = sum(v.state in ("decode", "stalled") and v.num_generated > 0
                       for v in snap.sequences)
        if (snap.num_running, decoding) != (seen["running"], seen["decoding"]):
            seen["running"], seen["decoding"] = snap.num_running, decoding
            seen["last_change"] = time.monotonic()
        seen["max_running"] = max(seen["max_running"], snap.num_running)
        seen["max_decoding"] = max(seen["max_decoding"], decoding)
    tele = Telemetry(e.handle.snapshot, a.tick_s)
    tele.on_sample.append(on_sample)
    finished: dict[str, str] = {}

    def on_event(ev) -> None:
        if isinstance(ev, FinishEvent):
            finished[ev.seq_id] = ev.reason
    pre0, oom0 = e.num_preemptions, e.num_oom_retries
    e.start()
    tele.start()
    t0 = time.monotonic()
    sids = []
    for i, ids in enumerate(prompts):
        sid = f"c{i}"
        e.submit(Request(prompt_ids=ids, seq_id=sid,
                         kv_format=pin_request(policy, ctl, cfg, sid),
                         sampling=SamplingParams(max_tokens=1 << 20, ignore_eos=True)),
                 on_event, prompt_ids=ids)
        sids.append(sid)
    why = "timeout"
    while time.monotonic() - t0 < a.timeout_s:
        time.sleep(a.tick_s)
        if seen["max_decoding"] >= len(prompts):
            why = "all decoding"
            break
        if e.num_preemptions > pre0:
            why = "preempted"
            break
        if finished:
            why = "a request finished: " + ", ".join(sorted(set(finished.values())))
            break
        if time.monotonic() - seen["last_change"] > a.settle_s:
            why = f"no admission or written prompt for {a.settle_s:g} s"
            break
    wall = time.monotonic() - t0
    tele.stop()
    snap = e.handle.snapshot()
    fmts: dict[str, int] = {}
    for v in snap.sequences:
        for f, n in v.bytes_by_format.items():
            fmts[f] = fmts.get(f, 0) + n
    for sid in sids:
        e.cancel(sid)
    e.stop()
    return dict(config=cfg, count=len(prompts), max_running=seen["max_running"],
                max_decoding=seen["max_decoding"],
                preemptions=e.num_preemptions - pre0, ooms=e.num_oom_retries - oom0,
                lost=sum(1 for r in finished.values() if r == "error"), ended=why,
                seconds=wall, bytes_by_format=fmts,
                decisions=dict(__import__("collections").Counter(
                    d.kind for d in ctl.log.recent())) if ctl is not None else {},
                refusals=sorted({d.reason[-160:] for d in ctl.log.recent()
                                 if d.kind in ("refused", "unmet")})[:3] if ctl else [])



def write(a, argv, configs: list[str], full_n: int, seq_bytes: int, best: dict,
          rows: list[dict], done: bool) -> str:
    """capacity.json and capacity.md as they stand (after every count: a run cut short
    by its time limit still leaves what it measured)."""
    # the ratio's base: the 'none' config's count where it ran, else what full
    # precision holds by bytes
    base = best.get("none", 0) if "none" in configs else full_n
    lines = [f"# Capacity — {a.model} ({a.dtype}, {a.device}), {a.kv_budget_gb:g} GiB KV "
             f"budget, {a.context}-token prompts, no host tier",
             "", f"Full precision holds {full_n} by bytes ({seq_bytes / 2**30:.2f} GiB each)."
             + ("" if done else " **Partial: the run had not ended.**"), "",
             "| config | sequences at once, no preemption | x full"
             + ("" if "none" in configs else " (by bytes)") + " |", "|---|---|---|"]
    for cfg in configs:
        n = best.get(cfg, 0)
        mine = [r for r in rows if r["config"] == cfg]
        if not n and mine:
            # its first count was not met: say how many ran at once, not 0
            lines.append(f"| {cfg} | < {mine[0]['count']} ({mine[0]['max_decoding']} at "
                         f"once) | - |")
            continue
        lines.append(f"| {cfg} | {n} | {n / base:.2f}x |" if base else f"| {cfg} | {n} | - |")
    md = "\n".join(lines) + "\n"
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "capacity.json").write_text(json.dumps(dict(
        command="python -m benchmarks.headline.capacity " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        machine=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        full_by_bytes=full_n, best=best, rows=rows, done=done), indent=1))
    (out / "capacity.md").write_text(md)
    return md


def model_shape(name: str) -> dict:
    """KV shape and vocabulary of a random-weight shape, 'default' or a local model
    directory (its config.json; no weights loaded)."""
    from engine.models import DEFAULT_MODEL, RANDOM_CONFIGS, default_model_dir
    if name.startswith("random:"):
        return RANDOM_CONFIGS[name.split(":", 1)[1]]
    path = default_model_dir() if name == DEFAULT_MODEL else Path(name).expanduser()
    cfg = json.loads((path / "config.json").read_text())
    heads = cfg["num_attention_heads"]
    return dict(num_key_value_heads=cfg.get("num_key_value_heads", heads),
                head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
                num_hidden_layers=cfg["num_hidden_layers"], vocab_size=cfg["vocab_size"])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="random:llama3-8b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--kv-budget-gb", type=float, default=20.0)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--settle-s", type=float, default=SETTLE_DEFAULT,
                    help="a count is not met once no request was admitted for this long")
    ap.add_argument("--configs", default="none,quantize_int4,adaptive:balanced")
    ap.add_argument("--counts", default="",
                    help="request counts to try, ascending (default: 1x..6x of full's)")
    ap.add_argument("--tick-s", type=float, default=0.25)
    ap.add_argument("--max-batch-tokens", type=int, default=8192)
    ap.add_argument("--timeout-s", type=float, default=900.0, help="per run")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="capacity-out")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU smoke run: random:tiny, 256-token contexts, 1 MiB budget")
    a = ap.parse_args(argv)
    if a.smoke:
        a.model, a.device, a.dtype, a.context = "random:tiny", "cpu", "float32", 256
        a.settle_s = a.settle_s if a.settle_s != SETTLE_DEFAULT else 3.0
        a.kv_budget_gb, a.max_batch_tokens, a.tick_s = 1 / 1024, 512, 0.05
        a.timeout_s, a.threads = min(a.timeout_s, 120.0), a.threads or 1
    a.profile_default, a.host_bytes = "balanced", 0
    from engine.layout import FULL, BlockGeometry
    from engine.models import resolve_dtype
    shape = model_shape(a.model)
    geom = BlockGeometry(32, shape["num_key_value_heads"], shape["head_dim"],
                         resolve_dtype(a.dtype, torch.device(a.device)))
    seq_bytes = -(-(a.context + 1) // 32) * geom.slot_bytes(FULL) * shape["num_hidden_layers"]
    budget = int(a.kv_budget_gb * (1 << 30))
    full_n = max(1, budget // seq_bytes)
    counts = ([int(x) for x in a.counts.split(",") if x] if a.counts else
              sorted({full_n * k for k in range(1, 7)}))
    rng = random.Random(a.seed)
    prompt = [rng.randrange(shape["vocab_size"]) for _ in range(a.context)]
    rows, best = [], {}
    configs = [c for c in a.configs.split(",") if c]
    for cfg in configs:
        for n in counts:
            prompts = [prompt[i:] + prompt[:i] for i in range(n)]  # no shared prefix
            t0 = time.time()
            r = run_count(a, cfg, prompts, budget)
            release_engine()
            r["met"] = (r["max_decoding"] >= n and r["preemptions"] == 0 and r["lost"] == 0
                        and r["ooms"] == 0)
            rows.append(r)
            print(f"[{time.time() - t0:.0f}s] {cfg} x{n}: max running {r['max_running']}, "
                  f"prompts written and decoding at once {r['max_decoding']}, "
                  f"preemptions {r['preemptions']}, lost {r['lost']}, OOMs {r['ooms']}: "
                  f"{'met' if r['met'] else 'not met'} ({r['ended']})", file=sys.stderr,
                  flush=True)
            if r["met"]:
                best[cfg] = n
            write(a, argv, configs, full_n, seq_bytes, best, rows, False)
            if not r["met"]:
                break
    print(write(a, argv, configs, full_n, seq_bytes, best, rows, True))


if __name__ == "__main__":
    main()
