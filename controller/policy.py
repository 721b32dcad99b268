"""Operator-facing policy state, the decision log, and the place the policy loop plugs in.

``PolicyState`` is what GetPolicy/SetPolicy/Pin/Unpin serve. ``DecisionLog`` keeps the
recent decisions in a ring buffer and fans new ones out to WatchDecisions subscribers.
``Controller.tick(snapshot)`` is called on the telemetry timer: it records watermark
crossings and, given the engine's handle, runs the policy loop (controller/loop.py).
"""
from __future__ import annotations

import collections
import itertools
import logging
import re
import threading
import time
from typing import Callable
from dataclasses import dataclass, field, replace

from controller.predictors.bus import Bus
from controller.profiles import PROFILE_NAMES

_log = logging.getLogger("kvctl.controller")

PROFILES = PROFILE_NAMES
_STRATEGY_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:+-]{0,63}$")


# decode steps of growth a lossy relief leaves room for under the high watermark
HEADROOM_TOKENS = 32


def check_watermarks(high: float, low: float) -> None:
    if not 0 < high <= 1:
        raise ValueError(f"high watermark must be in (0, 1], got {high}")
    if not 0 <= low < high:
        raise ValueError(f"low watermark must be in [0, high={high}), got {low}")


def known_strategies() -> set[str] | None:
    """Names a pin may use: controller.strategies' registry plus the profile names, or
    None when the registry cannot be loaded (then any well-formed name is accepted)."""
    global _KNOWN
    if _KNOWN is None:
        try:
            from controller.strategies import registry   # imports torch: daemon side only
        except ImportError:
            return None
        _KNOWN = set(registry()) | set(PROFILES)
    return _KNOWN


_KNOWN: set[str] | None = None


def check_strategy_name(name: str) -> str:
    if not _STRATEGY_NAME.match(name or ""):
        raise ValueError(f"strategy must be a short lowercase name like 'quantize_int4' or "
                         f"'heavy_hitter', got {name!r}")
    known = known_strategies()
    if known is not None and name not in known:
        raise ValueError(f"unknown strategy {name!r}; known: {', '.join(sorted(known))}")
    return name


@dataclass(frozen=True)
class PolicyView:
    profile: str
    budget_bytes: int
    high_watermark: float
    low_watermark: float
    pins: dict[str, str]


class PolicyState:
    """Thread-safe. Every change is validated in full before anything changes."""

    def __init__(self, profile: str = "balanced", budget_bytes: int = 0,
                 high_watermark: float = 0.9, low_watermark: float = 0.75) -> None:
        self._lock = threading.Lock()
        self._pinned_at: dict[str, float] = {}   # seq id -> unix time of its pin
        self._view = PolicyView(profile, budget_bytes, high_watermark, low_watermark, {})
        self.update(profile=profile, budget_bytes=budget_bytes,
                    high_watermark=high_watermark, low_watermark=low_watermark)

    def view(self) -> PolicyView:
        with self._lock:
            return replace(self._view, pins=dict(self._view.pins))

    def update(self, profile: str | None = None, budget_bytes: int | None = None,
               high_watermark: float | None = None, low_watermark: float | None = None) -> PolicyView:
        with self._lock:
            v = self._view
            new = replace(v,
                          profile=v.profile if profile is None else profile,
                          budget_bytes=v.budget_bytes if budget_bytes is None else budget_bytes,
                          high_watermark=v.high_watermark if high_watermark is None else high_watermark,
                          low_watermark=v.low_watermark if low_watermark is None else low_watermark)
            if new.profile not in PROFILES:
                raise ValueError(f"profile must be one of {', '.join(PROFILES)}, got {new.profile!r}")
            if new.budget_bytes < 0:
                raise ValueError(f"budget_bytes must be >= 0, got {new.budget_bytes}")
            check_watermarks(new.high_watermark, new.low_watermark)
            self._view = new
            return replace(new, pins=dict(new.pins))

    def pin(self, seq_id: str, strategy: str) -> str | None:
        check_strategy_name(strategy)
        with self._lock:
            previous = self._view.pins.get(seq_id)
            self._view.pins[seq_id] = strategy
            self._pinned_at[seq_id] = time.time()
            return previous

    def unpin(self, seq_id: str) -> str | None:
        with self._lock:
            return self._view.pins.pop(seq_id, None)

    def forget(self, live_seq_ids: set[str], as_of: float | None = None) -> None:
        """Drop pins of sequences that no longer exist: absent from a snapshot taken at
        ``as_of`` (unix time) and pinned before it (a pin newer than the snapshot may
        name a sequence the snapshot could not show yet)."""
        with self._lock:
            for s in [s for s in self._view.pins if s not in live_seq_ids]:
                if as_of is None or self._pinned_at.get(s, 0.0) < as_of:
                    del self._view.pins[s]
                    self._pinned_at.pop(s, None)


@dataclass
class Decision:
    kind: str
    reason: str
    seq_id: str = ""
    action: str = ""
    predicted_cost: float = 0.0
    freed_bytes: int = 0
    profile: str = ""
    time: float = field(default_factory=time.time)
    id: int = 0


class DecisionLog:
    """Ring buffer of decisions + fan-out to subscribers.

    A subscriber is a callback, called on the recording thread with each new decision;
    it must not block (the daemon's watchers hand the decision to the event loop and
    keep a bounded queue there, controller/service.py)."""

    def __init__(self, capacity: int = 1024) -> None:
        self._lock = threading.Lock()
        self._ring: collections.deque[Decision] = collections.deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._subscribers: dict[int, Callable[[Decision], None]] = {}
        self._tokens = itertools.count(1)
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self, d: Decision) -> Decision:
        with self._lock:
            d.id = next(self._ids)
            self._ring.append(d)
            self.counts[d.kind] += 1
            subs = list(self._subscribers.values())
        for fn in subs:
            try:
                fn(d)
            except Exception:   # a broken watcher never stops the policy
                _log.exception("decision subscriber failed")
        return d

    def recent(self, n: int | None = None) -> list[Decision]:
        with self._lock:
            items = list(self._ring)
        return items if n is None else items[max(0, len(items) - n):] if n else []

    def subscribe(self, fn: Callable[[Decision], None]) -> int:
        """Call ``fn(decision)`` for every decision recorded from now on; returns a token
        for ``unsubscribe``."""
        with self._lock:
            token = next(self._tokens)
            self._subscribers[token] = fn
        return token

    def unsubscribe(self, token: int) -> None:
        with self._lock:
            self._subscribers.pop(token, None)

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


class Controller:
    """The policy loop's seat. ``tick`` gets every telemetry snapshot, on one thread.

    It notes when GPU-tier KV bytes cross the high watermark of the budget (never more
    than the GPU tier holds) and when they fall back under the low one. The bytes are
    the blocks' exact slot bytes (``TierView.block_bytes``), the same bytes a move's
    ``freed_bytes`` counts and the engine reports freed, not the allocator's pages (a
    page holding one small slot would count whole, and moves that free no page would
    seem to do nothing). With an engine handle it also acts: above the high watermark,
    or while sequences are stalled for want of a block, the loop (controller/loop.py)
    picks the cheapest moves that bring the KV back to ``relief_mark`` (the low
    watermark with a host tier; just under the high one without) and hands them
    to the engine, which applies each whole or not at all between two steps. Offloaded
    blocks come back only under ``restore_mark`` (one watermark gap under the low
    watermark) and only up to it, so a relief's overshoot (under one block) and a few
    steps' growth never fetch back what was just moved out. Each outcome is logged with
    its reason, predicted cost and the bytes it really freed, on the tick after the
    engine applied it (at once when the engine runs inline). When no allowed move frees
    anything more and none waits on a rate limit, the budget is logged 'unmet' once,
    with where the bytes sit, and the loop makes no more moves until something changes
    (new tokens, the budget, the profile).
    """

    def __init__(self, policy: PolicyState, log: DecisionLog, handle=None,
                 clock=time.monotonic) -> None:
        self.policy = policy
        self.log = log
        self.handle = handle
        self._lock = threading.Lock()
        self._above = False
        self._unmet = False
        self._pending: tuple | None = None      # (future, kind, items, spans, context)
        self._min_version = 0
        self.loop = None
        if handle is not None:
            from controller.loop import PolicyLoop   # imports torch: daemon side only
            from controller.predictors.learned import predictor_for

            self.loop = PolicyLoop(predictor_for(handle.snapshot().model), clock=clock)

    @staticmethod
    def budget_of(snapshot, policy: PolicyView) -> int:
        """The budget in force: the operator's, never more than the GPU tier holds."""
        gpu = snapshot.tiers.get("gpu") if snapshot is not None else None
        cap = gpu.capacity_bytes if gpu else 0
        if policy.budget_bytes:
            return min(policy.budget_bytes, cap) if cap else policy.budget_bytes
        return cap

    @staticmethod
    def used_of(snapshot) -> int:
        """GPU-tier KV bytes: the live blocks' exact slot bytes."""
        gpu = snapshot.tiers.get("gpu")
        return gpu.block_bytes if gpu else 0

    @staticmethod
    def relief_mark(snapshot, policy: PolicyView, budget: int) -> float:
        """Fraction of the budget a relief brings the KV down to. With a host tier the
        low watermark: moves there are lossless (offload, fetched back under the restore
        mark), and the gap keeps the loop from acting at every step. Without one every
        move loses accuracy, so it frees only what the budget needs: down to the high
        watermark less the room the growing sequences fill in ``HEADROOM_TOKENS`` more
        tokens (never under the low watermark). The 0.90 / 0.75 defaults otherwise
        compress 15% of the budget more than it asks. Growing: the running sequences and
        the held ones (kept to be appended to: a question after a document, a tool's
        result). Without room for them, a held sequence compressed to exactly the mark
        met its first appended block with every older block lossy already, so that
        relief could only evict (the headline suite at 4K / 50%: one evicted block,
        KL 0.0091 against fixed int4's 0.0023)."""
        host = snapshot.tiers.get("host")
        if host is not None and host.capacity_bytes > 0:
            return policy.low_watermark
        per_token = snapshot.format_bytes.get("full", 0) / max(1, snapshot.block_size)
        growing = snapshot.num_running + sum(1 for v in snapshot.sequences if v.state == "held")
        growth = growing * HEADROOM_TOKENS * per_token / max(1, budget)
        return max(policy.low_watermark, policy.high_watermark - growth)

    @staticmethod
    def restore_mark(policy: PolicyView) -> float:
        """Fraction of the budget under which offloaded blocks come back (up to it)."""
        return max(0.0, 2 * policy.low_watermark - policy.high_watermark)

    def tick(self, snapshot, gpu=None) -> list[Decision]:
        """``gpu``: the telemetry sample's GpuSample (the bus offload would use)."""
        if not self._lock.acquire(blocking=False):
            return []                 # a tick is running: one at a time, never queued
        try:
            return self._tick(snapshot, Bus.of(snapshot, gpu))
        finally:
            self._lock.release()

    def _tick(self, snapshot, bus) -> list[Decision]:
        out = self._collect()
        p = self.policy.view()
        budget = self.budget_of(snapshot, p)
        if budget <= 0:
            return out
        used = self.used_of(snapshot)
        frac = used / budget
        stalled = snapshot.num_stalled
        # a request that waits for room is pressure too: compressing what runs admits it
        # (capacity), where an engine alone would queue it until others finish
        queued = snapshot.num_waiting > 0 and snapshot.pressure_bytes > 0
        above = frac > p.high_watermark or stalled > 0 or queued
        if not self._above and above:
            self._above = True
            why = (f"GPU-tier KV at {frac:.0%} of the {budget} B budget, above the high "
                   f"watermark {p.high_watermark:.0%}" if frac > p.high_watermark else
                   f"{stalled} sequence(s) stalled waiting for a KV block" if stalled else
                   f"{snapshot.num_waiting} request(s) waiting for "
                   f"{snapshot.pressure_bytes} B of KV room")
            out.append(self.log.record(Decision(
                kind="pressure", profile=p.profile,
                reason=why + ("" if self.loop else "; no engine handle, no actions taken"))))
        elif self._above and frac < p.low_watermark and not stalled and not queued:
            self._above = self._unmet = False
            out.append(self.log.record(Decision(
                kind="pressure_cleared", profile=p.profile,
                reason=f"GPU-tier KV at {frac:.0%} of budget, under the low watermark "
                       f"{p.low_watermark:.0%}")))
        if self.loop is None or self._pending is not None \
                or snapshot.version < self._min_version:
            return out                # the engine has not shown the last moves yet
        try:
            if above:
                def over(mark: float) -> int:   # bytes above a mark, or what waits for room
                    return max(used - int(mark * budget), snapshot.pressure_bytes)
                # what only moves that slow every step may free (offload, pause): the
                # bytes over the high watermark and what stalled sequences need, never
                # the next admission's (one request in, many running ones out)
                stream = max(used - int(p.high_watermark * budget), snapshot.stalled_bytes)
                out += self._relieve(snapshot, p, over(self.relief_mark(snapshot, p, budget)),
                                     frac, bus, over(p.high_watermark), stream)
            elif frac < self.restore_mark(p):
                self._restore(snapshot, p, frac, int(self.restore_mark(p) * budget) - used)
        except Exception:  # a policy bug must not take the telemetry thread down
            _log.exception("policy loop failed on this snapshot; no moves applied")
        return out + self._collect()

    def _relieve(self, snapshot, p: PolicyView, need: int, frac: float,
                 bus, floor: int | None = None, stream: int | None = None) -> list[Decision]:
        moves = self.loop.plan_relief(snapshot, need, p.profile, p.pins, bus, floor, stream)
        if not moves:
            if self._unmet or self.loop.num_resting:
                return []     # said so already, or a sequence moved recently may move again
            self._unmet = True
            budget = self.budget_of(snapshot, p)
            return [self.log.record(Decision(
                kind="unmet", profile=p.profile,
                reason=f"budget unmet: GPU-tier KV holds {self.used_of(snapshot)} B, "
                       f"{frac:.0%} of the {budget} B budget; {need} B more must be freed "
                       f"to reach {self.relief_mark(snapshot, p, budget):.0%} of it, but "
                       f"no move "
                       f"the {p.profile!r} profile (and pins) allow frees anything more: "
                       + self.loop.explain_unmet(snapshot, p.profile, p.pins, bus)
                       + ". No more moves until the sequences, the budget or the profile "
                         "change; sequences wait for room and the engine preempts if they "
                         "stall"))]
        why = (f"KV at {frac:.0%} > high watermark {p.high_watermark:.0%}" if
               frac > p.high_watermark else f"{snapshot.num_stalled} sequence(s) stalled"
               if snapshot.num_stalled else f"{snapshot.num_waiting} request(s) waiting")
        self._submit("relieve", moves, (p, why, need, bus.source))
        return []

    def _restore(self, snapshot, p: PolicyView, frac: float, room: int) -> None:
        items = self.loop.plan_restore(snapshot, room)
        if items:
            self._submit("restore", items, (p, frac))

    def _submit(self, kind: str, items: list, context) -> None:
        if kind == "relieve":
            steps = [m.candidate.steps for m in items]
        else:
            steps = [[m.actions] for m in items]
        flat = [a for s in steps for a in s]
        self._pending = (self.handle.submit_candidates(flat), kind, items,
                         [len(s) for s in steps], context)

    def _collect(self) -> list[Decision]:
        """Decisions for the last submission, once the engine has applied it."""
        if self._pending is None or not self._pending[0].done():
            return []
        fut, kind, items, spans, context = self._pending
        self._pending = None
        try:
            flat = fut.result()
        except Exception as e:   # the engine stopped: nothing was applied
            _log.warning("moves not applied: %s", e)
            return []
        self._min_version = self.handle.snapshot().version
        out = []
        at = 0
        for item, n in zip(items, spans):
            results, at = flat[at:at + n], at + n
            gpu = sum(r.freed_bytes.get("gpu", 0) for r in results if r.ok)
            done = any(r.ok for r in results)
            errors = "; ".join(r.error for r in results if not r.ok)
            if kind == "relieve":
                p, why, need, bus_source = context
                c = item.candidate
                if errors:
                    self.loop.refused(item)
                out.append(self.log.record(Decision(
                    kind=c.kind if done else "refused", seq_id=c.seq_id, profile=p.profile,
                    action=f"pause ({len(c.blocks)} GPU blocks swapped to host)"
                    if c.kind == "pause" else f"{c.strategy} " + ("; ".join(
                        f"{q.strategy.removeprefix('quantize_')} blocks {list(q.blocks)}"
                        for q in c.parts) if c.parts else f"blocks {list(c.blocks)}"
                        if c.blocks else "(the prompt as it is written)"),
                    predicted_cost=item.accuracy, freed_bytes=gpu,
                    reason=(f"{why}: need {need} B; cheapest move by the {item.source} "
                            f"predictor (accuracy cost {item.accuracy:.4f}, "
                            f"+{item.latency_s * 1e3:.2f} ms/step; bus: {bus_source})"
                            + (f"; its admission needs {c.freed_bytes} B less"
                               if c.kind == "fill" else "")
                            + (f"; engine refused{' part of it' if done else ''}: {errors}"
                               if errors else "")))))
            else:
                p, frac = context
                out.append(self.log.record(Decision(
                    kind="fetch" if done else "refused", seq_id=item.seq_id,
                    profile=p.profile, action=f"fetch {len(item.blocks)} blocks",
                    freed_bytes=gpu,
                    reason=f"KV at {frac:.0%} < {self.restore_mark(p):.0%} of budget (one "
                           "watermark gap under the low watermark): undo offload while it "
                           "fits" + (f"; refused: {errors}" if errors else ""))))
        return out
