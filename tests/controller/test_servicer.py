"""Servicers called directly (no network) over tables of cases, with the fake engine.
The servicer's handlers are coroutines: they run on an event loop thread, as in the
daemon (the ``loop`` fixture)."""
import asyncio
import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any

import grpc
import pytest

from controller.errors import status_for
from controller.policy import DecisionLog, PolicyState
from controller.service import KvctlService
from controller.telemetry import Nvml, Telemetry
from engine.actions import ActionError
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from tests.controller.fakes import FakeEngine
from tests.controller.helpers import wait_for

OK = grpc.StatusCode.OK
E = grpc.StatusCode


@dataclass
class Case:
    reason: str
    request: Any
    want: grpc.StatusCode = OK
    check: Any = None            # callable(result) -> None, for OK cases
    setup: dict = field(default_factory=dict)   # policy fields set before the call


@pytest.fixture
def svc(fake_engine):
    tel = Telemetry(fake_engine.handle.snapshot, nvml=Nvml())
    s = KvctlService(fake_engine, tel, PolicyState(), DecisionLog())
    tel.sample_now()
    return s


def call(svc, method, request, ctx, loop):
    """Run one handler to its end; a stream's result is the list of what it wrote."""
    try:
        out = loop.run(getattr(svc, method)(request, ctx), timeout=30)
        if method == "Generate":
            out = drain(ctx.written)
        elif method == "GetStatus":         # served pre-serialized (identity serializer)
            out = pb.NodeStatus.FromString(out)
        return OK, out
    except Exception as e:     # what the interceptor would send
        return status_for(e)[0], e


def drain(q: queue.Queue) -> list:
    out = []
    while not q.empty():
        out.append(q.get())
    return out


def start_stream(svc, method, request, ctx, loop):
    """Start a streaming handler; read its messages from ``ctx.written``."""
    return asyncio.run_coroutine_threadsafe(getattr(svc, method)(request, ctx), loop.loop)


def gen(**kw):
    kw.setdefault("sampling", pb.SamplingParams(max_tokens=3))
    return pb.GenerateRequest(**kw)


def events(out):
    return [r.WhichOneof("event") for r in out]


GENERATE = [
    Case("prompt text streams started, tokens, finished", gen(prompt="hello"),
         check=lambda out: events(out) == ["started", "token", "token", "token", "finished"]),
    Case("chat messages", gen(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="hi")]))),
    Case("token ids", gen(prompt_ids=pb.TokenIds(ids=[1, 2, 3])),
         check=lambda out: out[0].started.num_prompt_tokens == 3),
    Case("finish carries usage and kv bytes", gen(prompt="abcd"),
         check=lambda out: (out[-1].finished.usage.total_tokens == 7
                            and out[-1].finished.reason == pb.FINISH_REASON_LENGTH
                            and out[-1].finished.kv_bytes_by_tier["gpu"] > 0)),
    Case("no input", pb.GenerateRequest(), E.INVALID_ARGUMENT),
    Case("empty prompt", gen(prompt=""), E.INVALID_ARGUMENT),
    Case("bad chat role", gen(messages=pb.ChatMessages(messages=[pb.ChatMessage(role="bot", content="x")])),
         E.INVALID_ARGUMENT),
    Case("top_p out of range", gen(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), E.INVALID_ARGUMENT),
    Case("negative temperature", gen(prompt="x", sampling=pb.SamplingParams(temperature=-1)),
         E.INVALID_ARGUMENT),
    Case("temperature Inf", gen(prompt="x", sampling=pb.SamplingParams(temperature=float("inf"))),
         E.INVALID_ARGUMENT, check=lambda e: "temperature" in str(e) and "finite" in str(e)),
    Case("temperature NaN", gen(prompt="x", sampling=pb.SamplingParams(temperature=float("nan"))),
         E.INVALID_ARGUMENT, check=lambda e: "temperature" in str(e) and "finite" in str(e)),
    Case("top_p NaN", gen(prompt="x", sampling=pb.SamplingParams(top_p=float("nan"))),
         E.INVALID_ARGUMENT, check=lambda e: "top_p" in str(e) and "finite" in str(e)),
    Case("too many stop strings", gen(prompt="x", sampling=pb.SamplingParams(stop=["a"] * 17)),
         E.INVALID_ARGUMENT),
    Case("bad strategy name", gen(prompt="x", strategy="No Such!"), E.INVALID_ARGUMENT),
    Case("unknown strategy", gen(prompt="x", strategy="int5"), E.INVALID_ARGUMENT),
    Case("strategy pin from the registry", gen(prompt="x", strategy="snapkv")),
    Case("prompt longer than the context", gen(prompt="x" * 600), E.INVALID_ARGUMENT),
    Case("client-chosen seq_id", gen(prompt="x", seq_id="job-7:a.b_c"),
         check=lambda out: out[0].started.seq_id == out[-1].finished.seq_id == "job-7:a.b_c"),
    Case("seq_id of 64 characters", gen(prompt="x", seq_id="a" * 64)),
    Case("seq_id of 65 characters", gen(prompt="x", seq_id="a" * 65), E.INVALID_ARGUMENT,
         check=lambda e: "at most 64 characters" in str(e)),
    Case("seq_id of 10 kB: refused with a short message", gen(prompt="x", seq_id="a" * 10_000),
         E.INVALID_ARGUMENT, check=lambda e: len(str(e)) < 300),
    Case("seq_id with rich markup", gen(prompt="x", seq_id="[/x]"), E.INVALID_ARGUMENT,
         check=lambda e: "A-Z a-z 0-9 . _ : -" in str(e)),
    Case("seq_id with a newline", gen(prompt="x", seq_id="a\nb"), E.INVALID_ARGUMENT),
    Case("seq_id in the form the daemon assigns", gen(prompt="x", seq_id="seq-12"), E.INVALID_ARGUMENT,
         check=lambda e: "reserved for ids the daemon assigns" in str(e)),
    Case("seq_id merely like the daemon's", gen(prompt="x", seq_id="seq-12a")),
    Case("session_id", gen(prompt="x", session_id="chat-7:a.b_c"),
         check=lambda out: out[-1].finished.usage.cached_tokens == 0),
    Case("session_id of 65 characters", gen(prompt="x", session_id="a" * 65), E.INVALID_ARGUMENT,
         check=lambda e: "session_id must be at most 64 characters" in str(e)),
    Case("session_id with rich markup", gen(prompt="x", session_id="[/x]"), E.INVALID_ARGUMENT),
    Case("session_id may look like a daemon's seq id", gen(prompt="x", session_id="seq-12")),
    Case("can never fit the budget", gen(prompt_ids=pb.TokenIds(ids=[1] * 400),
                                         sampling=pb.SamplingParams(max_tokens=2000)),
         E.RESOURCE_EXHAUSTED),
]


@pytest.mark.parametrize("case", GENERATE, ids=[c.reason for c in GENERATE])
def test_generate(case, svc, ctx, loop):
    code, out = call(svc, "Generate", case.request, ctx, loop)
    assert code == case.want, out
    if case.check:
        assert case.check(out)
    assert svc.num_inflight == 0


UNARY = [
    Case("status", ("GetStatus", pb.GetStatusRequest()),
         check=lambda r: r.mode == "cpu" and r.model == "fake" and {t.name for t in r.tiers} == {"gpu", "host"}
         and r.policy.budget_bytes == 1_000_000 and not r.gpu.available and "cpu mode" in r.gpu.reason),
    Case("fresh status", ("GetStatus", pb.GetStatusRequest(fresh=True)), check=lambda r: r.host.memory_total_bytes > 0),
    Case("list sequences (none)", ("ListSequences", pb.ListSequencesRequest()), check=lambda r: len(r.sequences) == 0),
    Case("get unknown sequence", ("GetSequence", pb.GetSequenceRequest(seq_id="nope")), E.NOT_FOUND),
    Case("get without id", ("GetSequence", pb.GetSequenceRequest()), E.INVALID_ARGUMENT),
    Case("cancel unknown", ("Cancel", pb.CancelRequest(seq_id="nope")), E.NOT_FOUND),
    Case("cancel without id", ("Cancel", pb.CancelRequest()), E.INVALID_ARGUMENT),
    Case("policy get", ("GetPolicy", pb.GetPolicyRequest()), check=lambda r: r.profile == "balanced"),
    Case("policy set profile", ("SetPolicy", pb.SetPolicyRequest(profile="throughput")),
         check=lambda r: r.profile == "throughput"),
    Case("policy set watermarks", ("SetPolicy", pb.SetPolicyRequest(high_watermark=0.8, low_watermark=0.6)),
         check=lambda r: abs(r.high_watermark - 0.8) < 1e-9),
    Case("policy set budget", ("SetPolicy", pb.SetPolicyRequest(budget_bytes=5000)),
         check=lambda r: r.budget_bytes == 5000),
    Case("policy set nothing", ("SetPolicy", pb.SetPolicyRequest()), E.INVALID_ARGUMENT),
    Case("policy low >= high", ("SetPolicy", pb.SetPolicyRequest(low_watermark=0.95)), E.INVALID_ARGUMENT),
    Case("policy unknown profile", ("SetPolicy", pb.SetPolicyRequest(profile="yolo")), E.INVALID_ARGUMENT),
    Case("pin unknown sequence", ("Pin", pb.PinRequest(seq_id="nope", strategy="quantize_int4")), E.NOT_FOUND),
    Case("unpin unknown sequence", ("Unpin", pb.UnpinRequest(seq_id="nope")), E.NOT_FOUND),
    Case("capacity fits", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=100)),
         check=lambda r: r.can_admit and r.bytes_needed == 100_000 and r.bytes_free == 900_000),
    Case("capacity too big", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=500)),
         setup={"budget_bytes": 400_000},
         check=lambda r: not r.can_admit and r.reason.startswith("does not fit now") and r.bytes_free == 360_000),
    Case("capacity int4", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=500, format="int4")),
         setup={"budget_bytes": 400_000}, check=lambda r: r.can_admit and r.bytes_needed == 125_000),
    Case("capacity at the model's context", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=512)),
         check=lambda r: r.can_admit),
    Case("capacity beyond the model's context", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=513)),
         check=lambda r: not r.can_admit and r.reason == "never fits: exceeds the model's context of 512 tokens"),
    Case("capacity far beyond the model's context",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=5000)),
         check=lambda r: not r.can_admit and r.reason.startswith("never fits")),
    Case("capacity zero tokens", ("EstimateCapacity", pb.EstimateCapacityRequest()), E.INVALID_ARGUMENT),
    Case("capacity format of 10 kB: refused with a short message",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=1, format="x" * 10_000)),
         E.INVALID_ARGUMENT, check=lambda e: len(str(e)) < 200 and "10000 characters" in str(e)),
    Case("capacity of a prompt nothing is cached for",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=100, prompt_ids=pb.TokenIds(ids=[1] * 40))),
         check=lambda r: r.can_admit and r.reused_tokens == 0 and r.bytes_needed == 100_000
         and "0 of 40 prompt tokens reused" in r.reason),
    Case("capacity of a prompt alone (num_tokens 0)",
         ("EstimateCapacity", pb.EstimateCapacityRequest(prompt_ids=pb.TokenIds(ids=[1] * 40))),
         check=lambda r: r.bytes_needed == 40_000),
    Case("capacity num_tokens below the prompt",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=10, prompt_ids=pb.TokenIds(ids=[1] * 40))),
         E.INVALID_ARGUMENT, check=lambda e: "at least the 40 prompt ids" in str(e)),
    Case("capacity empty prompt_ids",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=10, prompt_ids=pb.TokenIds())),
         E.INVALID_ARGUMENT),
    Case("capacity session without prompt_ids",
         ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=10, session_id="chat")),
         E.INVALID_ARGUMENT, check=lambda e: "prompt_ids" in str(e)),
    Case("capacity bad session_id",
         ("EstimateCapacity", pb.EstimateCapacityRequest(prompt_ids=pb.TokenIds(ids=[1]), session_id="a b")),
         E.INVALID_ARGUMENT),
    Case("capacity of a prompt beyond the context",
         ("EstimateCapacity", pb.EstimateCapacityRequest(prompt_ids=pb.TokenIds(ids=[1] * 600))),
         check=lambda r: not r.can_admit and r.reason.startswith("never fits") and r.reused_tokens == 0),
    Case("list sessions (none)", ("ListSessions", pb.ListSessionsRequest()),
         check=lambda r: len(r.sessions) == 0),
    Case("drop unknown session", ("DropSession", pb.DropSessionRequest(session_id="nope")), E.NOT_FOUND,
         check=lambda e: "no session 'nope'" in str(e)),
    Case("drop session without id", ("DropSession", pb.DropSessionRequest()), E.INVALID_ARGUMENT),
    Case("drop session with a bad id", ("DropSession", pb.DropSessionRequest(session_id="a" * 65)),
         E.INVALID_ARGUMENT),
    Case("capacity unknown format", ("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=1, format="fp3")),
         E.INVALID_ARGUMENT),
]


@pytest.mark.parametrize("case", UNARY, ids=[c.reason for c in UNARY])
def test_unary(case, svc, ctx, loop):
    method, request = case.request
    if case.setup:
        svc.policy.update(**case.setup)
    code, out = call(svc, method, request, ctx, loop)
    assert code == case.want, out
    if case.check:
        assert case.check(out), out


def test_live_sequence_pin_cancel_and_lookup(svc, ctx, loop, fake_engine):
    run = lambda m, r: loop.run(getattr(svc, m)(r, ctx), timeout=10)  # noqa: E731
    fut = start_stream(svc, "Generate", gen(prompt="hello", sampling=pb.SamplingParams(max_tokens=1000)),
                       ctx, loop)
    seq_id = ctx.written.get(timeout=10).started.seq_id
    ctx.written.get(timeout=10)
    seqs = run("ListSequences", pb.ListSequencesRequest()).sequences
    assert [s.seq_id for s in seqs] == [seq_id] and seqs[0].strategy == "full"
    r = run("Pin", pb.PinRequest(seq_id=seq_id, strategy="quantize_int4"))
    assert r.strategy == "quantize_int4" and not r.previous
    one = run("GetSequence", pb.GetSequenceRequest(seq_id=seq_id))
    assert one.pinned_strategy == "quantize_int4" and len(one.blocks) == one.num_blocks > 0
    assert run("Unpin", pb.UnpinRequest(seq_id=seq_id)).previous == "quantize_int4"
    code, _ = call(svc, "Unpin", pb.UnpinRequest(seq_id=seq_id), ctx, loop)
    assert code == E.INVALID_ARGUMENT                  # live but not pinned
    assert run("Cancel", pb.CancelRequest(seq_id=seq_id)).cancelled
    fut.result(timeout=10)
    rest = drain(ctx.written)
    assert rest[-1].finished.reason == pb.FINISH_REASON_CANCELLED
    assert run("ListSequences", pb.ListSequencesRequest()).sequences == []
    kinds = [d.kind for d in svc.decisions.recent()]
    assert kinds == ["pin", "unpin"]


def test_session_turns_reuse_list_estimate_and_drop(svc, ctx, loop):
    """Two turns of one session through the servicer (fake engine): the second reuses the
    first's KV, the session is listed and counted, capacity counts the reuse, and
    DropSession forgets it (recorded as a decision), NOT_FOUND after."""
    run = lambda m, r: loop.run(getattr(svc, m)(r, ctx), timeout=10)  # noqa: E731
    first_ids = list(range(1, 11))
    code, out = call(svc, "Generate", gen(prompt_ids=pb.TokenIds(ids=first_ids), session_id="chat"),
                     ctx, loop)
    assert code == OK and out[-1].finished.usage.cached_tokens == 0
    ids = first_ids + list(out[-1].finished.token_ids) + [40, 41, 42]
    est = lambda **kw: run("EstimateCapacity", pb.EstimateCapacityRequest(  # noqa: E731
        num_tokens=len(ids) + 3, prompt_ids=pb.TokenIds(ids=ids), **kw))
    plain = run("EstimateCapacity", pb.EstimateCapacityRequest(num_tokens=len(ids) + 3))
    cached = est(session_id="chat")
    assert cached.reused_tokens == 12 and plain.reused_tokens == 0
    assert cached.bytes_needed == plain.bytes_needed - 12 * 1000
    code, out = call(svc, "Generate", gen(prompt_ids=pb.TokenIds(ids=ids), session_id="chat"), ctx, loop)
    assert code == OK and out[-1].finished.usage.cached_tokens == cached.reused_tokens
    (sess,) = run("ListSessions", pb.ListSessionsRequest()).sessions
    assert (sess.session_id, sess.turns, sess.active, sess.seq_id) == ("chat", 2, "", "session/chat")
    assert sess.num_tokens == len(ids) + 2 and sess.reused_tokens == 12
    assert sess.bytes_by_tier["gpu"] > 0 and sess.bytes_by_format["full"] > 0
    st = svc.status_of(svc.telemetry.sample_now(False))
    assert st.sessions == 1 and st.prefix.hit_tokens == 12
    assert st.prefix.queried_tokens == len(first_ids) + len(ids)
    r = run("DropSession", pb.DropSessionRequest(session_id="chat"))
    assert r.session_id == "chat" and r.dropped
    assert run("ListSessions", pb.ListSessionsRequest()).sessions == []
    code, err = call(svc, "DropSession", pb.DropSessionRequest(session_id="chat"), ctx, loop)
    assert code == E.NOT_FOUND
    (d,) = [d for d in svc.decisions.recent() if d.kind == "drop_session"]
    assert d.seq_id == "session/chat" and "'chat'" in d.reason and f"{len(ids) + 2} tokens" in d.reason


def test_a_client_id_cannot_take_the_daemons_next_one(svc, ctx, loop):
    """Issue 12 #6: a client that chose "seq-1" made the next unnamed request fail with
    "already in use"."""
    first = start_stream(svc, "Generate", gen(prompt="x", seq_id="seq-1",
                                               sampling=pb.SamplingParams(max_tokens=400)), ctx, loop)
    wait_for(lambda: first.done() or svc.num_inflight, 5, "the first request to start or fail")
    code, out = call(svc, "Generate", gen(prompt="y"), ctx, loop)
    assert code == OK, out
    with pytest.raises(ValueError, match="reserved for ids the daemon assigns"):
        first.result(timeout=10)


def test_a_generation_failing_in_the_engine_ends_internal_after_its_final_message(
        svc, ctx, loop, fake_engine):
    fake_engine.fail_next = "internal error in the engine step"
    code, err = call(svc, "Generate", gen(prompt="x", sampling=pb.SamplingParams(max_tokens=50)), ctx, loop)
    out = err if code == OK else drain(ctx.written)
    assert events(out) == ["started", "token", "finished"]
    assert out[-1].finished.reason == pb.FINISH_REASON_ERROR
    assert out[-1].finished.error == "internal error in the engine step"
    assert code == E.INTERNAL and "internal error in the engine step" in status_for(err)[1]
    assert svc.num_inflight == 0


def test_stream_delivers_every_token_in_order(svc, ctx, loop):
    _, out = call(svc, "Generate", gen(prompt="abc", sampling=pb.SamplingParams(max_tokens=40)), ctx, loop)
    assert events(out) == ["started"] + ["token"] * 40 + ["finished"]
    toks = [r.token for r in out[1:-1]]
    assert [t.index for t in toks] == list(range(40))
    assert [t.token_id for t in toks] == list(out[-1].finished.token_ids)
    assert "".join(t.text for t in toks) == out[-1].finished.text


def cancel_logs(caplog) -> list[dict]:
    return [{"msg": r.getMessage(), **getattr(r, "kv", {})} for r in caplog.records
            if r.name == "kvctl.server" and r.getMessage() == "cancelled"]


def test_client_hang_up_cancels_the_sequence(svc, ctx, loop, fake_engine, caplog):
    caplog.set_level(logging.INFO, logger="kvctl.server")
    fut = start_stream(svc, "Generate", gen(prompt="secret prompt text",
                                            sampling=pb.SamplingParams(max_tokens=1000)), ctx, loop)
    seq_id = ctx.written.get(timeout=10).started.seq_id
    ctx.written.get(timeout=10)
    fut.cancel()                      # what grpc.aio does when the client goes away
    wait_for(lambda: fake_engine.num_cancelled == 1 and not fake_engine.seqs, 5, "the cancel")
    assert svc.num_inflight == 0
    logged = cancel_logs(caplog)      # one line with the id and why; never the prompt
    assert len(logged) == 1 and logged[0]["seq_id"] == seq_id
    assert "client" in logged[0]["reason"]
    assert "secret" not in caplog.text and not any("secret" in str(v) for v in logged[0].values())


class SlowSubmitEngine(FakeEngine):
    """submit waits until released: the client can leave while it runs."""

    def __init__(self) -> None:
        super().__init__(token_interval_s=0.005)
        self.entered, self.release = threading.Event(), threading.Event()

    def submit(self, req, on_event, **kw):
        self.entered.set()
        self.release.wait(10)
        return super().submit(req, on_event, **kw)


def test_client_leaving_during_submit_still_frees_the_sequence(ctx, loop, caplog):
    caplog.set_level(logging.INFO, logger="kvctl.server")
    eng = SlowSubmitEngine()
    eng.start()
    try:
        svc = KvctlService(eng, Telemetry(eng.handle.snapshot, nvml=Nvml()), PolicyState(), DecisionLog())
        fut = start_stream(svc, "Generate", gen(prompt="x", sampling=pb.SamplingParams(max_tokens=1000)),
                           ctx, loop)
        assert eng.entered.wait(10)
        fut.cancel()
        eng.release.set()
        wait_for(lambda: eng.num_cancelled == 1 and not eng.seqs, 5, "the late cancel")
        logged = cancel_logs(caplog)
        assert len(logged) == 1 and logged[0]["seq_id"] == "seq-1" and "client" in logged[0]["reason"]
    finally:
        eng.stop()


def test_status_and_streams_do_not_wait_for_the_engine_lock(svc, ctx, loop, fake_engine):
    """Blocking work runs on the worker pool: while a handler waits for the engine's
    lock, the loop still answers GetStatus."""
    with fake_engine.lock:
        listing = asyncio.run_coroutine_threadsafe(svc.ListSequences(pb.ListSequencesRequest(), ctx),
                                                   loop.loop)
        st = pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx), timeout=5))
        assert st.model == "fake" and not listing.done()
    assert listing.result(timeout=5).sequences == []


def test_watch_decisions_streams_then_stops_on_cancel(svc, ctx, loop):
    fut = start_stream(svc, "WatchDecisions", pb.WatchDecisionsRequest(), ctx, loop)
    loop.run(svc.SetPolicy(pb.SetPolicyRequest(profile="streaming"), ctx), timeout=5)
    d = ctx.written.get(timeout=5)
    assert d.kind == "policy" and d.profile == "streaming"
    fut.cancel()
    wait_for(lambda: svc.decisions.num_subscribers == 0, 5, "the watcher to unsubscribe")


def test_draining_refuses_new_work(svc, ctx, loop):
    svc.begin_drain()
    for method, req in (("Generate", gen(prompt="x")), ("SetPolicy", pb.SetPolicyRequest(profile="streaming")),
                        ("Pin", pb.PinRequest(seq_id="a", strategy="quantize_int4")),
                        ("DropSession", pb.DropSessionRequest(session_id="a"))):
        code, err = call(svc, method, req, ctx, loop)
        assert code == E.UNAVAILABLE and "shutting down" in str(err)
    code, st = call(svc, "GetStatus", pb.GetStatusRequest(), ctx, loop)
    assert code == OK and st.draining


def test_status_bytes_are_the_cached_status_plus_live_fields(svc, ctx, loop):
    sample = svc.telemetry.latest()
    want = svc.status_of(sample)
    got = pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx)))
    assert got.uptime_s > 0 and not got.draining
    got.uptime_s = 0.0
    assert got == want
    svc.begin_drain()
    assert pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx))).draining


def test_status_follows_a_policy_change_without_a_new_sample(svc, ctx, loop):
    loop.run(svc.SetPolicy(pb.SetPolicyRequest(profile="throughput"), ctx))
    st = pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx)))
    assert st.policy.profile == "throughput"


@pytest.mark.parametrize("exc, want", [
    (ActionError("block 3 is evicted"), E.FAILED_PRECONDITION),
    (ValueError("bad"), E.INVALID_ARGUMENT),
    (KeyError("s1"), E.NOT_FOUND),
    (RuntimeError("boom"), E.INTERNAL),
])
def test_status_mapping(exc, want):
    assert status_for(exc)[0] == want


class CountingEngine(FakeEngine):
    def __init__(self) -> None:
        super().__init__(token_interval_s=0.005)
        self.tokenized = 0

    def tokenize(self, req):
        self.tokenized += 1
        return super().tokenize(req)


def test_generate_tokenizes_each_prompt_once(ctx, loop):
    """6eb73dd tokenized twice: once to count for the capacity check, once in submit."""
    eng = CountingEngine()
    eng.start()
    try:
        svc = KvctlService(eng, Telemetry(eng.handle.snapshot, nvml=Nvml()), PolicyState(),
                           DecisionLog())
        code, out = call(svc, "Generate", gen(prompt="hello there"), ctx, loop)
        assert code == OK and out[0].started.num_prompt_tokens == len("hello there")
        assert eng.tokenized == 1
    finally:
        eng.stop()


def test_fresh_status_reads_and_never_acts(svc, ctx, loop):
    """6eb73dd ran the telemetry callbacks (the policy tick) for GetStatus(fresh=True) on a
    pool thread, beside the telemetry thread's own tick."""
    ticks = []
    svc.telemetry.on_sample.append(ticks.append)
    code, st = call(svc, "GetStatus", pb.GetStatusRequest(fresh=True), ctx, loop)
    assert code == OK and st.model == "fake" and ticks == []


def test_controller_ticks_one_at_a_time():
    """Two threads ticking at once: one runs, the other returns at once with nothing
    (6eb73dd ran both, each freeing the same bytes)."""
    from controller.policy import Controller

    inside, release = threading.Event(), threading.Event()
    eng = FakeEngine()
    c = Controller(PolicyState(), DecisionLog(), eng.handle)
    snap = eng.handle.snapshot()
    real = c._tick

    def slow(*a):
        inside.set()
        release.wait(5)
        return real(*a)
    c._tick = slow
    t = threading.Thread(target=c.tick, args=(snap,))
    t.start()
    assert inside.wait(5)
    assert c.tick(snap) == []
    release.set()
    t.join(5)


def test_status_says_what_prices_the_moves(svc, ctx, loop, monkeypatch):
    """`kvctl status` names the predictor and, for the learned one, how many priced moves
    it left to the heuristic (the Prometheus counter's figure, where operators look)."""
    from controller.predictors.heuristic import HeuristicPredictor
    from controller.render import predictor_line

    st = pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx)))
    pred = svc.controller.loop.predictor
    assert isinstance(pred, HeuristicPredictor)   # the fake engine's model ships no file
    assert st.predictor.kind == "heuristic" and "no predictor file" in st.predictor.detail
    assert predictor_line(st.predictor).startswith("heuristic (no predictor file")

    class Learned:                                  # a learned predictor's info()
        def info(self):
            return "learned", "SmolLM2-135M-Instruct, 3 members", 200, 3
    monkeypatch.setattr(svc.controller.loop, "predictor", Learned())
    svc.telemetry.sample_now()                      # a new sample: the status is rebuilt
    st = pb.NodeStatus.FromString(loop.run(svc.GetStatus(pb.GetStatusRequest(), ctx)))
    assert (st.predictor.kind, st.predictor.priced, st.predictor.fallbacks) == ("learned", 200, 3)
    assert predictor_line(st.predictor) == ("learned (SmolLM2-135M-Instruct, 3 members); 3 of "
                                            "200 priced moves left to the heuristic (1.5%)")
