"""kvctl's configs on the suite's samples: full, every fixed strategy of the controller's
registry applied to reach a budget, and the daemon's policy (``Controller.tick``) per
profile, with and without a host tier.

Per sample and engine: the context is prefilled once as a held sequence (prompt-time
scores recorded), and each config continues from a fork of it (``Engine.fork``: full
blocks shared copy-on-write, statistics copied). Each config then sees the engine as if
its fork were the only sequence (``OnlyHandle``): its blocks are not shared, and the
GPU-tier bytes are its own. So a fixed strategy's proposal and the controller's budget
are exactly what they would be for that sequence alone; the engine copies a shared
block on a move (the base keeps its own), which changes no byte this suite counts.

Then every config's fork gets the continuation token by token through the decode path
(``Engine.append``, all forks in one batch), the controller ticking after each step as
the daemon ticks between steps. Scored positions record the NLL of the target token,
whether it was the argmax, and KL(full || config) against the full fork in the same
batch.

Bytes, as fractions of the same blocks at full precision (16-bit store, so the bytes
of an fp16 cache): ``gpu`` = the GPU tier's exact slot bytes of the sequence; ``read`` =
what a decode step's attention reads: GPU blocks plus offloaded ones (all of them in
exact mode, the top-k pages' share in top-k mode). Both at the first scored position
("at the answer"); ``peak_gpu`` = the most over the whole continuation.
"""
from __future__ import annotations

import collections
import itertools
import time
from dataclasses import dataclass, replace

import torch

from engine.layout import FULL

_ids = itertools.count()


@dataclass(frozen=True)
class Config:
    kind: str                # 'full' | 'fixed' | 'adaptive'
    strategy: str = ""       # registry name (fixed) or profile (adaptive)
    budget: float = 1.0      # fraction of the context's full-precision KV bytes
    host: bool = False       # engine with a host tier (offload possible)

    @property
    def family(self) -> str:
        """One line in the plots: the strategy across budgets."""
        if self.kind == "full":
            return "full"
        if self.kind == "fixed":
            return f"kvctl {self.strategy}" + (" +host" if self.host else "")
        return f"adaptive {self.strategy}" + (" +host" if self.host else "")

    @property
    def name(self) -> str:
        return self.family if self.kind == "full" else f"{self.family} @{self.budget:.1%}"


def needs_host(strategy: str) -> bool:
    return strategy.startswith("offload")


class OnlyHandle:
    """The engine's handle as the controller would see it if ``seq_id`` were the only
    sequence: others hidden, its blocks unshared, tier bytes its own."""

    def __init__(self, handle, seq_id: str) -> None:
        self._h = handle
        self.seq_id = seq_id

    def snapshot(self):
        snap = self._h.snapshot()
        seqs = [replace(v, blocks=[b._replace(shared=False) for b in v.blocks])
                for v in snap.sequences if v.seq_id == self.seq_id]
        tiers = {}
        for name, t in snap.tiers.items():
            mine = sum(v.bytes_by_tier.get(name, 0) for v in seqs)
            if name == "host":
                mine += sum(v.bytes_by_tier.get("parked", 0) for v in seqs)
            tiers[name] = replace(t, used_bytes=mine, block_bytes=mine,
                                  free_bytes=max(0, t.capacity_bytes - mine), cached_bytes=0)
        return replace(snap, sequences=seqs, tiers=tiers, num_waiting=0, num_running=0,
                       num_stalled=0, pressure_bytes=0, sessions=[])

    def submit_candidates(self, candidates):
        return self._h.submit_candidates(candidates)


def seq_bytes(view, full_block: int) -> dict:
    """Fractions of the sequence's blocks at full precision (see the module docstring)."""
    full = full_block * max(1, len(view.blocks))
    gpu = view.bytes_by_tier.get("gpu", 0)
    host_blocks = [b for b in view.blocks if b.tier == "host"]
    host = sum(b.nbytes for b in host_blocks)
    if view.decode_mode == "exact" or not host_blocks:
        read = gpu + host
    else:   # top-k pages: k of the offloaded blocks per layer and head
        read = gpu + host * min(1.0, view.top_k / len(host_blocks))
    return dict(gpu=gpu / full, read=read / full, full_bytes=full)


def format_counts(view) -> dict[str, int]:
    """Blocks by 'format/tier' (evicted blocks as 'evicted'): one timeline point."""
    c = collections.Counter("evicted" if b.tier in ("evicted", "parked") else
                            (b.fmt if b.tier == "gpu" else f"{b.fmt}/{b.tier}")
                            for b in view.blocks)
    return dict(c)


class FakeClock:
    """The controller's clock, one second a tick: per-sequence rate limits never stall
    an offline run."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Counted:
    """Counts the moves the predictor priced and how many the learned model left to the
    heuristic (``LearnedPredictor.num_fallbacks``; a heuristic predictor: all of them)."""

    def __init__(self, pred) -> None:
        self.pred, self.calls, self.fallbacks = pred, 0, 0
        self._inner = pred.predict_many

    def __call__(self, items, bus=None):
        before = getattr(self.pred, "num_fallbacks", 0)
        out = self._inner(items, bus)
        self.calls += len(items)
        self.fallbacks += (self.pred.num_fallbacks - before
                           if hasattr(self.pred, "num_fallbacks") else len(items))
        return out


class Run:
    """One config on one fork of the sample's base."""

    def __init__(self, engine, base_id: str, cfg: Config, predictor=None,
                 watermarks: tuple[float, float] = (1.0, 0.9)) -> None:
        self.e, self.cfg = engine, cfg
        self.sid = f"hl-{next(_ids)}"
        engine.fork(base_id, self.sid)
        self.handle = OnlyHandle(engine.handle, self.sid)
        self.full_block = engine.store.block_bytes(FULL)
        self.ctl = None
        self.counter = None
        self.decisions: list = []
        self.timeline: list[dict] = []
        self.error = ""
        self.peak_gpu = 0.0
        self.policy_s = 0.0
        if cfg.kind == "adaptive":
            from controller.policy import Controller, DecisionLog, PolicyState
            full = seq_bytes(self.view(), self.full_block)["full_bytes"]
            self.clock = FakeClock()
            policy = PolicyState(profile=cfg.strategy, budget_bytes=int(cfg.budget * full),
                                 high_watermark=watermarks[0],
                                 low_watermark=watermarks[1])
            if predictor is None:
                self.ctl = Controller(policy, DecisionLog(), self.handle, clock=self.clock)
            else:   # the daemon's wiring with one predictor loaded once for the whole run
                from controller.loop import PolicyLoop
                self.ctl = Controller(policy, DecisionLog(), None, clock=self.clock)
                self.ctl.handle = self.handle
                self.ctl.loop = PolicyLoop(predictor, clock=self.clock)
            self.counter = Counted(self.ctl.loop.predictor)
            self.ctl.loop.predictor = CountedProxy(self.ctl.loop.predictor, self.counter)

    def view(self):
        return self.handle.snapshot().sequences[0]

    def bytes(self) -> dict:
        return seq_bytes(self.view(), self.full_block)

    def compress(self) -> None:
        self.note()                      # the timeline's first point: as prefilled
        t0 = time.perf_counter()
        if self.cfg.kind == "fixed":
            self._fixed()
        elif self.cfg.kind == "adaptive":
            quiet = 0
            for _ in range(60):
                quiet = 0 if self.tick() else quiet + 1
                if quiet >= 3:
                    break
        self.policy_s += time.perf_counter() - t0
        self.note()

    def _fixed(self) -> None:
        from controller.strategies import Context, registry
        strat = registry()[self.cfg.strategy]
        snap = self.handle.snapshot()
        v = snap.sequences[0]
        b = seq_bytes(v, self.full_block)
        target = int(v.bytes_by_tier.get("gpu", 0) - self.cfg.budget * b["full_bytes"])
        if target <= 0:
            return
        cand = strat.propose(v, target, Context.from_snapshot(snap))
        if cand is None:
            self.error = "proposed nothing"
            return
        res = self.e.handle.apply_candidates(cand.steps)
        bad = [r.error for r in res if not r.ok]
        if bad:
            self.error = "; ".join(bad)

    def tick(self) -> list:
        if self.ctl is None:
            self.note()
            return []
        t0 = time.perf_counter()
        out = self.ctl.tick(self.handle.snapshot())
        self.clock.t += 1.0
        self.decisions.extend(out)
        self.policy_s += time.perf_counter() - t0
        self.note()
        return out

    def note(self) -> None:
        v = self.view()
        self.peak_gpu = max(self.peak_gpu, seq_bytes(v, self.full_block)["gpu"])
        if self.ctl is not None:
            self.timeline.append(dict(tokens=v.num_tokens, blocks=format_counts(v)))

    def summary(self) -> dict:
        kinds = collections.Counter(d.kind for d in self.decisions)
        out = dict(error=self.error, peak_gpu=self.peak_gpu, policy_s=self.policy_s)
        if self.ctl is not None:
            out |= dict(decisions=dict(kinds), predictor_calls=self.counter.calls,
                        predictor_fallbacks=self.counter.fallbacks,
                        predictor=getattr(self.counter.pred, "name", "?"),
                        actions=[d.action for d in self.decisions if d.action],
                        unmet=[d.reason for d in self.decisions if d.kind == "unmet"],
                        timeline=self.timeline)
        return out

    def close(self) -> None:
        self.e.release(self.sid)


class CountedProxy:
    """The predictor with ``predict_many`` counted (other attributes pass through)."""

    def __init__(self, pred, counter: Counted) -> None:
        self._pred, self.predict_many = pred, counter

    def __getattr__(self, name):
        return getattr(self._pred, name)


@torch.inference_mode()
def run_sample(engine, sample, cfgs: list[Config], predictor=None,
               watermarks: tuple[float, float] = (1.0, 0.9)) -> list[dict]:
    """Every config of ``cfgs`` (one engine) on one sample; one record each. A full
    reference fork runs beside them (KL) and is returned first, as config 'full'."""
    base = f"hl-base-{next(_ids)}"
    t0 = time.perf_counter()
    last = engine.prefill(base, sample.context_ids)
    prefill_s = time.perf_counter() - t0
    runs = [Run(engine, base, Config("full"))]
    try:
        for c in cfgs:
            runs.append(Run(engine, base, c, predictor, watermarks))
        engine.release(base)
        base = None
        for r in runs:
            r.compress()
        recs = [dict(nll=[], correct=[], kl=[]) for _ in runs]
        at_answer: list[dict | None] = [None] * len(runs)
        first = min(sample.scored)
        scored = set(sample.scored)
        logits = last.float().expand(len(runs), -1)
        cont = sample.continuation_ids
        t0 = time.perf_counter()
        for p, tok in enumerate(cont):
            if p == first:
                at_answer = [r.bytes() for r in runs]
            if p in scored:
                lp = torch.log_softmax(logits.float(), -1)
                ref = lp[0]
                for i, rec in enumerate(recs):
                    rec["nll"].append(-float(lp[i, tok]))
                    rec["correct"].append(int(lp[i].argmax()) == tok)
                    rec["kl"].append(float((ref.exp() * (ref - lp[i])).sum()))
            if p == len(cont) - 1:
                break
            logits = _append(engine, [r.sid for r in runs], tok)
            for r in runs:
                r.tick()
        decode_s = time.perf_counter() - t0
        out = []
        for r, rec, b in zip(runs, recs, at_answer):
            out.append(dict(sample=sample.id, task=sample.task, length=sample.length,
                            config=r.cfg.name, family=r.cfg.family, side="kvctl",
                            kind=r.cfg.kind, strategy=r.cfg.strategy, budget=r.cfg.budget,
                            host=r.cfg.host, read=b["read"], gpu=b["gpu"], groups=sample.groups,
                            scored=sample.scored, prefill_s=prefill_s, decode_s=decode_s,
                            **rec, **r.summary()))
        return out
    finally:
        if base is not None:
            engine.release(base)
        for r in runs:
            if r.sid in engine.held:     # the engine may have dropped a failed fork
                r.close()


def _append(engine, sids: list[str], tok: int) -> torch.Tensor:
    """One decode step of all forks; split when their offloaded blocks would not fit one
    staging buffer together."""
    from engine.arena import OutOfBlocks
    try:
        return engine.append(sids, [tok] * len(sids))
    except OutOfBlocks:
        if len(sids) == 1:
            raise
        h = len(sids) // 2
        return torch.cat([_append(engine, sids[:h], tok), _append(engine, sids[h:], tok)])
