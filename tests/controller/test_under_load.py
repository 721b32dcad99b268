"""The daemon under its own job (issues 11 and 12): many clients at once against the real
tiny engine under a KV budget that forces moves and preemption. Nothing raises, nothing
leaks, every stream ends with a status a client can act on.

The concurrency test failed on main at 6eb73dd (streams ended "internal error in the
engine step" once pressure hit a prompt in prefill)."""
import random
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc
from tests.controller.helpers import tiny_daemon, wait_for

DELIBERATE = {grpc.StatusCode.CANCELLED, grpc.StatusCode.RESOURCE_EXHAUSTED,
              grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
              grpc.StatusCode.FAILED_PRECONDITION}


@pytest.fixture(scope="module")
def daemon():
    # 2 layers x 24 pages x 2 full blocks: 768 tokens of KV on the "GPU" tier
    yield from tiny_daemon(**{
        "engine.block_size": 16, "engine.page_bytes": 16384,
        "engine.kv_budget_bytes": 2 * 24 * 16384, "engine.host_budget_bytes": 4 << 20,
        "engine.max_batch_tokens": 96, "engine.preempt_after_s": 0.2,
        "server.max_watchers": 3})


@pytest.fixture
def stub(daemon):
    ch = grpc.insecure_channel(f"unix:{daemon.socket_path}")
    yield kvctl_pb2_grpc.KvctlStub(ch)
    ch.close()


def idle(daemon):
    snap = daemon.engine.handle.snapshot()
    return not snap.sequences and daemon.engine.store.held_slots("gpu") == 0


def test_concurrent_clients_under_pressure(daemon, stub):
    """Generate, Cancel, GetStatus(fresh), Pin/Unpin, SetPolicy and policy ticks from
    many threads for a bounded time, under a budget below what the streams need."""
    wait_for(lambda: idle(daemon), 30, "an idle daemon")
    stub.SetPolicy(pb.SetPolicyRequest(budget_bytes=2 * 16 * 16384, profile="balanced"))
    stop = threading.Event()
    outcomes, bad, lock = [], [], threading.Lock()

    def note(kind, what):
        with lock:
            (bad if kind == "bad" else outcomes).append(what)

    def generator(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            n = rnd.randrange(8, 200)
            req = pb.GenerateRequest(
                prompt_ids=pb.TokenIds(ids=[rnd.randrange(1, 500) for _ in range(n)]),
                sampling=pb.SamplingParams(max_tokens=rnd.randrange(4, 80), ignore_eos=True),
                strategy=rnd.choice(["", "", "quantize_int8", "offload_exact"]))
            try:
                last = None
                for msg in stub.Generate(req, timeout=60):
                    last = msg
                fin = last.finished if last is not None else None
                if fin is None or fin.reason not in (pb.FINISH_REASON_STOP, pb.FINISH_REASON_LENGTH,
                                                     pb.FINISH_REASON_CANCELLED):
                    note("bad", f"stream ended without a deliberate finish: {last}")
                else:
                    note("ok", pb.FinishReason.Name(fin.reason))
            except grpc.RpcError as e:
                if e.code() in DELIBERATE:
                    note("ok", e.code().name)
                else:
                    note("bad", f"{e.code().name}: {e.details()}")

    def live_ids():
        return [s.seq_id for s in stub.ListSequences(pb.ListSequencesRequest()).sequences]

    def poker(seed):
        rnd = random.Random(seed)
        while not stop.is_set():
            try:
                ids = live_ids()
                op = rnd.randrange(6) if rnd.random() < 0.3 else rnd.randrange(1, 6)
                if op == 0 and ids:
                    stub.Cancel(pb.CancelRequest(seq_id=rnd.choice(ids)))
                elif op == 1:
                    stub.GetStatus(pb.GetStatusRequest(fresh=True))
                elif op == 2 and ids:
                    stub.Pin(pb.PinRequest(seq_id=rnd.choice(ids),
                                           strategy=rnd.choice(["quantize_int4", "snapkv",
                                                                "long-context"])))
                elif op == 3 and ids:
                    stub.Unpin(pb.UnpinRequest(seq_id=rnd.choice(ids)))
                elif op == 4:
                    stub.SetPolicy(pb.SetPolicyRequest(
                        profile=rnd.choice(["balanced", "throughput", "accuracy-critical"])))
                else:
                    stub.EstimateCapacity(pb.EstimateCapacityRequest(num_tokens=300))
            except grpc.RpcError as e:
                if e.code() not in DELIBERATE:
                    note("bad", f"{e.code().name}: {e.details()}")
            time.sleep(0.005)

    def ticker():
        c = daemon.service.controller
        while not stop.is_set():
            c.tick(daemon.engine.handle.snapshot())
            time.sleep(0.01)

    threads = [threading.Thread(target=generator, args=(i,)) for i in range(8)]
    threads += [threading.Thread(target=poker, args=(100 + i,)) for i in range(3)]
    threads += [threading.Thread(target=ticker) for _ in range(2)]
    for t in threads:
        t.start()
    time.sleep(12)
    stop.set()
    for t in threads:
        t.join(90)
    assert not any(t.is_alive() for t in threads), "a client hung"
    assert not bad, bad[:5]
    assert len(outcomes) > 20, outcomes
    wait_for(lambda: idle(daemon), 30, "every block freed")
    st = stub.GetStatus(pb.GetStatusRequest(fresh=True))    # the engine's counters in status
    assert st.engine.preemptions == daemon.engine.num_preemptions
    assert st.engine.paused == daemon.engine.num_paused
    assert st.engine.step_failures == 0 and st.counts.total == 0
    kinds = daemon.decisions.counts
    assert kinds["pressure"] > 0 and sum(kinds[k] for k in ("quantize", "offload", "evict")) > 0
    assert not daemon.errors.records, [r.getMessage() for r in daemon.errors.records[:5]]
    stub.SetPolicy(pb.SetPolicyRequest(budget_bytes=0, profile="balanced"))


def test_health_and_status_answer_with_130_streams_open(daemon, stub):
    """6eb73dd: maximum_concurrent_rpcs=128 counted open streams, so health checks,
    GetStatus and Cancel got RESOURCE_EXHAUSTED."""
    wait_for(lambda: idle(daemon), 30, "an idle daemon")
    streams = []
    try:
        for i in range(130):
            s = stub.Generate(pb.GenerateRequest(
                prompt_ids=pb.TokenIds(ids=[1 + i % 400, 2, 3]),
                sampling=pb.SamplingParams(max_tokens=2000, ignore_eos=True)))
            streams.append(s)
        started = [next(s).started.seq_id for s in streams]
        assert len(set(started)) == 130
        ch = grpc.insecure_channel(f"unix:{daemon.socket_path}")
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert stub.GetStatus(pb.GetStatusRequest()).model == "random:tiny"
        assert stub.Cancel(pb.CancelRequest(seq_id=started[0])).cancelled
        ch.close()
    finally:
        for s in streams:
            s.cancel()
    wait_for(lambda: idle(daemon), 60, "every block freed")


def test_watchers_are_limited_and_never_lock_others_out(daemon, stub):
    watchers = [stub.WatchDecisions(pb.WatchDecisionsRequest(), timeout=30) for _ in range(3)]
    try:
        wait_for(lambda: daemon.service._num_watchers == 3, 10, "3 watchers")
        extra = stub.WatchDecisions(pb.WatchDecisionsRequest())
        with pytest.raises(grpc.RpcError) as info:
            next(extra)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_watchers" in info.value.details()
        out = list(stub.Generate(pb.GenerateRequest(
            prompt_ids=pb.TokenIds(ids=[5, 6, 7]),
            sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True))))
        assert out[-1].finished.reason == pb.FINISH_REASON_LENGTH
        stub.SetPolicy(pb.SetPolicyRequest(profile="throughput"))
        for w in watchers:      # fed by the event loop: each sees the new decision
            kinds = []
            while "policy" not in kinds and len(kinds) < 50:   # after any pressure news
                kinds.append(next(w).kind)
            assert "policy" in kinds
    finally:
        for w in watchers:
            w.cancel()
        stub.SetPolicy(pb.SetPolicyRequest(profile="balanced"))
    wait_for(lambda: daemon.service._num_watchers == 0, 10, "watchers closed")


def test_unpin_undoes_a_pin_given_at_generate(daemon, stub):
    """6eb73dd kept the Generate pin in the engine's request too, so after Unpin the
    loop still read it from the sequence's view."""
    wait_for(lambda: idle(daemon), 30, "an idle daemon")
    stream = stub.Generate(pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=list(range(1, 60))), strategy="quantize_int8",
        sampling=pb.SamplingParams(max_tokens=2000, ignore_eos=True)))
    sid = next(stream).started.seq_id
    try:
        assert daemon.policy.view().pins == {sid: "quantize_int8"}
        assert stub.Unpin(pb.UnpinRequest(seq_id=sid)).previous == "quantize_int8"
        assert daemon.policy.view().pins == {}
        wait_for(lambda: any(v.seq_id == sid and v.state == "decode"
                             for v in daemon.engine.handle.snapshot().sequences), 20, "decode")
        snap = daemon.engine.handle.snapshot()
        moves = daemon.service.controller.loop.candidates(snap, 1, "balanced", {}, 1e12)
        strategies = {m.candidate.strategy for m in moves if m.candidate.seq_id == sid}
        assert "mixed_precision" in strategies and "quantize_int8" not in strategies
    finally:
        stream.cancel()
    wait_for(lambda: idle(daemon), 30, "every block freed")
