"""One writer (issue 11): the engine thread alone changes engine state; moves are refused
on blocks still being written; a candidate takes effect whole or not at all; readers
never wait for a step; tokenizers are never shared between threads.

Each test here failed on main at 6eb73dd (run against that commit in a worktree)."""
import threading
import time

import pytest
import torch

from engine import moves
from engine.actions import ActionError, Evict, Offload, Quantize, SetDecodeMode
from engine.api import Overloaded, Request, SamplingParams
from engine.arena import SlabAllocator
from engine.engine import Engine, EngineConfig
from engine.store import GPU, HOST


def tiny(**kw):
    cfg = dict(model="random:tiny", device="cpu", dtype="float32", block_size=4,
               kv_budget_bytes=2 << 20, page_bytes=4096, max_batch_tokens=64)
    return Engine(EngineConfig(**{**cfg, **kw}))


def req(n, max_tokens=8, start=1, **kw):
    return Request(prompt_ids=[(start + 7 * j) % 500 + 1 for j in range(n)],
                   sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)


def run_to_end(e, events, sids, limit=2000):
    for _ in range(limit):
        done = {ev.seq_id for ev in events if type(ev).__name__ == "FinishEvent"}
        if set(sids) <= done:
            return
        e.step()
    raise AssertionError("sequences did not finish")


def test_moves_refused_on_a_prompt_still_being_written():
    """A prompt longer than one step's tokens: after the first chunk its blocks past the
    written rows exist but are not fully written, and the sequence is in prefill. Every
    move on it is refused with a reason; it then finishes like an untouched one."""
    e = tiny(max_batch_tokens=10)
    try:
        events = []
        sid = e.submit(req(30), events.append)
        e.step()                                    # rows 0..9 of 30 written
        view = next(v for v in e.handle.snapshot().sequences if v.seq_id == sid)
        assert view.state == "prefill" and view.blocks[2].num_tokens == 2
        # (a fill format is not a move: it applies in any state, tests/engine/test_fill_format.py)
        for a in (Quantize(sid, (2,), 4), Quantize(sid, (0, 1), 8), Evict(sid, (2,)),
                  Offload(sid, (1,))):
            with pytest.raises(ActionError, match="prefill|not fully written"):
                e.handle.apply(a)
        assert all(b.fmt.is_full and b.tier == GPU for b in e.store.seqs[sid].blocks)
        run_to_end(e, events, [sid])
        fin = events[-1]
        assert fin.reason == "length" and fin.error == "" and len(fin.token_ids) == 8
        # the same prompt never touched gives the same tokens
        ref = list(e.generate(req(30)))[-1]
        assert ref.token_ids == fin.token_ids
    finally:
        e.stop()


def test_partly_written_block_refused_even_outside_prefill_state():
    """The store's own check (not only the sequence state): a block with fewer rows than
    the block size can only be the newest; moves name it, they are refused."""
    e = tiny()
    try:
        e.prefill("h", list(range(1, 23)))          # 22 tokens: blocks 0..5, 5 has 2 rows
        e.store.seqs["h"].blocks[3].num_tokens = 3  # as a chunk boundary would leave it
        with pytest.raises(ActionError, match="not fully written"):
            e.handle.apply(Quantize("h", (3,), 4))
        with pytest.raises(ActionError, match="not fully written"):
            e.handle.apply(Offload("h", (3,)))
        e.store.seqs["h"].blocks[3].num_tokens = 4
        e.handle.apply(Quantize("h", (3,), 4))
        e.release("h")
    finally:
        e.stop()


def test_candidate_is_all_or_nothing():
    """top-k decode then an offload the host tier cannot take: the sequence keeps exact
    decode and every block where it was (6eb73dd left it in top-k, nothing freed)."""
    e = tiny(host_budget_bytes=0)
    try:
        e.prefill("c", list(range(1, 41)))
        before = [(b.fmt, b.tier, b.offset) for b in e.store.seqs["c"].blocks]
        res = e.handle.apply_candidates([(SetDecodeMode("c", "topk", 2),
                                          Offload("c", (2, 3)))])[0]
        assert not res.ok and "host tier" in res.error
        kv = e.store.seqs["c"]
        assert (kv.decode_mode, kv.top_k) == ("exact", 0)
        assert [(b.fmt, b.tier, b.offset) for b in kv.blocks] == before
        # an irreversible action may only come last: nothing after it could be undone
        bad = e.handle.apply_candidates([(Quantize("c", (2,), 4), Offload("c", (3,)))])[0]
        assert not bad.ok and "last" in bad.error
        assert [(b.fmt, b.tier, b.offset) for b in kv.blocks] == before
        e.release("c")
    finally:
        e.stop()


def test_quantize_never_stops_half_way(monkeypatch):
    """Quantize in batches on a full arena: 6eb73dd converted the first batches, then the
    fragmented arena refused one, leaving some blocks int8 and raising. Now the plan is
    checked on a copy of the allocator first: refused, nothing changed."""
    e = tiny(kv_budget_bytes=2 * 8 * 4096)          # 2 layers x 8 pages
    try:
        geom = e.geom
        full, int8 = geom.slot_bytes(moves.FULL), geom.slot_bytes(moves.KVFormat(8, 8))
        assert 4096 // full == 2 and 4096 // int8 == 3, "the construction below needs these"
        e.prefill("q", list(range(1, 65)))          # 16 full blocks: every page, 2 a page
        assert not e.store.arenas[GPU].alloc._free_pages
        monkeypatch.setattr(moves, "BATCH", 2)
        # compaction off (it would find block 7 a place beside block 5; test_compaction)
        monkeypatch.setattr(SlabAllocator, "evacuation_page", lambda self, skip=(): None)
        before = [(b.fmt, b.offset) for b in e.store.seqs["q"].blocks]
        # [2, 3] free page 1 whole (3 int8 slots, 2 used); [4, 6] find 1 left, and
        # freeing them frees no page (blocks 5 and 7 share theirs)
        with pytest.raises(ActionError, match="fragmented"):
            e.handle.apply(Quantize("q", (2, 3, 4, 6), 8))
        assert [(b.fmt, b.offset) for b in e.store.seqs["q"].blocks] == before
        e.handle.apply(Quantize("q", (2, 3, 4), 8))        # what fits still converts
        e.release("q")
        assert e.store.held_slots(GPU) == 0
    finally:
        e.stop()


def test_reads_never_wait_for_a_step(monkeypatch):
    """While the engine thread is inside a slow forward pass, snapshots return at once
    (6eb73dd took the engine lock, held for the whole step)."""
    e = tiny()
    entered = threading.Event()
    slow = e.runner.run

    def run(*a, **kw):
        entered.set()
        time.sleep(1.5)
        return slow(*a, **kw)
    monkeypatch.setattr(e.runner, "run", run)
    e.start()
    try:
        e.submit(req(8, max_tokens=2), lambda ev: None)
        assert entered.wait(5)
        t0 = time.monotonic()
        snap = e.handle.snapshot()
        assert time.monotonic() - t0 < 0.5
        assert snap.num_running == 1 or snap.num_waiting == 1
    finally:
        e.stop()


def test_moves_are_applied_by_the_engine_thread():
    """With the engine thread running, a move posted from another thread is applied on
    the engine thread (between steps), and its result comes back to the poster."""
    e = tiny()
    e.start()
    try:
        done = threading.Event()
        sid = e.submit(req(40, max_tokens=400), lambda ev: None)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            v = next((v for v in e.handle.snapshot().sequences if v.seq_id == sid), None)
            if v is not None and v.state == "decode":
                break
            time.sleep(0.01)
        seen = []
        orig = e.apply_candidates

        def spy(c):
            seen.append(threading.current_thread().name)
            return orig(c)
        e.apply_candidates = spy
        r = e.handle.apply(Quantize(sid, (1, 2), 4))
        assert r.ok and r.freed_bytes[GPU] > 0 and seen == ["kvctl-engine"]
        e.cancel(sid)
        done.set()
    finally:
        e.stop()


def test_waiting_queue_is_bounded():
    e = tiny(max_waiting=3)
    try:
        for i in range(3):
            e.submit(req(8, start=i), lambda ev: None)
        with pytest.raises(Overloaded, match="retry") as info:
            e.submit(req(8, start=9), lambda ev: None)
        assert info.value.retry_after_s > 0
        e.step()                      # admitted: room in the queue again
        e.submit(req(8, start=10), lambda ev: None)
    finally:
        e.stop()


def test_generated_ids_skip_ids_clients_chose():
    e = tiny()
    try:
        e.submit(req(8, seq_id="seq-1"), lambda ev: None)
        sid = e.submit(req(8), lambda ev: None)     # 6eb73dd: "already in use"
        assert sid != "seq-1"
    finally:
        e.stop()


@pytest.mark.model
def test_each_thread_tokenizes_with_its_own_tokenizer(engine):
    """Fast tokenizers are not thread-safe: every thread but the writer gets a copy,
    and concurrent tokenization equals tokenizing one by one."""
    texts = [f"Request {i}: " + "the quick brown fox " * (20 + i) for i in range(24)]
    want = [engine.tokenizer(t)["input_ids"] for t in texts]
    got, toks, errors = {}, {}, []

    def work(i):
        try:
            for _ in range(3):
                got[i] = engine.tokenize(Request(prompt=texts[i]))
            toks[i] = engine._tokenizer_here()
        except Exception as err:
            errors.append(err)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and [got[i] for i in range(24)] == want
    assert len({id(t) for t in toks.values()}) == 24
    assert all(t is not engine.tokenizer for t in toks.values())


def test_step_failure_ends_only_its_sequences_and_rolls_back(monkeypatch):
    """An exception inside the forward pass ends the sequences that were in the step
    with reason 'error'; the store's lengths are rolled back, no block leaks, and a
    sequence submitted afterwards runs normally."""
    e = tiny()
    try:
        events = []
        a = e.submit(req(8, max_tokens=3), events.append)
        boom = {"n": 1}
        real = e.runner.run

        def run(*args, **kw):
            if boom["n"]:
                boom["n"] -= 1
                raise RuntimeError("injected failure")
            return real(*args, **kw)
        monkeypatch.setattr(e.runner, "run", run)
        e.step()
        fin = [ev for ev in events if type(ev).__name__ == "FinishEvent"]
        assert [(f.seq_id, f.reason) for f in fin] == [(a, "error")]
        assert "internal error" in fin[0].error and e.num_step_failures == 1
        assert e.store.held_slots(GPU) == 0
        b = list(e.generate(req(8, max_tokens=3)))[-1]
        assert b.reason == "length" and len(b.token_ids) == 3
    finally:
        e.stop()


def test_out_of_memory_in_a_step_is_retried_smaller(monkeypatch):
    """An out-of-memory error inside a step loses nothing: lengths roll back, the step is
    retried with fewer tokens, and the tokens equal an undisturbed run."""
    e = tiny()
    try:
        ref = list(e.generate(req(30, max_tokens=6)))[-1].token_ids
        real = e.runner.run
        fails = {"n": 2}

        def run(decode, chunks):
            if fails["n"]:
                fails["n"] -= 1
                raise torch.OutOfMemoryError("injected: CUDA out of memory")
            return real(decode, chunks)
        monkeypatch.setattr(e.runner, "run", run)
        got = list(e.generate(req(30, max_tokens=6)))[-1]
        assert got.reason == "length" and got.token_ids == ref
        assert e.num_oom_retries == 2 and e.num_step_failures == 0
        assert e.store.held_slots(GPU) == 0
    finally:
        e.stop()


def test_swapped_blocks_live_on_host():
    e = tiny(host_budget_bytes=2 << 20)
    try:
        e.prefill("s", list(range(1, 30)))
        idx = moves.swap_out(e.store, "s")
        assert idx and all(e.store.seqs["s"].blocks[i].tier == "swapped" for i in idx)
        assert e.store.held_slots(GPU) == 0
        assert e.store.held_slots(HOST) == len(idx)
        moves.swap_in(e.store, "s", idx)
        assert all(b.tier == GPU for b in e.store.seqs["s"].blocks)
        e.release("s")
    finally:
        e.stop()


def test_default_threads_follow_the_cpus_really_available(monkeypatch, tmp_path):
    """6eb73dd left torch at every core: with one other busy process on a 2-core node
    OpenMP collapsed to 1.8-2.0 tok/s (15.3-15.6 with 1 thread)."""
    from engine import config as cfg

    monkeypatch.setattr(cfg.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5, 6, 7})
    real = cfg.Path

    def fake_path(p):
        return tmp_path / "cpu.max" if p == "/sys/fs/cgroup/cpu.max" else real(p)
    monkeypatch.setattr(cfg, "Path", fake_path)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cfg.available_cpus() == 8 and cfg.default_num_threads() == 7
    (tmp_path / "cpu.max").write_text("250000 100000\n")        # a 2.5-CPU quota
    assert cfg.available_cpus() == 2 and cfg.default_num_threads() == 1
    monkeypatch.setattr(cfg.os, "sched_getaffinity", lambda pid: {3})
    assert cfg.default_num_threads() == 1
    assert cfg.EngineConfig(num_threads=3).threads == 3


def test_failure_after_the_model_run_ends_its_sequences_not_the_others(monkeypatch):
    """A bug after the forward pass (statistics, sampling, events) leaves KV holding a
    token no event announced: those sequences end with reason 'error' instead of
    generating on from a state that no longer matches; the rest run on, nothing leaks."""
    e = tiny()
    try:
        events = []
        a = e.submit(req(8, max_tokens=50), events.append)
        e.step()                                          # a prefilled, decoding
        b = e.submit(req(8, max_tokens=4, start=3), events.append)
        real = e._after
        boom = {"n": 1}

        def after(plan):
            if boom["n"] and plan.decode is not None:
                boom["n"] -= 1
                raise ValueError("injected bug in the statistics")
            return real(plan)
        monkeypatch.setattr(e, "_after", after)
        run_to_end(e, events, [a, b])
        fins = {ev.seq_id: ev for ev in events if type(ev).__name__ == "FinishEvent"}
        # both were in the failing step (a decoding, b's prompt)
        assert [fins[s].reason for s in (a, b)] == ["error", "error"]
        assert "internal error" in fins[a].error and e.num_step_failures == 1
        assert e.store.held_slots(GPU) == 0
        monkeypatch.setattr(e, "_after", real)
        c = list(e.generate(req(8, max_tokens=4, start=3)))[-1]
        d = list(e.generate(req(8, max_tokens=4, start=3)))[-1]
        assert c.reason == "length" and len(c.token_ids) == 4 and c.token_ids == d.token_ids
    finally:
        e.stop()
