"""The headline suite, accuracy side (issue 15): adaptive against every fixed strategy and
the peers, on the same token ids and budgets.

    python -m benchmarks.headline [--out DIR]            # the full suite (CPU: hours)
    python -m benchmarks.headline --quick                # smoke: random:tiny, no peers
    python -m benchmarks.headline --lengths 1024,2048 --samples 4 --budgets 0.25,0.125 \\
        --fixed quantize_int8,quantize_int4,mixed_precision,snapkv --profiles balanced \\
        --host off                                       # the reduced run in BENCHMARKS

Writes DIR/headline.json (every record, the pooled cells, the checks), DIR/headline.md
(the tables) and DIR/accuracy_vs_bytes.png, DIR/timeline.png.

Tasks (tasks.py): passkey at evenly spread depths, two needles half a context apart
(both keys asked), and stdlib text (pydoc_data.topics: top-1, PPL, KL). Configs:

* ``full``; every fixed strategy of ``controller.strategies.registry()`` applied once
  after the context to reach each budget (as far as it can: int8 cannot reach 25%, and
  reads what it reads); offload strategies on an engine with a host tier;
* adaptive: ``Controller.tick`` per profile (controller/profiles.py) with the budget as
  its GPU-tier budget (watermarks 1.0 / 0.9), on an engine without a host tier
  (``host_budget_bytes=0``) and with one (4 GiB), ticking after every decode step;
* peers (peers.py, in their own venv): kvpress StreamingLLM, SnapKV, TOVA,
  ExpectedAttention, KNorm at each budget; transformers' QuantizedCache, quanto int4/int2.

kvctl_side.py and peer_runner.py say exactly how each side prefills, compresses and
scores. A config that cannot run is listed with the reason, never dropped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.headline import kvctl_side, peers, report, tasks
from benchmarks.headline.kvctl_side import Config

HOST_BYTES = 4 << 30


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _list(s: str, every: tuple[str, ...]) -> list[str]:
    if s == "all":
        return list(every)
    if s in ("", "none"):
        return []
    items = [x for x in s.split(",") if x]
    bad = [x for x in items if x not in every]
    if bad:
        raise SystemExit(f"unknown: {', '.join(bad)}; choose from {', '.join(every)}")
    return items


def plan(a) -> tuple[dict[bool, list[Config]], dict[str, str]]:
    """kvctl configs per engine (host tier or not), and the ones that cannot run."""
    from controller.profiles import PROFILE_NAMES
    from controller.strategies import registry

    fixed = _list(a.fixed, tuple(registry()))
    profiles = _list(a.profiles, PROFILE_NAMES)
    hosts = {"off": [False], "on": [True], "both": [False, True]}[a.host]
    by_engine: dict[bool, list[Config]] = {False: [], True: []}
    not_run: dict[str, str] = {}
    for b in a.budgets:
        for s in fixed:
            host = kvctl_side.needs_host(s)
            c = Config("fixed", s, b, host)
            if host and True not in hosts:
                not_run[c.name] = "offload needs a host tier (--host off)"
            else:
                by_engine[host].append(c)
        for p in profiles:
            for h in hosts:
                by_engine[h].append(Config("adaptive", p, b, h))
    return by_engine, not_run


def run_kvctl(a, samples, by_engine) -> list[dict]:
    from engine.engine import Engine, EngineConfig

    records: list[dict] = []
    for n, (host, cfgs) in enumerate(by_engine.items()):
        if host and not cfgs:
            continue           # the engine without a host tier always runs: 'full'
        e = Engine(EngineConfig(model=a.model, device=a.device, dtype=a.dtype,
                                num_threads=a.threads, max_batch_tokens=1024,
                                host_budget_bytes=HOST_BYTES if host else 0, seed=a.seed,
                                **({"value_group": a.value_group} if a.value_group else {})))
        torch.set_num_threads(a.threads)
        from controller.predictors.learned import predictor_for
        pred = predictor_for(e.handle.snapshot().model)
        t0 = time.time()
        for i, s in enumerate(samples):
            recs = kvctl_side.run_sample(e, s, cfgs, pred, a.watermarks)
            if n:          # the full reference runs on each engine: keep the first's
                recs = [r for r in recs if r["kind"] != "full"]
            records += recs
            log(f"kvctl {'host' if host else 'no host'} {i + 1}/{len(samples)} {s.id}: "
                f"{len(recs)} configs, {time.time() - t0:.0f}s")
        e.stop()
        del e
    return records


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="headline-out", help="output directory")
    ap.add_argument("--quick", action="store_true",
                    help="smoke run in seconds: random:tiny, 256 tokens, 1 sample a task, "
                         "every config, no peers")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16",
                    help="16-bit store: its bytes are an fp16 cache's")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--value-group", type=int, default=0,
                    help="engine.value_group: channels a value scale covers (0: the default)")
    ap.add_argument("--tasks", default="all", help=f"all or some of {','.join(tasks.TASKS)}")
    ap.add_argument("--lengths", default="1024,2048,4096,6144")
    ap.add_argument("--samples", type=int, default=8, help="per task and length")
    ap.add_argument("--budgets", default="0.5,0.25,0.125")
    ap.add_argument("--text-score", type=int, default=64,
                    help="scored tokens at the end of each text window")
    ap.add_argument("--question", default="after", choices=("after", "context"),
                    help="retrieval questions after compression (kvpress's 'compress, then "
                         "ask': query-agnostic) or ending the compressed context")
    ap.add_argument("--fixed", default="all", help="registry strategies, 'all' or 'none'")
    ap.add_argument("--profiles", default="all", help="adaptive profiles, 'all' or 'none'")
    ap.add_argument("--host", default="both", choices=("off", "on", "both"),
                    help="adaptive without / with a host tier")
    ap.add_argument("--peers", default="all", help=f"all, none or some of {','.join(peers.PEERS)}")
    ap.add_argument("--peers-venv", default=".venv-peers")
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--watermarks", default="1.0,0.9",
                    help="adaptive's high,low watermarks as fractions of the budget: it "
                         "relieves to the low one (a lossy plan compresses that much more)")
    ap.add_argument("--from", dest="from_json", default="",
                    help="re-render the tables, checks and plots of a headline.json[.gz] "
                         "into --out")
    a = ap.parse_args(argv)
    if a.from_json:
        src = Path(a.from_json)
        if src.suffix == ".gz":
            import gzip
            res = json.loads(gzip.decompress(src.read_bytes()))
        else:
            res = json.loads(src.read_text())
        write(res, Path(a.out))
        return
    if a.quick:
        a.model, a.lengths, a.samples, a.text_score, a.peers = "random:tiny", "256", 1, 16, "none"
    a.budgets = [float(b) for b in a.budgets.split(",") if b]
    try:
        hi, lo = (float(x) for x in a.watermarks.split(","))
        from controller.policy import check_watermarks
        check_watermarks(hi, lo)
    except ValueError as e:
        raise SystemExit(f"--watermarks: {e} (want HIGH,LOW, e.g. 1.0,0.9)")
    a.watermarks = (hi, lo)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    by_engine, not_run = plan(a)
    peer_list = _list(a.peers, peers.PEERS)
    if a.peers in ("", "none"):
        for c in peers.configs(list(peers.PEERS), a.budgets):
            not_run[c["name"]] = "peers not asked for (--peers none" + (
                ", --quick" if a.quick else "") + ")"

    tok, vocab = None, 0
    if a.model.startswith("random:"):
        from engine.models import RANDOM_CONFIGS
        vocab = RANDOM_CONFIGS[a.model.split(":", 1)[1]]["vocab_size"]
    else:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(peers.model_dir(a.model))
    samples = tasks.build(tok, _list(a.tasks, tasks.TASKS),
                          [int(x) for x in a.lengths.split(",") if x], a.samples,
                          a.text_score, a.seed, vocab, a.question == "context")
    log(f"{len(samples)} samples; kvctl configs: {sum(map(len, by_engine.values()))}; "
        f"peers: {', '.join(peer_list) or 'none'}")
    records = run_kvctl(a, samples, by_engine)
    versions = {}
    if peer_list:
        precs, errors, versions = peers.run(samples, peers.configs(peer_list, a.budgets),
                                            a.model, a.dtype, a.threads,
                                            Path(a.peers_venv), out, log)
        records += precs
        not_run.update(errors)
    import transformers
    cmd = "python -m benchmarks.headline " + " ".join(
        argv if argv is not None else sys.argv[1:])
    meta = dict(command=cmd, date=datetime.date.today().isoformat(),
                machine=f"{platform.machine()}, {os.cpu_count()} cores", device=a.device,
                torch=torch.__version__, transformers=transformers.__version__,
                model=a.model, dtype=a.dtype, threads=a.threads, samples=a.samples,
                lengths=a.lengths, budgets=a.budgets, text_score=a.text_score,
                question=a.question, watermarks=list(a.watermarks),
                peer_versions=versions, seconds=time.time() - t0)
    res = dict(meta=meta, samples=[{k: v for k, v in s.to_json().items()
                                    if not k.endswith("_ids")} for s in samples],
               records=records, not_run=not_run)
    write(res, out)


def write(res: dict, out: Path) -> None:
    """headline.json, headline.md and the plots, the cells and checks (re)computed from
    the records."""
    out.mkdir(parents=True, exist_ok=True)
    res["cells"] = report.cells(res["records"])
    res["must_show"] = report.must_show(res["cells"])
    try:
        res["plots"] = report.plots(res, out)
    except ImportError as e:
        log(f"no plots (pip install '.[bench]' for matplotlib): {e}")
    (out / "headline.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "headline.md").write_text(report.markdown(res))
    log(f"wrote {out}/headline.json, headline.md, {', '.join(res.get('plots', []))} "
        f"({res['meta']['seconds'] / 60:.1f} min of runs)")
    print(report.markdown(res))


if __name__ == "__main__":
    main()
