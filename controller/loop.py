"""The policy loop: above the high watermark, the cheapest moves that bring GPU-tier KV
back to the low watermark; under the low watermark, undo reversible moves.

Each tick reads one engine snapshot. Candidates come from the strategies a sequence may
use (its pin, else its profile's list), each priced by the predictor (the learned one
when the loaded model has an artifact, else the heuristic) as accuracy cost + latency
weight x added step latency, per byte freed; the cheapest go first, one move per
sequence per tick, and a sequence moved recently waits (hysteresis against flapping).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from controller.predictors.heuristic import HeuristicPredictor
from controller.predictors.learned import LearnedPredictor
from controller.strategies import Candidate, Context, registry
from engine.actions import ActionError, Fetch, SetDecodeMode

# Which strategies each profile may use, in the order of preference that breaks ties.
PROFILE_STRATEGIES: dict[str, tuple[str, ...]] = {
    "accuracy-critical": ("quantize_int8", "offload_exact"),
    "streaming": ("sink_window", "quantize_int8", "quantize_int4"),
    "long-context": ("offload_topk", "quantize_int4", "offload_exact"),
    "throughput": ("quantize_int4", "heavy_hitter", "quantize_k4v2"),
    "multi-turn": ("offload_exact", "quantize_int8", "quantize_int4"),
    "balanced": ("quantize_int8", "quantize_int4", "offload_exact", "offload_topk",
                 "snapkv", "heavy_hitter", "quantize_k4v2", "sink_window", "quantize_int2"),
}
# seconds of added decode-step latency worth one unit of accuracy cost (PPL fraction)
LATENCY_WEIGHT = {"accuracy-critical": 0.01, "long-context": 0.1, "multi-turn": 0.1,
                  "balanced": 1.0, "streaming": 2.0, "throughput": 5.0}


@dataclass
class Move:
    candidate: Candidate
    cost: float
    accuracy: float
    latency_s: float
    source: str = "heuristic"                       # the predictor that priced it


@dataclass
class PolicyLoop:
    handle: object                                  # engine.handle.EngineHandle
    # HeuristicPredictor or LearnedPredictor (controller.predictors.predictor_for)
    predictor: HeuristicPredictor | LearnedPredictor = field(
        default_factory=HeuristicPredictor)
    min_interval_s: float = 1.0                     # per sequence, between two moves
    _last_move: dict[str, float] = field(default_factory=dict)

    def allowed(self, seq_pin: str | None, profile: str) -> tuple[str, ...]:
        if seq_pin in PROFILE_STRATEGIES:
            return PROFILE_STRATEGIES[seq_pin]
        if seq_pin:
            return (seq_pin,)
        return PROFILE_STRATEGIES[profile]

    def candidates(self, snapshot, need: int, profile: str, pins: dict[str, str],
                   now: float, bus_busy: float = 0.0) -> list[Move]:
        ctx = Context.from_snapshot(snapshot)
        strategies = registry()
        weight = LATENCY_WEIGHT.get(profile, 1.0)
        items: list[tuple[object, Candidate]] = []
        moves = []
        for seq in snapshot.sequences:
            if seq.state not in ("decode", "prefill", "stalled") or not seq.blocks:
                continue
            if now - self._last_move.get(seq.seq_id, -1e9) < self.min_interval_s:
                continue
            for name in self.allowed(pins.get(seq.seq_id) or seq.pinned, profile):
                strat = strategies.get(name)
                cand = strat.propose(seq, need, ctx) if strat else None
                if cand is None or cand.freed_bytes <= 0:
                    continue
                items.append((seq, cand))
        # one call for the whole tick: the learned model predicts a batch at once
        for (_, cand), p in zip(items, self.predictor.predict_many(items, bus_busy)):
            moves.append(Move(cand, p.total(weight) / cand.freed_bytes, p.accuracy,
                              p.latency_s, p.source))
        return sorted(moves, key=lambda m: m.cost)

    def relieve(self, snapshot, need: int, profile: str, pins: dict[str, str],
                bus_busy: float = 0.0) -> list[tuple[Move, dict[str, int] | str]]:
        """Apply the cheapest moves until ``need`` GPU bytes are freed. Returns each move
        with the engine's measured effect (bytes freed per tier) or its refusal."""
        now = time.monotonic()
        done: list[tuple[Move, dict[str, int] | str]] = []
        freed, moved = 0, set()
        for m in self.candidates(snapshot, need, profile, pins, now, bus_busy):
            if freed >= need:
                break
            if m.candidate.seq_id in moved:
                continue
            effect: dict[str, int] = {}
            try:
                for a in m.candidate.actions:
                    for tier, n in self.handle.apply(a).freed_bytes.items():
                        effect[tier] = effect.get(tier, 0) + n
            except (ActionError, KeyError) as err:  # the sequence moved on meanwhile
                done.append((m, str(err)))
                continue
            moved.add(m.candidate.seq_id)
            self._last_move[m.candidate.seq_id] = now
            freed += effect.get("gpu", 0)
            done.append((m, effect))
        return done

    def restore(self, snapshot, room: int) -> list[tuple[str, int, dict[str, int] | str]]:
        """Under the low watermark: fetch offloaded blocks back while ``room`` lasts."""
        out = []
        now = time.monotonic()
        for seq in snapshot.sequences:
            host = [b for b in seq.blocks if b.tier == "host"]
            if not host or now - self._last_move.get(seq.seq_id, -1e9) < self.min_interval_s:
                continue
            take = []
            for b in host:
                if b.nbytes > room:
                    break
                take.append(b.index)
                room -= b.nbytes
            if not take:
                break
            try:
                res = self.handle.apply(Fetch(seq.seq_id, tuple(take)))
                if len(take) == len(host):
                    self.handle.apply(SetDecodeMode(seq.seq_id, "exact"))
                out.append((seq.seq_id, len(take), res.freed_bytes))
                self._last_move[seq.seq_id] = now
            except (ActionError, KeyError) as err:
                out.append((seq.seq_id, len(take), str(err)))
        return out
