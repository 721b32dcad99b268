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
from typing import Callable

from controller.predictors.heuristic import HeuristicPredictor
from controller.predictors.learned import LearnedPredictor
from controller.profiles import PROFILES, get_profile
from controller.strategies import Candidate, Context, registry
from engine.actions import Fetch, SetDecodeMode

# moves only go to sequences in these states: the engine refuses the rest (a prompt still
# being written, a preempted or waiting sequence)
MOVABLE_STATES = ("decode", "stalled", "held", "idle")


@dataclass
class Move:
    candidate: Candidate
    cost: float
    accuracy: float
    latency_s: float
    source: str = "heuristic"                       # the predictor that priced it


@dataclass
class Restore:
    """Offloaded blocks of one sequence to fetch back (and exact decode when all are)."""

    seq_id: str
    blocks: tuple[int, ...]
    actions: tuple


@dataclass
class PolicyLoop:
    # HeuristicPredictor or LearnedPredictor (controller.predictors.predictor_for)
    predictor: HeuristicPredictor | LearnedPredictor = field(
        default_factory=HeuristicPredictor)
    min_interval_s: float = 1.0                     # per sequence, between two moves
    clock: Callable[[], float] = time.monotonic
    _last_move: dict[str, float] = field(default_factory=dict)

    def allowed(self, seq_pin: str | None, profile: str) -> tuple[str, ...]:
        if seq_pin in PROFILES:
            return PROFILES[seq_pin].strategies
        if seq_pin:
            return (seq_pin,)
        return get_profile(profile).strategies

    def _resting(self, seq_id: str, now: float) -> bool:
        return now - self._last_move.get(seq_id, -1e9) < self.min_interval_s

    def candidates(self, snapshot, need: int, profile: str, pins: dict[str, str],
                   now: float, bus=None) -> list[Move]:
        ctx = Context.from_snapshot(snapshot)
        strategies = registry()
        weight = get_profile(profile).latency_weight
        items: list[tuple[object, Candidate]] = []
        moves = []
        for seq in snapshot.sequences:
            if seq.state not in MOVABLE_STATES or not seq.blocks or self._resting(seq.seq_id, now):
                continue
            for name in self.allowed(pins.get(seq.seq_id), profile):
                strat = strategies.get(name)
                cand = strat.propose(seq, need, ctx) if strat else None
                if cand is None or cand.freed_bytes <= 0:
                    continue
                items.append((seq, cand))
        # one call for the whole tick: the learned model predicts a batch at once
        for (_, cand), p in zip(items, self.predictor.predict_many(items, bus)):
            moves.append(Move(cand, p.total(weight) / cand.freed_bytes, p.accuracy,
                              p.latency_s, p.source))
        return sorted(moves, key=lambda m: m.cost)

    def plan_relief(self, snapshot, need: int, profile: str, pins: dict[str, str],
                    bus=None) -> list[Move]:
        """The cheapest moves, one per sequence, whose predicted effect frees ``need``
        GPU bytes (fewer if the allowed moves run out). The engine applies them."""
        now = self.clock()
        chosen: list[Move] = []
        freed, seen = 0, set()
        for m in self.candidates(snapshot, need, profile, pins, now, bus):
            if freed >= need:
                break
            if m.candidate.seq_id in seen:
                continue
            seen.add(m.candidate.seq_id)
            self._last_move[m.candidate.seq_id] = now
            freed += m.candidate.freed_bytes
            chosen.append(m)
        return chosen

    def plan_restore(self, snapshot, room: int) -> list[Restore]:
        """Under the low watermark: offloaded blocks to fetch back while ``room`` lasts."""
        out = []
        now = self.clock()
        for seq in snapshot.sequences:
            host = [b for b in seq.blocks if b.tier == "host"]
            if not host or seq.state not in MOVABLE_STATES or self._resting(seq.seq_id, now):
                continue
            take = []
            for b in host:
                if b.nbytes > room:
                    break
                take.append(b.index)
                room -= b.nbytes
            if not take:
                break
            actions = (Fetch(seq.seq_id, tuple(take)),)
            if len(take) == len(host):
                actions += (SetDecodeMode(seq.seq_id, "exact"),)
            self._last_move[seq.seq_id] = now
            out.append(Restore(seq.seq_id, tuple(take), actions))
        return out
