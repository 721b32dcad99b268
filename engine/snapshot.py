"""Immutable views of the engine's state, built on the engine thread and published.

Readers (status, capacity, the controller) take the newest published ``EngineSnapshot``
and never wait for a forward pass. Building one walks every block of every sequence, so
the engine publishes after every change it must show at once (moves, admissions,
finishes) and otherwise at most every ``snapshot_interval_s`` while busy.
"""
from __future__ import annotations

import time

from engine.actions import BlockView, EngineSnapshot, SequenceView, TierView
from engine.layout import FULL, KVFormat
from engine.store import GPU

FORMATS = ("full", "int8", "int4", "int2", "k4v2", "k8v4", "fp8")


def sequence_view(engine, s, state: str) -> SequenceView:
    st = engine.store
    kv = st.seqs.get(s.seq_id)
    stats = engine.stats.get(s.seq_id)
    blocks = []
    by_tier: dict[str, int] = {}
    by_fmt: dict[str, int] = {}
    if kv is not None:
        refs = st.refs
        mass = stats.mass.tolist() if stats is not None else []
        obs = stats.observed.tolist() if stats is not None else []
        dis = stats.distinct.tolist() if stats is not None else []
        nm, no, nd = len(mass), len(obs), len(dis)
        # a sequence's blocks come in runs of one format and tier: what depends on those
        # only is looked up once a run (8,000 blocks a snapshot at batch 8 / 32K)
        fmt = tier = name = None
        nbytes = run = 0
        for b in kv.blocks:
            i = b.index
            if b.fmt is not fmt or b.tier != tier:
                if run:
                    by_tier[tier] = by_tier.get(tier, 0) + run
                    by_fmt[name] = by_fmt.get(name, 0) + run
                    run = 0
                fmt, tier = b.fmt, b.tier
                name, nbytes = fmt.name, st.block_bytes(fmt)
            nb = nbytes if b.offset >= 0 else 0
            run += nb             # the sequence's bytes by tier and format, same pass
            blocks.append(BlockView(i, b.num_tokens, name, tier, nb,
                                    mass[i] if i < nm else 0.0, obs[i] if i < no else 0.0,
                                    refs.get(st.slot_key(b), 0) if refs and nb else 0,
                                    dis[i] if i < nd else 0.0))
        if run:
            by_tier[tier] = by_tier.get(tier, 0) + run
            by_fmt[name] = by_fmt.get(name, 0) + run
    return SequenceView(
        s.seq_id, state, len(s.prompt_ids), kv.num_tokens if kv else 0, len(s.output_ids),
        s.priority, kv.decode_mode if kv else "exact", kv.top_k if kv else 0, by_tier,
        by_fmt, blocks, stats.entropy if stats else 0.0, stats.sink_mass if stats else 0.0,
        stats.recent_mass if stats else 0.0, num_preemptions=s.num_preemptions,
        fill_format=s.fill_format.name)


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
    for s in (list(engine.waiting) + engine.running + list(engine.held.values())
              + list(engine.idle.values())):
        if s.stalled:       # a block to grow into; a prompt written in chunks, the least
            chunk = engine._least_chunk(s) if s.state == "prefill" else 0
            pressure += full_block * max(1, st.blocks_for(chunk))
        state = "stalled" if s.stalled else s.state
        seqs.append(sequence_view(engine, s, state))
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
