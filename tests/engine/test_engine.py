"""Continuous batching, sampling, stopping, cancel, budgets: what a user notices."""
import time

import pytest

from engine.api import FinishEvent, Request, SamplingParams, TokenEvent
from engine.engine import Engine, EngineConfig
from engine.store import GPU


def run_all(engine, reqs):
    done, toks = {}, {}

    def cb(ev):
        if isinstance(ev, FinishEvent):
            done[ev.seq_id] = ev
        else:
            toks.setdefault(ev.seq_id, []).append(ev)
    ids = [engine.submit(r, cb) for r in reqs]
    for _ in range(10_000):
        if len(done) == len(ids):
            break
        engine.step()
    return ids, done, toks


def test_no_blocks_in_use_after_requests_finish_or_cancel(tiny):
    reqs = [Request(prompt_ids=list(range(1, 1 + n)),
                    sampling=SamplingParams(max_tokens=m, ignore_eos=True))
            for n, m in [(3, 5), (17, 2), (9, 30), (40, 7)]]
    victim = tiny.submit(Request(prompt_ids=[5] * 11, sampling=SamplingParams(max_tokens=500)),
                         lambda ev: None)
    tiny.step()
    tiny.step()
    assert tiny.store.held_slots(GPU) > 0
    assert tiny.cancel(victim)
    ids, done, _ = run_all(tiny, reqs)
    assert [done[i].num_generated for i in ids] == [5, 2, 30, 7]
    a = tiny.store.arenas[GPU]
    assert tiny.store.held_slots(GPU) == 0        # what is left is cached prefix blocks
    tiny.store.clear_cache()
    assert a.alloc.num_slots == 0 and a.used_bytes == 0 and a.block_bytes == 0
    assert not tiny.store.seqs and not tiny.running and not tiny.waiting


def test_cancel_emits_cancelled_and_unknown_cancel_is_false(tiny):
    events = []
    sid = tiny.submit(Request(prompt_ids=[1, 2, 3], sampling=SamplingParams(max_tokens=100)),
                      events.append)
    tiny.step()
    assert tiny.cancel(sid)
    assert isinstance(events[-1], FinishEvent) and events[-1].reason == "cancelled"
    assert not tiny.cancel(sid)
    assert not tiny.cancel("nope")


def test_seeded_sampling_is_reproducible_and_differs_across_seeds(tiny):
    def gen(seed):
        p = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=seed, max_tokens=12,
                           ignore_eos=True)
        _, done, _ = run_all(tiny, [Request(prompt_ids=[7, 8, 9], sampling=p)])
        return next(iter(done.values())).token_ids
    assert gen(1) == gen(1)
    assert gen(1) != gen(2)


def test_top_k_one_is_greedy(tiny):
    greedy = SamplingParams(max_tokens=10, ignore_eos=True)
    topk1 = SamplingParams(temperature=0.7, top_k=1, seed=3, max_tokens=10, ignore_eos=True)
    _, d1, _ = run_all(tiny, [Request(prompt_ids=[4, 4, 4], sampling=greedy)])
    _, d2, _ = run_all(tiny, [Request(prompt_ids=[4, 4, 4], sampling=topk1)])
    assert next(iter(d1.values())).token_ids == next(iter(d2.values())).token_ids


def test_requests_queue_when_the_budget_is_exhausted_and_run_later(tiny):
    # the arena holds 2 MiB / (2 layers * 4 KiB pages) = 256 pages of 4 slots (4 tokens)
    slots = tiny.store.arenas[GPU].alloc.free_slots(tiny.geom.slot_bytes(
        __import__("engine.layout", fromlist=["FULL"]).FULL))
    big = (slots - 2) * 4  # nearly all of it
    reqs = [Request(prompt_ids=[3] * big, sampling=SamplingParams(max_tokens=3, ignore_eos=True)),
            Request(prompt_ids=[2] * 40, sampling=SamplingParams(max_tokens=3, ignore_eos=True))]
    seen_waiting = []
    orig = tiny.step

    def step():
        seen_waiting.append(len(tiny.waiting))
        return orig()
    tiny.step = step
    try:
        ids, done, _ = run_all(tiny, reqs)
    finally:
        del tiny.step
    assert max(seen_waiting[1:]) == 1  # the second waited for room
    assert all(done[i].reason == "length" for i in ids)


def test_decode_stalls_without_crashing_when_blocks_run_out(tiny):
    alloc = tiny.store.arenas[GPU].alloc
    from engine.layout import FULL
    slot = tiny.geom.slot_bytes(FULL)
    sid = tiny.submit(Request(prompt_ids=[1] * 4, sampling=SamplingParams(max_tokens=50,
                                                                          ignore_eos=True)),
                      lambda ev: None)
    tiny.step()
    hog = alloc.allocate_many(slot, alloc.free_slots(slot))  # someone took everything
    for _ in range(8):
        tiny.step()
    snap = tiny.handle.snapshot()
    view = next(v for v in snap.sequences if v.seq_id == sid)
    assert view.state == "stalled" and snap.num_stalled == 1 and snap.pressure_bytes > 0
    for o in hog:
        alloc.free(o, slot)
    before = view.num_generated
    tiny.step()
    after = next(v for v in tiny.handle.snapshot().sequences if v.seq_id == sid)
    assert after.state == "decode" and after.num_generated == before + 1
    tiny.cancel(sid)


def test_stop_string_and_eos(engine):
    req = Request(prompt="Count: 1, 2, 3, 4,", sampling=SamplingParams(max_tokens=30,
                                                                        stop=(" 7",)))
    evs = list(engine.generate(req))
    fin = evs[-1]
    assert fin.reason == "stop" and " 7" not in fin.text and fin.text.rstrip().endswith("6,")
    assert "".join(e.text for e in evs if isinstance(e, TokenEvent)) == fin.text


@pytest.mark.parametrize("bad, msg", [
    (dict(prompt_ids=[10**9]), "vocabulary"),
    (dict(prompt_ids=[1] * 9000), "context"),
    (dict(prompt=""), "empty"),
])
def test_bad_requests_are_refused_clearly(engine, bad, msg):
    with pytest.raises(ValueError, match=msg):
        engine.submit(Request(**bad), lambda ev: None)
    assert not engine.waiting


def test_bad_sampling_params_are_refused():
    for kw in (dict(temperature=-1), dict(top_p=0), dict(max_tokens=0), dict(top_k=-2)):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
    with pytest.raises(ValueError):
        Request(prompt="a", prompt_ids=[1])


def test_engine_step_thread_runs_at_the_configured_nice():
    """thread_nice lowers the step thread's CPU priority only (the server's threads keep
    theirs); 0 leaves it alone; out of range is refused."""
    import os

    base = os.getpriority(os.PRIO_PROCESS, 0)
    for nice, want in ((7, min(19, base + 7)), (0, base)):
        e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                                block_size=4, kv_budget_bytes=2 << 20, page_bytes=4096,
                                thread_nice=nice))
        e.start()
        try:
            deadline = time.time() + 5
            tid = e._thread.native_id
            while os.getpriority(os.PRIO_PROCESS, tid) != want and time.time() < deadline:
                time.sleep(0.01)
            assert os.getpriority(os.PRIO_PROCESS, tid) == want
            assert os.getpriority(os.PRIO_PROCESS, 0) == base
        finally:
            e.stop()
    with pytest.raises(ValueError, match="thread_nice"):
        EngineConfig(model="random:tiny", thread_nice=20)


@pytest.mark.parametrize("cut, b_first_step", [(None, 0), (0, 24)])
def test_a_finishing_prompt_does_not_wait_on_the_next_prompts_chunk(cut, b_first_step):
    # two 40-token prompts arrive together, 64-token steps. By default the step in which
    # the first prompt finishes holds nothing of the second (its first token comes after
    # its own 40 tokens' work, not 64); prefill_cut_tokens=0 packs every step full
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32", block_size=4,
                            kv_budget_bytes=2 << 20, page_bytes=4096, max_batch_tokens=64,
                            prefill_cut_tokens=cut))
    try:
        sp = SamplingParams(max_tokens=3, ignore_eos=True)
        done: dict[str, FinishEvent] = {}

        def cb(ev):
            if isinstance(ev, FinishEvent):
                done[ev.seq_id] = ev
        a, b = (e.submit(Request(prompt_ids=[5 + i] * 40, sampling=sp), cb) for i in range(2))
        e.step()
        assert len(e.seqs[a].output_ids) == 1 and e.seqs[b].num_prefilled == b_first_step
        for _ in range(20):
            e.step()
        assert [done[i].num_generated for i in (a, b)] == [3, 3]
    finally:
        e.stop()


def test_prefill_cut_tokens_must_not_be_negative():
    with pytest.raises(ValueError, match="prefill_cut_tokens"):
        EngineConfig(model="random:tiny", prefill_cut_tokens=-1)


def test_the_snapshot_says_where_step_time_went(tiny):
    """Operators see the engine thread's seconds by part of a step (moves applied,
    admission, the model run, ...) and how many steps wrote prompt chunks or only
    decoded, with their seconds; the parts add up to the steps."""
    ids, done, _ = run_all(tiny, [Request(prompt_ids=list(range(1, 60)),
                                          sampling=SamplingParams(max_tokens=12,
                                                                  ignore_eos=True))])
    t = dict(tiny.laps.seconds)          # between steps: every step's parts counted
    assert tiny.handle.snapshot().step_times.get("decode_steps", 0) >= 1
    assert t["prefill_steps"] >= 1 and t["decode_steps"] >= 11
    assert t["launch"] > 0 and t["sample"] > 0
    parts = sum(v for k, v in t.items() if not k.endswith(("_steps", "_s")))
    steps = sum(v for k, v in t.items() if k.endswith("_s"))
    assert parts == pytest.approx(steps, rel=1e-6, abs=1e-6)


def test_steps_that_compile_triton_kernels_are_counted(tiny, monkeypatch):
    """A step that met a new kernel specialization stopped for its compile: the snapshot
    counts the kernels compiled, the steps that compiled them and those steps' seconds
    (on a fresh GPU, 1-4 s steps of the headline's adaptive run; none on the CPU)."""
    import sys
    import types

    import engine.engine as engine_mod
    from engine.kernels import jit_count

    fn = types.SimpleNamespace(device_caches={0: ({"a": 1, "b": 2}, None, None)})
    fake = types.ModuleType("fake_triton_kernels")
    fake.kernel = fn
    monkeypatch.setitem(sys.modules, jit_count.MODULES[0], fake)
    monkeypatch.setattr(jit_count, "_FOUND", {})
    assert jit_count.compiled_kernels() == 2
    keys = jit_count.compiled_keys()
    fn.device_caches[0][0]["c"] = 3          # one more compiled
    assert jit_count.compiled_kernels() == 3
    assert {k for _, k in jit_count.compiled_keys() - keys} == {"c"}

    before = dict(tiny.handle.snapshot().graphs)
    n = {"now": tiny.laps._compiled}
    monkeypatch.setattr(engine_mod, "compiled_kernels", lambda: n["now"])
    n["now"] += 3               # three specializations compiled in the next step
    run_all(tiny, [Request(prompt_ids=list(range(1, 40)),
                           sampling=SamplingParams(max_tokens=4, ignore_eos=True))])
    after = tiny.handle.snapshot().graphs
    assert after["kernel_compiles"] - before["kernel_compiles"] == 3
    assert after["compile_steps"] - before["compile_steps"] == 1
    assert after["compile_steps_s"] > before["compile_steps_s"]


def test_warm_up_runs_each_format_and_gives_its_kv_back(tiny):
    """Before serving (on a GPU, from ``start``), short requests written in each format,
    together and then each alone: every format's blocks were read in a decode step. They
    leave nothing behind (no sequence, no cached prefix block); requests then run as
    before. Unknown formats are refused at configuration."""
    tiny.start()
    seen: dict[str, set] = {}
    real = tiny._on_token

    def spy(s, t):
        if s.seq_id.startswith("warmup-"):
            seen.setdefault(s.seq_id, set()).update(
                b.fmt.name for b in tiny.store.seqs[s.seq_id].blocks)
        real(s, t)
    tiny._on_token = spy
    tiny.warm_up(("int8", "int4", "k4v2"))
    tiny._on_token = real
    assert set(seen) == {"warmup-all-0", "warmup-all-1", "warmup-all-2", "warmup-int8-0",
                         "warmup-int4-0", "warmup-k4v2-0"}
    assert {"int8", "full"} <= seen["warmup-int8-0"] and "int4" not in seen["warmup-int8-0"]
    assert "k4v2" in seen["warmup-all-2"] and "k4v2" in seen["warmup-k4v2-0"]
    snap = tiny.handle.snapshot()
    assert not snap.sequences and tiny.store.arenas[GPU].used_bytes == 0
    import threading
    fin = threading.Event()
    tiny.submit(Request(prompt_ids=list(range(1, 30)), sampling=SamplingParams(max_tokens=3)),
                lambda ev: fin.set() if isinstance(ev, FinishEvent) else None)
    assert fin.wait(30)
    with pytest.raises(ValueError, match="warmup_formats"):
        EngineConfig(model="random:tiny", warmup_formats=("int4", "int3"))


def test_a_chunk_over_its_own_earlier_tokens_attends_without_a_built_mask(tiny, monkeypatch):
    """A prompt's later chunk attends over the sequence's earlier tokens and its own
    (causal aligned to the bottom right): the same logits as with the [n, M] mask built,
    which it no longer builds."""
    import torch

    import engine.plan as plan_mod
    import engine.runner as runner_mod
    ids = [(5 * j) % 250 + 1 for j in range(70)]
    real_build = plan_mod.build_plan
    seen = []

    def spy(*a, **k):
        p = real_build(*a, **k)
        seen.extend(s.tail_causal for s in p.prefills)
        return p
    monkeypatch.setattr(runner_mod, "build_plan", spy)
    tiny.prefill("a", ids[:40])
    fast = tiny.extend("a", ids[40:], logits="last")
    assert seen == [False, True]           # the first chunk is plain causal

    def masked(*a, **k):
        p = real_build(*a, **k)
        for s in p.prefills:
            s.tail_causal = False
        return p
    monkeypatch.setattr(runner_mod, "build_plan", masked)
    tiny.prefill("b", ids[:40])
    slow = tiny.extend("b", ids[40:], logits="last")
    assert torch.allclose(fast, slow, atol=1e-5)


def test_start_freezes_the_heap_and_stop_gives_it_back(tiny):
    """What is alive at start-up (the model, the store, every imported module) leaves the
    collector's full passes (a snapshot's blocks otherwise set one off every few builds:
    benchmarks/snapshot_cost.py); stop returns it, so a process that starts and stops
    engines still collects them."""
    import gc
    gc.unfreeze()
    tiny.start()
    assert gc.get_freeze_count() > 0
    tiny.stop()
    assert gc.get_freeze_count() == 0
    off = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                              gc_freeze=False))
    off.start()
    try:
        assert gc.get_freeze_count() == 0
    finally:
        off.stop()


def test_snapshots_take_at_most_a_share_of_the_engine_thread(tiny, monkeypatch):
    """A snapshot walks every block of every sequence: where building one is slow (many
    long sequences), the engine builds them at most PUBLISH_SHARE of its time, even while
    every step changes what runs; a forced read still gets a fresh one."""
    import engine.engine as engine_mod
    real = engine_mod.snapshot.build
    builds = []

    def slow(engine, version):
        time.sleep(0.02)
        builds.append(time.monotonic())
        return real(engine, version)
    monkeypatch.setattr(engine_mod.snapshot, "build", slow)
    t0 = time.monotonic()
    for i in range(40):       # a new request admitted and finished nearly every step
        run_all(tiny, [Request(prompt_ids=[i + 1] * 5,
                               sampling=SamplingParams(max_tokens=2, ignore_eos=True))])
    wall = time.monotonic() - t0
    # not threaded: every snapshot() read is forced; run_all reads none
    assert len(builds) * 0.02 <= 0.1 * wall + 0.02 * 2
    n = len(builds)
    assert tiny.handle.snapshot() is not None and len(builds) == n + 1


def test_a_chunk_over_mixed_formats_and_offloaded_blocks_reads_them_as_stored(tiny):
    """A later chunk's keys come from blocks in several formats, some of them offloaded
    (read from the host arena, one read per format): its logits equal those of the same
    blocks all on the GPU (exact offload is lossless)."""
    import torch

    from engine.actions import Fetch, Offload, Quantize
    ids = [(3 * j) % 250 + 1 for j in range(48)]
    out = []
    for sid, back in (("host", False), ("gpu", True)):
        tiny.prefill(sid, ids[:40])
        for a in (Quantize(sid, (0, 1, 4), 4), Quantize(sid, (2, 5), 8),
                  Offload(sid, (1, 2, 3, 6))):
            assert tiny.handle.apply(a).ok
        if back:
            assert tiny.handle.apply(Fetch(sid, (1, 2, 3, 6))).ok
        tiers = {b.tier for b in tiny.store.seqs[sid].blocks}
        assert len(tiers) == (1 if back else 2)
        out.append(tiny.extend(sid, ids[40:], logits="last"))
        tiny.release(sid)
    assert torch.allclose(out[0], out[1], atol=1e-5)
