"""Engine decode speed against the strongest peer and the physical floor, in one process.

    python -m benchmarks.engine_speed --model random:llama3-8b --device cuda \
        --dtype bfloat16 --batches 1,8,32,64 --prompt 1024 --new 64 [--json out.json]

Same weights, same GPU, same run:
* kvctl, decode steps replayed as CUDA graphs (the default) and eager;
* transformers ``generate`` with ``cache_implementation="static"`` (it compiles its
  decode step with torch.compile) and with its default dynamic cache;
* the floor: the bytes a decode step must read (weights once, plus every sequence's KV)
  at the read bandwidth a plain reduction over a large buffer reaches on this GPU.
Decode rates exclude prefill: transformers' are timed per token with a streamer (each
token synchronizes), kvctl's over its decode steps. On CPU only kvctl eager and
transformers' dynamic cache run (no compile, no graphs).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch


def prompts_for(engine, n: int, count: int) -> list[list[int]]:
    if engine.tokenizer is not None:
        import pydoc_data.topics as t
        ids = engine.tokenizer(" ".join(t.topics.values()))["input_ids"]
        return [ids[i * 997:i * 997 + n] for i in range(count)]
    g = torch.Generator().manual_seed(0)
    vocab = engine.model.config.vocab_size
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for _ in range(count)]


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def read_bandwidth(dev, gib: float = 4.0) -> float:
    """Bytes/s of a plain reduction over a ``gib`` GiB buffer (best of 5)."""
    x = torch.ones(int(gib * (1 << 30)) // 2, dtype=torch.bfloat16, device=dev)
    best = float("inf")
    for _ in range(6):
        sync(dev)
        t0 = time.perf_counter()
        x.sum(dtype=torch.float32)
        sync(dev)
        best = min(best, time.perf_counter() - t0)
    del x
    return x_bytes(gib) / best


def x_bytes(gib: float) -> int:
    return int(gib * (1 << 30)) // 2 * 2


class Clock:
    """A transformers streamer: the time of every generated token (synchronized)."""

    def __init__(self, dev) -> None:
        self.dev, self.times, self.first = dev, [], True

    def put(self, value) -> None:
        if self.first:              # the prompt
            self.first = False
            return
        sync(self.dev)
        self.times.append(time.perf_counter())

    def end(self) -> None:
        """The streamer protocol's end of generation: nothing to flush."""

    def rate(self, batch: int) -> float:
        t = self.times
        return batch * (len(t) - 1) / (t[-1] - t[0]) if len(t) > 1 else 0.0


def bench_hf(model, prompts: list[list[int]], new: int, static: bool) -> float:
    """transformers generate over the batch; aggregate decode tok/s. The first call
    compiles (static cache); the second is timed."""
    x = torch.tensor(prompts, device=model.device)
    kw = dict(do_sample=False, pad_token_id=0, use_cache=True, max_new_tokens=new,
              min_new_tokens=new)
    if static:
        kw["cache_implementation"] = "static"
    impl = model.config._attn_implementation
    model.set_attn_implementation("sdpa")
    model.config.use_cache = True
    try:
        with torch.inference_mode():
            model.generate(x, **kw)                     # warm-up (compile)
            clock = Clock(model.device)
            model.generate(x, streamer=clock, **kw)
        return clock.rate(len(prompts))
    finally:
        model.set_attn_implementation(impl)
        model.config.use_cache = False


def bench_kvctl(engine, prompts: list[list[int]], new: int, overlap: str = "auto",
                fmt=None) -> tuple[float, float]:
    """kvctl, all prompts running together: (aggregate decode tok/s, ms per step).
    ``overlap``: engine.overlap_steps for this run. ``fmt`` (a KVFormat, default full):
    after the prefill every block but each sequence's newest is quantized to it, and the
    blocks that fill while decoding take it too (a pinned strategy's steady state)."""
    saved = engine.config.overlap_steps
    engine.config.overlap_steps = overlap
    try:
        return _bench_kvctl(engine, prompts, new, fmt)
    finally:
        engine.config.overlap_steps = saved


def pin_format(engine, seq_ids: list[str], fmt) -> None:
    """Every block but each sequence's newest re-stored in ``fmt``, and the blocks that
    fill from now on too (a pinned strategy's steady state); nothing for full."""
    from engine.actions import Quantize, SetFillFormat
    if fmt is None or fmt.is_full:
        return
    for i in seq_ids:
        old = tuple(range(len(engine.store.seqs[i].blocks) - 1))
        engine.handle.apply(SetFillFormat(i, fmt.k_bits, fmt.v_bits, fmt.fp8))
        engine.handle.apply(Quantize.to(i, old, fmt))


def _step_events(engine, before: dict | None = None):
    """Counters of what a step may do besides decoding; with ``before``, what changed."""
    g = engine.runner.graphs.stats if engine.runner.graphs is not None else None
    now = {"graph captures": g.num_graphs if g else 0, "eager steps": g.num_eager if g else 0,
           "compacted pages": engine.store.compactions,
           "moves": sum(len(s.moves) for s in engine.running),
           "quantized blocks": sum(not b.fmt.is_full for s in engine.running
                                   for b in engine.store.seqs[s.seq_id].blocks)}
    if before is None:
        return now
    return ", ".join(f"{k} {now[k] - before[k]:+d}" for k in now if now[k] != before[k])


def _bench_kvctl(engine, prompts: list[list[int]], new: int, fmt) -> tuple[float, float]:
    from engine.api import Request, SamplingParams
    sp = SamplingParams(max_tokens=1_000_000, ignore_eos=True)  # cancelled below
    ids = [engine.submit(Request(prompt_ids=p, sampling=sp), lambda ev: None) for p in prompts]
    while any(engine.seqs[i].state != "decode" for i in ids):
        engine.step()
    pin_format(engine, ids, fmt)
    # warm: graphs captured, kernels compiled. Three steps were not enough at batch 8 /
    # 32K on an H100 (2026-12-06: 26.8 ms a step over the next 28 where the engine's own
    # average of its replayed steps, and step_split's 10, read 21-22 ms)
    warm = min(8, max(1, new // 4))
    for _ in range(warm):
        engine.step()
    sync(engine.device)
    t0 = time.perf_counter()
    made0 = sum(len(engine.seqs[i].output_ids) for i in ids)
    steps = max(1, new - warm - 1)
    each = []
    for k in range(steps):
        # what the engine did in the step besides decoding: graph captures, eager steps,
        # compactions, moves (the slowest step says which, 2026-12-06: one of 245 ms)
        before = _step_events(engine)
        t1 = time.perf_counter()
        engine.step()
        each.append((time.perf_counter() - t1, k, _step_events(engine, before)))
    # every token counted is on the host now (each step reads its own); a step launched
    # ahead (overlap_steps) may still run and is not counted
    dt = time.perf_counter() - t0
    each.sort(key=lambda x: x[0])
    slow, k, what = each[-1]
    print(f"  [{len(prompts)} x {fmt.name if fmt else 'full'}] {steps} steps after {warm} "
          f"warm: median {each[len(each) // 2][0] * 1e3:.2f} ms, slowest {slow * 1e3:.2f} ms "
          f"(step {k}{': ' + what if what else ''})", flush=True)
    sync(engine.device)
    made = sum(len(engine.seqs[i].output_ids) for i in ids) - made0
    for i in ids:
        engine.cancel(i)
    engine.step()               # the cancellations take effect
    # the next run starts from the same arena: no blocks cached from this one (its prompts
    # are the same, so it would reuse them and decode over another slot layout)
    engine.call(engine.store.clear_cache)
    return made / dt, dt / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--prompt", type=int, default=1024)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--kv-budget-gb", type=float, default=0,
                    help="kvctl's KV arena (leave room for transformers' caches)")
    ap.add_argument("--hf", default="static,dynamic", help="transformers baselines to run")
    ap.add_argument("--no-eager", action="store_true", help="skip kvctl without graphs")
    ap.add_argument("--compile", action="store_true",
                    help="also kvctl with its decode step compiled (engine.compile_decode) "
                         "and captured (CUDA)")
    ap.add_argument("--only-hf", action="store_true",
                    help="transformers baselines and the floor only (kvctl's arena left "
                         "tiny): for shapes where its arena and their cache do not fit "
                         "together; run kvctl with --hf '' in the same call")
    ap.add_argument("--compiled-only", action="store_true",
                    help="with --compile: kvctl's compiled, overlapped steps only (no plain "
                         "graphs, no steps in order): long contexts prefill once per run")
    ap.add_argument("--no-in-order", action="store_true",
                    help="overlapped steps only (no run with each step run to its end first)")
    ap.add_argument("--kv-formats", default="full",
                    help="kvctl rows per KV format (e.g. full,int4): every block but the "
                         "newest quantized after the prefill; the floor counts that "
                         "format's bytes; transformers' rows with the first only")
    ap.add_argument("--json", default="")
    a = ap.parse_args()
    if a.only_hf:
        a.kv_budget_gb, a.compile, a.no_eager = 0.25, False, True
    from engine.engine import Engine, EngineConfig
    from engine.layout import FULL, KVFormat
    formats = [KVFormat.parse(f) for f in a.kv_formats.split(",") if f]
    batches = [int(b) for b in a.batches.split(",") if b]
    eng = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                              num_threads=a.threads, max_batch_tokens=4096,
                              kv_budget_bytes=int(a.kv_budget_gb * (1 << 30))))
    dev = eng.device
    prompts = prompts_for(eng, a.prompt, max(batches))
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else \
        (platform.processor() or platform.machine())
    wbytes = sum(p.numel() * p.element_size() for p in eng.model.parameters())
    kv_tok = eng.store.block_bytes(FULL) / eng.store.block_size      # bytes of KV a token
    bw = read_bandwidth(dev) if dev.type == "cuda" else 0.0
    hf = [x for x in a.hf.split(",") if x] if dev.type == "cuda" else ["dynamic"]
    compiled_graphs = None
    if a.compile and eng.runner.graphs is not None:
        from engine import attention
        from engine.cuda_graphs import DecodeGraphs
        compiled_graphs = DecodeGraphs(eng.model, eng.store, eng.num_layers, dev,
                                       eng.config.max_running,
                                       compiled=attention.compile_model(eng.model))
    rows = []
    for fi, fmt in enumerate(formats):
        for b in batches:
            row = _bench_row(a, eng, prompts, b, fmt, wbytes, bw, compiled_graphs,
                             hf if fi == 0 else [])
            rows.append(row)
            print(json.dumps(row), flush=True)
    _report(a, eng, rows, dict(gpu=where, torch=torch.__version__, model=eng.model_name,
                               dtype=str(eng.dtype), prompt=a.prompt, new=a.new,
                               weight_bytes=wbytes, kv_bytes_per_token=kv_tok,
                               read_bandwidth=bw, cpus=os.cpu_count()), compiled_graphs)


def _bench_row(a, eng, prompts, b: int, fmt, wbytes: int, bw: float, compiled_graphs,
               hf: list[str]) -> dict:
    """One batch size in one KV format: kvctl's rows, then transformers' (``hf``)."""
    dev = eng.device
    ctx = a.prompt + a.new // 2
    kv_tok = eng.store.block_bytes(fmt) / eng.store.block_size
    floor_ms = (wbytes + b * ctx * kv_tok) / bw * 1e3 if bw else 0.0
    row = dict(batch=b, kv_format=fmt.name, floor_ms=floor_ms,
               floor_tok_s=b / floor_ms * 1e3 if bw else 0.0)
    if not a.only_hf and not (a.compiled_only and compiled_graphs is not None):
        r, ms = bench_kvctl(eng, prompts[:b], a.new, fmt=fmt)
        row.update(kvctl_graphs_tok_s=r, kvctl_graphs_ms=ms)
        if eng.runner.graphs is not None and not a.no_in_order:   # each step to its end first
            r, ms = bench_kvctl(eng, prompts[:b], a.new, overlap="off", fmt=fmt)
            row.update(kvctl_graphs_seq_tok_s=r, kvctl_graphs_seq_ms=ms)
    if compiled_graphs is not None:
        saved, eng.runner.graphs = eng.runner.graphs, compiled_graphs
        t0 = time.perf_counter()
        try:
            r, ms = bench_kvctl(eng, prompts[:b], a.new, fmt=fmt)
            row.update(kvctl_compiled_tok_s=r, kvctl_compiled_ms=ms,
                       kvctl_compiled_wall_s=time.perf_counter() - t0)
            if not (a.compiled_only or a.no_in_order):
                r, ms = bench_kvctl(eng, prompts[:b], a.new, overlap="off", fmt=fmt)
                row.update(kvctl_compiled_seq_tok_s=r, kvctl_compiled_seq_ms=ms)
        finally:
            eng.runner.graphs = saved
    if not a.no_eager and eng.runner.graphs is not None:
        saved, eng.runner.graphs = eng.runner.graphs, None
        try:
            r, ms = bench_kvctl(eng, prompts[:b], a.new, fmt=fmt)
        finally:
            eng.runner.graphs = saved
        row.update(kvctl_eager_tok_s=r, kvctl_eager_ms=ms)
    for kind in hf:
        try:
            row[f"hf_{kind}_tok_s"] = bench_hf(eng.model, prompts[:b], a.new,
                                               kind == "static")
        except Exception as e:      # e.g. out of memory: say so, go on
            row[f"hf_{kind}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _report(a, eng, rows: list[dict], meta: dict, compiled_graphs) -> None:
    where, bw, wbytes = meta["gpu"], meta["read_bandwidth"], meta["weight_bytes"]
    meta.update(graphs=eng.runner.graphs.stats.__dict__ if eng.runner.graphs is not None else {},
                compiled_graphs=compiled_graphs.stats.__dict__ if compiled_graphs else {})
    print(f"\n# decode — {where}, {eng.model_name} ({eng.dtype}), prompt {a.prompt}, "
          f"{a.new} new; read bandwidth {bw / 1e12:.2f} TB/s, weights {wbytes / 1e9:.2f} GB\n")
    print("| batch, KV | floor tok/s | kvctl graphs tok/s (ms/step, % floor) | kvctl eager | "
          "hf static | hf dynamic | graphs / static | graphs+compile (ms, % floor) | "
          "graphs+compile / static | steps not overlapped: graphs, graphs+compile (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r.get("hf_static_tok_s")

        def run(kind: str) -> tuple[str, str]:
            """'tok/s (ms, % floor)' and 'x static' of one kvctl run, or dashes."""
            tok, ms = r.get(f"kvctl_{kind}_tok_s"), r.get(f"kvctl_{kind}_ms")
            if tok is None:
                return "-", "-"
            pct = f", {r['floor_ms'] / ms:.0%}" if r["floor_ms"] else ""
            return f"{tok:.1f} ({ms:.2f}{pct})", f"{tok / st:.2f}x" if st else "-"
        graphs, graphs_x = run("graphs")
        comp, comp_x = run("compiled")
        eager = r.get("kvctl_eager_tok_s")
        seq = ", ".join(f"{r[k]:.2f}" if k in r else "-"
                        for k in ("kvctl_graphs_seq_ms", "kvctl_compiled_seq_ms"))
        print(f"| {r['batch']}, {r['kv_format']} | {r['floor_tok_s']:.0f} | {graphs} | "
              f"{f'{eager:.1f}' if eager else '-'} | {_num(st, r.get('hf_static_error'))} | "
              f"{_num(r.get('hf_dynamic_tok_s'), r.get('hf_dynamic_error'))} | {graphs_x} | "
              f"{comp} | {comp_x} | {seq} |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)


def _num(x, err) -> str:
    return f"{x:.1f}" if x else (err or "-")


if __name__ == "__main__":
    main()
