"""The policy loop on a real (tiny) engine: pressure brings moves that free memory,
profiles and pins limit which moves, pressure's end brings offloaded blocks back."""
import pytest

from controller.policy import Controller, DecisionLog, PolicyState
from engine.api import Request, SamplingParams
from engine.layout import FULL
from tests.controller.helpers import tiny_engine

MOVES = {"quantize", "evict", "offload"}


@pytest.fixture
def eng():
    e = tiny_engine()
    yield e
    e.stop()


def fill(e, n_seqs=3, n_tokens=120):
    ids = [e.submit(Request(prompt_ids=[(7 * i + j) % 400 + 1 for j in range(n_tokens)],
                            sampling=SamplingParams(max_tokens=1000, ignore_eos=True)),
                    lambda ev: None) for i in range(n_seqs)]
    for _ in range(4):
        e.step()
    return ids


def controller(e, profile="balanced", frac_used=0.5, pins=None):
    """A controller whose budget puts the current usage at ``frac_used`` of it."""
    used = e.handle.snapshot().tiers["gpu"].used_bytes
    policy = PolicyState(profile=profile, budget_bytes=int(used / frac_used),
                         high_watermark=0.9, low_watermark=0.75)
    for s, strat in (pins or {}).items():
        policy.pin(s, strat)
    return Controller(policy, DecisionLog(), e.handle)


def arena_controller(e):
    """A balanced controller whose budget is the whole GPU arena, moving any sequence
    at every tick (no rest between two moves)."""
    budget = e.handle.snapshot().tiers["gpu"].capacity_bytes
    c = Controller(PolicyState(profile="balanced", budget_bytes=budget,
                               high_watermark=0.9, low_watermark=0.75),
                   DecisionLog(), e.handle)
    c.loop.min_interval_s = 0.0
    return c


def test_added_step_latency_is_priced_for_every_running_sequence(eng):
    """Streaming offloaded blocks slows every step, so every running sequence pays it:
    on a GPU bus an exact offload's price grows with the sequences running, while a
    quantization's (accuracy only, one sequence's) does not."""
    from dataclasses import replace

    from controller.predictors.bus import Bus
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    snap = eng.handle.snapshot()
    assert snap.num_running == 3
    bus = Bus(55.3e9, 0.0, "a GPU's PCIe")

    def priced(s):
        moves = c.loop._priced(s, {ids[0]: 1 << 30}, "balanced", {}, bus)[ids[0]]
        return {m.candidate.strategy: m for m in moves}
    three, one = priced(snap), priced(replace(snap, num_running=1))
    off3, off1 = three["offload_exact"], one["offload_exact"]
    assert off1.latency_s > 0 and off1.accuracy == 0
    assert off3.total == pytest.approx(3 * off1.total)
    assert three["mixed_precision"].total == pytest.approx(one["mixed_precision"].total)


def test_exact_offload_on_a_graphed_gpu_pays_for_the_eager_steps(eng):
    """An exactly offloaded block is streamed by every step, outside any CUDA graph: the
    batch runs eager. On a GPU engine with graphs that step time is priced (the engine's
    own eager less replayed step time, or one side from the other when only one was
    timed, or a prior replay before either), and the cheapest move per byte turns from
    exact offload to a compression. A sequence that already streams does not make the
    next one free: the batch stays eager until the last streamer is gone."""
    from dataclasses import replace

    from controller.predictors.bus import PRIOR_REPLAY_S, Bus, graph_loss_s
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    snap = replace(eng.handle.snapshot(), device="cuda:0")
    assert Bus.of(eng.handle.snapshot()).graph_loss_s == 0.0      # the CPU: no graphs
    assert graph_loss_s(snap) == 0.0                 # graphs off on this engine: none
    stats = {"num_graphs": 3, "num_replays": 0, "num_eager": 0, "num_overlapped": 0}
    untimed = replace(snap, graphs=stats)            # prompts still being written
    assert graph_loss_s(untimed) == pytest.approx(3 * PRIOR_REPLAY_S)
    timed = replace(snap, graphs={**stats, "replay_step_s": 0.010})
    assert graph_loss_s(timed) == pytest.approx(0.030)            # before any eager step
    eager_only = replace(snap, graphs={**stats, "eager_step_s": 0.040})
    assert graph_loss_s(eager_only) == pytest.approx(0.030)       # never replayed
    both = replace(snap, graphs={**stats, "replay_step_s": 0.010, "eager_step_s": 0.045})
    assert graph_loss_s(both) == pytest.approx(0.035)             # measured
    streaming = replace(both, sequences=[
        replace(v, decode_mode="exact", state="decode",
                bytes_by_tier={**v.bytes_by_tier, "host": 4096}) if i == 0 else v
        for i, v in enumerate(both.sequences)])
    assert graph_loss_s(streaming) == pytest.approx(0.035)

    def cheapest(s):
        bus = Bus.of(s)
        moves = c.loop._priced(s, {ids[0]: 1 << 16}, "balanced", {}, bus)[ids[0]]
        by = {m.candidate.strategy: m for m in moves}
        return min(by, key=lambda k: by[k].cost), by
    without, by0 = cheapest(snap)
    with_loss, by1 = cheapest(both)
    assert without == "offload_exact"
    assert with_loss != "offload_exact"
    assert cheapest(untimed)[0] != "offload_exact"      # before any decode-only step
    assert cheapest(streaming)[0] != "offload_exact"    # another one streams already
    assert by1["offload_exact"].latency_s == pytest.approx(
        by0["offload_exact"].latency_s + 0.035)


def test_no_moves_between_watermarks(eng):
    fill(eng)
    c = controller(eng, frac_used=0.8)
    assert c.tick(eng.handle.snapshot()) == []


@pytest.mark.parametrize("profile", ["balanced", "accuracy-critical", "streaming",
                                     "long-context", "throughput", "multi-turn"])
def test_pressure_brings_cheapest_moves_that_free_memory(eng, profile):
    ids = fill(eng)
    c = controller(eng, profile, frac_used=1.0)       # at 100% of budget: above 90%
    before = eng.handle.snapshot().tiers["gpu"].block_bytes
    decisions = c.tick(eng.handle.snapshot())
    moves = [d for d in decisions if d.kind in MOVES]
    assert decisions[0].kind == "pressure" and moves
    assert all(d.freed_bytes > 0 and d.seq_id in ids and d.reason for d in moves)
    after = eng.handle.snapshot().tiers["gpu"].block_bytes
    assert before - after == sum(d.freed_bytes for d in moves)   # measured, not predicted
    if profile == "accuracy-critical":   # never evicts, never below int8
        assert {d.action.split()[0] for d in moves} <= {"quantize_int8", "offload_exact"}
    for _ in range(3):                   # generation goes on over the moved blocks
        eng.step()
    assert all(len(eng.seqs[s].output_ids) >= 4 for s in ids)


def test_pins_override_the_profile(eng):
    ids = fill(eng)
    c = controller(eng, "balanced", frac_used=1.0, pins={s: "heavy_hitter" for s in ids})
    moves = [d for d in c.tick(eng.handle.snapshot()) if d.kind in MOVES]
    assert moves and all(d.action.startswith("heavy_hitter") for d in moves)


def test_end_of_pressure_fetches_offloaded_blocks_back(eng):
    ids = fill(eng)
    c = controller(eng, "multi-turn", frac_used=1.0)
    c.loop.min_interval_s = 0.0
    moves = [d for d in c.tick(eng.handle.snapshot()) if d.kind == "offload"]
    assert moves
    offloaded = sum(b.tier == "host" for s in ids for b in eng.store.seqs[s].blocks)
    assert offloaded > 0
    c.policy.update(budget_bytes=c.policy.view().budget_bytes * 4)  # pressure gone
    fetched = [d for d in c.tick(eng.handle.snapshot()) if d.kind == "fetch"]
    assert fetched
    assert sum(b.tier == "host" for s in ids for b in eng.store.seqs[s].blocks) < offloaded


def test_a_sequence_moved_recently_waits(eng):
    fill(eng)
    c = controller(eng, "balanced", frac_used=1.0)
    c.loop.min_interval_s = 3600.0                    # no timing in the test: "recently"
    first = [d.seq_id for d in c.tick(eng.handle.snapshot()) if d.kind in MOVES]
    c.policy.update(budget_bytes=1)                   # still (hugely) over budget
    second = [d.seq_id for d in c.tick(eng.handle.snapshot()) if d.kind in MOVES]
    assert first and not set(first) & set(second)


# -- budgets a user sets: reached on exact bytes, with the cheapest moves, without flapping
# (issue 15). Held sequences of 1,000 tokens in 32-token blocks (fp32 store: int8 0.31x,
# int4 0.19x, k4v2 0.16x, int2 0.125x of full precision; the newest block stays full).

class Clock:
    """The controller's clock: one second a tick, so rate limits never stall a test."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def held(e, n_seqs=3, n_tokens=1000):
    import random

    rng = random.Random(0)
    ids = [f"h{i}" for i in range(n_seqs)]
    for sid in ids:
        e.prefill(sid, [rng.randint(1, 500) for _ in range(n_tokens)])
    return ids


def budgeted(e, frac, profile="balanced", high=0.9, low=0.75):
    """A controller whose budget is ``frac`` of the sequences' full-precision bytes."""
    snap = e.handle.snapshot()
    full = sum(len(s.blocks) for s in snap.sequences) * snap.format_bytes["full"]
    clock = Clock()
    policy = PolicyState(profile=profile, budget_bytes=int(frac * full),
                         high_watermark=high, low_watermark=low)
    return Controller(policy, DecisionLog(), e.handle, clock=clock), clock


def tick_until_quiet(e, c, clock, quiet=3, limit=40):
    out, n = [], 0
    for _ in range(limit):
        d = c.tick(e.handle.snapshot())
        clock.t += 1.0
        out += d
        n = 0 if d else n + 1
        if n >= quiet:
            break
    return out


def layout(e):
    """(format, tier) of every block of every sequence."""
    return {(s.seq_id, b.index): (b.fmt, b.tier) for s in e.handle.snapshot().sequences
            for b in s.blocks}


@pytest.fixture
def big():
    e = tiny_engine(block_size=32, host_budget_bytes=0, kv_budget_bytes=8 << 20,
                    page_bytes=0)
    yield e
    e.stop()


@pytest.mark.parametrize("frac", [0.5, 0.25])
def test_budget_reached_by_quantization_alone_when_it_suffices(big, frac):
    held(big)
    c, clock = budgeted(big, frac)
    decisions = tick_until_quiet(big, c, clock)
    snap = big.handle.snapshot()
    gpu = snap.tiers["gpu"]
    # no host tier: every move is lossy, so only what the budget needs: down to the high
    # watermark less a block of room for each held sequence (they grow when appended
    # to), not to the low one
    mark = c.relief_mark(snap, c.policy.view(), c.policy.view().budget_bytes)
    assert 0.75 < mark < 0.9
    assert gpu.block_bytes <= mark * c.policy.view().budget_bytes
    assert [d.kind for d in decisions].count("pressure") == 1
    moves = [d for d in decisions if d.kind in MOVES]
    assert moves and {d.kind for d in moves} == {"quantize"}            # nothing evicted
    assert all(b.tier == "gpu" for s in snap.sequences for b in s.blocks)
    assert sum(d.freed_bytes for d in moves) > 0
    # one move per sequence reached it: formats chosen once, no stepping down
    assert len(moves) == 3


def test_evicts_only_what_the_lowest_formats_cannot_reach(big):
    held(big)
    c, clock = budgeted(big, 0.125)
    decisions = tick_until_quiet(big, c, clock)
    snap = big.handle.snapshot()
    budget = c.policy.view().budget_bytes
    mark = c.relief_mark(snap, c.policy.view(), budget)      # no host tier: the high one
    assert snap.tiers["gpu"].block_bytes <= mark * budget
    assert "unmet" not in {d.kind for d in decisions}
    fb = snap.format_bytes
    # formats alone cannot reach it: every block but the newest at int2 is still too much
    blocks = sum(len(s.blocks) for s in snap.sequences)
    assert blocks * fb["int2"] + 3 * (fb["full"] - fb["int2"]) > mark * budget
    for s in snap.sequences:
        evicted = [b for b in s.blocks if b.tier == "evicted"]
        kept = [b for b in s.blocks[:-1] if b.tier == "gpu"]
        assert evicted and kept and len(evicted) < len(s.blocks) / 2
        assert all(b.index >= snap.num_sink_blocks for b in evicted)          # sinks kept
        assert all(b.index < s.blocks[-2].index for b in evicted)             # recent kept
    gpu = sum(b.nbytes for s in snap.sequences for b in s.blocks if b.tier == "gpu")
    assert gpu == snap.tiers["gpu"].block_bytes                               # exact bytes


def test_no_lossy_block_is_quantized_again_while_sequences_grow(big):
    ids = held(big, n_tokens=600)
    c, clock = budgeted(big, 0.3, high=0.9, low=0.8)
    seen: dict = {}
    moved = []
    for step in range(70):                    # ~2 new blocks a sequence, ticks between
        moved += [d for d in tick_until_quiet(big, c, clock, quiet=1, limit=3)
                  if d.kind in MOVES]
        for key, (fmt, tier) in layout(big).items():
            was = seen.get(key)
            if was and was[0] != "full" and tier == "gpu":
                assert fmt == was[0], f"{key}: {was[0]} -> {fmt}"
            seen[key] = (fmt, tier)
        big.append(ids, [step % 400 + 1] * len(ids))
    assert len(moved) > 3                     # the first relief, then the grown blocks
    used = big.handle.snapshot().tiers["gpu"].block_bytes
    assert used <= 0.9 * c.policy.view().budget_bytes + 3 * big.store.block_bytes(FULL)


def test_a_grown_block_is_quantized_before_anything_more_is_evicted(big):
    """After the first relief every block but the newest is lossy, so a later relief can
    only lower the blocks filled since, or evict. Reaching the relief mark (the high
    watermark less a block of headroom a sequence) would take an eviction; getting under
    the high watermark takes only the new blocks at a lower format. An eviction is for
    good, so that later relief quantizes and evicts nothing (at 4K on the default model
    one such eviction doubled a sample's KL: docs/BENCHMARKS.md, "Two ladders")."""
    import random

    rng = random.Random(1)
    for _ in range(3):                        # decoding: the relief mark keeps headroom
        big.submit(Request(prompt_ids=[rng.randint(1, 500) for _ in range(600)],
                           sampling=SamplingParams(max_tokens=200, ignore_eos=True)),
                   lambda ev: None)
    while [s.state for s in big.handle.snapshot().sequences] != ["decode"] * 3:
        big.step()
    c, clock = budgeted(big, 0.3, high=0.9, low=0.8)
    assert [d for d in tick_until_quiet(big, c, clock) if d.kind in MOVES]
    budget = c.policy.view().budget_bytes
    for _ in range(32):                       # one more full block a sequence
        big.step()
    snap = big.handle.snapshot()
    used = snap.tiers["gpu"].block_bytes
    mark = c.relief_mark(snap, c.policy.view(), budget)
    assert used > 0.9 * budget and mark < 0.9
    before = {k for k, (_, tier) in layout(big).items() if tier == "evicted"}
    moves = [d for d in tick_until_quiet(big, c, clock, quiet=1, limit=3) if d.kind in MOVES]
    after = {k for k, (_, tier) in layout(big).items() if tier == "evicted"}
    assert moves and {d.kind for d in moves} == {"quantize"} and after == before
    assert big.handle.snapshot().tiers["gpu"].block_bytes <= 0.9 * budget


def test_a_budget_that_cannot_be_met_is_reported_once_and_the_loop_stops(big):
    held(big)
    c, clock = budgeted(big, 0.01)              # under the newest blocks' own bytes
    decisions = tick_until_quiet(big, c, clock)
    unmet = [d for d in decisions if d.kind == "unmet"]
    assert len(unmet) == 1
    why = unmet[0].reason
    assert "budget unmet" in why and "newest blocks" in why and "allowed moves" in why
    before = layout(big)
    later = tick_until_quiet(big, c, clock, quiet=10)
    assert later == [] and layout(big) == before          # no more moves, no flapping


def test_a_static_sequence_is_not_offloaded_then_fetched_back():
    e = tiny_engine(block_size=32, kv_budget_bytes=8 << 20, page_bytes=0,
                    host_budget_bytes=8 << 20, staging_bytes=4 << 20)
    try:
        held(e, n_seqs=1)
        c, clock = budgeted(e, 0.5, profile="multi-turn")   # offload before compressing
        decisions = tick_until_quiet(e, c, clock, quiet=10)
        kinds = [d.kind for d in decisions]
        assert "offload" in kinds and "fetch" not in kinds and "refused" not in kinds
        assert kinds.count("pressure") == 1
    finally:
        e.stop()


def test_pressure_counts_exact_bytes_not_pages(big):
    """One sequence's share of the GPU tier is its blocks' bytes: the controller's
    pressure, a move's predicted bytes and what the engine reports freed agree."""
    held(big, n_seqs=1)
    snap = big.handle.snapshot()
    seq = snap.sequences[0]
    gpu = snap.tiers["gpu"]
    assert gpu.block_bytes == seq.bytes_by_tier["gpu"] == Controller.used_of(snap)
    assert gpu.used_bytes <= gpu.block_bytes * 1.05 + big.store.page_bytes * 2


def test_fetch_back_takes_the_room_at_once_and_stops():
    """Once pressure is gone, offloaded blocks come back in one move per sequence (the
    room is counted in the blocks' bytes, so a fetch is never repeated a few blocks at a
    time while a page count stays flat), and nothing is offloaded again."""
    e = tiny_engine(block_size=32, kv_budget_bytes=8 << 20, page_bytes=0,
                    host_budget_bytes=8 << 20, staging_bytes=4 << 20)
    try:
        ids = held(e)
        c, clock = budgeted(e, 0.6, profile="multi-turn")
        assert "offload" in {d.kind for d in tick_until_quiet(e, c, clock)}
        c.policy.update(budget_bytes=c.policy.view().budget_bytes * 4)
        later = tick_until_quiet(e, c, clock, quiet=5)
        fetched = [d for d in later if d.kind == "fetch"]
        assert len(fetched) == len(ids) and len({d.seq_id for d in fetched}) == len(ids)
        assert {d.kind for d in later} <= {"fetch", "pressure_cleared"}
        assert all(b.tier == "gpu" for s in e.handle.snapshot().sequences for b in s.blocks)
    finally:
        e.stop()


def test_a_sequences_moves_are_compared_in_one_unit(big):
    """The learned model answers in KL, the heuristic in PPL fractions: where the model
    falls back on one of a sequence's moves (a plan touching blocks hotter than any it
    was trained on), the heuristic prices all of them, or the plan would lose to an
    eviction by units alone (seen on passkey retrieval: sink_window won and lost the
    needle)."""
    from controller.predictors.heuristic import HeuristicPredictor, Prediction

    class HalfLearned:                  # answers evictions (at no cost), not the rest
        heuristic = HeuristicPredictor()

        def predict_many(self, items, bus=None):
            return [Prediction(0.0, 0.0, "learned") if c.kind == "evict"
                    else self.heuristic.predict(s, c, bus) for s, c in items]

    held(big, n_seqs=1)
    c, _ = budgeted(big, 0.25, profile="throughput")       # int4, heavy hitters, k4v2
    c.loop.predictor = HalfLearned()
    need = Controller.used_of(big.handle.snapshot()) // 2
    moves = c.loop.candidates(big.handle.snapshot(), need, "throughput", {}, now=1e9)
    assert {m.candidate.kind for m in moves} == {"quantize", "evict"}
    assert all(m.source == "heuristic" and m.accuracy > 0 for m in moves)


def _idle_session(e, n_tokens=120):
    from engine.api import FinishEvent
    req = Request(prompt_ids=[(5 * j) % 400 + 1 for j in range(n_tokens)], session_id="s",
                  sampling=SamplingParams(max_tokens=3, ignore_eos=True))
    assert isinstance(list(e.generate(req))[-1], FinishEvent)
    return "session/s"


@pytest.mark.parametrize("host", [True, False])
def test_idle_sessions_give_before_live_sequences(host):
    """Under pressure an idle session is moved first: parked on host losslessly when
    there is a host tier, else quantized or dropped; live sequences are left alone while
    it covers the need, and its offloaded blocks are not fetched back when pressure ends."""
    e = tiny_engine(**({} if host else {"host_budget_bytes": 0}))
    try:
        hid = _idle_session(e)
        ids = fill(e, n_seqs=2, n_tokens=40)
        gpu_idle = e.handle.snapshot()
        idle_gpu = next(v for v in gpu_idle.sequences if v.seq_id == hid).bytes_by_tier["gpu"]
        used = gpu_idle.tiers["gpu"].block_bytes
        # a budget whose need the idle session's bytes cover
        policy = PolicyState(profile="balanced", budget_bytes=int((used - idle_gpu // 2) / 0.9),
                             high_watermark=0.9, low_watermark=0.89)
        c = Controller(policy, DecisionLog(), e.handle)
        c.loop.min_interval_s = 0.0
        moves = [d for d in c.tick(e.handle.snapshot()) if d.kind in MOVES | {"refused"}]
        assert moves and {d.seq_id for d in moves} == {hid}
        assert all(d.kind != "refused" for d in moves)
        if host:
            assert moves[0].action.startswith("park_idle_session")
            assert any(b.tier == "host" for b in e.store.seqs[hid].blocks)
            policy.update(budget_bytes=used * 10)          # pressure gone
            assert not [d for d in c.tick(e.handle.snapshot()) if d.kind == "fetch"]
        else:
            assert moves[0].action.split()[0] in ("mixed_precision", "drop_idle_session")
        for s in ids:
            assert all(b.fmt == FULL and b.tier == "gpu" for b in e.store.seqs[s].blocks)
    finally:
        e.stop()


def test_room_for_waiting_requests_is_not_bought_with_step_time(eng):
    """On a GPU bus, while requests wait and nothing running is stalled, no move that
    adds step time (offloads streamed every step) is offered: the room would admit more
    requests and slow every step. Compressions still are; with a stalled sequence
    (the other way out is a preemption) offloads are offered again."""
    from dataclasses import replace

    from controller.predictors.bus import Bus
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    bus = Bus(55.3e9, 0.0, "a GPU's PCIe")
    snap = eng.handle.snapshot()

    def offered(s):
        return {m.candidate.strategy: m for m in
                c.loop._priced(s, {ids[0]: 1 << 30}, "balanced", {}, bus)[ids[0]]}
    free = offered(snap)
    assert free["offload_exact"].latency_s > 0
    queued = offered(replace(snap, num_waiting=3, pressure_bytes=1 << 20))
    assert queued and all(m.latency_s == 0 for m in queued.values())
    assert "offload_exact" not in queued and "mixed_precision" in queued
    stalled = offered(replace(snap, num_waiting=3, num_stalled=1))
    assert "offload_exact" in stalled
    # an unmet budget says so
    why = c.loop.explain_unmet(replace(snap, num_waiting=3), "balanced", {}, bus)
    assert "offloads are not offered while requests wait" in why
    assert "not offered" not in c.loop.explain_unmet(replace(snap, num_waiting=3),
                                                     "balanced", {}, Bus.none())
    # the CPU has no bus: its offloads cost no step time and stay on offer
    assert "offload_exact" in {m.candidate.strategy for m in c.loop._priced(
        replace(snap, num_waiting=3), {ids[0]: 1 << 30}, "balanced", {}, Bus.none())[ids[0]]}


def _burst(e, c, bus, max_tokens: int, limit: int = 4000) -> set:
    """Ten 200-token requests at once, the controller ticking after every step until
    all finish (at most ``limit`` steps); the finish reasons (every one must finish)."""
    done = {}
    for i in range(10):
        e.submit(Request(prompt_ids=[(11 * i + j) % 300 + 1 for j in range(200)],
                         sampling=SamplingParams(max_tokens=max_tokens, ignore_eos=True)),
                 lambda ev: done.__setitem__(ev.seq_id, ev.reason)
                 if hasattr(ev, "reason") else None)
    for _ in range(limit):
        if len(done) == 10:
            break
        e.step()
        c._tick(e.handle.snapshot(), bus)
    assert len(done) == 10, f"{len(done)} of 10 finished in {limit} steps"
    return set(done.values())


@pytest.mark.parametrize("on_bus", [True, False])
def test_a_queue_on_a_bus_is_served_without_streaming_offloads(on_bus):
    """A burst of requests past the budget, the controller ticking after every step: on a
    node with a bus no move that streams blocks is planned while requests wait and nothing
    running is stalled, and every request still finishes. Without a bus (the CPU)
    offloads cost no step time and are planned as before."""
    from controller.predictors.bus import Bus
    e = tiny_engine(kv_budget_bytes=256 << 10, max_batch_tokens=64)
    try:
        c = arena_controller(e)
        bus = Bus(55.3e9, 0.0, "a GPU's PCIe") if on_bus else Bus.none()
        planned, while_queued = [], []
        orig = c.loop.plan_relief

        def spy(snapshot, *a, **k):
            moves = orig(snapshot, *a, **k)
            planned.extend(moves)
            if snapshot.num_waiting and not snapshot.num_stalled:
                while_queued.extend(m for m in moves if m.candidate.kind == "offload")
            return moves
        c.loop.plan_relief = spy
        assert _burst(e, c, bus, max_tokens=30) == {"length"}
        assert planned                                   # the budget did bite
        if on_bus:
            assert while_queued == []
        else:
            assert while_queued                          # the same run, no bus: offloads
    finally:
        e.stop()


def _move(seq, strategy, freed, total):
    from controller.loop import Move
    from controller.strategies import Candidate
    cand = Candidate(strategy, seq, (), (0,), freed, False,
                     "offload" if strategy.startswith("offload") else "quantize")
    return Move(cand, total / freed, total, 0.0, "heuristic", total, 100)


def test_relief_takes_the_least_total_cost_over_all_sequences():
    """Two sequences, each with a quantization (90 B at 0.09) and a top-k offload (100 B
    at 0.29). For 190 B one of them must take the offload, not both: the share rule
    (95 B each, met only by the offload) paid 0.58 where 0.38 frees enough. Where the
    cheap moves are enough both quantize; where nothing frees the need, each sequence
    takes its largest move; a free move goes first."""
    from controller.loop import _pick

    def priced(extra=()):
        return {s: [_move(s, "mixed_precision", 90, 0.09), _move(s, "offload_topk", 100, 0.29),
                    *[_move(s, *e) for e in extra]] for s in ("a", "b")}

    def plan(need, extra=()):
        chosen = _pick(priced(extra), need)
        return sorted(m.candidate.strategy for m in chosen.values() if m), \
            sum(m.total for m in chosen.values() if m)
    names, cost = plan(190)
    assert names == ["mixed_precision", "offload_topk"] and cost == pytest.approx(0.38)
    assert plan(180) == (["mixed_precision", "mixed_precision"], pytest.approx(0.18))
    assert plan(90) == (["mixed_precision"], pytest.approx(0.09))
    assert plan(10**6)[0] == ["offload_topk", "offload_topk"]
    assert plan(60, extra=[("offload_exact", 60, 0.0)]) == (["offload_exact"], 0.0)


def test_topk_offload_on_a_graphed_gpu_pays_for_its_row(eng):
    """A sequence that starts decoding over top-k pages adds a top-k row to every step:
    on a GPU engine that timed steps with and without such rows, a top-k offload pays
    the measured cost of a row (steps with rows less replayed steps, per row), besides
    its bytes; a sequence already decoding top-k pays only its bytes. Before a step
    with such rows was timed, a prior share of a replayed step (priced 0, 21 sequences
    went top-k at once on an H100); on the CPU, nothing is added."""
    from dataclasses import replace

    from controller.predictors.bus import (PRIOR_REPLAY_S, TOPK_ROW_OVER_REPLAY, Bus,
                                           topk_row_s)
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    snap = replace(eng.handle.snapshot(), device="cuda:0")
    stats = {"num_graphs": 3, "num_replays": 10, "num_eager": 0, "replay_step_s": 0.020}
    untimed = replace(snap, graphs=stats)
    timed = replace(snap, graphs={**stats, "topk_step_s": 0.060, "topk_rows": 4.0})
    assert topk_row_s(eng.handle.snapshot()) == 0.0          # the CPU engine: no graphs
    assert topk_row_s(untimed) == pytest.approx(TOPK_ROW_OVER_REPLAY * 0.020)
    assert topk_row_s(replace(snap, graphs={"num_replays": 0})) == pytest.approx(
        TOPK_ROW_OVER_REPLAY * PRIOR_REPLAY_S)
    assert Bus.of(timed).topk_row_s == pytest.approx(0.010)

    def topk_latency(s, seq_id):
        moves = c.loop._priced(s, {seq_id: 1 << 16}, "balanced", {}, Bus.of(s))[seq_id]
        return next(m.latency_s for m in moves if m.candidate.strategy == "offload_topk")
    assert topk_latency(timed, ids[0]) == pytest.approx(
        topk_latency(untimed, ids[0]) + 0.010 - TOPK_ROW_OVER_REPLAY * 0.020)
    # already top-k (its blocks partly on host): no new row
    already = replace(timed, sequences=[
        replace(v, decode_mode="topk", top_k=2, blocks=[
            b._replace(tier="host") if b.index == 1 else b for b in v.blocks],
            bytes_by_tier={**v.bytes_by_tier, "host": v.blocks[1].nbytes})
        if v.seq_id == ids[0] else v for v in timed.sequences])
    base = replace(already, graphs=stats)
    assert topk_latency(already, ids[0]) == pytest.approx(topk_latency(base, ids[0]))


def test_a_waiting_prompt_is_written_in_a_cheaper_format_where_that_costs_least():
    """Requests past the budget: the request the engine admits next may be written in a
    lossy format as it fills (SetFillFormat), priced as that format over its whole
    prompt against compressing the running sequences. Such a prompt is never written at
    full precision first; a pinned request keeps its own format; every request finishes."""
    from controller.predictors.bus import Bus
    from controller.predictors.costs import quantize_cost
    e = tiny_engine(kv_budget_bytes=256 << 10, max_batch_tokens=64)
    try:
        c = arena_controller(e)
        done, ids = {}, []
        for i in range(10):
            ids.append(e.submit(Request(
                prompt_ids=[(11 * i + j) % 300 + 1 for j in range(200)],
                sampling=SamplingParams(max_tokens=30, ignore_eos=True),
                kv_format="int8" if i == 9 else None),
                lambda ev: done.__setitem__(ev.seq_id, ev.reason)
                if hasattr(ev, "reason") else None))
        offered = None
        decisions = []
        written_full = set()
        for _ in range(4000):
            if len(done) == 10:
                break
            e.step()
            snap = e.handle.snapshot()
            if offered is None and snap.next_admission and snap.admission_bytes:
                offered = {m.candidate.strategy: m for m in
                           c.loop._fill_moves(snap, "balanced", {})}
                nxt = snap.next_admission
            for s in e.running:
                kv = e.store.seqs.get(s.seq_id)
                if kv and s.fill_format != FULL and any(
                        b.fmt == FULL for b in kv.blocks[:-1]
                        if b.index < s.num_prefilled // e.store.block_size - 1):
                    written_full.add(s.seq_id)
            decisions += c._tick(snap, Bus(55.3e9, 0.0, "a GPU's PCIe"))
        assert len(done) == 10 and set(done.values()) == {"length"}
        # what was offered for the next admission: each format mixed_precision has
        # with keys of 4 bits or more, priced as that format over the whole prompt,
        # freeing what its room shrinks by
        assert offered and set(offered) == {"fill_int8", "fill_int4", "fill_k4v2"}
        for name, m in offered.items():
            assert m.candidate.seq_id == nxt and m.latency_s == 0
            assert m.total == pytest.approx(quantize_cost(name[5:], 1.0, 1.0))
            assert m.candidate.freed_bytes > 0
        fills = [d for d in decisions if d.kind == "fill"]
        assert fills and ids[9] not in {d.seq_id for d in fills}    # its own format
        assert not written_full
        for d in fills:
            assert d.action.startswith("fill_") and d.predicted_cost > 0
    finally:
        e.stop()


def test_a_plan_rests_between_slices_so_the_engine_thread_runs(monkeypatch):
    """The policy thread shares the interpreter with the engine's, which gives it up at
    every torch op: a plan rests after each slice of its work, in proportion to the
    slice (holding the interpreter ``duty`` of the time); with duty 1 it never rests."""
    import controller.loop as loop_mod
    from benchmarks.policy_tick import snapshot
    from controller.loop import PolicyLoop
    from controller.predictors.bus import Bus

    snap, used = snapshot(6, 40)
    rests = []
    monkeypatch.setattr(loop_mod.time, "sleep", rests.append)
    PolicyLoop(slice_s=0.0, duty=0.25).plan_relief(snap, used // 4, "balanced", {},
                                                   Bus(55.3e9, 0.0, "x"))
    assert len(rests) >= 6 and all(r > 0 for r in rests)       # one a sequence at least
    rests.clear()
    PolicyLoop(duty=1.0).plan_relief(snap, used // 4, "balanced", {}, Bus(55.3e9, 0.0, "x"))
    assert rests == []


def _streaming(seq, freed, total, latency_s=0.005):
    from dataclasses import replace
    return replace(_move(seq, "offload_topk", freed, total), latency_s=latency_s)


def test_headroom_is_not_bought_with_step_time():
    """The bytes that must go now (``floor``: a stalled sequence's block, the excess over
    the high watermark) may take a move that streams at every step; the headroom down to
    the low watermark may not. Here 3 sequences: quantizations free 30 B each, top-k
    offloads 100 B each at a lower price per byte. For 250 B with a 20 B floor, the
    plan was three top-k rows (every later step slower); now it is one quantization
    (the floor), the headroom waiting. A floor only streaming can free takes the least
    such moves; without a floor the plan is as before."""
    from controller.loop import _pick, _stream_for_floor_only
    priced = {s: [_move(s, "mixed_precision", 30, 0.06), _streaming(s, 100, 0.1)]
              for s in ("a", "b", "c")}

    def names(c):
        return sorted(m.candidate.strategy for m in c.values() if m)
    assert names(_pick(priced, 250)) == ["offload_topk"] * 3
    assert names(_stream_for_floor_only(priced, _pick(priced, 250), 250, 20)) \
        == ["mixed_precision"]
    # the headroom reachable without streaming: all of it, without streaming
    assert names(_stream_for_floor_only(priced, _pick(priced, 90), 90, 20)) \
        == ["mixed_precision"] * 3
    # a floor past what the quantizations free: the fewest streaming moves for it
    assert names(_stream_for_floor_only(priced, _pick(priced, 250), 250, 150)) \
        == ["offload_topk"] * 2


def test_a_pause_costs_its_share_of_the_batch_not_a_row_on_every_step(eng):
    """On a GPU engine a decoding sequence may be paused (its blocks swapped to host
    memory, no steps for it until it fits again): priced as its share of the batch's
    progress, a replayed step over the running sequences, which the latency weight
    (per running sequence) turns into one step's time. A top-k row adds its measured
    time to every step for all of them, so where both free the bytes the pause is
    cheaper. Not offered: on the CPU (offload costs no step time there), while requests
    wait (room for them is not bought with progress), to a sequence running alone, nor
    where the profile allows no offload."""
    from dataclasses import replace

    from controller.predictors.bus import Bus
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    stats = {"num_graphs": 3, "num_replays": 10, "num_eager": 0, "replay_step_s": 0.020,
             "topk_step_s": 0.150, "topk_rows": 10.0}
    snap = replace(eng.handle.snapshot(), device="cuda:0", graphs=stats)
    assert Bus.of(snap).step_s == 0.020

    def offered(s, profile="balanced", bus=None):
        return {m.candidate.strategy: m for m in c.loop._priced(
            s, {ids[0]: 1 << 16}, profile, {}, Bus.of(s) if bus is None else bus)[ids[0]]}
    by = offered(snap)
    pause = by["pause"]
    assert pause.candidate.kind == "pause" and pause.accuracy == 0.0
    assert pause.candidate.freed_bytes == snap.sequences[0].bytes_by_tier["gpu"]
    assert pause.latency_s == pytest.approx(0.020 / 3)
    assert pause.total == pytest.approx(0.020)              # balanced: weight 1 per row
    assert by["offload_topk"].total > 3 * 0.013 > pause.total
    assert "pause" not in offered(eng.handle.snapshot(), bus=Bus.none())     # the CPU
    assert "pause" not in offered(replace(snap, num_waiting=2, pressure_bytes=1 << 20))
    assert "pause" not in offered(replace(snap, num_running=1))
    assert "pause" not in offered(snap, profile="throughput")               # no offload
    assert "pause" in offered(snap, profile="accuracy-critical")


def test_a_burst_on_a_gpu_bus_pauses_rather_than_streams():
    """Requests past the budget on a node with a bus, the controller ticking after every
    step: once the queue drains and the sequences grow past what compression frees, the
    plan pauses sequences (swapped whole to host, resumed when they fit) instead of
    putting rows on top-k pages, and every request finishes."""
    from controller.predictors.bus import Bus
    e = tiny_engine(kv_budget_bytes=256 << 10, max_batch_tokens=64)
    try:
        c = arena_controller(e)
        bus = Bus(55.3e9, 0.0, "a GPU's PCIe", 0.030, 0.010, 0.020)
        assert _burst(e, c, bus, max_tokens=60, limit=6000) == {"length"}
        kinds = c.log.counts
        assert kinds["pause"] > 0 and e.num_paused == kinds["pause"], kinds
        assert not any("offload_topk" in d.action for d in c.log.recent()), kinds
    finally:
        e.stop()


def test_a_waiting_request_is_not_admitted_by_pausing_running_ones(eng):
    """While a sequence is stalled and a request waits, the pressure holds both needs;
    moves that slow every step (here: pauses) go only to the stalled bytes and the
    excess over the high watermark (``stream``), never to the admission: an H100 run
    paused 22 sequences at once for one waiting request. Without the limit the same
    plan pauses for the whole need."""
    from dataclasses import replace

    from controller.predictors.bus import Bus
    fill(eng, n_seqs=4)
    c = controller(eng, frac_used=1.0)
    c.loop.min_interval_s = 0.0
    stats = {"num_graphs": 3, "num_replays": 10, "num_eager": 0, "replay_step_s": 0.020,
             "topk_step_s": 0.150, "topk_rows": 10.0}
    snap = replace(eng.handle.snapshot(), device="cuda:0", graphs=stats, num_waiting=1,
                   num_stalled=1)
    gpu = sum(v.bytes_by_tier.get("gpu", 0) for v in snap.sequences)
    # compression frees nothing here: only pauses and offloads are on offer
    c.loop.allowed = lambda pin, profile: ("offload_exact",)
    need = gpu * 3 // 4
    one = max(v.bytes_by_tier.get("gpu", 0) for v in snap.sequences)

    def pauses(stream):
        moves = c.loop.plan_relief(snap, need, "balanced", {}, Bus.of(snap), need, stream)
        return [m for m in moves if m.candidate.kind == "pause"]
    assert sum(m.candidate.freed_bytes for m in pauses(None)) >= need
    small = pauses(one // 2)
    assert len(small) == 1 and small[0].candidate.freed_bytes >= one // 2


def test_an_admission_floor_buys_room_for_the_queue_with_int4_or_better_only(eng):
    """``admission_floor='int4'``: while requests wait (and nothing is stalled), the
    plans offered keep every block at int4 or better and evict nothing, and fixed
    formats below int4 and evicting strategies are not offered; without a queue the
    profile's plans are as before."""
    from dataclasses import replace

    from controller.predictors.bus import Bus
    from engine.actions import Evict, Quantize
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    c.loop.admission_floor = "int4"
    snap = eng.handle.snapshot()
    queued = replace(snap, num_waiting=2, pressure_bytes=1 << 20)
    strategies = ("mixed_precision", "quantize_k4v2", "quantize_int2", "quantize_int4",
                  "heavy_hitter")
    c.loop.allowed = lambda pin, profile: strategies

    def offered(s):
        return {m.candidate.strategy: m for m in c.loop._priced(
            s, {ids[0]: 1 << 30}, "balanced", {}, Bus.none())[ids[0]]}
    q = offered(queued)
    assert set(q) == {"mixed_precision", "quantize_int4"}
    acts = [a for p in q["mixed_precision"].candidate.parts or [q["mixed_precision"].candidate]
            for a in p.actions]
    assert acts and not any(isinstance(a, Evict) for a in acts)
    assert all(isinstance(a, Quantize) and a.bits >= 4 and (a.v_bits or a.bits) >= 4
               for a in acts)
    free = offered(snap)                                   # no queue: as before
    assert {"quantize_k4v2", "quantize_int2", "heavy_hitter"} <= set(free)
    assert any(isinstance(a, Evict) for p in free["mixed_precision"].candidate.parts
               for a in p.actions)


def test_an_admission_ceiling_limits_what_each_sequence_pays_for_the_queue(eng):
    """``admission_ceiling``: while requests wait (and nothing is stalled), a move below
    int4 or evicting is offered only while its sequence's predicted cost for such moves,
    with what it already paid, stays under the ceiling; moves at int4 or better are
    always offered and not counted; with no queue every move is offered as before."""
    from dataclasses import replace

    from controller.loop import _keeps_int4
    from controller.predictors.bus import Bus
    ids = fill(eng)
    c = controller(eng, frac_used=1.0)
    snap = eng.handle.snapshot()
    queued = replace(snap, num_waiting=2, pressure_bytes=1 << 20)
    strategies = ("quantize_int8", "quantize_int4", "quantize_k4v2", "quantize_int2",
                  "heavy_hitter")
    c.loop.allowed = lambda pin, profile: strategies

    def offered(s, sid=ids[0]):
        return {m.candidate.strategy: m for m in c.loop._priced(
            s, {sid: 1 << 30}, "balanced", {}, Bus.none())[sid]}
    free = offered(queued)
    assert set(free) == set(strategies)
    keeps = {n for n, m in free.items() if _keeps_int4(m.candidate)}
    assert keeps == {"quantize_int8", "quantize_int4"}
    below = sorted(free[n].accuracy for n in set(strategies) - keeps)
    assert below[0] < below[-1]
    # a ceiling between the cheapest and the dearest move below int4: only those under it
    c.loop.admission_ceiling = (below[0] + below[-1]) / 2
    capped = offered(queued)
    assert keeps < set(capped) < set(free)
    assert all(m.accuracy <= c.loop.admission_ceiling
               for n, m in capped.items() if n not in keeps)
    assert set(offered(snap)) == set(strategies)             # no queue: no ceiling
    # what the sequence already paid counts against it; int4 and int8 stay
    c.loop._spent[ids[0]] = c.loop.admission_ceiling
    assert set(offered(queued)) == keeps
    # a plan under a queue counts what it chose below int4, and only that
    c.loop._spent.clear()
    c.loop.admission_ceiling = below[-1] * 10
    chosen = c.loop.plan_relief(queued, 1 << 20, "balanced", {}, Bus.none())
    assert chosen
    for m in chosen:
        want = 0.0 if _keeps_int4(m.candidate) else m.accuracy
        assert c.loop._spent.get(m.candidate.seq_id, 0.0) == pytest.approx(want)
