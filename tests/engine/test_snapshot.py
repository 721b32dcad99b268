"""Snapshots show each block as the store holds it when the snapshot is built: the views
are made on first read (engine.snapshot.BlockViews), from fields taken at build time."""
from engine.actions import BlockView, Evict, Offload, Quantize
from engine.api import Request, SamplingParams
from engine.store import ARENA_OF


def expected(engine, seq_id):
    """Each block's view, made straight from the store and the statistics."""
    st = engine.store
    kv = st.seqs[seq_id]
    stats = engine.stats.get(seq_id)
    col = lambda name: getattr(stats, name).tolist() if stats is not None else []  # noqa: E731
    mass, obs, dis = col("mass"), col("observed"), col("distinct")
    out, by_tier, by_fmt, by_place = [], {}, {}, {}
    for b in kv.blocks:
        nb = st.block_bytes(b.fmt) if b.offset >= 0 else 0
        if nb:
            by_tier[b.tier] = by_tier.get(b.tier, 0) + nb
            by_fmt[b.fmt.name] = by_fmt.get(b.fmt.name, 0) + nb
            key = (b.tier, b.fmt.name)
            by_place[key] = by_place.get(key, 0) + nb
        i = b.index
        out.append(BlockView(i, b.num_tokens, b.fmt.name, b.tier, nb,
                             mass[i] if i < len(mass) else 0.0,
                             obs[i] if i < len(obs) else 0.0,
                             st.refs.get((ARENA_OF[b.tier], b.offset), 0) if nb else 0,
                             dis[i] if i < len(dis) else 0.0))
    return out, by_tier, by_fmt, by_place


def check(engine, snap):
    for v in snap.sequences:
        if v.seq_id not in engine.store.seqs:
            assert len(v.blocks) == 0 and not v.bytes_by_tier
            continue
        blocks, by_tier, by_fmt, by_place = expected(engine, v.seq_id)
        assert len(v.blocks) == len(blocks)
        assert list(v.blocks) == blocks and v.blocks == blocks
        assert v.blocks[-1] == blocks[-1] and v.blocks[1:3] == blocks[1:3]
        assert v.bytes_by_tier == by_tier and v.bytes_by_format == by_fmt
        assert v.bytes_by_place == by_place
        assert v.num_shared_blocks == sum(1 for b in blocks if b.shared)


def test_snapshot_blocks_match_the_store_through_moves(tiny):
    e = tiny
    prefix = list(range(1, 41))                       # 10 blocks of 4, shared by both
    sids = []
    for tail in ([50, 51, 52, 53, 54, 55], [60, 61, 62, 63, 64, 65, 66]):
        # one after the other: the second reuses the first's prefix blocks
        sids.append(e.submit(Request(prompt_ids=prefix + tail, sampling=SamplingParams(
            max_tokens=40, ignore_eos=True)), lambda ev: None))
        for _ in range(3):
            e.step()
    a, b = sids
    check(e, e.snapshot())
    before = e.snapshot()
    kept = [list(v.blocks) for v in before.sequences]
    unread = e.snapshot()                             # the same state, not read yet
    assert any(v.shared for v in before.sequences[1].blocks), "prefix blocks are shared"
    own = [i for i, v in enumerate(before.sequences[0].blocks[:-1]) if not v.shared]
    assert own, "the test needs blocks of its own to move"
    e.handle.apply(Quantize(a, tuple(own[-2:]), bits=4))
    e.handle.apply(Offload(b, (0, 1)))
    e.handle.apply(Evict(b, (3,), park=True))
    e.handle.apply(Evict(b, (4,), park=False))
    for _ in range(3):
        e.step()
    after = e.snapshot()
    check(e, after)
    # an older snapshot shows what was there when it was built, read before the moves
    # or first read after them
    assert [list(v.blocks) for v in before.sequences] == kept
    assert [list(v.blocks) for v in unread.sequences] == kept
    tiers = {v.tier for v in after.sequences[1].blocks}
    assert {"host", "parked", "evicted"} <= tiers
    assert "int4" in {v.fmt for v in after.sequences[0].blocks}
    for s in sids:
        e.cancel(s)
