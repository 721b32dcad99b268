"""`kvctl` as a person uses it: the daemon as a subprocess (`kvctl serve`, real engine,
random:tiny), the CLI as subprocesses against it, SIGTERM and systemd notifications."""
import json
import signal
import socket
import subprocess

import grpc
import pytest

from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc
from tests.controller.helpers import KVCTL, ROOT, child_env, wait_for


def start_daemon(sock_dir, grace_s: float, notify: str | None = None):
    # under "systemd": notify socket, and a 0.4 s watchdog (pings every 0.2 s)
    env = child_env(**({"NOTIFY_SOCKET": notify, "WATCHDOG_USEC": "400000"} if notify else {}))
    p = subprocess.Popen(KVCTL + ["serve", "--socket", f"{sock_dir}/kvctl.sock", "--model", "random:tiny",
                                  "--set", "engine.num_threads=1",
                                  "--set", f"server.drain_grace_s={grace_s}"],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    sock = sock_dir / "kvctl.sock"
    wait_for(lambda: sock.exists() or p.poll() is not None, 60, "the daemon's socket")
    assert p.poll() is None, p.stderr.read()
    return p, sock


def kvctl(sock, *args, timeout=30):
    return subprocess.run(KVCTL + ["--socket", str(sock), *args], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served():
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="kv-"))
    p, sock = start_daemon(d, grace_s=5)
    yield sock
    p.send_signal(signal.SIGTERM)
    p.wait(30)
    p.stderr.close()


def test_status_json_parses(served):
    r = kvctl(served, "status", "--json")
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["mode"] == "cpu" and st["model"] == "random:tiny"
    assert {t["name"] for t in st["tiers"]} >= {"gpu"}
    assert st["policy"]["profile"] == "balanced"
    assert st["predictor"]["kind"] == "heuristic"      # random:tiny ships no predictor file


def test_status_screen_reads(served):
    r = kvctl(served, "status")
    assert r.returncode == 0, r.stderr
    for word in ("KV memory by tier", "cpu mode", "profile", "balanced", "Sequences", "steps",
                 "predictor", "no predictor file for model 'random:tiny'"):
        assert word in r.stdout, word


def test_generate_streams_to_stdout(served):
    p = subprocess.Popen(KVCTL + ["--socket", str(served), "generate", "--ids", "1,2,3,4",
                                  "--max-tokens", "3000", "--json"],
                         cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first = json.loads(p.stdout.readline())
    seq_id = first["started"]["seq_id"]
    token = json.loads(p.stdout.readline())       # arrives while the generation still runs
    assert token["token"]["seq_id"] == seq_id and p.poll() is None
    seqs = json.loads(kvctl(served, "sequences", "--json").stdout)
    assert [s["seq_id"] for s in seqs] == [seq_id]
    assert kvctl(served, "pin", seq_id, "quantize_int4").returncode == 0
    pol = json.loads(kvctl(served, "policy", "get", "--json").stdout)
    assert pol["pins"] == [{"seq_id": seq_id, "strategy": "quantize_int4"}]
    assert kvctl(served, "unpin", seq_id).returncode == 0
    channel = grpc.insecure_channel(f"unix:{served}")
    kvctl_pb2_grpc.KvctlStub(channel).Cancel(pb.CancelRequest(seq_id=seq_id))
    channel.close()
    out, err = p.communicate(timeout=30)
    last = json.loads(out.strip().splitlines()[-1])
    assert last["finished"]["reason"] == "FINISH_REASON_CANCELLED" and p.returncode == 0


def test_generate_plain_text_and_summary(served):
    r = kvctl(served, "generate", "--ids", "7,8,9", "--max-tokens", "5")
    assert r.returncode == 0, r.stderr
    assert "5 generated tokens" in r.stderr and ": length," in r.stderr


@pytest.mark.parametrize("args, code, msg", [
    (["policy", "set", "--low", "0.99"], 1, "INVALID_ARGUMENT"),
    (["pin", "nope", "quantize_int4"], 1, "NOT_FOUND"),
    (["generate", "needs a tokenizer"], 1, "prompt_ids"),
    (["bench"], 2, "Missing argument"),
    (["bench", "nope"], 2, "unknown benchmark"),
    (["train"], 2, "required: {record,fit}"),
    (["train", "fit", "--traces", "/no/such/traces.jsonl", "--out", "/tmp/x.skops"], 1,
     "traces file /no/such/traces.jsonl does not exist"),
    (["status", "--no-such-flag"], 2, "No such option"),
])
def test_cli_errors_are_messages_not_tracebacks(served, args, code, msg):
    r = kvctl(served, *args)
    assert r.returncode == code and msg in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_policy_set_then_watch_shows_it(served):
    r = kvctl(served, "policy", "set", "--profile", "throughput", "--high", "0.8", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["profile"] == "throughput"
    w = subprocess.Popen(KVCTL + ["--socket", str(served), "watch", "--json", "--history", "1"],
                         cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    line = w.stdout.readline()
    w.terminate()
    w.wait(10)
    w.stdout.close()
    d = json.loads(line)
    assert d["kind"] == "policy" and "throughput" in d["reason"]


def test_second_daemon_on_the_same_socket_refuses(served):
    r = subprocess.run(KVCTL + ["serve", "--socket", str(served), "--model", "random:tiny"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "already serving" in r.stderr and "Traceback" not in r.stderr
    assert kvctl(served, "status", "--json").returncode == 0       # the first one is untouched


def test_serve_leaves_a_file_that_is_not_a_socket_alone(tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("precious\n")
    r = subprocess.run(KVCTL + ["serve", "--socket", str(f), "--model", "random:tiny"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "is not a socket" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert f.read_text() == "precious\n"


def test_prepare_socket_removes_only_a_stale_socket(tmp_path):
    from controller.server import prepare_socket

    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                       # a socket file nobody listens on: a dead daemon's
    prepare_socket(stale)
    assert not stale.exists()
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    for other in (tmp_path / "dir", tmp_path / "link"):
        with pytest.raises(FileExistsError, match="is not a socket"):
            prepare_socket(other)
        assert other.is_symlink() or other.is_dir()


def test_serve_refuses_tcp_without_tls(tmp_path):
    r = subprocess.run(KVCTL + ["serve", "--socket", str(tmp_path / "s.sock"), "--tcp", "127.0.0.1:7999",
                                "--model", "random:tiny"], cwd=ROOT, env=child_env(),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "needs TLS and a token" in r.stderr and "Traceback" not in r.stderr


def test_serve_with_an_empty_token_file_fails_before_loading_the_model(tmp_path):
    for n in ("c.pem", "k.pem", "token"):
        (tmp_path / n).write_text("x" if n != "token" else "")
    r = subprocess.run(KVCTL + ["serve", "--socket", str(tmp_path / "s.sock"), "--tcp", "127.0.0.1:7999",
                                "--model", "random:tiny", "--set", f"server.tls_cert={tmp_path}/c.pem",
                                "--set", f"server.tls_key={tmp_path}/k.pem",
                                "--set", f"server.token_file={tmp_path}/token"],
                       cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "server.token_file" in r.stderr and "is empty" in r.stderr, r.stderr
    assert "engine loaded" not in r.stderr and "Traceback" not in r.stderr


def test_no_daemon_is_a_clear_message(tmp_path):
    r = kvctl(tmp_path / "absent.sock", "status")
    assert r.returncode == 1 and "not running" in r.stderr and "Traceback" not in r.stderr
    stale = tmp_path / "stale.sock"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()                       # a socket file nobody listens on
    r = subprocess.run(KVCTL + ["--socket", str(stale), "--timeout", "3", "status"], cwd=ROOT,
                       env=child_env(), capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "cannot reach the kvctl daemon" in r.stderr, r.stderr


def save_tiny_model_dir(d):
    """random:tiny's shape with a word-level tokenizer, saved as a local HF model dir:
    loading it from disk is what prints transformers' progress bars."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from engine.models import RANDOM_CONFIGS

    vocab = {"<unk>": 0, "</s>": 1, **{chr(97 + i): 2 + i for i in range(26)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(d)
    AutoModelForCausalLM.from_config(LlamaConfig(**RANDOM_CONFIGS["tiny"])).save_pretrained(d)


def test_serve_log_is_json_lines_while_a_model_loads_from_disk(tmp_path):
    import tempfile
    from pathlib import Path

    save_tiny_model_dir(tmp_path / "tiny")
    d = Path(tempfile.mkdtemp(prefix="kv-"))
    p = subprocess.Popen(KVCTL + ["serve", "--socket", f"{d}/kvctl.sock", "--model", str(tmp_path / "tiny"),
                                  "--set", "engine.num_threads=1"],
                         cwd=ROOT, env=child_env(), stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        while not lines or '"serving"' not in lines[-1]:
            line = p.stderr.readline()
            assert line, f"the daemon exited: {''.join(lines)}"
            lines.append(line)
        for line in lines:               # a tqdm bar here would break `journalctl -o cat | jq`
            json.loads(line)
    finally:
        p.send_signal(signal.SIGTERM)
        p.wait(30)
        p.stderr.close()


def test_sigterm_drains_and_notifies_systemd():
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="kv-"))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(d / "notify"))
    notify.settimeout(60)
    p, sock = start_daemon(d, grace_s=1.0, notify=str(d / "notify"))
    try:
        msgs = [notify.recv(4096)]
        while msgs[-1].startswith(b"STATUS="):     # progress before READY (engine start)
            msgs.append(notify.recv(4096))
        assert msgs[-1].startswith(b"READY=1"), msgs
        assert notify.recv(4096) == b"WATCHDOG=1"
        stub = kvctl_pb2_grpc.KvctlStub(grpc.insecure_channel(f"unix:{sock}"))
        short = stub.Generate(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[1, 2]),
                                                 sampling=pb.SamplingParams(max_tokens=40, ignore_eos=True)))
        long = stub.Generate(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[1, 2]),
                                                sampling=pb.SamplingParams(max_tokens=4000, ignore_eos=True)))
        next(short), next(long), next(long)
        p.send_signal(signal.SIGTERM)
        while (msg := notify.recv(4096)) == b"WATCHDOG=1":
            pass
        assert msg == b"STOPPING=1"
        assert list(short)[-1].finished.reason == pb.FINISH_REASON_LENGTH   # finished within grace
        with pytest.raises(grpc.RpcError) as e:
            list(long)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE and "drain grace" in e.value.details()
        assert p.wait(30) == 0
        logs = [json.loads(line) for line in p.stderr.read().splitlines() if line.startswith("{")]
        msgs = [x["msg"] for x in logs]
        assert "serving" in msgs and "draining" in msgs and msgs[-1] == "stopped"
        assert logs[-1]["cancelled"] == 1 and not sock.exists()
        assert not any("prompt" in x for x in logs if x["msg"] == "generate")   # log_prompts off
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()
        notify.close()


def test_sigterm_under_pressure_ends_every_stream_deliberately():
    """32 streams on an arena that holds a fraction of them (stalls, moves, preemption
    in progress), then SIGTERM: each stream ends finished or UNAVAILABLE (drain grace
    over), the daemon exits 0 and says how many it cancelled."""
    import tempfile
    import threading
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="kv-"))
    env = child_env()
    p = subprocess.Popen(KVCTL + ["serve", "--socket", f"{d}/kvctl.sock", "--model", "random:tiny",
                                  "--set", "engine.num_threads=1", "--set", "engine.block_size=16",
                                  "--set", "engine.page_bytes=16384",
                                  "--set", f"engine.kv_budget_bytes={2 * 16 * 16384}",
                                  "--set", "engine.preempt_after_s=0.2",
                                  "--set", "server.drain_grace_s=1.0"],
                         cwd=ROOT, env=env, stderr=subprocess.PIPE, text=True)
    sock = d / "kvctl.sock"
    try:
        wait_for(lambda: sock.exists() or p.poll() is not None, 60, "the daemon's socket")
        stub = kvctl_pb2_grpc.KvctlStub(grpc.insecure_channel(f"unix:{sock}"))
        ends, lock = [], threading.Lock()

        def stream(i):
            try:
                last = list(stub.Generate(pb.GenerateRequest(
                    prompt_ids=pb.TokenIds(ids=[(7 * i + j) % 400 + 1 for j in range(40 + i)]),
                    sampling=pb.SamplingParams(max_tokens=400 + 40 * i, ignore_eos=True))))[-1]
                end = pb.FinishReason.Name(last.finished.reason)
            except grpc.RpcError as e:
                end = e.code().name
            with lock:
                ends.append(end)
        threads = [threading.Thread(target=stream, args=(i,)) for i in range(32)]
        for t in threads:
            t.start()
        wait_for(lambda: stub.GetStatus(pb.GetStatusRequest()).counts.total >= 16, 30,
                 "the streams to be admitted")
        p.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(60)
        assert len(ends) == 32 and set(ends) <= {"FINISH_REASON_LENGTH", "UNAVAILABLE"}, ends
        assert p.wait(30) == 0
        logs = [json.loads(x) for x in p.stderr.read().splitlines() if x.startswith("{")]
        assert logs[-1]["msg"] == "stopped" and logs[-1]["cancelled"] == ends.count("UNAVAILABLE")
        assert not any(x["level"] == "error" for x in logs), [x for x in logs if x["level"] == "error"]
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


def test_sigkill_then_restart_on_the_same_socket():
    """A daemon killed outright leaves its socket file behind; the next start finds it
    stale (nobody answers), removes it and serves."""
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="kv-"))
    p, sock = start_daemon(d, grace_s=1.0)
    try:
        stub = kvctl_pb2_grpc.KvctlStub(grpc.insecure_channel(f"unix:{sock}"))
        stream = stub.Generate(pb.GenerateRequest(prompt_ids=pb.TokenIds(ids=[1, 2, 3]),
                                                  sampling=pb.SamplingParams(max_tokens=4000,
                                                                             ignore_eos=True)))
        next(stream)
        p.kill()
        p.wait(30)
        with pytest.raises(grpc.RpcError) as e:
            list(stream)
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        assert sock.exists()                       # left behind by the killed daemon
    finally:
        p.stderr.close()
    p2, sock = start_daemon(d, grace_s=1.0)      # returns at once: the old file is there

    def answers():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(sock))
            return True
        except OSError:
            return p2.poll() is not None
        finally:
            s.close()
    try:
        wait_for(answers, 60, "the restarted daemon")
        assert p2.poll() is None, p2.stderr.read()
        out = kvctl(sock, "generate", "--ids", "1,2,3", "--max-tokens", "3")
        assert out.returncode == 0, out.stderr
        st = json.loads(kvctl(sock, "status", "--json").stdout)
        assert st["model"] == "random:tiny"
    finally:
        p2.send_signal(signal.SIGTERM)
        p2.wait(30)
        p2.stderr.close()


def test_status_says_where_step_time_went():
    """`kvctl status` shows the engine's steps by kind and the parts of a step that took
    its time, largest first, with the graphs it captured and replayed."""
    from controller.render import engine_line
    e = pb.EngineCounters(preemptions=2, cuda_graphs=30, graph_capture_seconds=21.2,
                          graph_replays=478, step_times={
                              "prefill_steps": 46, "prefill_s": 54.0, "decode_steps": 482,
                              "decode_s": 36.0, "moves": 9.0, "launch": 60.0,
                              "sample": 18.0, "publish": 3.0})
    line = engine_line(e)
    assert "46 prefill steps (54.0s)" in line and "482 decode steps (36.0s)" in line
    assert "time in launch 67%, sample 20%, moves 10%, publish 3%" in line
    assert "graphs 30 (21.2 s capturing), 478 replays" in line and "2 preemptions" in line
    assert engine_line(pb.EngineCounters()).startswith("no steps yet; time in -")
    assert "paused" not in line
    assert "2 preemptions, 5 paused by the controller, 0 failed" in engine_line(
        pb.EngineCounters(preemptions=2, paused=5))
