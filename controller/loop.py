"""The policy loop: above the high watermark, the cheapest moves that bring GPU-tier KV
back to the low watermark; under the low watermark, undo reversible moves.

Each tick reads one engine snapshot. The bytes to free are split over the sequences
that may move now, in proportion to their GPU-tier bytes (a sequence that cannot give
its share leaves the rest to the others). Each sequence's allowed strategies (its pin,
else its profile's list) propose moves for its share, priced by the predictor (the
learned one when the loaded model has an artifact, else the heuristic) as accuracy
cost + latency weight x added step latency; the plan takes, over all sequences, the
moves that free the bytes at the least total cost (one per sequence: each the move
that minimises cost - price x bytes, at the least price per byte that frees them;
controller.loop._pick). So a sequence's blocks get
their final format in one move, not by stepping down a format a tick (a lossy block is
never quantized again: controller/strategies/mixed_precision.py). One move per
sequence per tick, and a sequence moved recently waits (hysteresis against flapping);
a move the engine refused is not proposed again until its sequence has new tokens.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from typing import Callable

from controller.predictors.costs import quantize_cost
from controller.predictors.heuristic import HeuristicPredictor
from controller.predictors.learned import LearnedPredictor
from controller.profiles import PROFILES, get_profile
from controller.strategies import Candidate, Context, registry
from controller.strategies.cold_quantization import ColdQuantization
from controller.strategies.mixed_precision import MixedPrecision
from engine.actions import (DropSession, Fetch, KVFormat, Pause, Quantize, SetDecodeMode,
                            SetFillFormat)

# moves only go to sequences in these states: the engine refuses the rest (a prompt still
# being written, a preempted or waiting sequence)
MOVABLE_STATES = ("decode", "stalled", "held", "idle")


@dataclass
class Move:
    candidate: Candidate
    cost: float                                     # total cost per byte freed
    accuracy: float
    latency_s: float
    source: str = "heuristic"                       # the predictor that priced it
    total: float = 0.0                              # accuracy + weight x latency
    num_tokens: int = 0                             # the sequence's, when proposed


@dataclass
class Restore:
    """Offloaded blocks of one sequence to fetch back (and exact decode when all are)."""

    seq_id: str
    blocks: tuple[int, ...]
    actions: tuple


def _queued_only(snapshot) -> bool:
    """Requests wait for room and no running sequence is stalled: the pressure is the
    queue's alone (moves that add step time are not offered for it)."""
    return snapshot.num_waiting > 0 and not snapshot.num_stalled


@dataclass
class PolicyLoop:
    # HeuristicPredictor or LearnedPredictor (controller.predictors.predictor_for)
    predictor: HeuristicPredictor | LearnedPredictor = field(
        default_factory=HeuristicPredictor)
    min_interval_s: float = 1.0                     # per sequence, between two moves
    clock: Callable[[], float] = time.monotonic
    num_resting: int = 0                            # last plan: sequences left to wait
    _last_move: dict[str, float] = field(default_factory=dict)
    _refused: dict[tuple[str, str], int] = field(default_factory=dict)
    # the interpreter is shared with the engine's thread, which gives it up and takes it
    # back at every torch op: while a plan computes, each take waits out the switch
    # interval (5 ms), so a step of ~1,500 ops ran 16.6 ms alone and 7,460 ms beside
    # a 0.75 s plan (2-core box, docs/BENCHMARKS.md). Planning stops for a rest after
    # each slice, holding the interpreter at most ``duty`` of the time.
    slice_s: float = 0.002
    duty: float = 0.25
    _slice_start: float = 0.0
    # room for waiting requests bought only with formats at least this good (and no
    # eviction), None: any move the profile allows. An experiment, off by default: on
    # the default model under a queue at 4x, adaptive's admissions (evictions, k4v2)
    # left its greedy outputs further from the unpressured ones than fixed int4's
    # (docs/BENCHMARKS.md, "What adaptive's admissions cost in output")
    admission_floor: str | None = None
    # the predicted accuracy cost a running sequence may be made to pay, in all, for
    # room for waiting requests by moves below int4 or evicting (None: no limit; moves
    # at int4 or better are not counted). Per sequence, not per byte: evicting cold
    # blocks of a 32K sequence costs it little, evicting 3 of a chat request's 6 blocks
    # or its sink block's 2-bit codes costs it 0.05-0.25 (KL, nats a token) where int4
    # costs 0.003 (the queue workload's moves, docs/BENCHMARKS.md, fifteenth session).
    # Counting the int4 steps too left long sequences at int8 with their allowance
    # spent (2K capacity 8 against int4's 16). The relief of a stalled sequence is not
    # limited. An experiment, off by default
    admission_ceiling: float | None = None
    _spent: dict[str, float] = field(default_factory=dict)

    def _spent_by(self, cand: Candidate) -> float:
        return self._spent.get(cand.seq_id, 0.0)

    def _over_ceiling(self, cand: Candidate, accuracy: float) -> bool:
        """Under a queue: ``cand`` (below int4 or evicting) would take its sequence past
        ``admission_ceiling`` (a fill move's sequence is the request waiting: 0 spent)."""
        return self.admission_ceiling is not None and not _keeps_int4(cand) \
            and self._spent_by(cand) + accuracy > self.admission_ceiling

    def _pace(self) -> None:
        """Between two sequences of a plan: rest once a slice of planning has run."""
        now = time.perf_counter()
        if now - self._slice_start >= self.slice_s:
            if self.duty < 1.0:
                time.sleep((now - self._slice_start) * (1.0 - self.duty) / self.duty)
            self._slice_start = time.perf_counter()

    def allowed(self, seq_pin: str | None, profile: str) -> tuple[str, ...]:
        if seq_pin in PROFILES:
            return PROFILES[seq_pin].strategies
        if seq_pin:
            return (seq_pin,)
        return get_profile(profile).strategies

    def _resting(self, seq_id: str, now: float) -> bool:
        return now - self._last_move.get(seq_id, -1e9) < self.min_interval_s

    def refused(self, move: Move) -> None:
        """The engine refused ``move``: do not propose it again for the same content."""
        c = move.candidate
        self._refused[(c.seq_id, c.strategy)] = move.num_tokens

    def _movable(self, snapshot, now: float) -> list:
        live = {s.seq_id for s in snapshot.sequences}
        if len(self._last_move) + len(self._refused) > 4 * len(live) + 64:
            self._last_move = {k: v for k, v in self._last_move.items() if k in live}
            self._refused = {k: v for k, v in self._refused.items() if k[0] in live}
            self._spent = {k: v for k, v in self._spent.items() if k in live}
        out, self.num_resting = [], 0
        for seq in snapshot.sequences:
            if seq.state not in MOVABLE_STATES or not seq.blocks:
                continue
            if self._resting(seq.seq_id, now):
                self.num_resting += 1
                continue
            out.append(seq)
        return out

    def _priced(self, snapshot, targets: dict[str, int], profile: str, pins: dict[str, str],
                bus=None) -> dict[str, list[Move]]:
        """Every allowed move of each sequence in ``targets`` for its target, priced."""
        ctx = Context.from_snapshot(snapshot)
        strategies = registry()
        # a step's added time (offloaded blocks streamed at every step) delays every
        # sequence in the batch, where a compression's accuracy cost is one sequence's:
        # the latency side is paid once per running sequence. Priced for the mover
        # alone, a 27-sequence batch on an H100 took 490 exact offloads and streamed
        # 20 GB/s at every step (docs/BENCHMARKS.md, the headline's speed side)
        weight = get_profile(profile).latency_weight * max(1, snapshot.num_running)
        # room for requests that wait is not bought with step time: a move that streams
        # blocks at every step slows every sequence running, and the room it frees goes
        # to admitting more, whose blocks then stream too. On an H100 under 4x pressure
        # adaptive admitted all 49 requests by offloading and ran 204 ms steps against
        # pinned int4's 43 (95.4 tok/s against 281.7; docs/BENCHMARKS.md). While a
        # running sequence is stalled such moves stay (the other way out is a preemption)
        queued = _queued_only(snapshot)
        # and so not proposed: an offload streams bytes at every step wherever there is a
        # bus (a quarter of a 49 x 210 plan's time went to offloads dropped here)
        streaming = queued and (bus is None or bus.bytes_per_s is not None)
        items: list[tuple[object, Candidate]] = []
        self._slice_start = time.perf_counter()
        floor = self.admission_floor if queued else None
        for seq in snapshot.sequences:
            target = targets.get(seq.seq_id)
            if target is None:
                continue
            self._pace()
            for name in self.allowed(pins.get(seq.seq_id), profile):
                strat = strategies.get(name)
                if floor is not None and strat is not None:
                    strat = _above_floor(strat, floor)
                if strat is None or self._refused.get((seq.seq_id, name)) == seq.num_tokens \
                        or (streaming and strat.kind == "offload"):
                    continue
                cand = strat.propose(seq, target, ctx)
                if cand is None or cand.freed_bytes <= 0:
                    continue
                items.append((seq, cand))
        out: dict[str, list[Move]] = {sid: [] for sid in targets}
        # one call for the whole tick: the learned model predicts a batch at once
        preds = self.predictor.predict_many(items, bus)
        # like with like: the learned model's KL and the heuristic's PPL fraction are not
        # one unit, so where it fell back on any of a sequence's moves, the heuristic
        # prices all of them (a hot-block plan it never saw priced against evictions it
        # did would be chosen by units, not by cost)
        fell = {seq.seq_id for (seq, _), p in zip(items, preds) if p.source != "learned"}
        heuristic = getattr(self.predictor, "heuristic", None)
        if heuristic is not None and fell:
            preds = [heuristic.predict(seq, c, bus)
                     if seq.seq_id in fell and p.source == "learned" else p
                     for (seq, c), p in zip(items, preds)]
        for (seq, cand), p in zip(items, preds):
            if queued and (p.latency_s > 0 or self._over_ceiling(cand, p.accuracy)):
                continue
            total = p.total(weight)
            out[cand.seq_id].append(Move(cand, total / cand.freed_bytes, p.accuracy,
                                         p.latency_s, p.source, total, seq.num_tokens))
        if not queued:
            for m in self._pauses(snapshot, targets, profile, pins, bus, ctx, weight):
                out[m.candidate.seq_id].append(m)
        return out

    def _pauses(self, snapshot, targets: dict[str, int], profile: str, pins: dict[str, str],
                bus, ctx: Context, weight: float) -> list[Move]:
        """A pause for each decoding sequence in ``targets`` whose allowed strategies
        include an offload, on an engine with a bus (a GPU): every GPU block of it swapped
        to host memory (nothing lost) and no more steps for it until it fits again
        (engine.actions.Pause). Priced as its share of the batch's progress, the tokens it
        does not make: a replayed step's time over the running sequences, added to every
        step as an offload's streaming is (the same latency weight, per running sequence,
        turns it into step time x weight). An offload priced against it streams at every
        step for as long as it lasts: on an H100 under 4x pressure, 19 top-k rows took a
        step from 10 ms replayed to 263 ms eager (~13 ms a row against ~0.2 ms a pause;
        docs/BENCHMARKS.md, fourteenth session). On a CPU engine offload costs no step
        time, so it is not offered there; nor for a sequence that runs alone."""
        if bus is None or bus.bytes_per_s is None or snapshot.num_running < 2:
            return []
        host = ctx.host_free_bytes
        per_row = bus.step_s / snapshot.num_running
        out = []
        for seq in snapshot.sequences:
            gpu = seq.bytes_by_tier.get("gpu", 0)
            if seq.seq_id not in targets or seq.state not in ("decode", "stalled") \
                    or gpu <= 0 or (host is not None and gpu > host) \
                    or not any(n.startswith("offload")
                               for n in self.allowed(pins.get(seq.seq_id), profile)):
                continue
            cand = Candidate("pause", seq.seq_id, (Pause(seq.seq_id),),
                             tuple(b.index for b in seq.blocks if b.tier == "gpu"), gpu,
                             True, "pause")
            total = per_row * weight
            out.append(Move(cand, total / gpu, 0.0, per_row, "step time", total,
                            seq.num_tokens))
        return out

    def candidates(self, snapshot, need: int, profile: str, pins: dict[str, str],
                   now: float, bus=None) -> list[Move]:
        """Every allowed move of every sequence that may move now, each proposed for the
        sequence's share of ``need``; cheapest per byte first."""
        targets = _shares(self._movable(snapshot, now), need)
        moves = [m for ms in self._priced(snapshot, targets, profile, pins, bus).values()
                 for m in ms]
        return sorted(moves, key=lambda m: m.cost)

    def plan_relief(self, snapshot, need: int, profile: str, pins: dict[str, str],
                    bus=None, floor: int | None = None,
                    stream: int | None = None) -> list[Move]:
        """One move per sequence that may move now: together they free ``need`` GPU
        bytes at the least predicted cost the strategies offer (fewer bytes if the
        allowed moves run out). The engine applies them.

        ``floor`` (<= need): the bytes that must go now (under the high watermark); the
        rest is headroom. A sequence whose move for its share of ``need`` evicts takes a
        move that evicts nothing where one frees its share of ``floor``: an eviction is
        for good, so it waits until quantizing cannot keep the budget (a growing
        sequence's new blocks at int4 defer it by a few blocks, not forever).

        ``stream`` (default ``floor``): the most that moves adding step time (offloads,
        pauses) may free: the floor less what the next waiting request's admission needs.
        While a sequence is stalled and a request waits, the floor held both; an H100
        run then paused 22 running sequences at once (4 GB, KV from 91% to 47% of the
        budget) for one request's 1.67 GB (docs/BENCHMARKS.md, fourteenth session)."""
        now = self.clock()
        seqs = self._movable(snapshot, now)
        # idle sessions first: they give everything they hold before a live sequence
        # gives anything (park on host losslessly, else quantize, else drop)
        idle = [s for s in seqs if s.state == "idle" and s.bytes_by_tier.get("gpu", 0)]
        first = self._relieve_idle(snapshot, idle, need, profile, bus) if idle else []
        for m in first:
            self._last_move[m.candidate.seq_id] = now
        need -= sum(m.candidate.freed_bytes for m in first)
        seqs = [s for s in seqs if s.state != "idle"]
        fill = self._fill_moves(snapshot, profile, pins)
        queued = _queued_only(snapshot)
        if queued:
            fill = [m for m in fill if not self._over_ceiling(m.candidate, m.accuracy)]
        if need <= 0 or not (seqs or fill):
            return first
        targets = _shares(seqs, need)
        priced = self._priced(snapshot, targets, profile, pins, bus) if seqs else {}
        if fill:
            priced[fill[0].candidate.seq_id] = fill
        chosen = _pick(priced, need)
        short = need - _freed(chosen)
        can = [s for s in seqs if any(m.candidate.freed_bytes >= targets[s.seq_id]
                                      for m in priced[s.seq_id])]
        if short > 0 and can and len(can) < len(seqs):
            # the sequences that could give their share offer more, in proportion
            more = {sid: targets[sid] + n for sid, n in _shares(can, short).items()}
            for sid, ms in self._priced(snapshot, more, profile, pins, bus).items():
                priced[sid] = priced[sid] + ms
            chosen = _pick(priced, need)
        limit = floor if stream is None or floor is None else min(floor, stream)
        if limit is not None and 0 <= limit < need:
            chosen = _stream_for_floor_only(priced, chosen, need, limit)
        if floor is not None and 0 <= floor < need:
            if floor > 0:
                self._defer_evictions(snapshot, chosen, _shares(seqs, floor), profile,
                                      pins, bus)
        out = sorted((m for m in chosen.values() if m), key=lambda m: m.cost)
        for m in out:
            self._last_move[m.candidate.seq_id] = now
            if queued and self.admission_ceiling is not None \
                    and not _keeps_int4(m.candidate):
                self._spent[m.candidate.seq_id] = self._spent_by(m.candidate) + m.accuracy
        return first + out

    def _fill_moves(self, snapshot, profile: str, pins: dict[str, str]) -> list[Move]:
        """The request the engine admits next, written in a lossy format as it fills
        (SetFillFormat), one move per format its allowed strategies quantize to: it
        frees what its admission would need at full precision less what it needs in
        that format. Priced as that format over the whole prompt (all its attention,
        all its blocks: quantize_cost), since nothing it attends to is known before it
        is written. Cheaper per byte than compressing the running sequences' blocks
        where those are already in their last formats; written so, a prompt is never
        written full only to be quantized a tick later (both bytes and work: on an H100
        under 4x pressure, 99 quantizations and 97 evictions of running sequences where
        a pinned int4, its prompts written int4, made 9; docs/BENCHMARKS.md)."""
        sid, need = snapshot.next_admission, snapshot.admission_bytes
        view = next((s for s in snapshot.sequences if s.seq_id == sid), None) if sid else None
        if view is None or view.fill_format != "full" or not need.get("full"):
            return []
        strategies = registry()
        formats = {f for name in self.allowed(pins.get(sid), profile)
                   if (strat := strategies.get(name)) is not None
                   for f in strat.fill_formats}
        if self.admission_floor is not None:
            least = KVFormat.parse(self.admission_floor)
            formats = {f for f in formats if _at_least(KVFormat.parse(f), least)}
        out = []
        for f in sorted(formats):
            fmt = KVFormat.parse(f)
            if fmt.k_bits < 4:
                # keys need the bits (FACTS), and a prompt not yet written has no
                # statistics to pick the blocks that could do without: 2-bit keys go
                # block by block (mixed_precision), never over a whole prompt. Offered,
                # int2 over a whole prompt (0.177) undercut evicting running blocks in
                # the CPU speed run
                continue
            freed = need["full"] - need.get(f, need["full"])
            if freed <= 0 or self._refused.get((sid, f"fill_{f}")) == view.num_tokens:
                continue
            cand = Candidate(f"fill_{f}", sid, (SetFillFormat(sid, fmt.k_bits, fmt.v_bits,
                                                             fmt.fp8),),
                             (), freed, False, "fill")
            cost = quantize_cost(f, 1.0, 1.0)
            out.append(Move(cand, cost / freed, cost, 0.0, "heuristic", cost,
                            view.num_tokens))
        return out

    def _defer_evictions(self, snapshot, chosen: dict, floors: dict[str, int], profile: str,
                         pins: dict[str, str], bus) -> None:
        """Replace, in ``chosen``, each evicting move by the cheapest move that evicts
        nothing and frees the sequence's ``floors`` share, where there is one."""
        evicting = {sid: floors[sid] for sid, m in chosen.items()
                    if m and m.candidate.kind == "evict"}
        if not evicting:
            return
        for sid, ms in self._priced(snapshot, evicting, profile, pins, bus).items():
            keep = _best([m for m in ms if m.candidate.kind != "evict"], evicting[sid])
            if keep is not None and keep.candidate.freed_bytes >= evicting[sid]:
                chosen[sid] = keep

    def _relieve_idle(self, snapshot, idle: list, need: int, profile: str, bus) -> list[Move]:
        """One move per idle session, least recently used first, until ``need`` is met:
        all its movable blocks to the host tier (top-k decode mode, so the staging
        buffer does not bound it: it is not decoding, and its next turn fetches them
        back), else the mixed-precision plan for all of them, else ``DropSession``. An
        idle session streams nothing and reads nothing, so none of these slows a step;
        only quantization costs accuracy, priced as for any sequence."""
        ctx = Context.from_snapshot(snapshot)
        strategies = registry()
        idle_s = {s.get("seq_id") or f"session/{s['session_id']}": s.get("idle_s", 0.0)
                  for s in getattr(snapshot, "sessions", [])}
        out: list[Move] = []
        for seq in sorted(idle, key=lambda s: -idle_s.get(s.seq_id, 0.0)):
            if need <= 0:
                break
            gpu = seq.bytes_by_tier.get("gpu", 0)
            move = None
            park = strategies.get("offload_exact")
            cand = park.propose(seq, gpu, replace(ctx, staging_bytes=0)) if park else None
            if cand is not None and cand.freed_bytes > 0:
                actions = (SetDecodeMode(seq.seq_id, "topk", 1),) + cand.actions
                move = Move(replace(cand, actions=actions, strategy="park_idle_session"),
                            0.0, 0.0, 0.0, "idle-session", 0.0, seq.num_tokens)
            if move is None and (mixed := strategies.get("mixed_precision")) is not None:
                cand = mixed.propose(seq, min(gpu, need), ctx)
                if cand is not None and cand.freed_bytes > 0:
                    p = self.predictor.predict_many([(seq, cand)], bus)[0]
                    total = p.total(get_profile(profile).latency_weight)
                    move = Move(cand, total / cand.freed_bytes, p.accuracy, p.latency_s,
                                p.source, total, seq.num_tokens)
            if move is None:
                # nothing to park or quantize: the session goes (its next turn prefills
                # again; no accuracy is lost), unless it is parked already or holds
                # nothing movable (dropping it would free one block and lose the rest)
                if any(b.tier == "host" for b in seq.blocks) or not any(
                        b.tier == "gpu" and not b.shared for b in seq.blocks[:-1]):
                    continue
                cand = Candidate("drop_idle_session", seq.seq_id, (DropSession(seq.seq_id),),
                                 tuple(b.index for b in seq.blocks), gpu, True, "evict")
                move = Move(cand, 0.0, 0.0, 0.0, "idle-session", 0.0, seq.num_tokens)
            out.append(move)
            need -= move.candidate.freed_bytes
        return out

    def explain_unmet(self, snapshot, profile: str, pins: dict[str, str], bus=None) -> str:
        """Where the GPU-tier bytes sit when no allowed move frees anything more."""
        newest = lossy = full = fixed = 0
        for seq in snapshot.sequences:
            gpu = [b for b in seq.blocks if b.tier == "gpu"]
            if seq.state not in MOVABLE_STATES:
                fixed += sum(b.nbytes for b in gpu)
                continue
            last = seq.blocks[-1].index if seq.blocks else -1
            for b in gpu:
                if b.index == last:
                    newest += b.nbytes
                elif b.fmt != "full":
                    lossy += b.nbytes
                else:
                    full += b.nbytes
        names = sorted({n for s in snapshot.sequences
                        for n in self.allowed(pins.get(s.seq_id), profile)})
        held = ("; offloads are not offered while requests wait and nothing running "
                "is stalled (the room would slow every step)"
                if bus is not None and bus.bytes_per_s is not None and _queued_only(snapshot)
                and any(n.startswith("offload") for n in names) else "")
        return (f"{newest} B in newest blocks (kept at full precision), {lossy} B in blocks "
                f"already in their final lossy format, {full} B in full-precision blocks, "
                f"{fixed} B in sequences that cannot move now (prefill, waiting, "
                f"preempted); allowed moves: {', '.join(names) or 'none'}{held}")

    def plan_restore(self, snapshot, room: int) -> list[Restore]:
        """Offloaded blocks to fetch back while ``room`` lasts, the most attended first."""
        out = []
        now = self.clock()
        for seq in snapshot.sequences:
            host = [b for b in seq.blocks if b.tier == "host"]
            if not host or seq.state not in MOVABLE_STATES or seq.state == "idle" \
                    or self._resting(seq.seq_id, now):
                continue            # an idle session's next turn fetches its own blocks
            take = []
            for b in sorted(host, key=lambda b: (-b.mass, b.index)):
                if b.nbytes > room:
                    break
                take.append(b.index)
                room -= b.nbytes
            if not take:
                break
            actions = (Fetch(seq.seq_id, tuple(sorted(take))),)
            if len(take) == len(host):
                actions += (SetDecodeMode(seq.seq_id, "exact"),)
            self._last_move[seq.seq_id] = now
            out.append(Restore(seq.seq_id, tuple(sorted(take)), actions))
        return out


def _at_least(fmt: KVFormat, least: KVFormat) -> bool:
    """Both sides keep at least ``least``'s bits (full precision counts as 16)."""
    bits = lambda b: b or 16  # noqa: E731
    return bits(fmt.k_bits) >= bits(least.k_bits) and bits(fmt.v_bits) >= bits(least.v_bits)


_INT4 = KVFormat.parse("int4")


def _keeps_int4(cand: Candidate) -> bool:
    """Every action of the move (of each part of a plan) quantizes to int4 or better or
    sets such a fill format: nothing evicted, offloaded or below 4 bits."""
    acts = [a for part in (cand.parts or (cand,)) for a in part.actions]
    return bool(acts) and all(
        isinstance(a, (Quantize, SetFillFormat))
        and _at_least(KVFormat(a.bits, a.bits if a.v_bits is None else a.v_bits, a.fp8),
                      _INT4)
        for a in acts)


def _above_floor(strat, floor: str):
    """``strat`` as it may be used to admit waiting requests under ``admission_floor``:
    a mixed-precision plan down to the floor without eviction; a fixed format or an
    eviction below it: None (not offered); anything else as it is."""
    least = KVFormat.parse(floor)
    if isinstance(strat, MixedPrecision):
        keep = tuple(f for f in strat.formats if _at_least(KVFormat.parse(f), least))
        return MixedPrecision(formats=keep, evict=False, recent_blocks=strat.recent_blocks,
                              variant=strat.variant) if keep else None
    if isinstance(strat, ColdQuantization):
        return strat if _at_least(strat.fmt, least) else None
    return None if strat.kind == "evict" else strat


def _shares(seqs: list, need: int) -> dict[str, int]:
    """``need`` split over ``seqs`` in proportion to their GPU-tier bytes."""
    gpu = {s.seq_id: s.bytes_by_tier.get("gpu", 0) for s in seqs}
    total = sum(gpu.values())
    if total <= 0:
        return {sid: need for sid in gpu}
    return {sid: max(1, math.ceil(need * n / total)) for sid, n in gpu.items()}


def _pick(priced: dict[str, list[Move]], need: int) -> dict[str, Move | None]:
    """One move or none per sequence, together freeing ``need`` bytes at the least total
    predicted cost. Each sequence takes the move that minimises total - price x freed
    (none: 0) at the least price per byte at which together they free ``need``; where
    no price does, each its largest move. A sequence whose cheap move frees less than
    its share leaves the rest to the others' cheap bytes rather than paying for its
    own dear ones: taking "the move that meets the share, else the one that frees most"
    chose a top-k offload at cost 0.29 over a quantization at 0.14 freeing 12% fewer
    bytes in 30 of 35 such choices of one run (the CPU speed smoke)."""
    def at(price: float, large: bool = True) -> dict[str, Move | None]:
        """Each sequence's move at this price; on a tie the larger (or smaller) one."""
        sign = -1 if large else 1
        out: dict[str, Move | None] = {}
        for sid, ms in priced.items():
            m = min(ms, key=lambda m: (m.total - price * m.candidate.freed_bytes,
                                       sign * m.candidate.freed_bytes), default=None)
            v = None if m is None else m.total - price * m.candidate.freed_bytes
            out[sid] = m if v is not None and (v < 0 or large and v == 0) else None
        return out

    # the prices where a choice changes: a move's cost per byte, and the step from one
    # move of a sequence to a larger one
    prices = {m.total / m.candidate.freed_bytes for ms in priced.values() for m in ms}
    for ms in priced.values():
        for a in ms:
            for b in ms:
                df = b.candidate.freed_bytes - a.candidate.freed_bytes
                if df > 0 and b.total > a.total:
                    prices.add((b.total - a.total) / df)
    ladder = sorted(p for p in prices if p >= 0)
    lo, hi = 0, len(ladder)           # the least rung that frees need: binary search
    while lo < hi:                    # (what a price frees never falls as it rises)
        mid = (lo + hi) // 2
        if _freed(at(ladder[mid])) >= need:
            hi = mid
        else:
            lo = mid + 1
    if lo < len(ladder):
        # at that price sequences may be indifferent between two moves (the same step
        # up costs the same per byte): they step up one at a time, only as many as the
        # need takes (identical sequences would all step up at once)
        chosen, up = at(ladder[lo], large=False), at(ladder[lo])
        gain = lambda sid: (up[sid].candidate.freed_bytes if up[sid] else 0) - (  # noqa: E731
            chosen[sid].candidate.freed_bytes if chosen[sid] else 0)
        total = _freed(chosen)
        for sid in sorted(priced, key=gain, reverse=True):
            if total >= need:
                break
            total += gain(sid)
            chosen[sid] = up[sid]
        return chosen
    return {sid: max(ms, key=lambda m: (m.candidate.freed_bytes, -m.total), default=None)
            for sid, ms in priced.items()}


def _freed(chosen: dict[str, Move | None]) -> int:
    """Bytes a choice of one move (or none) per sequence frees."""
    return sum(m.candidate.freed_bytes for m in chosen.values() if m)


def _stream_for_floor_only(priced: dict[str, list[Move]], chosen: dict[str, Move | None],
                           need: int, floor: int) -> dict[str, Move | None]:
    """``chosen`` (for ``need``) again without the moves that add step time (blocks
    streamed, or top-k pages read, at every step from now on) where it holds any: the
    headroom down to the low watermark is not bought with every later step's time. The
    least-cost moves without them for ``need`` where they free it; else for ``floor``
    (the bytes that must go now; the rest of the headroom waits for the next ticks);
    where those cannot free ``floor`` either, the least-cost moves of all for ``floor``.
    For headroom, an H100 run's relief put 30 of 49 sequences on top-k pages, most for
    2 blocks (3-5 MB each), where the sequences stalled for a block needed a few MB: its
    steps then ran at ~100 ms instead of ~15 (docs/BENCHMARKS.md, twelfth session)."""
    if not any(m and m.latency_s > 0 for m in chosen.values()):
        return chosen
    still = {sid: [m for m in ms if m.latency_s <= 0] for sid, ms in priced.items()}
    alt = _pick(still, need)
    if _freed(alt) >= need:
        return alt
    alt = _pick(still, floor)
    if _freed(alt) >= floor:
        return alt
    return _pick(priced, floor)


def _best(moves: list[Move], target: int) -> Move | None:
    """The cheapest move that frees ``target``; when none does, the one freeing most."""
    if not moves:
        return None
    enough = [m for m in moves if m.candidate.freed_bytes >= target]
    if enough:
        return min(enough, key=lambda m: (m.total, -m.candidate.freed_bytes))
    return max(moves, key=lambda m: (m.candidate.freed_bytes, -m.total))
