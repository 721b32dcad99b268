"""The policy loop on a real (tiny) engine: pressure brings moves that free memory,
profiles and pins limit which moves, pressure's end brings offloaded blocks back."""
import pytest

from controller.policy import Controller, DecisionLog, PolicyState
from engine.api import Request, SamplingParams
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
