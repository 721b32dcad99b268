"""Prefix reuse and multi-turn sessions (issue 16): same tokens as without reuse, shared
slots never freed while held, sessions parked / quantized / expired / dropped."""
import time

import pytest
import torch

from engine.actions import ActionError, Offload, Quantize
from engine.api import FinishEvent, Request, SamplingParams
from engine.engine import Engine, EngineConfig
from engine.store import ARENA_OF, GPU, HOST


def finish(e, ids, session=None, n=8, **kw):
    req = Request(prompt_ids=list(ids), session_id=session,
                  sampling=SamplingParams(max_tokens=n, ignore_eos=True), **kw)
    return next(x for x in e.generate(req) if isinstance(x, FinishEvent))


def check_slots(store):
    """Every slot is held by the sequences that name it (``refs`` counts them) or by the
    index as a cached entry, and the allocator counts exactly those."""
    holders: dict[tuple[str, int], int] = {}
    for kv in store.seqs.values():
        for b in kv.blocks:
            if b.offset >= 0:
                k = (ARENA_OF[b.tier], b.offset)
                holders[k] = holders.get(k, 0) + 1
    assert {k: n for k, n in holders.items() if n > 1} == store.refs
    cached = {e.key for e in store.prefix.lru.values()}
    assert not cached & set(holders), "a cached entry is also held"
    for name, a in store.arenas.items():
        mine = [k for k in list(holders) + list(cached) if k[0] == name]
        assert a.alloc.num_slots == len(mine)
        for _, off in mine:                      # not on any free list
            page, rem = divmod(off, a.alloc.page_bytes)
            slot = a.alloc._page_slot.get(page)
            assert slot is not None and rem // slot not in a.alloc._page_free[page]


@pytest.fixture
def pair():
    """Two tiny engines, the same weights: with and without prefix reuse."""
    kw = dict(model="random:tiny", device="cpu", dtype="float32", block_size=4,
              kv_budget_bytes=1 << 20, page_bytes=4096, max_batch_tokens=64, observe_window=4)
    a, b = Engine(EngineConfig(**kw)), Engine(EngineConfig(prefix_caching=False, **kw))
    yield a, b
    a.stop()
    b.stop()


def prompt(seed, n):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 500, (n,), generator=g).tolist()


def test_reused_prefix_gives_the_same_tokens(pair):
    reuse, plain = pair
    base = prompt(0, 61)
    first = finish(reuse, base)
    assert first.cached_tokens == 0
    for tail in ([9, 8, 7], prompt(1, 17), []):
        ids = base + tail
        got, want = finish(reuse, ids), finish(plain, ids)
        assert got.token_ids == want.token_ids
        assert got.cached_tokens >= 48            # 12 of the prompt's blocks, at least
        assert want.cached_tokens == 0
        check_slots(reuse.store)
    snap = reuse.snapshot()
    assert snap.prefix["hit_tokens"] > 0 and snap.prefix["cached_blocks"] > 0
    assert snap.tiers[GPU].cached_bytes > 0       # counted free, not used
    assert snap.tiers[GPU].used_bytes + snap.tiers[GPU].free_bytes == \
        snap.tiers[GPU].capacity_bytes


def test_shared_blocks_live_while_any_holder_does(pair):
    reuse, plain = pair
    base = prompt(2, 40)
    # two requests with the same 10-block prefix in one batch: the second shares the
    # first's blocks once they are indexed (after the first's prefill step)
    evs = {}
    a = reuse.submit(Request(prompt_ids=base + [1], sampling=SamplingParams(
        max_tokens=3, ignore_eos=True)), lambda ev: evs.setdefault(ev.seq_id, []).append(ev))
    reuse.step()
    b = reuse.submit(Request(prompt_ids=base + [2, 3], sampling=SamplingParams(
        max_tokens=12, ignore_eos=True)), lambda ev: evs.setdefault(ev.seq_id, []).append(ev))
    reuse.step()
    assert reuse.store.refs, "the second request shares the first's blocks"
    check_slots(reuse.store)
    while reuse.running or reuse.waiting:
        reuse.step()
        check_slots(reuse.store)       # a finished, b still reading the shared slots
    got = evs[b][-1]
    assert got.cached_tokens > 0
    assert got.token_ids == finish(plain, base + [2, 3], n=12).token_ids
    assert not reuse.store.refs and reuse.store.held_slots(GPU) == 0


def test_moves_of_shared_blocks_copy(pair):
    """Quantizing or offloading a block another sequence shares leaves the other's slot
    and its index entry alone (copy on write)."""
    reuse, _ = pair
    base = prompt(3, 40)
    reuse.prefill("src", base)          # held: not indexed; fork shares its full blocks
    reuse.fork("src", "dst", share=True)
    assert reuse.store.refs
    reuse.handle.apply(Quantize("dst", (1, 2), 4))
    reuse.handle.apply(Offload("dst", (3,)))
    src = reuse.store.seqs["src"].blocks
    assert [(b.fmt.name, b.tier) for b in src[1:4]] == [("full", GPU)] * 3
    check_slots(reuse.store)
    a, b = (reuse.append([s], [5]) for s in ("src", "src"))
    assert torch.isfinite(b).all()
    reuse.release("dst")
    reuse.release("src")
    check_slots(reuse.store)
    assert reuse.store.held_slots(GPU) == 0 and reuse.store.held_slots(HOST) == 0


def _conversation(e, turns, session, moves=None):
    """A chat: each turn's prompt is the history so far plus new user tokens."""
    hist, outs = [], []
    for t, new in enumerate(turns):
        if moves and t in moves:
            moves[t](e)
        hist = hist + new
        ev = finish(e, hist, session)
        outs.append(ev)
        hist = hist + ev.token_ids
    return outs


def test_five_turns_same_tokens_as_replaying_the_history(pair):
    reuse, plain = pair
    turns = [prompt(10 + t, 23 + 7 * t) for t in range(5)]

    def park(e):                         # the idle session to host, losslessly
        kv = e.store.seqs["session/chat"]
        idx = tuple(b.index for b in kv.blocks[:-1] if b.tier == GPU and b.index > 0)
        e.handle.apply(Offload("session/chat", idx))
        assert all(b.tier == HOST for b in kv.blocks[1:-1])
    got = _conversation(reuse, turns, "chat", {2: park})
    want = _conversation(plain, turns, None)
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    assert all(g.cached_tokens > 0 for g in got[1:])
    # the parked blocks came back to the GPU tier with turn 3
    assert all(b.tier == GPU for b in reuse.store.seqs["session/chat"].blocks)
    sess = reuse.snapshot().sessions
    assert [s["session_id"] for s in sess] == ["chat"] and sess[0]["turns"] == 5
    check_slots(reuse.store)


def test_quantized_session_blocks_are_reused_as_quantized(pair):
    """After the idle session's blocks 1-3 were quantized, the next turn gives the same
    tokens as a run without reuse that quantized the same blocks before the rest."""
    reuse, plain = pair
    t1, t2 = prompt(20, 45), prompt(21, 20)
    first = finish(reuse, t1, "q")
    reuse.handle.apply(Quantize("session/q", (1, 2, 3), 4))
    ids = t1 + first.token_ids + t2
    got = finish(reuse, ids, "q")
    m = got.cached_tokens
    assert m >= 16
    # the same without reuse: prefill what was reused, quantize it, then the rest
    plain.prefill("ref", ids[:m])
    plain.handle.apply(Quantize("ref", (1, 2, 3), 4))
    logits = plain.extend("ref", ids[m:])[-1]
    toks = [int(logits.argmax())]
    for _ in range(7):
        toks.append(int(plain.append(["ref"], [toks[-1]])[0].argmax()))
    assert got.token_ids == toks
    # a request outside the session never inherits those lossy blocks
    other = finish(reuse, ids)
    assert other.cached_tokens < 8
    plain.release("ref")


def test_idle_sessions_expire_and_free_every_block():
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=4,
                            kv_budget_bytes=1 << 20, page_bytes=4096, session_ttl_s=60.0))
    try:
        finish(e, prompt(30, 30), "a")
        assert "session/a" in e.store.seqs
        e._expire_sessions(time.monotonic() + 30)   # not yet
        assert "session/a" in e.store.seqs
        e._expire_sessions(time.monotonic() + 61)
        assert "session/a" not in e.store.seqs and not e.sessions
        assert e.store.held_slots(GPU) == 0
        check_slots(e.store)
    finally:
        e.stop()


def test_session_limit_and_drop_session():
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=4,
                            kv_budget_bytes=1 << 20, page_bytes=4096, max_sessions=2))
    try:
        for s in ("a", "b", "c"):
            finish(e, prompt(ord(s), 20), s)
        assert sorted(e.sessions) == ["b", "c"]     # the least recent went
        assert e.drop_session("b") and not e.drop_session("b")
        assert sorted(e.sessions) == ["c"] and "session/b" not in e.store.seqs
        with pytest.raises(ActionError):            # gone: moves are refused
            e.handle.apply(Offload("session/b", (1,)))
        check_slots(e.store)
    finally:
        e.stop()


def test_idle_session_gives_way_to_a_waiting_request():
    """Without a controller, an idle session that holds the room a new request needs is
    dropped after ``preempt_after_s`` (sessions are a cache, never a reason to wait)."""
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=4,
                            kv_budget_bytes=64 << 10, page_bytes=4096, preempt_after_s=0.0,
                            host_budget_bytes=0))            # 16 blocks
    try:
        finish(e, prompt(40, 40), "s")                      # 11 blocks kept idle
        ev = finish(e, prompt(41, 40))                      # needs 11 + 1
        assert ev.reason == "length" and "s" not in e.sessions
        assert e.num_sessions_dropped == 1
    finally:
        e.stop()


def test_refused_candidate_undoes_moves_of_shared_blocks(pair):
    """A candidate that offloads a shared block and then fails leaves both sequences
    exactly as they were: the copy is given back, the block names its shared slot."""
    reuse, _ = pair
    reuse.prefill("src", prompt(5, 40))
    reuse.fork("src", "dst", share=True)
    kv = reuse.store.seqs["dst"]
    before = [(b.tier, b.offset, b.fmt) for b in kv.blocks]
    refs = dict(reuse.store.refs)
    res = reuse.handle.apply_candidates([(Offload("dst", (1, 2)), Quantize("dst", (9, 99), 4))])
    assert not res[0].ok
    assert [(b.tier, b.offset, b.fmt) for b in kv.blocks] == before
    assert reuse.store.refs == refs
    check_slots(reuse.store)
    reuse.release("dst")
    reuse.release("src")


def test_controller_can_drop_an_idle_session(pair):
    from engine.actions import DropSession
    reuse, _ = pair
    finish(reuse, prompt(6, 30), "d")
    with pytest.raises(ActionError):
        reuse.handle.apply(DropSession("seq-1"))           # not an idle session
    r = reuse.handle.apply(DropSession("session/d"))
    assert r.ok and r.freed_bytes.get(GPU, 0) > 0
    assert "d" not in reuse.sessions and "session/d" not in reuse.store.seqs
    check_slots(reuse.store)


def test_dropping_a_session_while_its_turn_runs_sticks(pair):
    reuse, _ = pair
    finish(reuse, prompt(7, 30), "live")
    sid = reuse.submit(Request(prompt_ids=prompt(7, 30) + [4, 5], session_id="live",
                               sampling=SamplingParams(max_tokens=6, ignore_eos=True)),
                       lambda ev: None)
    reuse.step()
    assert reuse.sessions["live"].active == sid
    assert reuse.drop_session("live")
    while reuse.running or reuse.waiting:
        reuse.step()
    assert "live" not in reuse.sessions and not reuse.idle
    assert reuse.store.held_slots(GPU) == 0


def test_fork_copies_by_default_so_each_copy_can_be_compressed(pair):
    """Evaluations fork one prefill and compress each copy apart: a plain fork shares
    nothing, so every strategy sees its blocks as its own."""
    reuse, _ = pair
    reuse.prefill("p", prompt(8, 40))
    reuse.fork("p", "c")
    assert not reuse.store.refs
    snap = reuse.handle.snapshot()
    assert not any(b.shared for v in snap.sequences for b in v.blocks)
    reuse.release("c")
    reuse.release("p")
