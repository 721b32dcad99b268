"""What eviction and top-k offload cost in accuracy (CPU, default model).

    python -m benchmarks.compression [--lengths 1024,2048,4096] [--depths 10]

Each run: prefill a context at full precision, compress it once with a strategy to
keep a fraction of its blocks (kvpress-style "compress, then ask"), then every later
token goes through the *decode* path over the compressed cache:

* perplexity: the last ``--score`` tokens of a ``pydoc_data.topics`` window are
  teacher-forced one decode step each (so top-k offload really selects pages per layer);
* passkey: the question ("What is the pass key? The pass key is") is fed token by token,
  then 8 greedy tokens; a hit is the key in the output.

Each context is prefilled once; every config continues from a copy of it
(``KVStore.fork``), so configs differ only in what the strategy did.
Strategies come from the controller's registry; the bench only applies their proposals.
"""
from __future__ import annotations

import argparse
import itertools
import math
import sys
import time

import torch

from controller.strategies import (ColdOffload, Context, HeavyHitterEviction,
                                   SinkWindowEviction, SnapKVEviction)
from benchmarks.evaluate import (QUESTION, build_passkey_prompt, passkey_keys, ppl_text_ids,
                                 ppl_windows)
from engine.engine import Engine, EngineConfig

_ids = itertools.count()


def configs(keeps: list[float]):
    yield "full", None, 1.0
    for keep in keeps:
        yield f"sink+window {keep:.0%}", SinkWindowEviction(), keep
        yield f"heavy-hitter {keep:.0%}", HeavyHitterEviction(), keep
        yield f"snapkv {keep:.0%}", SnapKVEviction(), keep
        yield f"top-k offload {keep:.0%}", ColdOffload(top_k_fraction=keep), keep


class Run:
    """One held sequence (Engine.prefill): prefill, compress, decode teacher-forced."""

    def __init__(self, engine: Engine, context: list[int] | None, base: "Run | None" = None):
        self.e = engine
        self.sid = f"bench-{next(_ids)}"
        if base is not None:  # continue from a copy of base's prefilled context
            engine.fork(base.sid, self.sid)
            self.n_prompt, self.last_logits = base.n_prompt, base.last_logits
            return
        self.n_prompt = len(context)
        self.last_logits = engine.prefill(self.sid, context)

    def view(self):
        return next(v for v in self.e.handle.snapshot().sequences if v.seq_id == self.sid)

    def compress(self, strategy, keep: float) -> int:
        """Apply the strategy's proposal; returns attended blocks after it."""
        view = self.view()
        if strategy is None:
            return len(view.blocks)
        h = self.e.handle
        ctx = Context.from_snapshot(h.snapshot())
        gpu = view.bytes_by_tier.get("gpu", 0)
        target = 10**18 if strategy.kind == "offload" else int((1 - keep) * gpu)
        cand = strategy.propose(view, target, ctx)
        if cand is not None:
            res = h.apply_candidates([cand.actions])[0]
            if not res.ok:
                raise RuntimeError(f"{strategy.name} refused: {res.error}")
        v = self.view()
        host = sum(b.tier == "host" for b in v.blocks)
        return sum(b.tier == "gpu" for b in v.blocks) + (
            min(v.top_k, host) if v.decode_mode == "topk" else host)

    def decode(self, token: int) -> torch.Tensor:
        return self.e.append([self.sid], [token])[0]

    def close(self) -> None:
        self.e.release(self.sid)


@torch.inference_mode()
def ppl(engine, base: Run, tail: list[int], strategy, keep: float) -> tuple[float, float]:
    r = Run(engine, None, base)
    try:
        attended = r.compress(strategy, keep) / len(r.view().blocks)
        nll, logits = [], r.last_logits
        for t in tail:
            nll.append(-float(torch.log_softmax(logits.float(), -1)[t]))
            logits = r.decode(t)
    finally:
        r.close()
    return math.exp(sum(nll) / len(nll)), attended


@torch.inference_mode()
def passkey(engine, base: Run, question: list[int], key: str, strategy, keep: float,
            new: int = 8) -> bool:
    r = Run(engine, None, base)
    try:
        r.compress(strategy, keep)
        for t in question:
            logits = r.decode(t)
        out = []
        for _ in range(new):
            out.append(int(logits.argmax()))
            logits = r.decode(out[-1])
    finally:
        r.close()
    return key in engine.tokenizer.decode(out)


def split_passkey(tok, prompt) -> tuple[list[int], list[int]]:
    """(context, question) ids: the question goes through the decode path."""
    cut = prompt.text.rindex(QUESTION)
    return tok(prompt.text[:cut].rstrip())["input_ids"], tok(" " + QUESTION)["input_ids"]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--ppl-lengths", default="2048,4096")
    ap.add_argument("--depths", type=int, default=10)
    ap.add_argument("--keeps", default="0.5,0.25")
    ap.add_argument("--score", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma list of config labels to run")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    e = Engine(EngineConfig(model="default", device="cpu", dtype="float32",
                            max_batch_tokens=1024, host_budget_bytes=4 << 30))
    keeps = [float(k) for k in a.keeps.split(",")]
    cfgs = [c for c in configs(keeps) if not a.only or c[0] in a.only.split(",")]
    lengths = [int(x) for x in a.lengths.split(",") if x]
    plens = [int(x) for x in a.ppl_lengths.split(",") if x]
    depths = [i / max(1, a.depths - 1) for i in range(a.depths)]
    keys = passkey_keys(lengths, depths)
    text = ppl_text_ids(e.tokenizer)
    prompts = {(L, i): build_passkey_prompt(e.tokenizer, L, d, keys[(L, i)])
               for L in lengths for i, d in enumerate(depths)}
    print(f"# compression accuracy — default model (fp32, CPU, {a.threads} threads), "
          f"block {e.geom.block_size}, compress once after the context, score "
          f"{a.score} decode steps", flush=True)
    print()
    head = ["config"] + [f"PPL@{L}" for L in plens] + [f"passkey@{L}" for L in lengths]
    res: dict[str, list] = {c[0]: [] for c in cfgs}
    att: dict[str, list] = {c[0]: [] for c in cfgs}
    t0 = time.time()
    with torch.inference_mode():
        for L in plens:
            ids = ppl_windows(text, L, 1)[0][1]
            base = Run(e, ids[:-a.score])
            for label, strat, keep in cfgs:
                p, frac = ppl(e, base, ids[-a.score:], strat, keep)
                res[label].append(f"{p:.2f}")
                att[label].append(frac)
            base.close()
            print(f"[PPL@{L} done, {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
        for L in lengths:
            hits = {c[0]: 0 for c in cfgs}
            for i in range(len(depths)):
                ctx, q = split_passkey(e.tokenizer, prompts[(L, i)])
                base = Run(e, ctx)
                for label, strat, keep in cfgs:
                    hits[label] += passkey(e, base, q, prompts[(L, i)].key, strat, keep)
                base.close()
            for label in hits:
                res[label].append(f"{hits[label]}/{len(depths)}")
            print(f"[passkey@{L} done, {time.time() - t0:.0f}s]", file=sys.stderr, flush=True)
    print("| " + " | ".join(head) + " | attended blocks |")
    print("|" + "---|" * (len(head) + 1))
    for label, _, _ in cfgs:
        a_ = att[label]
        print(f"| {label} | " + " | ".join(res[label])
              + f" | {sum(a_) / max(1, len(a_)):.0%} |", flush=True)


if __name__ == "__main__":
    main()
