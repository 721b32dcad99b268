"""Real round trips: the daemon hosting the real Engine (model "random:tiny"), over the
Unix socket and over TCP+TLS on loopback."""
import json
import os
import stat
import threading
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from controller.config import load_config
from controller.server import Daemon
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc
from tests.controller.helpers import free_port, make_tls, wait_for

TOKEN = "s3cret-token-for-tests"


def long_request(n=3000):
    return pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=list(range(1, 65))),
                              sampling=pb.SamplingParams(max_tokens=n, ignore_eos=True))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    import tempfile

    d = tempfile.mkdtemp(prefix="kv-")
    tls = tmp_path_factory.mktemp("tls")
    cert, key = make_tls(tls)
    (tls / "token").write_text(TOKEN + "\n")
    cfg = load_config(overrides={
        "server.socket": f"{d}/kvctl.sock", "engine.model": "random:tiny",
        "engine.num_threads": 1, "engine.kv_budget_bytes": 64 << 20,
        "server.tcp_address": f"127.0.0.1:{free_port()}", "server.tls_cert": str(cert),
        "server.tls_key": str(key), "server.token_file": str(tls / "token"),
        "metrics.enabled": True, "metrics.port": 0, "telemetry.interval_s": 0.05}, env={})
    dm = Daemon(cfg)
    dm.start()
    dm.cert = cert
    yield dm
    dm.stop(grace_s=1)


@pytest.fixture
def unix_stub(daemon):
    ch = grpc.insecure_channel(f"unix:{daemon.socket_path}")
    yield kvctl_pb2_grpc.KvctlStub(ch)
    ch.close()


def tls_channel(daemon):
    creds = grpc.ssl_channel_credentials(root_certificates=daemon.cert.read_bytes())
    return grpc.secure_channel(daemon.cfg.server.tcp_address, creds,
                               options=[("grpc.ssl_target_name_override", "localhost")])


def test_socket_mode_and_health(daemon):
    assert stat.S_IMODE(os.stat(daemon.socket_path).st_mode) == 0o660
    ch = grpc.insecure_channel(f"unix:{daemon.socket_path}")
    h = health_pb2_grpc.HealthStub(ch)
    for svc in ("", "kvctl.v1.Kvctl"):
        assert h.Check(health_pb2.HealthCheckRequest(service=svc)).status == \
            health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ch)
    resp = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
    names = {s.name for s in resp.list_services_response.service}
    assert {"kvctl.v1.Kvctl", "grpc.health.v1.Health"} <= names


def test_generate_status_policy_over_unix(daemon, unix_stub):
    out = list(unix_stub.Generate(pb.GenerateRequest(
        prompt_ids=pb.TokenIds(ids=[5, 6, 7, 8]),
        sampling=pb.SamplingParams(max_tokens=6, ignore_eos=True, temperature=0.7, seed=3))))
    kinds = [r.WhichOneof("event") for r in out]
    assert kinds == ["started"] + ["token"] * 6 + ["finished"]
    fin = out[-1].finished
    assert fin.reason == pb.FINISH_REASON_LENGTH and fin.usage.prompt_tokens == 4
    assert list(fin.token_ids) == [r.token.token_id for r in out[1:-1]]
    assert sum(fin.kv_bytes_by_tier.values()) > 0 and "full" in fin.kv_bytes_by_format
    st = unix_stub.GetStatus(pb.GetStatusRequest(fresh=True))
    assert st.model and st.mode == "cpu" and st.tiers[0].capacity_bytes > 0
    assert st.policy.budget_bytes == 64 << 20
    p = unix_stub.SetPolicy(pb.SetPolicyRequest(profile="long-context", high_watermark=0.85))
    assert p.profile == "long-context" and unix_stub.GetPolicy(pb.GetPolicyRequest()).profile == "long-context"
    with pytest.raises(grpc.RpcError) as e:
        unix_stub.SetPolicy(pb.SetPolicyRequest(low_watermark=0.9))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "low watermark" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(unix_stub.Generate(pb.GenerateRequest(prompt="text needs a tokenizer")))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prompt_ids" in e.value.details()


def test_streamed_messages_equal_the_engines_events(daemon, unix_stub):
    """What a client receives (pre-serialized on the daemon) is, message for message, the
    engine's own events for the same seeded request built as protobuf messages."""
    from controller import convert
    from engine.api import FinishEvent, TokenEvent

    def req(seq_id):
        return pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[9, 8, 7, 6, 5]), seq_id=seq_id,
                                  sampling=pb.SamplingParams(max_tokens=12, ignore_eos=True,
                                                             temperature=0.9, seed=11))
    wire = list(unix_stub.Generate(req("wire-1")))
    engine = list(daemon.engine.generate(convert.request_from_proto(req("wire-1")), timeout=30))
    toks = [e for e in engine if isinstance(e, TokenEvent)]
    fin = next(e for e in engine if isinstance(e, FinishEvent))
    assert wire[0] == convert.started_to_proto("wire-1", 5)
    assert wire[1:-1] == [convert.token_to_proto(e) for e in toks] and len(toks) == 12
    got = wire[-1]
    assert got.finished.seconds > 0
    got.finished.seconds = 0.0
    assert got == convert.finish_to_proto(fin, 0.0)


def test_cancel_mid_stream_frees_blocks(daemon, unix_stub):
    stream = unix_stub.Generate(long_request())
    seq_id = next(stream).started.seq_id
    for _ in range(3):
        assert next(stream).WhichOneof("event") == "token"
    one = unix_stub.GetSequence(pb.GetSequenceRequest(seq_id=seq_id))
    assert one.num_blocks > 0 and one.bytes_by_tier["gpu"] > 0
    gpu_used = unix_stub.GetStatus(pb.GetStatusRequest(fresh=True)).tiers[0].used_bytes
    assert gpu_used > 0
    watch = unix_stub.WatchDecisions(pb.WatchDecisionsRequest())
    assert unix_stub.Pin(pb.PinRequest(seq_id=seq_id, strategy="quantize_int8")).strategy == "quantize_int8"
    d = next(watch)
    assert (d.kind, d.seq_id, d.action) == ("pin", seq_id, "quantize_int8")
    watch.cancel()
    assert unix_stub.Cancel(pb.CancelRequest(seq_id=seq_id)).cancelled
    last = list(stream)[-1]
    assert last.finished.reason == pb.FINISH_REASON_CANCELLED
    assert last.finished.usage.completion_tokens < 3000
    st = unix_stub.GetStatus(pb.GetStatusRequest(fresh=True))
    assert st.tiers[0].used_bytes == 0 and st.counts.total == 0
    with pytest.raises(grpc.RpcError) as e:
        unix_stub.GetSequence(pb.GetSequenceRequest(seq_id=seq_id))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND


def test_session_turns_reuse_kv_over_the_wire(daemon, unix_stub):
    """Issue 16 over the socket: the second turn of a session (its prompt the first turn's
    prompt and output plus new ids) reuses the first's KV; ListSessions shows it;
    EstimateCapacity counts the same reuse before the turn; DropSession forgets it."""
    T = daemon.engine.store.block_size
    window = max(1, daemon.engine.config.observe_window)

    def turn(ids, n=8):
        return list(unix_stub.Generate(pb.GenerateRequest(
            prompt_ids=pb.TokenIds(ids=ids), session_id="rt-chat",
            sampling=pb.SamplingParams(max_tokens=n, ignore_eos=True))))[-1].finished

    first_ids = [(7 * i + 3) % 500 for i in range(80)]
    try:
        first = turn(first_ids)
        assert first.usage.cached_tokens == 0 and len(first.token_ids) == 8
        ids = first_ids + list(first.token_ids) + list(range(100, 110))
        want = (len(ids) - window) // T * T        # blocks before the recomputed window
        assert want > 0
        est = lambda **kw: unix_stub.EstimateCapacity(  # noqa: E731
            pb.EstimateCapacityRequest(num_tokens=len(ids) + 8, **kw))
        plain, cached = est(), est(prompt_ids=pb.TokenIds(ids=ids), session_id="rt-chat")
        assert plain.reused_tokens == 0 and cached.reused_tokens == want
        assert cached.bytes_needed < plain.bytes_needed and cached.can_admit
        assert f"{want} of {len(ids)} prompt tokens reused" in cached.reason
        second = turn(ids)
        assert second.usage.cached_tokens == want and second.usage.prompt_tokens == len(ids)
        (sess,) = [x for x in unix_stub.ListSessions(pb.ListSessionsRequest()).sessions
                   if x.session_id == "rt-chat"]
        assert sess.turns == 2 and not sess.active and sess.reused_tokens == want
        assert sess.num_tokens == len(ids) + 7 and sess.bytes_by_tier["gpu"] > 0
        assert sess.seq_id and sess.bytes_by_format["full"] > 0
        kept = unix_stub.GetSequence(pb.GetSequenceRequest(seq_id=sess.seq_id))
        assert kept.state == "idle" and kept.num_tokens == sess.num_tokens
        st = unix_stub.GetStatus(pb.GetStatusRequest(fresh=True))
        assert st.sessions >= 1 and st.prefix.hit_tokens >= want
        assert st.prefix.queried_tokens >= len(first_ids) + len(ids)
        assert st.prefix.indexed_blocks > 0
        with pytest.raises(grpc.RpcError) as e:
            list(unix_stub.Generate(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[1, 2]),
                                                       session_id="no spaces allowed")))
        assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_id" in e.value.details()
    finally:
        try:
            dropped = unix_stub.DropSession(pb.DropSessionRequest(session_id="rt-chat"))
        except grpc.RpcError:
            dropped = None
    assert dropped is not None and dropped.dropped and dropped.session_id == "rt-chat"
    assert not [x for x in unix_stub.ListSessions(pb.ListSessionsRequest()).sessions
                if x.session_id == "rt-chat"]
    with pytest.raises(grpc.RpcError) as e:
        unix_stub.DropSession(pb.DropSessionRequest(session_id="rt-chat"))
    assert e.value.code() == grpc.StatusCode.NOT_FOUND and "rt-chat" in e.value.details()


def test_client_disconnect_frees_the_sequence(daemon, unix_stub):
    stream = unix_stub.Generate(long_request())
    seq_id = next(stream).started.seq_id
    next(stream)
    stream.cancel()                      # the client goes away without calling Cancel
    wait_for(lambda: not any(s.seq_id == seq_id for s in
                             unix_stub.ListSequences(pb.ListSequencesRequest()).sequences),
             10, "the engine to drop the abandoned sequence")


def test_tcp_tls_token(daemon):
    ch = tls_channel(daemon)
    stub = kvctl_pb2_grpc.KvctlStub(ch)
    # read-only calls need TLS but no token
    assert stub.GetStatus(pb.GetStatusRequest()).model
    stub.ListSessions(pb.ListSessionsRequest())
    for call, req in ((stub.SetPolicy, pb.SetPolicyRequest(profile="streaming")),
                      (stub.Cancel, pb.CancelRequest(seq_id="x")),
                      (stub.Pin, pb.PinRequest(seq_id="x", strategy="quantize_int4")),
                      (stub.Unpin, pb.UnpinRequest(seq_id="x")),
                      (stub.DropSession, pb.DropSessionRequest(session_id="x"))):
        for meta in ((), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)):
            with pytest.raises(grpc.RpcError) as e:
                call(req, metadata=meta)
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED, (call, meta)
            assert "Bearer" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long_request(5)))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    good = (("authorization", f"Bearer {TOKEN}"),)
    assert stub.SetPolicy(pb.SetPolicyRequest(profile="streaming"), metadata=good).profile == "streaming"
    out = list(stub.Generate(long_request(4), metadata=good))
    assert out[-1].finished.usage.completion_tokens == 4
    with pytest.raises(grpc.RpcError) as e:      # past the token check: no such session
        stub.DropSession(pb.DropSessionRequest(session_id="x"), metadata=good)
    assert e.value.code() == grpc.StatusCode.NOT_FOUND
    ch.close()


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_is_case_insensitive(daemon, scheme):
    """RFC 7235: the auth scheme is case-insensitive (the token is not)."""
    ch = tls_channel(daemon)
    stub = kvctl_pb2_grpc.KvctlStub(ch)
    p = stub.SetPolicy(pb.SetPolicyRequest(profile="streaming"),
                       metadata=(("authorization", f"{scheme} {TOKEN}"),))
    assert p.profile == "streaming"
    with pytest.raises(grpc.RpcError) as e:
        stub.SetPolicy(pb.SetPolicyRequest(profile="streaming"),
                       metadata=(("authorization", f"{scheme} {TOKEN.upper()}"),))
    assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED
    ch.close()


def test_plaintext_tcp_is_refused(daemon):
    ch = grpc.insecure_channel(daemon.cfg.server.tcp_address)
    with pytest.raises(grpc.RpcError) as e:
        kvctl_pb2_grpc.KvctlStub(ch).GetStatus(pb.GetStatusRequest(), timeout=3)
    assert e.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    ch.close()


def test_metrics_endpoint(daemon, unix_stub):
    list(unix_stub.Generate(long_request(3)))
    wait_for(lambda: daemon.metrics.token_times.count >= 3, 5, "token counter")
    body = urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics", timeout=5).read().decode()
    for name in ("kvctl_kv_bytes", "kvctl_tier_capacity_bytes", "kvctl_time_per_token_seconds_bucket",
                 "kvctl_generated_tokens_total", "kvctl_cpu_mode 1.0", "kvctl_host_memory_bytes",
                 "kvctl_pcie_bytes_per_second", "kvctl_predictor_fallbacks_total",
                 "kvctl_decisions_total", 'kvctl_prefix_tokens_total{kind="hit"}',
                 'kvctl_prefix_tokens_total{kind="queried"}', 'kvctl_prefix_blocks{kind="cached"}',
                 'kvctl_sessions{state="idle"}', 'kvctl_tier_cached_bytes{tier="gpu"}',
                 'kvctl_arena_compacted_total{kind="pages"}'):
        assert name in body, name

    def steps() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{daemon.metrics_port}/metrics",
                                      timeout=5).read().decode()
    # where the engine's step time went, and its steps by kind (after a telemetry tick)
    wait_for(lambda: 'kvctl_engine_steps_total{kind="decode"}' in steps(), 5, "step counters")
    body = steps()
    for name in ('kvctl_engine_step_seconds_total{part="launch"}',
                 'kvctl_engine_steps_seconds_total{kind="prefill"}'):
        assert name in body, name


def test_drain_lets_short_requests_finish_and_cancels_long_ones(tmp_path_factory):
    import tempfile

    d = tempfile.mkdtemp(prefix="kv-")
    cfg = load_config(overrides={"server.socket": f"{d}/k.sock", "engine.model": "random:tiny",
                                 "engine.num_threads": 1}, env={})
    dm = Daemon(cfg)
    dm.start()
    stub = kvctl_pb2_grpc.KvctlStub(grpc.insecure_channel(f"unix:{dm.socket_path}"))
    long_stream = stub.Generate(long_request(4000))
    next(long_stream)
    next(long_stream)
    stopper = threading.Thread(target=dm.stop, kwargs={"grace_s": 1.0})
    stopper.start()
    wait_for(lambda: dm.service.draining, 5, "drain to start")
    with pytest.raises(grpc.RpcError) as e:
        list(stub.Generate(long_request(2)))
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in e.value.details()
    with pytest.raises(grpc.RpcError) as e:
        list(long_stream)
    assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "drain grace" in e.value.details()
    stopper.join(20)
    assert not stopper.is_alive() and not os.path.exists(dm.socket_path)


def test_cli_over_tcp_tls(daemon, tmp_path):
    import subprocess

    from tests.controller.helpers import KVCTL, ROOT, child_env

    token = tmp_path / "token"
    token.write_text(TOKEN)
    base = KVCTL + ["--address", daemon.cfg.server.tcp_address, "--tls-ca", str(daemon.cert)]
    run = lambda *a: subprocess.run([*base, *a], cwd=ROOT, env=child_env(), capture_output=True,  # noqa: E731
                                    text=True, timeout=30)
    r = run("status", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["model"], r.stderr
    r = run("policy", "set", "--profile", "multi-turn")
    assert r.returncode == 1 and "UNAUTHENTICATED" in r.stderr and "Traceback" not in r.stderr
    r = run("--token-file", str(token), "policy", "set", "--profile", "multi-turn", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["profile"] == "multi-turn", r.stderr


def test_generate_with_kv_format_writes_the_prompt_in_it(unix_stub):
    """kv_format on the wire: the prompt's blocks are int4 by the time it finishes (the
    newest stays full precision); a bad format is INVALID_ARGUMENT naming the field."""
    req = pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[(i * 7) % 300 + 1 for i in range(400)]),
                             kv_format="int4",
                             sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True))
    fin = list(unix_stub.Generate(req))[-1].finished
    assert fin.reason == pb.FINISH_REASON_LENGTH
    by = dict(fin.kv_bytes_by_format)
    assert by.get("int4", 0) > 0 and by.get("full", 0) < by["int4"], by
    req.kv_format = "int3"
    with pytest.raises(grpc.RpcError) as e:
        list(unix_stub.Generate(req))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "kv_format 'int3'" in e.value.details()
