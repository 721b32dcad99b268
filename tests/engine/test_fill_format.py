"""A request's kv_format: its blocks, its prompt's included, take that format as they fill,
and admission counts the prompt at that format (plus one prefill chunk at full precision)
instead of waiting for room for it all at full precision."""
from __future__ import annotations

import random

import pytest

from engine.api import FinishEvent, OutOfBlocks, Request, SamplingParams, TokenEvent
from engine.engine import Engine, EngineConfig
from engine.layout import FULL, KVFormat
from engine.store import GPU

INT4 = KVFormat.parse("int4")
CHUNK = 128


def make(budget: int) -> Engine:
    return Engine(EngineConfig(model="random:tiny", device="cpu", max_batch_tokens=CHUNK,
                               kv_budget_bytes=budget, host_budget_bytes=0,
                               prefix_caching=False))


class Sink:
    def __init__(self):
        self.tokens: dict[str, int] = {}
        self.finished: dict[str, str] = {}

    def __call__(self, ev):
        if isinstance(ev, TokenEvent):
            self.tokens[ev.seq_id] = self.tokens.get(ev.seq_id, 0) + 1
        elif isinstance(ev, FinishEvent):
            self.finished[ev.seq_id] = ev.reason


def submit(e, n, kv_format=None, new=8, seed=0, sink=None):
    rnd = random.Random(seed)
    ids = [rnd.randrange(1, 200) for _ in range(n)]
    return e.submit(Request(prompt_ids=ids, kv_format=kv_format, sampling=SamplingParams(
        max_tokens=new, ignore_eos=True)), sink or (lambda ev: None))


def run_to_end(e, steps=3000):
    peak = 0
    for _ in range(steps):
        if not (e.waiting or e.running):
            break
        e.step()
        peak = max(peak, e.store.arenas[GPU].used_bytes)
    return peak


def test_a_prompt_too_big_at_full_precision_runs_in_int4():
    e = make(1 << 20)
    n = 1500                                   # 47 blocks: 1.5 MiB at full precision
    assert not e.prompt_fits(n)
    with pytest.raises(OutOfBlocks):
        submit(e, n)
    assert e.prompt_fits(n, INT4)
    sink = Sink()
    sid = submit(e, n, "int4", sink=sink)
    run_to_end(e)
    assert sink.finished == {sid: "length"} and sink.tokens[sid] == 8


def test_a_prompt_that_fits_by_bytes_but_not_by_pages_is_refused_at_submit():
    """Each format's slots fill pages of their own, so a prompt in a fill format (its
    blocks in it, a chunk at full precision) can fit an empty tier by bytes and never
    by pages: accepted on bytes, it waited forever in an empty engine (the headline's
    CPU run at a 21 MB budget: 5 of 9 requests unfinished after 600 s). Every prompt
    accepted is admitted and finishes; the first that cannot be is refused at submit."""
    e = Engine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                            block_size=4, kv_budget_bytes=64 << 10, page_bytes=4096,
                            max_batch_tokens=16, host_budget_bytes=0,
                            prefix_caching=False))
    alloc = e.store.arenas[GPU].alloc
    try:
        refused = None
        for n in range(4, 400, 4):
            slots = e._prompt_slots(e.store.blocks_for(n) + 1, INT4)
            pages = sum(-(-k // alloc.slots_per_page(sl)) for sl, k in slots.items())
            bytes_fit = sum(sl * k for sl, k in slots.items()) <= alloc.capacity_bytes
            if pages <= alloc.num_pages:
                sink = Sink()
                sid = submit(e, n, "int4", new=2, sink=sink)
                run_to_end(e, steps=500)
                assert sink.finished == {sid: "length"}, n
            else:
                with pytest.raises(OutOfBlocks):
                    submit(e, n, "int4")
                refused = (n, bytes_fit)
                break
        assert refused == (80, True)    # the case: it fits by bytes, not by pages
    finally:
        e.stop()


def test_prompt_blocks_take_the_format_chunk_by_chunk():
    e = make(4 << 20)
    sid = submit(e, 700, "int4", new=1000)
    most_full = 0
    while e.seqs[sid].state != "decode":
        e.step()
        kv = e.store.seqs[sid]
        most_full = max(most_full, sum(b.fmt == FULL for b in kv.blocks))
    # never more than a chunk of the prompt at full precision (it may start mid-block)
    assert most_full <= e.store.blocks_for(CHUNK) + 1
    e.step()
    fmts = [b.fmt for b in e.store.seqs[sid].blocks]
    assert fmts[-1] == FULL and set(fmts[:-1]) == {INT4}


def test_admission_counts_compressed_prompts():
    """Sequences running at once in one budget: 3x or more in int4 than at full
    precision, with no preemption."""
    def running_at_once(kv_format):
        e = make(1 << 20)
        for i in range(8):
            submit(e, 600, kv_format, new=200, seed=i)
        most = 0
        for _ in range(80):
            e.step()
            most = max(most, len(e.running))
        return most, e.num_preemptions
    full, _ = running_at_once(None)
    int4, preempted = running_at_once("int4")
    assert full >= 1 and int4 >= 3 * full, (full, int4)
    assert preempted == 0


def test_prompts_waiting_their_turn_to_be_written_hold_no_full_precision_room():
    """Admitted prompts in a format are written one chunk after another: one not yet
    written holds nothing, so full-precision room is taken only by the chunks being
    written, and the bytes admission counts (the prompts in int4) decide how many run.
    Each admitted prompt used to hold its first chunk at full precision until its turn
    (an H100 at 32K: 7.5 GB of idle chunks, 10 pinned-int4 sequences where 15 fit)."""
    e = make(1 << 20)
    sids = [submit(e, 600, "int4", new=200, seed=i) for i in range(10)]
    e.step()
    admitted = [s for s in sids if e.seqs[s].state != "waiting"]
    unwritten = [s for s in admitted if e.seqs[s].num_prefilled == 0]
    assert len(admitted) > 1 and unwritten
    assert all(not e.store.seqs[s].blocks for s in unwritten)
    full_blocks = sum(b.fmt == FULL for s in admitted for b in e.store.seqs[s].blocks)
    assert full_blocks <= e.store.blocks_for(CHUNK) + 2
    # the prompts' int4 bytes fill the tier, not their waiting chunks
    most = 0
    for _ in range(120):
        e.step()
        most = max(most, len(e.running))
    int4_prompt = e._admission_bytes(600, INT4) - e._admission_bytes(CHUNK, FULL)
    assert most >= (1 << 20) // int4_prompt - 2, (most, int4_prompt)
    assert e.num_preemptions == 0


def test_prompts_admitted_in_a_format_do_not_overcommit_the_tier():
    """Room for a prompt written a chunk at a time is not taken at once: admission counts
    what the prompts admitted before still owe, so none stalls mid-prompt, nothing is
    preempted, and every request finishes."""
    e = make(1 << 20)
    sink = Sink()
    sids = [submit(e, 1200, "int4", new=4, seed=i, sink=sink) for i in range(6)]
    stalled_in_prompt = 0
    for _ in range(3000):
        if not (e.waiting or e.running):
            break
        e.step()
        stalled_in_prompt += sum(s.stalled and s.state == "prefill" for s in e.running)
    assert sink.finished == {s: "length" for s in sids}
    assert e.num_preemptions == 0 and stalled_in_prompt == 0


@pytest.mark.parametrize("bad", ["int3", "int16", "float", "k4v3"])
def test_bad_kv_format_is_refused_with_the_formats_named(bad):
    e = make(1 << 20)
    with pytest.raises(ValueError, match="kv_format|KV format"):
        submit(e, 100, bad)
    assert not e.waiting and not e.seqs


def test_a_prompt_stalled_mid_write_by_growing_sequences_ends_well():
    """Sequences at full precision grow into the room an int4 prompt was admitted on
    (admission does not reserve it): the prompt stalls between chunks, the engine
    preempts as for any stall, and every request still finishes with all its tokens."""
    e = make(1 << 20)
    sink = Sink()
    growers = [submit(e, 200, None, new=300, seed=10 + i, sink=sink) for i in range(2)]
    for _ in range(3):
        e.step()
    late = submit(e, 1500, "int4", new=6, seed=1, sink=sink)
    while e.seqs[late].state != "prefill":
        e.step()
    e.step()
    grown = 0
    while True:                 # the growers' next blocks, taken now: all the room left
        try:
            e.store.reserve(growers[0], grown + 32)
            grown += 32
        except OutOfBlocks:
            break
    e.config.preempt_after_s = 60.0
    e.step()
    assert e.seqs[late].stalled and e.seqs[late].state == "prefill"
    # the pressure the controller sees is the least chunk the prompt goes on with (an
    # eighth of a step's tokens, a block at least), not one block nor a whole chunk
    full, least = e.store.block_bytes(FULL), max(e.store.block_size, CHUNK // 8)
    assert e.handle.snapshot().pressure_bytes >= e.store.blocks_for(least) * full
    e.config.preempt_after_s = 0.0
    moves = e.seqs[late].moves
    for _ in range(5000):
        if not (e.waiting or e.running):
            break
        e.step()
    assert e.num_preemptions >= 1 and any(m.startswith("preempted") for m in moves), moves
    assert sink.finished == {s: "length" for s in growers + [late]}
    assert sink.tokens[late] == 6 and all(sink.tokens[s] == 300 for s in growers)


def test_a_prompt_short_of_room_for_a_chunk_writes_a_smaller_one():
    """Room for less than a step's chunk of an int4 prompt, but for some blocks: the
    prompt goes on with fewer tokens (whole blocks) instead of stalling, so no pressure
    asks the controller to free a whole chunk's bytes, and it ends well."""
    e = make(1 << 20)
    sink = Sink()
    grower = submit(e, 200, None, new=40, seed=10, sink=sink)
    e.step()
    late = submit(e, 1500, "int4", new=6, seed=1, sink=sink)
    while e.seqs[late].state != "prefill":
        e.step()
    e.step()
    T, grown = e.store.block_size, 0
    while e.store.can_reserve(late, CHUNK):      # leave room for less than a chunk
        grown += T
        e.store.reserve(grower, grown)
    assert e.store.can_reserve(late, 2 * T)
    before = e.seqs[late].num_prefilled
    e.step()
    wrote = e.seqs[late].num_prefilled - before
    assert not e.seqs[late].stalled and 0 < wrote < CHUNK and wrote % T == 0, wrote
    assert e.handle.snapshot().pressure_bytes == 0
    run_to_end(e)
    assert sink.finished == {grower: "length", late: "length"}
    assert sink.tokens[late] == 6


def waiting_behind(first_tokens: int):
    """A 1 MiB engine decoding one prompt of ``first_tokens``, and a 900-token request
    submitted behind it (stepped once: admitted if it fits)."""
    e = make(1 << 20)
    first = submit(e, first_tokens, None, new=400)
    while e.seqs[first].state != "decode":
        e.step()
    late = submit(e, 900, None, new=4, seed=3)
    e.step()
    return e, late


def test_a_fill_format_set_while_waiting_admits_at_its_bytes():
    """SetFillFormat on a request still waiting for room (any state before its end, as
    `kv_format` at submit): the engine admits it at that format's bytes, and keeps the
    format across a preemption that recomputes it."""
    from engine.actions import SetFillFormat
    e, late = waiting_behind(400)
    assert e.seqs[late].state == "waiting"          # 900 tokens do not fit at full precision
    assert e.handle.snapshot().pressure_bytes > 0   # shown to the controller
    assert e.handle.apply(SetFillFormat(late, 4)).ok
    for _ in range(50):
        e.step()
        if e.seqs[late].state == "decode":
            break
    assert e.seqs[late].state == "decode"
    assert {b.fmt for b in e.store.seqs[late].blocks[:-1]} == {INT4}   # its prompt
    e.preempt(e.seqs[late])                         # dropped, recomputed on return
    assert e.seqs[late].fill_format == INT4
    with pytest.raises(Exception, match="unknown sequence"):
        e.handle.apply(SetFillFormat("nobody", 4))


def test_the_snapshot_names_the_next_admission_and_its_room_by_format():
    """What the controller prices a fill format with: the request the engine admits
    next, the room admitting it needs at each format (the engine's own admission
    figure), and each sequence's fill format; none once nothing waits."""
    from engine.actions import SetFillFormat
    e, late = waiting_behind(400)
    snap = e.handle.snapshot()
    assert snap.next_admission == late
    need = snap.admission_bytes
    assert need["full"] == e._admission_bytes(900, FULL)
    assert need["int4"] == e._admission_bytes(900, INT4) < need["full"]
    assert need["int8"] < need["full"] and need["int2"] < need["int4"]
    view = {v.seq_id: v for v in snap.sequences}[late]
    assert view.state == "waiting" and view.fill_format == "full"
    e.handle.apply(SetFillFormat(late, 4))
    assert {v.seq_id: v for v in e.handle.snapshot().sequences}[late].fill_format == "int4"
    for _ in range(50):
        e.step()
        if e.seqs[late].state == "decode":
            break
    snap = e.handle.snapshot()
    assert snap.next_admission == "" and snap.admission_bytes == {}


def test_a_prompt_short_of_pages_not_bytes_shows_pressure():
    """A prompt in a fill format needs slots of two sizes, each on its own pages: where
    its bytes fit the free pages but its slots do not, the engine cannot admit it, and
    the snapshot says what is missing (whole pages) instead of no pressure at all."""
    from engine.actions import SetFillFormat
    e, late = waiting_behind(600)
    e.handle.apply(SetFillFormat(late, 4))
    e.step()
    tier = e.handle.snapshot().tiers["gpu"]
    assert e._admission_bytes(900, INT4) <= tier.free_bytes     # the bytes would fit
    assert e.seqs[late].state == "waiting"                       # the pages do not
    alloc = e.store.arenas["gpu"].alloc
    page = alloc.page_bytes * e.store.arenas["gpu"].num_layers
    assert e.handle.snapshot().pressure_bytes == page


def test_a_prompt_in_a_format_shares_a_cached_prefix_and_converts_only_its_own():
    """With prefix reuse: the blocks a prompt shares from the index stay as they are
    (another sequence holds them too; converting would copy, not free); the blocks it
    writes itself take its format; it runs to the end."""
    e = Engine(EngineConfig(model="random:tiny", device="cpu", max_batch_tokens=CHUNK,
                            kv_budget_bytes=4 << 20, host_budget_bytes=0,
                            prefix_caching=True))
    sink = Sink()
    rnd = random.Random(5)
    shared = [rnd.randrange(1, 200) for _ in range(320)]
    first = e.submit(Request(prompt_ids=shared + [7] * 40, sampling=SamplingParams(
        max_tokens=400, ignore_eos=True)), sink)
    while e.seqs[first].state != "decode":
        e.step()
    second = e.submit(Request(prompt_ids=shared + [9] * 400, kv_format="int4",
                              sampling=SamplingParams(max_tokens=4, ignore_eos=True)), sink)
    while e.seqs[second].state != "decode":
        e.step()
    e.step()
    assert e.seqs[second].cached_tokens >= 256
    kv = e.store.seqs[second]
    n_shared = e.seqs[second].cached_tokens // e.store.block_size
    assert all(b.fmt == FULL for b in kv.blocks[:n_shared])
    assert {b.fmt for b in kv.blocks[n_shared:-1]} == {INT4}
    for _ in range(50):
        if second in sink.finished:
            break
        e.step()
    assert sink.finished[second] == "length" and sink.tokens[second] == 4
