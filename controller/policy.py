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
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace

_log = logging.getLogger("kvctl.controller")

PROFILES = ("balanced", "accuracy-critical", "streaming", "long-context", "throughput",
            "multi-turn")
_STRATEGY_NAME = re.compile(r"^[a-z0-9][a-z0-9_.:+-]{0,63}$")


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
            return previous

    def unpin(self, seq_id: str) -> str | None:
        with self._lock:
            return self._view.pins.pop(seq_id, None)

    def forget(self, live_seq_ids: set[str]) -> None:
        """Drop pins of sequences that no longer exist."""
        with self._lock:
            for s in [s for s in self._view.pins if s not in live_seq_ids]:
                del self._view.pins[s]


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
    """Ring buffer of decisions + fan-out to subscribers (one bounded queue each)."""

    def __init__(self, capacity: int = 1024, subscriber_queue: int = 1024) -> None:
        self._lock = threading.Lock()
        self._ring: collections.deque[Decision] = collections.deque(maxlen=capacity)
        self._ids = itertools.count(1)
        self._subscribers: set[queue.Queue] = set()
        self._qsize = subscriber_queue
        self.counts: collections.Counter[str] = collections.Counter()

    def record(self, d: Decision) -> Decision:
        with self._lock:
            d.id = next(self._ids)
            self._ring.append(d)
            self.counts[d.kind] += 1
            subs = list(self._subscribers)
        for q in subs:
            try:
                q.put_nowait(d)
            except queue.Full:   # a stalled watcher loses decisions, never blocks the loop
                pass
        return d

    def recent(self, n: int | None = None) -> list[Decision]:
        with self._lock:
            items = list(self._ring)
        return items if n is None else items[len(items) - n:] if n else []

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize=self._qsize)
        with self._lock:
            self._subscribers.add(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            self._subscribers.discard(q)

    @property
    def num_subscribers(self) -> int:
        with self._lock:
            return len(self._subscribers)


class Controller:
    """The policy loop's seat. ``tick`` gets every telemetry snapshot.

    It notes when GPU-tier KV bytes cross the high watermark of the budget and when they
    fall back under the low one; with an engine handle it also acts: above the high
    watermark the loop (controller/loop.py) applies the cheapest moves that bring the
    KV back to the low watermark, under the low watermark it fetches offloaded blocks
    back. Every move is logged with its reason, predicted cost and measured effect.
    """

    def __init__(self, policy: PolicyState, log: DecisionLog, handle=None) -> None:
        self.policy = policy
        self.log = log
        self._above = False
        self.loop = None
        if handle is not None:
            from controller.loop import PolicyLoop   # imports torch: daemon side only
            from controller.predictors.learned import predictor_for

            self.loop = PolicyLoop(handle, predictor_for(handle.snapshot().model))

    @staticmethod
    def budget_of(snapshot, policy: PolicyView) -> int:
        if policy.budget_bytes:
            return policy.budget_bytes
        gpu = snapshot.tiers.get("gpu")
        return gpu.capacity_bytes if gpu else 0

    @staticmethod
    def used_of(snapshot) -> int:
        gpu = snapshot.tiers.get("gpu")
        return gpu.used_bytes if gpu else 0

    def tick(self, snapshot, bus_busy: float = 0.0) -> list[Decision]:
        p = self.policy.view()
        budget = self.budget_of(snapshot, p)
        if budget <= 0:
            return []
        used = self.used_of(snapshot)
        frac = used / budget
        out = []
        if not self._above and frac > p.high_watermark:
            self._above = True
            out.append(self.log.record(Decision(
                kind="pressure", profile=p.profile,
                reason=f"GPU-tier KV at {frac:.0%} of the {budget} B budget, above the high "
                       f"watermark {p.high_watermark:.0%}"
                       + ("" if self.loop else "; no engine handle, no actions taken"))))
        elif self._above and frac < p.low_watermark:
            self._above = False
            out.append(self.log.record(Decision(
                kind="pressure_cleared", profile=p.profile,
                reason=f"GPU-tier KV at {frac:.0%} of budget, under the low watermark "
                       f"{p.low_watermark:.0%}")))
        if self.loop is None:
            return out
        try:
            out += self._act(snapshot, p, budget, used, frac, bus_busy)
        except Exception:  # a policy bug must not take the telemetry thread down
            _log.exception("policy loop failed on this snapshot; no moves applied")
        return out

    def _act(self, snapshot, p: PolicyView, budget: int, used: int, frac: float,
             bus_busy: float) -> list[Decision]:
        out: list[Decision] = []
        if frac > p.high_watermark:
            need = used - int(p.low_watermark * budget)
            for move, effect in self.loop.relieve(snapshot, need, p.profile, p.pins, bus_busy):
                c = move.candidate
                ok = isinstance(effect, dict)
                out.append(self.log.record(Decision(
                    kind=c.kind if ok else "refused", seq_id=c.seq_id, profile=p.profile,
                    action=f"{c.strategy} blocks {list(c.blocks)}",
                    predicted_cost=move.accuracy, freed_bytes=effect.get("gpu", 0) if ok else 0,
                    reason=(f"KV at {frac:.0%} > high watermark {p.high_watermark:.0%}: need "
                            f"{need} B; cheapest move by the {move.source} predictor "
                            f"(accuracy cost {move.accuracy:.4f}, "
                            f"+{move.latency_s * 1e3:.2f} ms/step)"
                            + ("" if ok else f"; engine refused: {effect}")))))
        elif frac < p.low_watermark:
            room = int(p.low_watermark * budget) - used
            for seq_id, n, effect in self.loop.restore(snapshot, room):
                ok = isinstance(effect, dict)
                out.append(self.log.record(Decision(
                    kind="fetch" if ok else "refused", seq_id=seq_id, profile=p.profile,
                    action=f"fetch {n} blocks",
                    freed_bytes=effect.get("gpu", 0) if ok else 0,
                    reason=f"KV at {frac:.0%} < low watermark {p.low_watermark:.0%}: undo "
                           "offload while it fits" + ("" if ok else f"; refused: {effect}"))))
        return out
