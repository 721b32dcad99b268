"""The decode table reuses each sequence's row over its written prefix between steps
(engine/plan.py ``_row``): after any mix of moves, compactions, truncations, forks and
growth, the cached table equals one built by walking every block, and each sequence's
host-block count (what staging_need reads instead of a walk) is never under the truth."""
import random

import pytest
import torch

from engine import moves, plan
from engine.actions import ActionError
from engine.layout import FULL, BlockGeometry, KVFormat
from engine.store import GPU, KVStore


def tables(st, sids, monkeypatch):
    got = plan._table(st, sids, torch.device("cpu"))
    with monkeypatch.context() as m:        # the reference: no row kept, every block walked
        m.setattr(plan, "_row", lambda kv, T: plan._Row(kv.version))
        want = plan._table(st, sids, torch.device("cpu"))
    return got, want


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_cached_rows_equal_a_full_walk_through_random_changes(seed, monkeypatch):
    rng = random.Random(seed)
    T = 4
    geom = BlockGeometry(T, 1, 8, torch.float32, value_group=8)
    full = geom.slot_bytes(FULL)
    st = KVStore(geom, 2, torch.device("cpu"), gpu_bytes=full * 2 * 400,
                 host_bytes=full * 2 * 200, page_bytes=full * 4, prefix_cache=False)
    sids = []
    for i in range(4):
        sid = f"s{i}"
        st.add_sequence(sid)
        st.reserve(sid, T * 6 + 1)
        st.write_targets(sid, T * 6 + 1)
        sids.append(sid)
    fmts = [KVFormat(8, 8), KVFormat(4, 4), KVFormat(4, 2), KVFormat(8, 8, fp8=True)]
    kinds = ["grow", "grow", "quantize", "offload", "fetch", "park", "restore", "evict",
             "truncate", "compact", "fork", "free", "cut"]
    checked = 0
    for step in range(120):
        sid = rng.choice(sids)
        kv = st.seqs[sid]
        n = len(kv.blocks)
        idx = rng.sample(range(n - 1), min(n - 1, rng.randint(1, 3))) if n > 1 else []
        kind = rng.choice(kinds)
        try:
            if kind == "grow":
                k = rng.randint(1, 2 * T)
                st.reserve(sid, k)
                st.write_targets(sid, k)
            elif kind == "quantize" and idx:
                moves.quantize(st, sid, idx, rng.choice(fmts))
            elif kind == "offload" and idx:
                moves.offload(st, sid, idx)
            elif kind == "fetch":
                host = [b.index for b in kv.blocks if b.tier == "host"]
                if host:
                    moves.fetch(st, sid, host[:2])
            elif kind == "park" and idx:
                moves.evict(st, sid, idx, park=True)
            elif kind == "restore":
                parked = [b.index for b in kv.blocks if b.tier == "parked"]
                if parked:
                    moves.restore(st, sid, parked[:2])
            elif kind == "evict" and idx:
                moves.evict(st, sid, idx, park=False)
            elif kind == "truncate" and kv.num_tokens > T:
                # what a failed step's tokens undo: written full-precision GPU blocks
                to = kv.num_tokens - rng.randint(1, T + 1)
                if all(b.tier == GPU and b.fmt.is_full for b in kv.blocks[to // T:]):
                    st.truncate(sid, to)
            elif kind == "cut" and n > 2:
                # a session's unmatched tail dropped (engine/sessions.py), then regrown:
                # new block objects where cached ones were
                k = rng.randint(1, n - 1)
                for b in kv.blocks[k:]:
                    st._release(b, keep=False)
                del kv.blocks[k:]
                kv.num_tokens = k * T
                st.reserve(sid, T * (n - k))
                st.write_targets(sid, T * (n - k))
            elif kind == "compact":
                st.compact(GPU, rng.randint(1, 3))
            elif kind == "fork" and len(sids) < 7:
                new = f"f{step}"
                st.fork(sid, new, share=rng.random() < 0.5)
                sids.append(new)
            elif kind == "free" and len(sids) > 2:
                st.free_sequence(sid, keep=False)
                sids.remove(sid)
        except ActionError:
            pass                                 # refused moves change nothing
        live = [s for s in sids if any(b.tier == GPU for b in st.seqs[s].blocks)]
        if not live:
            continue
        got, want = tables(st, live, monkeypatch)
        for name in ("offsets", "kbits", "vbits", "ntok", "stage_mask", "lengths"):
            assert torch.equal(getattr(got, name), getattr(want, name)), (step, kind, name)
        assert got.fmt == want.fmt
        for s_ in sids:                          # the host-block count behind staging_need
            kv_ = st.seqs[s_]
            assert kv_.num_host >= sum(b.tier == "host" for b in kv_.blocks)
            assert st.host_blocks(s_) == [b for b in kv_.blocks if b.tier == "host"]
        checked += 1
    assert checked > 100
    # rows were reused: most sequences' rows cover all but their tail
    assert any(st.seqs[s].table_row is not None and len(st.seqs[s].table_row.blocks) > 2
               for s in sids)


def test_a_freed_sequence_goes_without_a_collection(monkeypatch):
    """Blocks hold their sequence weakly: freeing a sequence frees it and its blocks
    (summaries of offloaded blocks are device tensors) by reference counting, not at
    the next full collection."""
    import gc
    import weakref

    T = 4
    geom = BlockGeometry(T, 1, 8, torch.float32, value_group=8)
    full = geom.slot_bytes(FULL)
    st = KVStore(geom, 2, torch.device("cpu"), gpu_bytes=full * 2 * 64,
                 host_bytes=full * 2 * 64, prefix_cache=False)
    st.add_sequence("a")
    st.reserve("a", T * 5 + 1)
    st.write_targets("a", T * 5 + 1)
    moves.offload(st, "a", [1, 2])
    tables(st, ["a"], monkeypatch)                 # the row kept on the sequence
    kv = weakref.ref(st.seqs["a"])
    block = weakref.ref(st.seqs["a"].blocks[1])
    assert kv().num_host == 2 and kv().table_row is not None
    gc.disable()
    try:
        st.free_sequence("a", keep=False)
        assert kv() is None and block() is None
    finally:
        gc.enable()
