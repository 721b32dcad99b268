"""The event-loop side of the daemon: engine events handed to the loop in batches
(controller/aio.py), and many streams served by the one loop over a real socket."""
import asyncio
import tempfile
import threading

import grpc

from controller.aio import LoopThread, Outbox
from controller.config import load_config
from controller.server import Daemon
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc
from tests.controller.fakes import FakeEngine


def block(loop: LoopThread) -> threading.Event:
    """Keep the loop busy until the returned event is set."""
    gate = threading.Event()
    loop.loop.call_soon_threadsafe(gate.wait, 10)
    return gate


def collect(loop: LoopThread, stream, n: int) -> list:
    async def go():
        out = []
        while len(out) < n:
            out += await stream.get_all()
        return out
    return loop.run(go(), timeout=10)


def test_a_burst_is_one_wakeup_and_each_stream_keeps_its_order(loop):
    box = Outbox(loop.loop)
    streams = [box.stream() for _ in range(3)]
    gate = block(loop)
    for i in range(10):                      # the engine: one event per stream per step
        for k, s in enumerate(streams):
            s.put((k, i))
    gate.set()
    for k, s in enumerate(streams):
        assert collect(loop, s, 10) == [(k, i) for i in range(10)]
    assert box.num_wakeups == 1


def test_events_after_a_delivery_start_a_new_burst(loop):
    box = Outbox(loop.loop)
    s = box.stream()
    s.put("a")
    assert collect(loop, s, 1) == ["a"]
    s.put("b")
    s.put("c")
    assert collect(loop, s, 2) == ["b", "c"]
    assert box.num_wakeups == 2


def test_events_still_arriving_are_delivered_together(loop):
    box = Outbox(loop.loop, settle_s=0.02)
    s = box.stream()
    s.put(0)                                 # the loop's first look sees one event ...
    loop.run(asyncio.sleep(0.005))
    for i in range(1, 5):                    # ... more arrive before the next look
        s.put(i)
    assert collect(loop, s, 5) == [0, 1, 2, 3, 4]
    assert box.num_wakeups == 1


def test_a_burst_settling_during_a_slow_delivery_waits_its_turn(loop):
    """Streams that take long to write (here: a consumer that holds the loop) must not
    let a later burst overtake the rest of an earlier one."""
    import time

    box = Outbox(loop.loop, settle_s=0.001, chunk=1)
    s = box.stream()
    got = []

    async def consume():
        while len(got) < 20:
            for ev in await s.get_all():
                got.append(ev)
                time.sleep(0.002)            # a slow write, on the loop

    fut = asyncio.run_coroutine_threadsafe(consume(), loop.loop)
    gate = block(loop)
    for i in range(10):
        s.put(i)
    gate.set()
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.0005)
    for i in range(10, 20):                  # the next step's events, mid-delivery
        s.put(i)
    fut.result(timeout=10)
    assert got == list(range(20))


def test_delivery_lets_other_work_run_between_chunks(loop):
    """A request arriving while a burst is delivered is served before the burst ends."""
    box = Outbox(loop.loop, chunk=2)
    streams = [box.stream() for _ in range(6)]
    order = []

    async def consume(k, s):
        await s.get_all()
        order.append(k)
        if k == 0:
            asyncio.get_running_loop().call_soon(order.append, "other")

    async def run_all():
        await asyncio.gather(*(consume(k, s) for k, s in enumerate(streams)))

    fut = asyncio.run_coroutine_threadsafe(run_all(), loop.loop)
    loop.run(asyncio.sleep(0.01))            # every consumer is waiting
    gate = block(loop)
    for s in streams:
        s.put("tok")
    gate.set()
    fut.result(timeout=10)
    assert sorted(k for k in order if k != "other") == list(range(6))
    assert order.index("other") < order.index(5)


def test_put_after_the_loop_closed_is_dropped():
    lt = LoopThread("closing")
    box = Outbox(lt.loop)
    s = box.stream()
    lt.close()
    s.put("late")                            # the engine's callback must not raise


def test_many_streams_over_the_socket_get_every_token_in_order():
    d = tempfile.mkdtemp(prefix="kv-")
    cfg = load_config(overrides={"server.socket": f"{d}/k.sock", "telemetry.interval_s": 0.05}, env={})
    dm = Daemon(cfg, engine=FakeEngine(token_interval_s=0.002))
    dm.start()
    try:
        ch = grpc.insecure_channel(f"unix:{dm.socket_path}")
        stub = kvctl_pb2_grpc.KvctlStub(ch)
        results: dict[int, list] = {}

        def client(i: int) -> None:
            req = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[i + 1, i + 2]),
                                     sampling=pb.SamplingParams(max_tokens=40))
            results[i] = list(stub.Generate(req, timeout=60))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(24)]
        for t in threads:
            t.start()
        assert stub.GetStatus(pb.GetStatusRequest(), timeout=10).model == "fake"
        for t in threads:
            t.join(60)
        assert len(results) == 24
        for out in results.values():
            kinds = [r.WhichOneof("event") for r in out]
            assert kinds == ["started"] + ["token"] * 40 + ["finished"]
            toks = [r.token for r in out[1:-1]]
            assert [t.index for t in toks] == list(range(40))
            assert [t.token_id for t in toks] == list(out[-1].finished.token_ids)
            assert "".join(t.text for t in toks) == out[-1].finished.text
        assert dm.service.num_inflight == 0
        ch.close()
    finally:
        dm.stop(grace_s=1)
