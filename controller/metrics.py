"""Prometheus metrics (own registry; served on a separate port, 127.0.0.1 by default)."""
from __future__ import annotations

import bisect
import collections
import itertools
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.utils import floatToGoString

from controller.predictors.counters import FALLBACKS   # torch-free


# sequence states (engine.handle's views) whose series exist from the first sample on
SEQUENCE_STATES = ("waiting", "prefill", "decode", "stalled")


class Metrics:
    def __init__(self, decisions=None) -> None:
        r = self.registry = CollectorRegistry()
        self.kv_bytes = Gauge("kvctl_kv_bytes", "KV bytes held, by tier and format",
                              ["tier", "format"], registry=r)
        self.tier_capacity = Gauge("kvctl_tier_capacity_bytes", "KV arena size by tier",
                                   ["tier"], registry=r)
        self.tier_used = Gauge("kvctl_tier_used_bytes", "KV arena bytes in use by tier",
                               ["tier"], registry=r)
        self.sequences = Gauge("kvctl_sequences", "Live sequences by state and strategy",
                               ["state", "strategy"], registry=r)
        self.decisions = Counter("kvctl_decisions", "Controller decisions by kind", ["kind"],
                                 registry=r)
        self.token_times = TokenTimes()
        r.register(self.token_times)
        self.finished = Counter("kvctl_finished_sequences", "Finished sequences by reason",
                                ["reason"], registry=r)
        self.tokens_per_s = Gauge("kvctl_engine_tokens_per_second",
                                  "Engine decode throughput (engine's own estimate)", registry=r)
        self.gpu_memory = Gauge("kvctl_gpu_memory_bytes", "GPU memory (NVML)", ["kind"], registry=r)
        self.pcie = Gauge("kvctl_pcie_bytes_per_second", "PCIe throughput (NVML)", ["direction"],
                          registry=r)
        self.host_memory = Gauge("kvctl_host_memory_bytes", "Host memory (psutil)", ["kind"],
                                 registry=r)
        self.predictor_fallbacks = Counter(
            "kvctl_predictor_fallbacks", "Times the learned predictor fell back to the heuristic",
            registry=r)
        self.cpu_mode = Gauge("kvctl_cpu_mode", "1 when no GPU/NVML is usable", registry=r)
        # prefix reuse: the engine's counters since start, followed by their increase
        self.prefix_tokens = Counter(
            "kvctl_prefix_tokens", "Prompt tokens of admitted requests: 'hit' reused from the "
            "prefix cache, 'queried' all of them (hit rate = hit / queried)", ["kind"], registry=r)
        self.prefix_evicted = Counter(
            "kvctl_prefix_cached_evicted_blocks", "Cached prefix blocks given back for room",
            registry=r)
        self.compacted = Counter(
            "kvctl_arena_compacted", "Compaction: 'pages' given back by moving 'slots' out of "
            "half-empty pages (so a full arena can take slots of another size)", ["kind"],
            registry=r)
        self.prefix_blocks = Gauge(
            "kvctl_prefix_blocks", "Prefix-indexed blocks now: 'indexed' (reusable), 'cached' "
            "(held by no sequence), 'shared' (held by several sequences)", ["kind"], registry=r)
        self.tier_cached = Gauge("kvctl_tier_cached_bytes",
                                 "Cached prefix bytes by tier (counted free, given back on demand)",
                                 ["tier"], registry=r)
        self.sessions = Gauge("kvctl_sessions", "Multi-turn sessions: 'idle' (KV kept between "
                              "turns) or 'active' (a turn running)", ["state"], registry=r)
        self.step_seconds = Counter(
            "kvctl_engine_step_seconds", "Engine thread seconds by part of a step: 'moves' "
            "(applying commands), 'admit', 'schedule', 'launch' (the model run queued), "
            "'sample' (on CUDA: waiting for it), 'publish', 'post', 'after', 'stats'",
            ["part"], registry=r)
        self.steps = Counter(
            "kvctl_engine_steps", "Engine steps by kind: 'prefill' (wrote prompt chunks), "
            "'decode', 'idle' (nothing could run)", ["kind"], registry=r)
        self.steps_seconds = Counter(
            "kvctl_engine_steps_seconds", "Seconds of engine steps by kind", ["kind"],
            registry=r)
        for kind in ("hit", "queried"):
            self.prefix_tokens.labels(kind)
        self._seen_prefix: collections.Counter[str] = collections.Counter()
        # every label set exported so far: a series stays, at 0, when nothing has it any
        # more (dashboards and sum() see 0, not a gap); tiers' full-precision series and
        # each state's "full" series are there from the first sample
        self._kv_keys: set[tuple[str, str]] = set()
        self._seq_keys: set[tuple[str, str]] = {(s, "full") for s in SEQUENCE_STATES}
        self._decision_log = decisions
        self._seen_decisions: collections.Counter[str] = collections.Counter()
        self._seen_fallbacks = FALLBACKS.value     # process-wide; count from here on
        self._server = None

    def on_finish(self, reason: str) -> None:
        self.finished.labels(reason).inc()

    def update(self, sample) -> None:
        """Refresh gauges from one telemetry sample (runs on the telemetry thread)."""
        from controller.convert import strategy_of

        g, h, snap = sample.gpu, sample.host, sample.snapshot
        self.cpu_mode.set(0 if g.available else 1)
        self.gpu_memory.labels("used").set(g.memory_used_bytes)
        self.gpu_memory.labels("total").set(g.memory_total_bytes)
        self.pcie.labels("tx").set(g.pcie_tx_bytes_per_s)
        self.pcie.labels("rx").set(g.pcie_rx_bytes_per_s)
        self.host_memory.labels("total").set(h.memory_total_bytes)
        self.host_memory.labels("available").set(h.memory_available_bytes)
        self.host_memory.labels("process_rss").set(h.process_rss_bytes)
        if self._decision_log is not None:
            for kind, n in list(self._decision_log.counts.items()):
                if n > self._seen_decisions[kind]:
                    self.decisions.labels(kind).inc(n - self._seen_decisions[kind])
                    self._seen_decisions[kind] = n
        n = FALLBACKS.value
        if n > self._seen_fallbacks:
            self.predictor_fallbacks.inc(n - self._seen_fallbacks)
            self._seen_fallbacks = n
        if snap is None:
            return
        self.tokens_per_s.set(snap.tokens_per_s)
        for t in snap.tiers.values():
            self.tier_capacity.labels(t.name).set(t.capacity_bytes)
            self.tier_used.labels(t.name).set(t.used_bytes)
            self.tier_cached.labels(t.name).set(t.cached_bytes)
        self._update_prefix(snap)
        for key, total in snap.step_times.items():     # engine.engine.Laps
            if key.endswith("_steps"):
                counter = self.steps.labels(key[:-len("_steps")])
            elif key.endswith("_s"):
                counter = self.steps_seconds.labels(key[:-len("_s")])
            else:
                counter = self.step_seconds.labels(key)
            self._follow(f"laps:{key}", total, counter)
        by = collections.Counter()
        counts = collections.Counter()
        for v in snap.sequences:
            if v.state == "finished":
                continue
            counts[(v.state, strategy_of(v))] += 1
            if not v.num_shared_blocks:     # (reading a snapshot's blocks makes them)
                by.update(v.bytes_by_place)
                continue
            for b in v.blocks:     # a shared slot counted once over its holders
                by[(b.tier, b.fmt)] += b.nbytes / b.shared if b.shared else b.nbytes
        self._kv_keys.update(by, ((t, "full") for t in snap.tiers))
        for tier, fmt in self._kv_keys:
            self.kv_bytes.labels(tier, fmt).set(by[(tier, fmt)])
        self._seq_keys.update(counts)
        for state, strat in self._seq_keys:
            self.sequences.labels(state, strat).set(counts[(state, strat)])

    def _update_prefix(self, snap) -> None:
        p = snap.prefix
        for kind, key in (("hit", "hit_tokens"), ("queried", "queried_tokens")):
            self._follow(key, p.get(key, 0), self.prefix_tokens.labels(kind))
        self._follow("cached_evicted", p.get("cached_evicted", 0), self.prefix_evicted)
        for kind in ("pages", "slots"):
            self._follow(f"compacted_{kind}", p.get(f"compacted_{kind}", 0),
                         self.compacted.labels(kind))
        for kind, key in (("indexed", "indexed_blocks"), ("cached", "cached_blocks"),
                          ("shared", "shared_slots")):
            self.prefix_blocks.labels(kind).set(p.get(key, 0))
        active = sum(1 for d in snap.sessions if d.get("active"))
        self.sessions.labels("active").set(active)
        self.sessions.labels("idle").set(len(snap.sessions) - active)

    def _follow(self, key: str, total: float, counter) -> None:
        """Increase ``counter`` by what the engine's running total ``key`` gained."""
        if total > self._seen_prefix[key]:
            counter.inc(total - self._seen_prefix[key])
            self._seen_prefix[key] = total

    def serve(self, address: str, port: int) -> int:
        """Start the HTTP endpoint; returns the bound port."""
        self._server, _ = start_http_server(port, addr=address, registry=self.registry)
        return self._server.server_port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


class TokenTimes:
    """``kvctl_generated_tokens`` (counter) and ``kvctl_time_per_token_seconds``
    (histogram), kept as plain numbers and turned into metrics when scraped.

    ``observe`` runs once per streamed token on the daemon's event loop, in the burst of
    writes that ends every engine step: prometheus_client's Counter.inc + Histogram.observe
    cost ~1.1 us and three lock round trips there; this is one bisect and two additions.
    One writer (the event loop), so no lock; a scrape copies the bucket list in one step,
    so its buckets and count agree (the sum may lead or lag them by a token)."""

    BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10)

    def __init__(self) -> None:
        self.bounds = tuple(float(b) for b in self.BUCKETS)
        self._counts = [0] * (len(self.bounds) + 1)   # the last: above every bound (+Inf)
        self._sum = 0.0
        self._created = time.time()

    def observe(self, interval_s: float) -> None:
        """One streamed token, ``interval_s`` after its sequence's previous one (or its start)."""
        self._counts[bisect.bisect_left(self.bounds, interval_s)] += 1   # le: bound >= value
        self._sum += interval_s

    @property
    def count(self) -> int:
        """Tokens streamed so far."""
        return sum(self._counts)

    def collect(self):
        cum = list(itertools.accumulate(list(self._counts)))
        total = cum[-1]
        yield CounterMetricFamily("kvctl_generated_tokens", "Tokens streamed to clients",
                                  value=total, created=self._created)
        yield HistogramMetricFamily(
            "kvctl_time_per_token_seconds", "Time between streamed tokens of one sequence",
            buckets=[(floatToGoString(b), c) for b, c in zip(self.bounds, cum)] + [("+Inf", total)],
            sum_value=self._sum)
