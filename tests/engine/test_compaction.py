"""Compaction: slots moved out of half-empty pages so a full arena can take slots of
another size (quantizing at a full arena was refused as "too fragmented" before)."""
import random

import pytest
import torch

from engine import moves
from engine.actions import ActionError, Quantize
from engine.arena import SlabAllocator
from engine.engine import Engine, EngineConfig
from engine.store import GPU
from tests.engine.decoding import decode
from tests.engine.test_prefix_reuse import check_slots

SIZES = [4096, 1536, 768, 1024, 96]


def churned(pages: int, steps: int, p_free: float, seed: int):
    """An allocator of ``pages`` 4 KiB pages after ``steps`` random allocations and frees
    of SIZES; returns it and its live slots (offset -> bytes)."""
    rng = random.Random(seed)
    a = SlabAllocator(pages * 4096, 4096)
    live: dict[int, int] = {}
    for _ in range(steps):
        if live and rng.random() < p_free:
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        elif a.can_allocate(size := rng.choice(SIZES)):
            live[a.allocate(size)] = size
    return a, live


@pytest.mark.parametrize("seed", range(4))
def test_evacuating_pages_keeps_every_slot_and_frees_the_page(seed):
    a, live = churned(48, 600, 0.5, seed)
    free_before = len(a._free_pages)
    bound = a.compactable_pages()
    evacuated = 0
    while (page := a.evacuation_page()) is not None:
        for old, new, n in a.evacuate(page):
            assert live.pop(old) == n and new not in live
            live[new] = n
        evacuated += 1
        assert len(a._free_pages) == free_before + evacuated
        ends = sorted((o, o + n) for o, n in live.items())   # no two live slots overlap
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))
        assert a.num_slots == len(live) and a.used_slot_bytes == sum(live.values())
    assert evacuated == bound                 # the bound make_room checks first is exact
    # what is left: per slot size, at most one page with free slots
    for size, pages in a._partial.items():
        assert len(pages) <= 1, size
    for off, n in live.items():
        a.free(off, n)
    assert a.used_pages == 0


def engine(kv_bytes):
    return Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                               block_size=4, kv_budget_bytes=kv_bytes, page_bytes=4096,
                               max_batch_tokens=64))


def test_quantize_at_a_full_arena_compacts_and_keeps_the_logits(monkeypatch):
    """16 full blocks fill all 8 pages (2 a page). Quantizing blocks 2, 3, 4, 6 to int8
    needs two pages: freeing them empties only page 1, so block 7 moves next to block 5
    and page 3 comes back. The logits after equal a roomy engine's that quantized the same
    blocks in place."""
    tight, roomy = engine(2 * 8 * 4096), engine(2 << 20)
    try:
        full, int8 = tight.geom.slot_bytes(moves.FULL), tight.geom.slot_bytes(moves.KVFormat(8, 8))
        assert 4096 // full == 2 and 4096 // int8 == 3, "the construction needs these"
        prompt = [(5 + 7 * j) % 500 + 1 for j in range(58)]     # 15 blocks; 16 with 3 new
        act = lambda n, sids: [Quantize(sids[0], (2, 3, 4, 6), 8)] if n == 0 else []  # noqa: E731
        got, toks = decode(tight, [prompt], 2, moves=act)
        assert tight.store.compactions >= 1
        want, want_toks = decode(roomy, [prompt], 2, moves=act)
        assert roomy.store.compactions == 0
        assert toks == want_toks
        torch.testing.assert_close(got[0], want[0], rtol=0, atol=0)
        check_slots(tight.store)
    finally:
        tight.stop()
        roomy.stop()


def test_a_single_block_at_a_full_arena_is_still_refused_and_nothing_changes():
    e = engine(2 * 8 * 4096)
    try:
        e.prefill("q", list(range(1, 65)))           # every page: 2 full blocks
        before = [(b.fmt, b.offset) for b in e.store.seqs["q"].blocks]
        with pytest.raises(ActionError, match="fragmented"):
            e.handle.apply(Quantize("q", (6,), 8))   # frees half a page: no page for int8
        assert [(b.fmt, b.offset) for b in e.store.seqs["q"].blocks] == before
        assert e.store.compactions == 0
        e.handle.apply(Quantize("q", (2, 3, 4, 6), 8))   # what fits converts
        check_slots(e.store)
        e.release("q")
        assert e.store.held_slots(GPU) == 0
    finally:
        e.stop()


def test_compaction_carries_shared_and_cached_slots():
    """Slots a prefix-sharing sequence and the index hold move with their holders: a
    request that reuses the prefix afterwards reads the same K/V (same tokens as one that
    did not reuse)."""
    e = engine(2 * 12 * 4096)
    plain = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                                block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096,
                                max_batch_tokens=64, prefix_caching=False))
    try:
        base = [(3 + 11 * j) % 480 + 2 for j in range(40)]
        e.prefill("a", base)                          # 10 blocks, indexed
        e.fork("a", "b", share=True)                  # all shared
        e.prefill("c", [(9 + 5 * j) % 470 + 3 for j in range(40)])
        e.release("c")                                # cached: 10 blocks on the index
        e.prefill("d", [(4 + 3 * j) % 400 + 7 for j in range(14)])
        e.handle.apply(Quantize("d", (0, 1), 4))      # int4 pages beside the full ones
        e.release("b")
        e.handle.apply(Quantize("a", tuple(range(1, 9)), 8))
        check_slots(e.store)
        n0 = e.store.compactions
        e.store.compact(GPU, 8)
        assert e.store.compactions > n0, "the construction leaves pages to empty"
        check_slots(e.store)
        _, got = decode(e, [base + [17, 18, 19]], 3)
        _, want = decode(plain, [base + [17, 18, 19]], 3)
        assert got == want
        check_slots(e.store)
    finally:
        e.stop()
        plain.stop()


def test_host_arena_compacts_for_offloaded_blocks_of_another_size():
    """The host tier's pages fill with full blocks, half come back, then int8 blocks are
    offloaded: no page is free for their slot size until the half-empty pages are merged.
    Exact offload stays exact: logits equal a roomy host tier's with the same moves."""
    from engine.actions import Fetch, Offload

    def run(host_pages):
        e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                                block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096,
                                host_budget_bytes=2 * host_pages * 4096, max_batch_tokens=64,
                                prefix_caching=False))
        odd = tuple(range(1, 15, 2))
        acts = lambda n, sids: [Offload(sids[0], tuple(range(1, 15))), Fetch(sids[0], odd),  # noqa: E731
                                Quantize(sids[0], (1, 3), 8), Offload(sids[0], (1, 3))] \
            if n == 0 else []
        try:
            lg, toks = decode(e, [[(3 + 5 * j) % 450 + 2 for j in range(62)]], 3, moves=acts)
            from engine.store import HOST
            return lg[0], toks, e.store.compactions, e.store.arenas[HOST].alloc
        finally:
            e.stop()
    got, toks, n, alloc = run(7)
    assert n >= 1                  # the int8 offload needed a merged page
    want, want_toks, n0, _ = run(64)
    assert n0 == 0
    assert toks == want_toks
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_one_compaction_moves_slots_twice_and_every_block_keeps_its_bytes():
    """A compaction of many pages moves the bytes page by page and the blocks once at the
    end: a slot moved into a page that is emptied later in the same compaction moves
    twice, and its block must end where its bytes are. Mixed formats and shared and
    cached slots over several seeds, pages emptied in an order that makes such chains;
    every block's bytes are compared before and after."""
    from engine.store import ARENA_OF
    chains = 0
    for seed in range(6):
        rng = random.Random(seed)
        e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                                block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096,
                                max_batch_tokens=64))
        try:
            for i in range(6):
                ids = [rng.randrange(2, 480) for _ in range(rng.randrange(24, 48))]
                e.prefill(f"s{i}", ids)
            e.fork("s0", "f0", share=True)
            e.release("s1")                                  # its indexed blocks: cached
            for i in (2, 3, 4, 5):
                n = len(e.store.seqs[f"s{i}"].blocks) - 1
                picks = tuple(sorted(rng.sample(range(1, n), k=min(n - 1, 5))))
                e.handle.apply(Quantize(f"s{i}", picks, rng.choice((8, 4, 2))))
            store = e.store
            a = store.arenas[GPU]

            def slot_bytes(b):
                return a.data[:, b.offset:b.offset + store.geom.slot_bytes(b.fmt)].clone()
            blocks = [b for kv in store.seqs.values() for b in kv.blocks
                      if b.offset >= 0 and ARENA_OF[b.tier] == GPU]
            before = [slot_bytes(b) for b in blocks]
            seen: list[tuple[int, int]] = []
            al = a.alloc
            real_evacuate, real_pick = al.evacuate, al.evacuation_page

            def pick(skip=frozenset()):
                # a page that took moved slots first, where its slots fit elsewhere: the
                # order that makes chains (the allocator's own order rarely does)
                for _, new in seen:
                    page = new // al.page_bytes
                    slot = al._page_slot.get(page)
                    if slot is None or page in skip:
                        continue
                    used = al.slots_per_page(slot) - len(al._page_free[page])
                    room = sum(len(al._page_free[p]) for p in al._partial.get(slot, ())
                               if p != page)
                    if 0 < used <= room:
                        return page
                return real_pick(skip)
            al.evacuate = lambda page: [seen.append((o, n)) or (o, n, s)  # noqa: E731
                                        for o, n, s in real_evacuate(page)]
            al.evacuation_page = pick
            store.compact(GPU, 1000)
            al.evacuate, al.evacuation_page = real_evacuate, real_pick
            dests = {n for _, n in seen}
            chains += sum(1 for o, _ in seen if o in dests)
            check_slots(store)
            for b, want in zip(blocks, before):
                assert torch.equal(slot_bytes(b), want), (seed, b.index)
        finally:
            e.stop()
    assert chains > 0, "no slot moved twice: the construction does not test the chains"


@pytest.mark.parametrize("seed", range(3))
def test_allocator_clone_is_independent_and_equal(seed):
    """A quantize's dry run replays its allocations on ``clone()``: the copy starts equal
    to the allocator and nothing done to one shows in the other."""
    a, live = churned(32, 200, 0.4, seed)
    state = lambda x: (list(x._free_pages), dict(x._page_slot),  # noqa: E731
                       {p: list(f) for p, f in x._page_free.items()},
                       {k: set(v) for k, v in x._partial.items()}, x.used_slot_bytes,
                       x.num_slots)
    c = a.clone()
    assert state(c) == state(a)
    before = state(a)
    while (page := c.evacuation_page()) is not None:
        c.evacuate(page)
    for size in SIZES:
        while c.can_allocate(size):
            c.allocate(size)
    assert state(a) == before
    # and the other way: the original changes, the copy does not
    c2 = a.clone()
    snap = state(c2)
    for off, n in list(live.items()):
        a.free(off, n)
    assert state(c2) == snap
