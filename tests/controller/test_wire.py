"""What leaves the daemon per streamed token: the pre-serialized token messages and the
token metrics kept without prometheus_client's per-call locks."""
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from controller import convert
from controller.metrics import Metrics, TokenTimes
from engine.api import TokenEvent
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb

EVENTS = [
    TokenEvent("seq-1", 42, "Hello", 0),
    TokenEvent("seq-1", 0, "", 1),                          # zeros and empty text: omitted fields
    TokenEvent("seq-1", 49151, " wörld ✓", 2),              # multi-byte text
    TokenEvent("seq-1", 2**32 - 1, "\n", 300),              # varints of several bytes
    TokenEvent("seq-1", 7, "", 0),                          # text emptied after a non-empty one
    TokenEvent("a-much-longer-client-chosen-sequence-id-" + "x" * 200, 1, "y" * 300, 65536),
]


def test_token_bytes_equal_the_message_they_replace():
    enc = convert.TokenEncoder()                 # one encoder reused across events, as a stream does
    for ev in EVENTS:
        raw = enc(ev)
        assert raw == convert.token_to_proto(ev).SerializeToString()
        msg = pb.GenerateResponse.FromString(raw)
        assert msg.WhichOneof("event") == "token"
        assert (msg.token.seq_id, msg.token.token_id, msg.token.text, msg.token.index) == \
            (ev.seq_id, ev.token_id, ev.text, ev.index)


def scrape(registry) -> dict:
    return {s.name + str(sorted(s.labels.items())): s.value
            for fam in text_string_to_metric_families(generate_latest(registry).decode())
            for s in fam.samples}


@pytest.mark.parametrize("intervals", [[], [0.001, 0.005, 0.0051, 0.3, 10.0, 11.0], [0.02] * 5])
def test_token_times_expose_what_a_prometheus_histogram_would(intervals):
    from prometheus_client import Counter, Histogram

    ref = CollectorRegistry()
    c = Counter("kvctl_generated_tokens", "Tokens streamed to clients", registry=ref)
    h = Histogram("kvctl_time_per_token_seconds", "Time between streamed tokens of one sequence",
                  buckets=TokenTimes.BUCKETS, registry=ref)
    ours = CollectorRegistry()
    tt = TokenTimes()
    ours.register(tt)
    for x in intervals:
        c.inc()
        h.observe(x)
        tt.observe(x)
    want = {k: v for k, v in scrape(ref).items() if "_created" not in k}
    got = {k: v for k, v in scrape(ours).items() if "_created" not in k}
    assert got == pytest.approx(want)
    assert tt.count == len(intervals)


def test_daemon_metrics_register_the_token_series():
    m = Metrics()
    m.token_times.observe(0.2)
    body = generate_latest(m.registry).decode()
    assert "kvctl_generated_tokens_total 1.0" in body
    assert 'kvctl_time_per_token_seconds_bucket{le="0.25"} 1.0' in body
    assert 'kvctl_time_per_token_seconds_bucket{le="0.1"} 0.0' in body


def test_kv_bytes_and_sequences_read_zero_when_idle():
    """Series a dashboard plotted do not vanish when the node goes idle: they read 0."""
    from controller.telemetry import Nvml, Telemetry
    from engine.api import Request
    from tests.controller.fakes import FakeEngine

    eng = FakeEngine()
    tel = Telemetry(eng.handle.snapshot, nvml=Nvml())
    m = Metrics()
    m.update(tel.sample_now())                      # idle from the start: the series exist
    idle = scrape(m.registry)
    assert idle["kvctl_kv_bytes[('format', 'full'), ('tier', 'gpu')]"] == 0
    assert idle["kvctl_kv_bytes[('format', 'full'), ('tier', 'host')]"] == 0
    assert idle["kvctl_sequences[('state', 'decode'), ('strategy', 'full')]"] == 0
    sid = eng.submit(Request(prompt_ids=[1, 2, 3]), lambda ev: None)
    m.update(tel.sample_now())
    busy = scrape(m.registry)
    assert busy["kvctl_kv_bytes[('format', 'full'), ('tier', 'gpu')]"] > 0
    assert busy["kvctl_sequences[('state', 'decode'), ('strategy', 'full')]"] == 1
    eng.cancel(sid)
    m.update(tel.sample_now())
    after = scrape(m.registry)
    assert after["kvctl_kv_bytes[('format', 'full'), ('tier', 'gpu')]"] == 0
    assert after["kvctl_sequences[('state', 'decode'), ('strategy', 'full')]"] == 0
