"""Overlapped steps (``engine.overlap_steps``): the next decode step launched before this
one's tokens are read gives exactly the tokens, finishes, slots and index of steps run
one after the other. On CPU ``"on"`` runs the launched-ahead step eagerly: no speed, the
same bookkeeping as the CUDA-graph path (tests/engine/test_cuda_graphs.py runs that)."""
import pytest

from engine.actions import Quantize
from engine.api import FinishEvent, Request, SamplingParams
from engine.engine import Engine, EngineConfig
from engine.store import GPU

from tests.engine.test_engine import run_all as run_engine
from tests.engine.test_prefix_reuse import check_slots, prompt

KW = dict(model="random:tiny", device="cpu", dtype="float32", block_size=4,
          kv_budget_bytes=1 << 20, page_bytes=4096, max_batch_tokens=64, observe_window=4)


@pytest.fixture
def pair():
    """The same weights; steps overlapped in the first, one after the other in the second."""
    a = Engine(EngineConfig(overlap_steps="on", **KW))
    b = Engine(EngineConfig(overlap_steps="off", **KW))
    yield a, b
    a.stop()
    b.stop()


def run_all(engine, reqs):
    """(token ids, finish reason, tokens generated) of each request, run to the end."""
    ids, done, toks = run_engine(engine, reqs)
    return [([ev.token_id for ev in toks.get(i, [])], done[i].reason, done[i].num_generated)
            for i in ids]


def requests(eos_ignored=True, sampled=False):
    out = []
    for i, (n, m) in enumerate([(3, 5), (17, 2), (9, 30), (40, 7), (6, 19), (11, 1)]):
        p = SamplingParams(max_tokens=m, ignore_eos=eos_ignored)
        if sampled and i % 2:
            p = SamplingParams(max_tokens=m, ignore_eos=eos_ignored, temperature=0.8,
                               top_k=20, seed=i)
        out.append(Request(prompt_ids=prompt(i, n), sampling=p))
    return out


@pytest.mark.parametrize("sampled", [False, True])
def test_same_tokens_finishes_and_slots_as_steps_in_order(pair, sampled):
    on, off = pair
    want = run_all(off, requests(sampled=sampled))
    got = run_all(on, requests(sampled=sampled))
    assert got == want
    assert on.num_overlapped > 20          # most decode steps were launched ahead
    assert on.snapshot().graphs["num_overlapped"] == on.num_overlapped   # status shows it
    assert on._ahead is None
    check_slots(on.store)
    assert on.store.held_slots(GPU) == 0 and not on.store.seqs


def test_a_stop_token_mid_batch_gives_back_the_row_launched_ahead(pair):
    """Sequences that stop on a token (not by length: the launch cannot foresee it) end
    with the same tokens, and the position their launched-ahead row wrote is given back."""
    on, off = pair
    ref = run_all(off, requests())
    stop = ref[2][0][4]                     # the 5th token of the longest request
    for e in pair:
        e.eos_ids = {stop}
    want = run_all(off, requests(eos_ignored=False))
    got = run_all(on, requests(eos_ignored=False))
    assert got == want
    assert any(r == "stop" for _, r, _ in got)
    check_slots(on.store)
    assert on.store.held_slots(GPU) == 0


def test_sessions_and_commands_between_steps(pair):
    """A 3-turn chat (its KV kept between turns) beside other requests, and a move
    applied between two ``step`` calls (a command run at once forgets the step launched
    ahead): the same tokens as steps in order."""
    def chat(e):
        hist, outs = [], []
        for t in range(3):
            hist = hist + prompt(20 + t, 9 + 5 * t)
            ev = next(x for x in e.generate(Request(
                prompt_ids=list(hist), session_id="c",
                sampling=SamplingParams(max_tokens=9, ignore_eos=True)))
                if isinstance(x, FinishEvent))
            outs.append(ev.token_ids)
            hist = hist + ev.token_ids
        return outs

    def with_move(e):
        toks = []
        sid = e.submit(Request(prompt_ids=prompt(7, 33), sampling=SamplingParams(
            max_tokens=20, ignore_eos=True)), lambda ev: toks.append(getattr(ev, "token_id", None)))
        for i in range(40):
            e.step()
            if i == 6:
                r = e.handle.apply(Quantize(sid, (1, 2, 3), 2))
                assert r.ok, r.message
                # the move saw the sequence as a reader of finished steps does
                toks.append(e.store.seqs[sid].num_tokens)
        return toks

    assert chat(on := pair[0]) == chat(pair[1])
    assert with_move(on) == with_move(pair[1])
    check_slots(on.store)


def test_a_session_turn_that_stops_on_a_token_keeps_exactly_its_kv(pair):
    """A turn that ends on a stop token while its next step was already launched: the
    session keeps the KV of its tokens only (the next turn reuses it and must give the
    tokens a replay without reuse gives)."""
    on, off = pair

    def chat(e, stop):
        e.eos_ids = {stop} if stop is not None else set()
        hist, outs = [], []
        for t in range(3):
            hist = hist + prompt(40 + t, 10 + 3 * t)
            ev = next(x for x in e.generate(Request(
                prompt_ids=list(hist), session_id="s",
                sampling=SamplingParams(max_tokens=12, ignore_eos=stop is None)))
                if isinstance(x, FinishEvent))
            held = [x["num_tokens"] for x in e.snapshot().sessions]
            outs.append((ev.token_ids, ev.reason, held))   # `kvctl sessions` shows held
            hist = hist + ev.token_ids
        e.drop_session("s")
        return outs

    stop = chat(off, None)[0][0][5]         # a token the first turn produces mid-way
    want = chat(off, stop)
    assert want[0][1] == "stop"
    assert chat(on, stop) == want
    assert on.num_overlapped > 0
    check_slots(on.store)


def test_overlap_setting_is_checked():
    with pytest.raises(ValueError, match="overlap_steps"):
        EngineConfig(model="random:tiny", overlap_steps="maybe")


def test_threaded_engine_same_tokens(pair):
    """The engine thread (the daemon's way): requests posted from another thread while
    steps are launched ahead end with the tokens of steps in order."""
    import threading

    def threaded(e):
        done, toks, all_done = {}, {}, threading.Event()
        reqs = requests()

        def cb(ev):
            if isinstance(ev, FinishEvent):
                done[ev.seq_id] = ev
                if len(done) == len(reqs):
                    all_done.set()
            else:
                toks.setdefault(ev.seq_id, []).append(ev.token_id)
        e.start()
        try:
            ids = [e.submit(r, cb) for r in reqs]
            assert all_done.wait(60)
        finally:
            e.stop()
        return [(toks.get(i, []), done[i].reason) for i in ids]
    on, off = pair
    assert threaded(on) == threaded(off)
    assert on.num_overlapped > 0
    check_slots(on.store)
