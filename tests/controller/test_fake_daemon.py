"""The real gRPC server (controller.server.Daemon) hosting the fake engine, and the CLI as
subprocesses against it: what a user sees at the edges (odd strings from the daemon,
malformed requests, failed generations), fast because no model loads."""
import subprocess
import tempfile

import grpc
import pytest

from controller.config import load_config
from controller.policy import Decision
from controller.server import Daemon
from engine.api import Request, SamplingParams
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc
from tests.controller.fakes import FakeEngine
from tests.controller.helpers import KVCTL, ROOT, child_env


@pytest.fixture(scope="module")
def fake_daemon():
    d = tempfile.mkdtemp(prefix="kv-")
    cfg = load_config(overrides={"server.socket": f"{d}/kvctl.sock", "engine.model": "random:tiny",
                                 "telemetry.interval_s": 0.05}, env={})
    dm = Daemon(cfg, engine=FakeEngine(token_interval_s=0.005))
    dm.start()
    yield dm
    dm.stop(grace_s=1)
    subprocess.run(["rm", "-rf", d])


def kvctl(dm, *args, timeout=30):
    return subprocess.run(KVCTL + ["--socket", str(dm.socket_path), *args], cwd=ROOT,
                          env=child_env(COLUMNS="200"), capture_output=True, text=True,
                          timeout=timeout)


# ids the daemon no longer accepts from clients, but an engine (or an older daemon) may
# still report, and other daemon strings (a model directory's name) can hold brackets
MARKUP_IDS = ["[/x]", "[bold]red"]


@pytest.fixture
def markup_sequences(fake_daemon):
    eng = fake_daemon.engine
    for sid in MARKUP_IDS:
        eng.submit(Request(prompt_ids=[1, 2], seq_id=sid, sampling=SamplingParams(max_tokens=10**6)),
                   lambda ev: None)
    fake_daemon.policy.pin(MARKUP_IDS[0], "quantize_int4")
    fake_daemon.decisions.record(Decision(kind="pin", seq_id=MARKUP_IDS[0], action="quantize_int4",
                                          reason="operator pinned [/x] [bold]", profile="balanced"))
    yield fake_daemon
    for sid in MARKUP_IDS:
        eng.cancel(sid)
    fake_daemon.policy.unpin(MARKUP_IDS[0])


@pytest.mark.parametrize("args, shown", [
    (["status"], ["[/x]", "[bold]red", "[/x]→quantize_int4"]),
    (["sequences"], MARKUP_IDS),
    (["policy", "get"], ["pin [/x]"]),
])
def test_cli_shows_markup_in_daemon_strings_literally(markup_sequences, args, shown):
    r = kvctl(markup_sequences, *args)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    for text in shown:
        assert text in r.stdout, (text, r.stdout)


def test_watch_shows_markup_in_a_decision_literally(markup_sequences):
    w = subprocess.Popen(KVCTL + ["--socket", str(markup_sequences.socket_path), "watch", "--history", "1"],
                         cwd=ROOT, env=child_env(COLUMNS="200"), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    line = w.stdout.readline()
    w.terminate()
    _, err = w.communicate(timeout=10)
    assert "pin [/x] quantize_int4: operator pinned [/x] [bold]" in line, (line, err)


def test_a_stream_failing_in_the_engine_ends_internal(fake_daemon):
    """After its final message (reason ERROR), not with OK."""
    fake_daemon.engine.fail_next = "internal error in the engine step"
    ch = grpc.insecure_channel(f"unix:{fake_daemon.socket_path}")
    stream = kvctl_pb2_grpc.KvctlStub(ch).Generate(pb.GenerateRequest(prompt="hi"))
    got = []
    with pytest.raises(grpc.RpcError) as e:
        for msg in stream:
            got.append(msg)
    ch.close()
    assert [m.WhichOneof("event") for m in got] == ["started", "token", "finished"]
    assert got[-1].finished.reason == pb.FINISH_REASON_ERROR
    assert e.value.code() == grpc.StatusCode.INTERNAL
    assert "internal error in the engine step" in e.value.details()


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_kvctl_generate_failing_in_the_engine_exits_non_zero(fake_daemon, json_flag):
    fake_daemon.engine.fail_next = "internal error in the engine step"
    r = kvctl(fake_daemon, "generate", "hi", *json_flag)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "internal error in the engine step" in r.stderr and "Traceback" not in r.stderr


METHODS = list(pb.DESCRIPTOR.services_by_name["Kvctl"].methods)


@pytest.mark.parametrize("method", METHODS, ids=[m.name for m in METHODS])
@pytest.mark.parametrize("raw", [b"\xff\xff\xff", b"\x0a\x05ab"], ids=["bad varint", "truncated field"])
def test_malformed_request_bytes_are_invalid_argument(fake_daemon, method, raw):
    ch = grpc.insecure_channel(f"unix:{fake_daemon.socket_path}")
    path = f"/kvctl.v1.Kvctl/{method.name}"
    # identity serializers: the bytes go out as they are
    call = ch.unary_stream(path) if method.server_streaming else ch.unary_unary(path)
    with pytest.raises(grpc.RpcError) as e:
        out = call(raw, timeout=10)
        if method.server_streaming:
            list(out)
    ch.close()
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.value.code(), e.value.details())
    details = e.value.details()
    assert details.startswith("malformed request: ") and method.input_type.full_name in details
    assert "Error" not in details and "Exception" not in details and "Traceback" not in details


@pytest.fixture
def wide_console():
    """Tables as a wide terminal draws them (CliRunner's stdout is no terminal: 80 columns)."""
    from controller.render import console
    width = console._width
    console.width = 200
    yield
    console._width = width


def test_cli_sessions_status_and_drop_session(fake_daemon, wide_console):
    """`kvctl sessions` (table and --json), the prefix line of `kvctl status` and
    `kvctl drop-session`, in process through typer's CliRunner."""
    import json

    from typer.testing import CliRunner

    from controller.cli import app
    from tests.controller.helpers import wait_for

    eng = fake_daemon.engine
    done = []
    ids = list(range(1, 11))
    eng.submit(Request(prompt_ids=ids, session_id="cli-chat",
                       sampling=SamplingParams(max_tokens=3)), done.append)
    wait_for(lambda: done and done[-1].reason == "length", 10, "the first turn")
    eng.submit(Request(prompt_ids=ids + done[-1].token_ids + [5, 6], session_id="cli-chat",
                       sampling=SamplingParams(max_tokens=3)), done.append)
    wait_for(lambda: len([e for e in done if getattr(e, "reason", "")]) == 2, 10, "the second turn")
    assert done[-1].cached_tokens == 12
    sock = str(fake_daemon.socket_path)
    runner = CliRunner()
    run = lambda *a: runner.invoke(app, ["--socket", sock, *a])  # noqa: E731
    try:
        r = run("sessions")
        assert r.exit_code == 0, r.output
        # 17 tokens kept: 5 blocks of 4 x 1000 B
        for text in ("Sessions", "SESSION", "KV BY TIER", "cli-chat", "gpu 19.5 KiB", "full 19.5 KiB"):
            assert text in r.output, (text, r.output)
        row = next(line for line in r.output.splitlines() if "cli-chat" in line)
        assert [c.strip() for c in row.split("│")[2:4]] == ["2", "0s"]   # turns, age
        r = run("sessions", "--json")
        (sess,) = json.loads(r.output)
        assert (sess["session_id"], sess["turns"], sess["seq_id"]) == ("cli-chat", 2, "session/cli-chat")
        assert sess["num_tokens"] == 17 and sess["reused_tokens"] == "12"   # uint64: a JSON string
        wait_for(lambda: fake_daemon.telemetry.latest().snapshot.sessions, 5,
                 "a telemetry sample with the session")
        r = run("status")
        assert r.exit_code == 0, r.output
        p = fake_daemon.engine.prefix      # other tests' prompts count too
        rate = f"hit rate {p['hit_tokens'] / p['queried_tokens']:.0%} ({p['hit_tokens']} of "
        assert rate in r.output and "1 session" in r.output, r.output
        assert "CACHED" in r.output
        r = run("drop-session", "cli-chat")
        assert r.exit_code == 0 and "dropped session cli-chat" in r.output, r.output
        assert json.loads(run("sessions", "--json").output) == []
    finally:
        eng.drop_session("cli-chat")
    r = kvctl(fake_daemon, "drop-session", "cli-chat")        # the installed entry point's errors
    assert r.returncode == 1 and "NOT_FOUND" in r.stderr and "Traceback" not in r.stderr, r.stderr
