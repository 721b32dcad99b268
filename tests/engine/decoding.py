"""Greedy decode through the engine step by step, with moves between steps and the
runner's fast paths (CUDA graphs, the compiled step) switchable: the tests that compare
a fast path with the eager one share it."""
import torch

from engine.api import FinishEvent, Request, SamplingParams


def decode(e, prompts, steps, moves=None, graphs=True, compiled=True):
    """Greedy decode of ``prompts`` together; per sequence its per-step logits and tokens.
    ``moves(step, seq_ids)``: actions applied before that decode step. ``graphs`` /
    ``compiled`` False: the runner's graphs / compiled model off for this call."""
    saved = e.runner.graphs, e.runner.compiled
    if not graphs:
        e.runner.graphs = None
    if not compiled:
        e.runner.compiled = None
    logits, done = {}, {}
    e.on_logits = lambda sids, lg: [logits.setdefault(s, []).append(lg[i].float().cpu())
                                    for i, s in enumerate(sids)]
    try:
        sids = [e.submit(Request(prompt_ids=p, sampling=SamplingParams(
            max_tokens=steps + 1, ignore_eos=True)),
            lambda ev: done.__setitem__(ev.seq_id, ev.token_ids)
            if isinstance(ev, FinishEvent) else None) for p in prompts]
        n = 0
        while len(done) < len(sids):
            if moves is not None and all(e.seqs[s].state == "decode" for s in sids
                                         if s in e.seqs):
                for a in moves(n, sids):
                    e.handle.apply(a)
                n += 1
            e.step()
    finally:
        e.on_logits = None
        e.runner.graphs, e.runner.compiled = saved
    return [torch.stack(logits[s]) for s in sids], [done[s] for s in sids]
