"""Operator-facing policy state, the decision log, and the place the policy loop plugs in.

``PolicyState`` is what GetPolicy/SetPolicy/Pin/Unpin serve. ``DecisionLog`` keeps the
recent decisions in a ring buffer and fans new ones out to WatchDecisions subscribers.
``Controller.tick(snapshot)`` is called on the telemetry timer; today it records
watermark crossings only. Choosing and applying actions is a later issue and plugs in here.
"""
from __future__ import annotations

import collections
import itertools
import queue
import re
import threading
import time
from dataclasses import dataclass, field, replace

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

    Today it only notes when GPU-tier KV bytes cross the high watermark of the budget
    and when they fall back under the low one; it proposes and applies no actions yet.
    """

    def __init__(self, policy: PolicyState, log: DecisionLog) -> None:
        self.policy = policy
        self.log = log
        self._above = False

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

    def tick(self, snapshot) -> list[Decision]:
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
                       f"watermark {p.high_watermark:.0%}; no actions taken (policy loop not "
                       f"implemented yet)")))
        elif self._above and frac < p.low_watermark:
            self._above = False
            out.append(self.log.record(Decision(
                kind="pressure_cleared", profile=p.profile,
                reason=f"GPU-tier KV at {frac:.0%} of budget, under the low watermark "
                       f"{p.low_watermark:.0%}")))
        return out
