from types import SimpleNamespace

import pytest

from controller.policy import PROFILES, Controller, Decision, DecisionLog, PolicyState
from engine.actions import EngineSnapshot, TierView


def snap(used: int, capacity: int = 1000) -> EngineSnapshot:
    return EngineSnapshot(0.0, 0, "cpu", "m", 32, 2,
                          {"gpu": TierView("gpu", "cpu", capacity, used, used, capacity - used)},
                          [], 0, 0, 0, 0, 0.0)


@pytest.mark.parametrize("kw, want", [
    ({"high_watermark": 0.0}, "high watermark"),
    ({"high_watermark": 1.01}, "high watermark"),
    ({"low_watermark": 0.9}, "low watermark"),       # == high
    ({"low_watermark": -0.1}, "low watermark"),
    ({"profile": "fastest"}, "profile must be one of"),
    ({"budget_bytes": -5}, "budget_bytes"),
])
def test_update_rejects_and_changes_nothing(kw, want):
    p = PolicyState()
    before = p.view()
    with pytest.raises(ValueError, match=want):
        p.update(**kw)
    assert p.view() == before


def test_update_partial_and_all_profiles():
    p = PolicyState()
    for prof in PROFILES:
        assert p.update(profile=prof).profile == prof
    v = p.update(high_watermark=0.8, low_watermark=0.5, budget_bytes=10)
    assert (v.high_watermark, v.low_watermark, v.budget_bytes) == (0.8, 0.5, 10)
    assert p.update(high_watermark=1.0).low_watermark == 0.5


def test_pins():
    p = PolicyState()
    assert p.pin("s1", "quantize_int4") is None
    assert p.pin("s1", "heavy_hitter") == "quantize_int4"
    with pytest.raises(ValueError, match="strategy must be"):
        p.pin("s1", "Bad Name!")
    with pytest.raises(ValueError, match="unknown strategy 'int5'; known: .*quantize_int8"):
        p.pin("s1", "int5")
    assert p.pin("s1", "long-context") == "heavy_hitter"    # a profile name is a valid pin
    p.pin("s1", "heavy_hitter")
    assert p.view().pins == {"s1": "heavy_hitter"}
    p.forget({"s2"})
    assert p.view().pins == {}
    assert p.unpin("s1") is None


def test_decision_log_ring_and_subscribers():
    log = DecisionLog(capacity=3)
    got = []
    token = log.subscribe(got.append)
    for i in range(5):
        log.record(Decision(kind="pressure", reason=str(i)))
    assert [d.reason for d in log.recent()] == ["2", "3", "4"]
    assert [d.reason for d in log.recent(2)] == ["3", "4"]
    assert log.recent(0) == []
    assert [d.id for d in got] == [1, 2, 3, 4, 5]
    log.unsubscribe(token)
    log.record(Decision(kind="x", reason=""))
    assert len(got) == 5 and log.num_subscribers == 0
    assert log.counts == {"pressure": 5, "x": 1}


def test_broken_subscriber_never_stops_recording():
    log = DecisionLog()
    got = []

    def broken(d):
        raise RuntimeError("watcher gone")
    log.subscribe(broken)
    log.subscribe(got.append)
    for _ in range(3):
        log.record(Decision("k", "r"))
    assert len(got) == 3 and len(log.recent()) == 3


def test_controller_records_watermark_crossings_only():
    log = DecisionLog()
    c = Controller(PolicyState(high_watermark=0.9, low_watermark=0.5), log)
    seen = [len(c.tick(snap(u))) for u in (100, 950, 990, 700, 400, 300, 960)]
    assert seen == [0, 1, 0, 0, 1, 0, 1]
    kinds = [d.kind for d in log.recent()]
    assert kinds == ["pressure", "pressure_cleared", "pressure"]
    assert all(d.action == "" and d.freed_bytes == 0 for d in log.recent())   # no fake moves


def test_controller_uses_policy_budget_over_capacity():
    log = DecisionLog()
    c = Controller(PolicyState(budget_bytes=500), log)
    assert c.tick(snap(460, capacity=1000))      # 92% of the 500 B budget


def test_budget_above_the_gpu_tier_is_the_gpu_tier():
    """6eb73dd: a budget above the arena (the README's own 8 GB example on a 16 MiB node)
    hid the pressure: sequences stalled for good with no move and no error."""
    view = PolicyState(budget_bytes=8_000_000_000).view()
    assert Controller.budget_of(snap(0, capacity=1000), view) == 1000
    c = Controller(PolicyState(budget_bytes=8_000_000_000), DecisionLog())
    d = c.tick(snap(995, capacity=1000))
    assert [x.kind for x in d] == ["pressure"] and "100%" in d[0].reason


def test_stalled_sequences_are_pressure_under_the_watermark():
    c = Controller(PolicyState(high_watermark=0.9, low_watermark=0.5), DecisionLog())
    s = snap(100, capacity=1000)
    s.num_stalled, s.pressure_bytes = 2, 64
    d = c.tick(s)
    assert [x.kind for x in d] == ["pressure"] and "stalled" in d[0].reason


def test_a_request_waiting_for_room_is_pressure_until_admitted():
    """Under the watermark, a queued request whose prompt does not fit is pressure: the
    loop compresses what runs so it is admitted (capacity), instead of the engine
    queueing it until others finish. Cleared once nothing waits and KV is low again."""
    c = Controller(PolicyState(high_watermark=0.9, low_watermark=0.5), DecisionLog())
    s = snap(400, capacity=1000)
    s.num_waiting, s.pressure_bytes = 1, 300
    d = c.tick(s)
    assert [x.kind for x in d] == ["pressure"] and "waiting" in d[0].reason
    assert c.tick(s) == []                      # still waiting: still under pressure
    s.num_waiting, s.pressure_bytes = 0, 0
    s.tiers["gpu"].block_bytes = 300
    assert [x.kind for x in c.tick(s)] == ["pressure_cleared"]
    s.num_waiting, s.pressure_bytes = 2, 0      # waiting, but it fits: no pressure
    assert c.tick(s) == []


def test_pressure_is_the_blocks_bytes_not_the_pages_they_sit_in():
    """Issue 15: with pages of ~1 MiB a layer a 1K-token sequence occupied 131% of its
    bytes, moves freed no page and the loop over-evicted. Pressure now counts the exact
    slot bytes of live blocks (what a move frees), whatever pages they sit in."""
    s = snap(100, capacity=1000)
    s.tiers["gpu"].used_bytes = 980          # pages: above the high watermark
    c = Controller(PolicyState(high_watermark=0.9, low_watermark=0.5), DecisionLog())
    assert c.tick(s) == []
    assert Controller.used_of(s) == 100
    s.tiers["gpu"].block_bytes = 950
    assert [d.kind for d in c.tick(s)] == ["pressure"]


def test_a_pin_newer_than_the_snapshot_survives_forget():
    """The telemetry thread forgets pins of sequences missing from its snapshot; a pin
    made after that snapshot was taken names a sequence it could not show yet."""
    import time

    from controller.policy import PolicyState
    p = PolicyState()
    taken = time.time()
    p.pin("new-seq", "quantize_int8")
    p.forget(set(), as_of=taken)
    assert p.view().pins == {"new-seq": "quantize_int8"}
    p.forget(set(), as_of=time.time() + 1)
    assert p.view().pins == {}


def test_relief_goes_to_the_low_watermark_only_when_moves_are_lossless():
    """With a host tier a relief offloads (lossless) down to the low watermark; without
    one every move loses accuracy, so it frees what the budget needs: down to the high
    watermark less the next 32 decode steps of the running sequences (never under the
    low watermark)."""
    view = PolicyState(budget_bytes=100_000, high_watermark=0.9, low_watermark=0.75).view()
    s = snap(95_000, capacity=200_000)
    s.format_bytes, s.block_size = {"full": 3200}, 32          # 100 bytes a token
    assert Controller.relief_mark(s, view, 100_000) == 0.9     # nothing running: the high one
    s.num_running = 6                                          # 6 x 32 x 100 B = 19.2% ...
    assert Controller.relief_mark(s, view, 100_000) == 0.75    # ... floored at the low one
    s.num_running = 2
    assert Controller.relief_mark(s, view, 100_000) == pytest.approx(0.836)
    s.num_running = 1                                          # + one held: it grows when
    s.sequences = [SimpleNamespace(state="held"), SimpleNamespace(state="preempted")]
    assert Controller.relief_mark(s, view, 100_000) == pytest.approx(0.836)  # appended to
    s.tiers["host"] = TierView("host", "cpu", 50_000, 0, 0, 50_000)
    assert Controller.relief_mark(s, view, 100_000) == 0.75
