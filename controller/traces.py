"""Record predictor traces: what each strategy's move really costs, on the real engine.

    python -m controller.train record --out traces.jsonl [--model default] [--sequences N]

Per sequence: prefill a window of ``pydoc_data.topics`` text (varied lengths and
offsets; or, with ``--prompts haystack``, a repetitive filler with two numbered facts and
a question about one at the end: retrieval-shaped attention, concentrated on a few
blocks, which the prose text never shows) as a held sequence (``Engine.prefill``),
decode ``--warmup`` teacher-forced tokens so the decode-time statistics exist (0: the
moves are measured right after the prefill, on prompt-time statistics), then take the
snapshot (``SequenceView``). Every
strategy in the registry proposes moves at several byte targets; each move is applied
(as a candidate, whole or not at all) to its own copy of the sequence (``Engine.fork``),
and the copies plus the untouched sequence decode the next ``horizon`` text tokens
teacher-forced, batched (``Engine.append``).
The target is the mean KL(full || moved) of next-token distributions over those steps,
with top-1 agreement and the NLL change. Rows are JSON lines (never pickle): features
from ``candidate_features`` (the same function prediction uses) plus the measurements,
plus the heuristic predictor's output for the same move. Prompt text is never logged.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import random
import sys
import time
from dataclasses import dataclass

import torch

from controller.predictors.features import SCHEMA_VERSION, candidate_features
from controller.predictors.heuristic import HeuristicPredictor
from controller.strategies import (Candidate, ColdQuantization, Context, MixedPrecision,
                                   registry)
from controller.strategies.base import Strategy
from engine.config import EngineConfig
from engine.handle import open_engine

TRACE_VERSION = 1


@dataclass
class RecordConfig:
    model: str = "default"
    sequences: int = 24
    min_tokens: int = 256
    max_tokens: int = 2048
    targets: int = 3              # byte targets per strategy, fractions in [0.03, 0.9]
    horizon: int = 24             # teacher-forced tokens scored after the move
    warmup: int = 8               # decode steps before the snapshot (0: right after the
                                  # prefill, on prompt-time statistics, where a relief
                                  # after an admission or a held prompt's decides)
    batch: int = 8                # forks decoded together
    threads: int = 1
    seed: int = 0
    prior_share: float = 0.3      # sequences moved in part before the snapshot
    block_size: int = 32          # the serving engine's (features depend on it)
    prompts: str = "text"         # 'text' (pydoc prose) | 'haystack' (filler, facts, question)

    def __post_init__(self) -> None:
        if self.sequences < 1:
            raise ValueError(f"--sequences must be >= 1, got {self.sequences}")
        if not 1 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"need 1 <= --min-tokens <= --max-tokens, got "
                             f"{self.min_tokens}, {self.max_tokens}")
        if self.block_size < 1:
            raise ValueError(f"--block-size must be >= 1, got {self.block_size}")
        if self.prompts not in ("text", "haystack"):
            raise ValueError(f"--prompts must be text or haystack, got {self.prompts!r}")
        if self.horizon < 2 or self.targets < 1 or self.batch < 1 or self.warmup < 0:
            raise ValueError("--horizon must be >= 2; --targets, --batch >= 1; --warmup >= 0")


def make_engine(cfg: RecordConfig):
    torch.set_num_threads(cfg.threads)
    # room for a batch of forks at the longest length, and for streaming their
    # offloaded blocks in one step
    return open_engine(EngineConfig(model=cfg.model, device="cpu", dtype="float32",
                                    block_size=cfg.block_size, num_threads=cfg.threads,
                                    max_batch_tokens=1024, kv_budget_bytes=4 << 30,
                                    host_budget_bytes=4 << 30, staging_bytes=512 << 20,
                                    seed=cfg.seed))


def text_ids(engine) -> list[int]:
    """Token ids of the stdlib's pydoc topics (bytes folded into the vocabulary when the
    model has no tokenizer: random-weight models)."""
    import pydoc_data.topics as t
    text = "\n\n".join(t.topics.values())
    if engine.tokenizer is not None:
        return engine.tokenizer(text)["input_ids"]
    vocab = engine.model.config.vocab_size
    return [b % vocab for b in text.encode()[:300_000]]


# retrieval-shaped prompts of their own (not the headline suite's filler, needle or
# question: its tasks score the predictor, so they must not train it)
HAYSTACKS = (   # shorter cycles repeat more: sharper, lower-entropy attention
    "The river runs to the sea. The hills are quiet at night. Birds fly south in autumn. "
    "The road bends near the old mill. ",
    "The tide is low. The night is calm. ",
    "Stay on the path. ")
FACT = " Note: the {name} number is {code}. "
ASK = " Question: what is the {name} number? Answer: the {name} number is"
NAMES = ("harbor", "lantern", "orchard", "compass", "violet", "granite", "meadow", "falcon")


def haystack_window(engine, n: int, extra: int, rng: random.Random) -> list[int]:
    """``n`` prompt tokens (filler with two facts at random depths, then a question
    about one of them) and ``extra`` more: the answer, then the filler going on."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("--prompts haystack needs a tokenizer (the default model)")

    def enc(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]
    names = rng.sample(NAMES, 2)
    codes = [str(rng.randint(10000, 99999)) for _ in names]
    facts = [enc(FACT.format(name=a, code=c)) for a, c in zip(names, codes)]
    k = rng.randrange(2)
    ask = enc(ASK.format(name=names[k]))
    body = n - len(ask) - sum(map(len, facts))
    if body < 2 * len(facts):
        raise ValueError(f"a haystack prompt needs more than {n} tokens")
    fill = enc(rng.choice(HAYSTACKS))
    hay = (fill * (body // len(fill) + 2))[:body]
    prompt, last = [], 0
    for depth, f in zip(sorted(rng.uniform(0.05, 0.95) for _ in facts), facts):
        cut = int(depth * body)
        prompt += hay[last:cut] + f
        last = cut
    prompt += hay[last:] + ask
    after = enc(f" {codes[k]}.") + fill * (extra // len(fill) + 1)
    return prompt + after[:extra]


_ids = itertools.count()


def _sid(kind: str) -> str:
    return f"trace-{kind}-{next(_ids)}"


def seq_view(engine, seq_id: str):
    return next(v for v in engine.handle.snapshot().sequences if v.seq_id == seq_id)


def staging_need(view, num_layers: int) -> int:
    """Bytes per layer a decode step of this sequence streams from the host tier."""
    host = [b.nbytes // num_layers for b in view.blocks if b.tier == "host"]
    if not host:
        return 0
    if view.decode_mode == "topk":
        return min(view.top_k, len(host)) * max(host)
    return sum(host)


def compare(ref: torch.Tensor, moved: torch.Tensor, targets: list[int]) -> dict[str, float]:
    """ref, moved [N, V] logits of the same steps; targets: the N-1 next tokens."""
    lp, lq = ref.double().log_softmax(-1), moved.double().log_softmax(-1)
    kl = (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)
    t = torch.tensor(targets)
    rows = torch.arange(len(targets))
    nll = float((lp[rows, t] - lq[rows, t]).mean())
    return {"kl": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((lp.argmax(-1) == lq.argmax(-1)).double().mean()),
            "nll_delta": nll}


def propose_all(seq, ctx: Context, fracs: list[float]) -> list[tuple[float, Candidate, str]]:
    """(byte target, candidate, the plan it is a part of or '') of every strategy at each
    target. A plan's parts are measured on their own too: the learned predictor prices
    a plan it does not know as the sum of its parts, and those parts (one hot block at
    int4, the rest at k4v2, ...) are moves no single strategy proposes at these targets."""
    out, gpu = [], seq.bytes_by_tier.get("gpu", 0)
    seen: set[tuple[str, tuple[int, ...]]] = set()
    for strat in registry().values():
        for f in fracs:
            c = strat.propose(seq, int(f * gpu), ctx)
            if c is None or c.freed_bytes <= 0 or (c.strategy, c.blocks) in seen:
                continue
            seen.add((c.strategy, c.blocks))
            out.append((f, c, ""))
            for p in c.parts if len(c.parts) > 1 else ():
                if p.freed_bytes > 0 and (p.strategy, p.blocks) not in seen:
                    seen.add((p.strategy, p.blocks))
                    out.append((f, p, c.strategy))
    return out


def groups(engine, sids: list[str], size: int) -> list[list[str]]:
    """Batches of at most ``size`` whose offloaded blocks fit one staging buffer."""
    out: list[list[str]] = [[]]
    room = engine.store.staging_half
    left = room
    snap = engine.handle.snapshot()
    views = {v.seq_id: v for v in snap.sequences}
    for sid in sids:
        need = staging_need(views[sid], snap.num_layers)
        if out[-1] and (len(out[-1]) >= size or need > left):
            out.append([])
            left = room
        out[-1].append(sid)
        left -= need
    return out


def apply_moves(engine, seq_id: str, cand: Candidate) -> str:
    """The candidate's moves on ``seq_id``, each whole or not at all; '' or why not."""
    steps = [tuple(dataclasses.replace(a, seq_id=seq_id) for a in step) for step in cand.steps]
    return "; ".join(r.error for r in engine.handle.apply_candidates(steps) if r.error)


@torch.inference_mode()
def record_sequence(engine, ids: list[int], n_prompt: int, cfg: RecordConfig,
                    fracs: list[float], prior: tuple[Strategy, float] | None = None
                    ) -> list[dict]:
    """Rows for one window ``ids`` = context + warmup + horizon tokens. ``prior``: a
    strategy and byte fraction applied right after the prefill, so that moves are also
    measured on a sequence that was already moved (the cost is then relative to it)."""
    heur = HeuristicPredictor()
    ctx_ids = ids[:n_prompt]
    warm = ids[n_prompt:n_prompt + cfg.warmup]
    tail = ids[n_prompt + cfg.warmup:]
    base = _sid("base")
    engine.prefill(base, ctx_ids)
    try:
        if prior is not None:   # an earlier move: traces then price the next one
            pv = seq_view(engine, base)
            c = prior[0].propose(pv, int(prior[1] * pv.bytes_by_tier.get("gpu", 0)),
                                 Context.from_snapshot(engine.handle.snapshot()))
            if c is not None:
                apply_moves(engine, base, c)
        for t in warm:
            engine.append([base], [t])
        view = seq_view(engine, base)
        ctx = Context.from_snapshot(engine.handle.snapshot())
        cands = propose_all(view, ctx, fracs)
        prior_name = f"{prior[0].name}@{prior[1]:.2f}" if prior else None
        ref: list[torch.Tensor] = []
        rows: list[dict] = []
        pending = list(cands)
        first = True
        while pending or first:
            chunk, pending = pending[:cfg.batch], pending[cfg.batch:]
            forks, sids = [], []
            try:
                # the reference is a copy too: ``base`` must stay as it was snapshotted
                refsid = _sid("ref") if first else None
                if refsid:
                    engine.fork(base, refsid)
                    sids.append(refsid)
                for frac, c, part_of in chunk:
                    sid = _sid("move")
                    engine.fork(base, sid)
                    sids.append(sid)
                    if not apply_moves(engine, sid, c):    # the move, on the copy
                        forks.append((frac, c, part_of, sid))
                outs: dict[str, list[torch.Tensor]] = {sid: [] for sid in sids}
                for grp in groups(engine, sids, cfg.batch + 1):
                    for t in tail:
                        for sid, lg in zip(grp, engine.append(grp, [t] * len(grp))):
                            outs[sid].append(lg)
                if refsid is not None:
                    ref = outs[refsid]
                    first = False
                R = torch.stack(ref)
                for frac, c, part_of, sid in forks:
                    m = compare(R, torch.stack(outs[sid]), tail[1:])
                    p = heur.predict(view, c)
                    rows.append({
                        "v": TRACE_VERSION, "schema": SCHEMA_VERSION, "model": engine.model_name,
                        "tokens": view.num_tokens, "strategy": c.strategy, "kind": c.kind,
                        "target_frac": round(frac, 4), "prior": prior_name,
                        "part_of": part_of,
                        "num_touched": len(c.blocks), "freed_bytes": c.freed_bytes,
                        "features": candidate_features(view, c), **m,
                        "heuristic": p.accuracy})
            finally:
                for sid in sids:
                    engine.release(sid)
    finally:
        engine.release(base)
    return rows


def record(cfg: RecordConfig, out, log=sys.stderr) -> int:
    """Record ``cfg.sequences`` windows into the open text file ``out``; returns rows."""
    rng = random.Random(cfg.seed)
    e = make_engine(cfg)
    try:
        ids = text_ids(e) if cfg.prompts == "text" else []
        extra = cfg.warmup + cfg.horizon
        lo, hi = math.log2(cfg.min_tokens), math.log2(cfg.max_tokens)
        total, t0 = 0, time.time()
        for i in range(cfg.sequences):
            n = int(round(2 ** rng.uniform(lo, hi)))   # lengths spread on a log scale
            if cfg.prompts == "haystack":
                window = haystack_window(e, n, extra, rng)
            else:
                if n + extra > len(ids):
                    raise ValueError(f"the text has {len(ids)} tokens, fewer than "
                                     f"{n + extra} for one sequence")
                off = rng.randrange(0, len(ids) - n - extra + 1)
                window = ids[off:off + n + extra]
            fracs = sorted(rng.uniform(0.03, 0.9) for _ in range(cfg.targets))
            prior = None
            if rng.random() < cfg.prior_share:
                # an earlier move: a cold quantization, or the policy's own per-block plan
                # down to 25-40% of the bytes (its next, small relief then touches the
                # blocks that filled since: hot ones, moves no cold strategy makes)
                prior = (ColdQuantization(rng.choice((8, 4))), rng.uniform(0.2, 0.6)) \
                    if rng.random() < 0.5 else (MixedPrecision(), rng.uniform(0.6, 0.75))
            rows = record_sequence(e, window, n, cfg, fracs, prior)
            for r in rows:
                r["seq"] = i
                r["prompts"] = cfg.prompts
                r["warmup"] = cfg.warmup
                out.write(json.dumps(r) + "\n")
            out.flush()
            total += len(rows)
            print(f"[sequence {i + 1}/{cfg.sequences}: {n} tokens"
                  + (f" (after {rows[0]['prior']})" if prior and rows else "")
                  + f", {len(rows)} moves, "
                  f"{total} rows, {time.time() - t0:.0f}s]", file=log, flush=True)
        return total
    finally:
        e.stop()
