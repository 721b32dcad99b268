"""Immutable views of the engine's state, built on the engine thread and published.

Readers (status, capacity, the controller) take the newest published ``EngineSnapshot``
and never wait for a forward pass. Building one walks every block of every sequence, so
the engine publishes after every change it must show at once (moves, admissions,
finishes) and otherwise at most every ``snapshot_interval_s`` while busy.
"""
from __future__ import annotations

import operator
import time
from collections.abc import Iterator, Sequence
from itertools import repeat

from engine.actions import BlockView, EngineSnapshot, SequenceView, TierView
from engine.layout import FULL, KVFormat
from engine.store import ARENA_OF, GPU

FORMATS = ("full", "int8", "int4", "int2", "k4v2", "k8v4", "fp8")


# a block's fields as a snapshot keeps them: all atomic (the format as its code), so the
# garbage collector drops the tuples from its young generation at its first look
_ROW = operator.attrgetter("index", "num_tokens", "fmt.code", "tier", "offset")
_NAMES: dict[int, str] = {}
_new = tuple.__new__


def _name(code: int) -> str:
    n = _NAMES.get(code)
    if n is None:
        n = _NAMES[code] = KVFormat.from_code(code).name
    return n


class BlockViews(Sequence):
    """A sequence's blocks as a snapshot shows them: each block's fields are taken when
    the snapshot is built (one C-level attribute read a block), the ``BlockView`` tuples
    made the first time a reader looks. The engine builds a snapshot after every batch of
    moves and every few steps, and most snapshots' blocks are read by no one before the
    next one: at 49 x 700 blocks a build took 27-29 ms on the 2-core box when it made the
    tuples, 9-16 ms since (``python -m benchmarks.snapshot_cost``); a reader's first pass
    over every block then takes ~20 ms on its own thread.

    Reads from several threads are safe: two first reads may both make the list, from
    the same captured fields."""

    __slots__ = ("_rows", "_nbytes", "_mass", "_observed", "_distinct", "_shared",
                 "_views")

    def __init__(self, rows=(), nbytes=None, mass=(), observed=(), distinct=(),
                 shared=None) -> None:
        self._rows, self._nbytes = rows, nbytes or {}
        self._mass, self._observed, self._distinct = mass, observed, distinct
        self._shared = shared
        self._views: list[BlockView] | None = None

    def _list(self) -> list[BlockView]:
        v = self._views
        if v is None:
            rows, nbytes = self._rows, self._nbytes
            n = max(len(rows), rows[-1][0] + 1) if rows else 0

            def pad(xs):       # statistics cover the blocks that existed at the last step
                return xs if len(xs) >= n else list(xs) + [0.0] * (n - len(xs))
            mass, obs, dis = pad(self._mass), pad(self._observed), pad(self._distinct)
            names = {c: _name(c) for c in nbytes}
            # tuple.__new__: a BlockView without a Python-level __new__ call a block
            v = [_new(BlockView, (i, t, names[c], tier, nbytes[c] if off >= 0 else 0,
                                  mass[i], obs[i], sh, dis[i]))
                 for (i, t, c, tier, off), sh in zip(rows, self._shared or repeat(0))]
            self._views = v
        return v

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i):
        return self._list()[i]

    def __iter__(self) -> Iterator[BlockView]:
        return iter(self._list())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (BlockViews, list, tuple)):
            return list(self) == list(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  (mutable-looking, like a list)

    def __repr__(self) -> str:
        return f"BlockViews({self._list()!r})"


def sequence_view(engine, s, state: str, sizes: dict[int, int] | None = None
                  ) -> SequenceView:
    """``sizes``: block bytes by format code, shared by one build's sequences."""
    st = engine.store
    kv = st.seqs.get(s.seq_id)
    stats = engine.stats.get(s.seq_id)
    by_tier: dict[str, int] = {}
    by_fmt: dict[str, int] = {}
    by_place: dict[tuple[str, str], int] = {}
    blocks = BlockViews()
    num_shared = 0
    if kv is not None and kv.blocks:
        rows = list(map(_ROW, kv.blocks))      # one C-level read a block
        # the sequence's bytes by tier and format: its blocks come in runs of one format
        # and tier, so a run is looked up once (a tier equal to the last but another
        # string object starts a run, and adds to the same entries)
        nbytes = {} if sizes is None else sizes

        def add(code, tier, n):
            nb = nbytes.get(code)
            if nb is None:
                nb = nbytes[code] = st.block_bytes(KVFormat.from_code(code))
            if n:
                by_tier[tier] = by_tier.get(tier, 0) + n * nb
                name = _name(code)
                by_fmt[name] = by_fmt.get(name, 0) + n * nb
                by_place[tier, name] = by_place.get((tier, name), 0) + n * nb
        code = tier = None
        n = 0
        for r in rows:
            if r[2] != code or r[3] is not tier:
                if code is not None:
                    add(code, tier, n)
                code, tier, n = r[2], r[3], 0
            if r[4] >= 0:                      # holds a slot (an evicted block: -1)
                n += 1
        add(code, tier, n)
        refs = st.refs
        shared = None
        if refs:        # prefix reuse: holders of each block's slot (0: its own)
            shared = [refs.get((ARENA_OF[t], o), 0) if o >= 0 else 0
                      for _, _, _, t, o in rows]
            num_shared = len(shared) - shared.count(0)
        blocks = BlockViews(rows, nbytes,
                            stats.mass.tolist() if stats is not None else (),
                            stats.observed.tolist() if stats is not None else (),
                            stats.distinct.tolist() if stats is not None else (), shared)
    return SequenceView(
        s.seq_id, state, len(s.prompt_ids), kv.num_tokens if kv else 0, len(s.output_ids),
        s.priority, kv.decode_mode if kv else "exact", kv.top_k if kv else 0, by_tier,
        by_fmt, blocks, stats.entropy if stats else 0.0, stats.sink_mass if stats else 0.0,
        stats.recent_mass if stats else 0.0, num_preemptions=s.num_preemptions,
        fill_format=s.fill_format.name, bytes_by_place=by_place,
        num_shared_blocks=num_shared)


def build(engine, version: int) -> EngineSnapshot:
    """The engine's state now (engine thread, or the caller when no thread runs)."""
    st = engine.store
    tiers = {}
    for name, a in st.arenas.items():
        cached = st.cached_bytes(name)
        used = a.used_bytes - st.reclaimable_bytes(name)
        tiers[name] = TierView(name, str(a.device), a.capacity_bytes, used,
                               a.block_bytes - cached, a.capacity_bytes - used, cached)
    seqs = []
    pressure = 0
    full_block = st.block_bytes(FULL)
    sizes: dict[int, int] = {}
    for s in (list(engine.waiting) + engine.running + list(engine.held.values())
              + list(engine.idle.values())):
        if s.stalled:       # a block to grow into; a prompt written in chunks, the least
            chunk = engine._least_chunk(s) if s.state == "prefill" else 0
            pressure += full_block * max(1, st.blocks_for(chunk))
        state = "stalled" if s.stalled else s.state
        seqs.append(sequence_view(engine, s, state, sizes))
    stalled = pressure         # the running sequences' own need, the queue's aside
    head, admission = "", {}
    if engine.waiting:
        s = engine._next_waiting()
        head = s.seq_id
        if not s.swapped and not s.num_prefilled:
            admission = {f: engine._admission_bytes(len(s.context_ids), KVFormat.parse(f))
                         for f in FORMATS}
        need = admission.get(s.fill_format.name) or engine._admission_bytes(
            len(s.context_ids), s.fill_format)
        # by bytes, and by pages: a prompt in a format no page holds yet needs fresh pages
        # even where the bytes fit (the request would wait with no pressure shown)
        pressure += max(0, need - tiers[GPU].free_bytes,
                        st.room_short_bytes(GPU, engine._admission_room(s)))
    return EngineSnapshot(
        time.time(), engine.step_count, str(engine.device), engine.model_name,
        st.block_size, engine.num_layers, tiers, seqs, len(engine.waiting),
        len(engine.running), sum(s.stalled for s in engine.running), pressure,
        engine.tokens_per_s(), {f: st.block_bytes(KVFormat.parse(f)) for f in FORMATS},
        st.num_sink_blocks, version=version, max_positions=engine.max_positions,
        num_preemptions=engine.num_preemptions, num_paused=engine.num_paused,
        stalled_bytes=stalled,
        num_step_failures=engine.num_step_failures,
        staging_bytes=st.staging_half,
        graphs=dict(vars(engine.runner.graphs.stats) if engine.runner.graphs else {},
                    num_overlapped=engine.num_overlapped, **engine.laps.compiles),
        prefix=prefix_counters(st), sessions=engine.session_views(),
        step_times=dict(engine.laps.seconds), next_admission=head,
        admission_bytes=admission)


def prefix_counters(st) -> dict:
    p = st.prefix
    return {"hit_tokens": p.hit_tokens, "queried_tokens": p.queried_tokens,
            "indexed_blocks": len(p), "cached_blocks": len(p.lru),
            "shared_slots": len(st.refs), "cached_evicted": p.evicted_cached,
            # the store's compaction (not prefix reuse, counted here with the slot counters)
            "compacted_pages": st.compactions, "compacted_slots": st.compacted_slots}
