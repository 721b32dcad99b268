"""KV events (controller/kv_events.py, engine/api.py, engine/block_hash.py) as a router sees them: a pyzmq
subscriber decodes the stream with vLLM's schema, written here from vLLM's documented
fields (vllm/distributed/kv_events.py; nothing imported from kvctl for decoding), and
rebuilds the node's prefix index (block hashes per medium)."""
import hashlib
import shutil
import struct
import tempfile
import threading
import time
from typing import Any

import pytest

zmq = pytest.importorskip("zmq")
msgspec = pytest.importorskip("msgspec")

from controller import kv_events
from controller.config import load_config
from controller.kv_events import KVEventPublisher
from engine import api as ev
from engine import block_hash


# ---------------------------------------------------------------- vLLM's schema
class Event(msgspec.Struct, tag=True):          # a map; the class name under "type"
    pass


class BlockStored(Event):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    event_version: int = 1
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None


class BlockRemoved(Event):
    block_hashes: list[int]
    medium: str | None = None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(Event):
    pass


class Batch(msgspec.Struct, array_like=True):
    ts: float
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]
    data_parallel_rank: int | None = None


# vLLM before PR #42892: every event a positional array, its type first
class OldEvent(msgspec.Struct, array_like=True, tag=True):
    pass


class OldBlockStored(OldEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None = None
    lora_name: str | None = None


class OldBlockRemoved(OldEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None = None


class OldAllBlocksCleared(OldEvent, tag="AllBlocksCleared"):
    pass


class OldBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[OldBlockStored | OldBlockRemoved | OldAllBlocksCleared]
    data_parallel_rank: int | None = None


# ---------------------------------------------------------------- vLLM's sha256_cbor, again
def _head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if n < 1 << (8 * struct.calcsize(fmt)):
            return bytes([major << 5 | info]) + struct.pack(fmt, n)
    raise AssertionError(n)


def ref_digest(parent: bytes | None, tokens: list[int], seed: str = "vllm-none-hash") -> bytes:
    if parent is None:
        parent = hashlib.sha256(_head(3, len(seed)) + seed.encode()).digest()
    body = [b"\x83", _head(2, 32), parent, _head(4, len(tokens))]
    body += [_head(0, t) for t in tokens] + [b"\xf6"]
    return hashlib.sha256(b"".join(body)).digest()


# ---------------------------------------------------------------- a router's view
class Router:
    """A subscriber that rebuilds the node's prefix index from the live stream and checks
    each stored block's hash against its tokens (chained from its parent)."""

    def __init__(self, pub, decode=Batch, bound: tuple | None = None) -> None:
        # bound: (context, SUB socket) bound already, the publisher dialing it
        self.ctx, self.sub = bound or (zmq.Context(), None)
        if self.sub is None:
            self.sub = self.ctx.socket(zmq.SUB)
            self.sub.connect(pub.endpoint)
        self.sub.subscribe(pub.topic.encode())
        self.decoder = msgspec.msgpack.Decoder(type=decode)
        self.index: dict[str, set[int]] = {}
        self.digests: dict[int, bytes] = {}        # every hash ever stored -> its digest
        self.seqs: list[int] = []
        self.batches: list = []
        self.payloads: list[bytes] = []
        # PUB/SUB drops what is sent before the subscription arrives: send clears until
        # one comes through (they leave an empty index as it is); the test's batches
        # follow from seq last_sync + 1 on
        for n in range(400):
            assert pub.on_kv_events([ev.AllBlocksCleared()]) is False
            if self.sub.poll(25):
                break
        else:
            raise AssertionError("the subscription never reached the publisher")
        self.last_sync = n

    def receive_until(self, last_seq: int, timeout: float = 20.0) -> None:
        end = time.monotonic() + timeout
        while not self.seqs or self.seqs[-1] < last_seq:
            assert self.sub.poll(max(1, int((end - time.monotonic()) * 1000))), \
                f"batch {last_seq} never came (last: {self.seqs[-1:]})"
            topic, seq, payload = self.sub.recv_multipart()
            assert topic == b"kv"
            self.payloads.append(payload)
            self.apply(int.from_bytes(seq, "big"), self.decoder.decode(payload))

    def apply(self, seq: int, batch) -> None:
        assert not self.seqs or seq == self.seqs[-1] + 1, "sequence numbers have a gap"
        self.seqs.append(seq)
        self.batches.append(batch)
        assert batch.data_parallel_rank == 0 and batch.ts > 0
        for e in batch.events:
            if isinstance(e, (AllBlocksCleared, OldAllBlocksCleared)):
                self.index.clear()
            elif isinstance(e, (BlockRemoved, OldBlockRemoved)):
                self.index.setdefault(e.medium, set()).difference_update(e.block_hashes)
            else:
                assert len(e.token_ids) == len(e.block_hashes) * e.block_size
                assert e.lora_id is None and e.lora_name is None
                parent = None if e.parent_block_hash is None else self.digests[e.parent_block_hash]
                for i, h in enumerate(e.block_hashes):
                    parent = ref_digest(parent, e.token_ids[i * e.block_size:(i + 1) * e.block_size])
                    assert h == int.from_bytes(parent[-8:], "big"), "hash does not match tokens"
                    self.digests[h] = parent
                self.index.setdefault(e.medium, set()).update(e.block_hashes)

    def view(self) -> dict[str, set[int]]:
        return {m: hs for m, hs in self.index.items() if hs}

    def close(self) -> None:
        self.sub.close(linger=0)
        self.ctx.term()


@pytest.fixture
def sockdir():
    d = tempfile.mkdtemp(prefix="kve-")     # short: ipc paths have a ~107-byte limit
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def publisher(sockdir):
    pubs = []

    def make(**kw):
        kw.setdefault("replay_endpoint", f"ipc://{sockdir}/replay-{len(pubs)}")
        p = KVEventPublisher(f"ipc://{sockdir}/pub-{len(pubs)}", topic="kv", **kw)
        pubs.append(p)
        return p
    yield make
    for p in pubs:
        p.close()


class Engine:
    """Synthetic engine records for token sequences (block size 4)."""
    BS = 4

    def __init__(self) -> None:
        self.accepted = 0

    @classmethod
    def hashes(cls, tokens):
        return [block_hash.external_hash(d) for d in block_hash.prefix_block_hashes(tokens, cls.BS)]

    @classmethod
    def stored(cls, tokens, first, last, medium="GPU"):
        """Blocks [first, last) of ``tokens`` stored on ``medium``."""
        h = cls.hashes(tokens)
        return ev.BlockStored(h[first:last], h[first - 1] if first else None,
                              list(tokens[first * cls.BS:last * cls.BS]), cls.BS, medium)

    def step(self, pub, records) -> None:
        assert pub.on_kv_events(records) is False
        self.accepted += 1


A = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]  # 4 blocks + 1
B = A[:8] + [90, 91, 92, 93, 94]                       # shares A's first 2 blocks
C = [7] * 9


def test_router_rebuilds_the_prefix_index(publisher):
    pub = publisher()
    router = Router(pub)
    eng, hA, hB = Engine(), Engine.hashes(A), Engine.hashes(B)
    base = router.last_sync
    try:
        eng.step(pub, [Engine.stored(A, 0, 3)])                       # A prefilled
        eng.step(pub, [Engine.stored(B, 2, 3)])                       # B reuses A's 2 blocks
        eng.step(pub, [Engine.stored(A, 3, 4)])                       # A decoded a block
        eng.step(pub, [ev.BlockRemoved(hA[2:4], "GPU"),               # A's cold blocks to host
                       Engine.stored(A, 2, 4, "CPU")])
        eng.step(pub, [ev.BlockRemoved([hB[2]], "GPU")])              # B finished, freed
        router.receive_until(base + eng.accepted)
        assert router.view() == {"GPU": set(hA[:2]), "CPU": set(hA[2:4])}
        eng.step(pub, [ev.BlockRemoved(hA[2:4], "CPU"),               # fetched back
                       Engine.stored(A, 2, 4, "GPU")])
        router.receive_until(base + eng.accepted)
        assert router.view() == {"GPU": set(hA)}
        eng.step(pub, [ev.AllBlocksCleared(), Engine.stored(C, 0, 2)])
        router.receive_until(base + eng.accepted)
        assert router.view() == {"GPU": set(Engine.hashes(C))}
    finally:
        router.close()
    stored = router.batches[-1].events[1]
    assert (stored.group_idx, stored.kv_cache_spec_kind, stored.event_version) == \
        (0, "full_attention", 1)


def test_payload_is_vllms_map_encoding(publisher):
    """The bytes, not just a round trip: an array batch whose events are maps tagged by
    "type", fields at their default left out (vLLM after PR #42892)."""
    pub = publisher()
    router = Router(pub)
    try:
        Engine().step(pub, [Engine.stored(A, 0, 1), ev.BlockRemoved(Engine.hashes(A)[:1], "CPU")])
        router.receive_until(router.last_sync + 1)
    finally:
        router.close()
    ts, events, rank = msgspec.msgpack.decode(router.payloads[-1])
    assert isinstance(ts, float) and rank == 0
    assert events == [
        {"type": "BlockStored", "block_hashes": Engine.hashes(A)[:1], "parent_block_hash": None,
         "token_ids": A[:4], "block_size": 4, "lora_id": None, "medium": "GPU", "lora_name": None,
         "group_idx": 0, "kv_cache_spec_kind": "full_attention"},
        {"type": "BlockRemoved", "block_hashes": Engine.hashes(A)[:1], "medium": "CPU",
         "group_idx": 0}]


def test_array_encoding_for_older_consumers(publisher):
    pub = publisher(encoding="array")
    router = Router(pub, decode=OldBatch)
    eng, h = Engine(), Engine.hashes(A)
    try:
        eng.step(pub, [Engine.stored(A, 0, 4)])
        eng.step(pub, [ev.BlockRemoved(h[3:], "GPU")])
        router.receive_until(router.last_sync + 2)
    finally:
        router.close()
    assert router.view() == {"GPU": set(h[:3])}
    assert msgspec.msgpack.decode(router.payloads[-2])[1] == \
        [["BlockStored", h, None, A[:16], 4, None, "GPU", None]]
    assert msgspec.msgpack.decode(router.payloads[-1])[1] == [["BlockRemoved", h[3:], "GPU"]]


def _replay(endpoint: str, start: int, timeout_ms: int = 10_000) -> list[tuple[bytes, int, Batch]]:
    """A DEALER client: [b"", start] -> [b"", topic, seq, payload]... then the end marker."""
    ctx = zmq.Context()
    d = ctx.socket(zmq.DEALER)
    d.connect(endpoint)
    got = []
    try:
        d.send_multipart([b"", start.to_bytes(8, "big")])
        while True:
            assert d.poll(timeout_ms), "replay stalled"
            empty, topic, seq, payload = d.recv_multipart()
            assert empty == b""
            if seq == (-1).to_bytes(8, "big", signed=True):
                assert (topic, payload) == (b"", b"")
                return got
            got.append((topic, int.from_bytes(seq, "big"), msgspec.msgpack.decode(payload, type=Batch)))
    finally:
        d.close(linger=0)
        ctx.term()


def test_replay_serves_the_bounded_buffer(publisher):
    pub = publisher(buffer_steps=5)
    for i in range(8):
        assert pub.on_kv_events([Engine.stored(A, i % 4, i % 4 + 1)]) is False
    deadline = time.monotonic() + 10
    while pub.num_batches < 8:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    got = _replay(pub.replay_endpoint, 0)
    assert [s for _, s, _ in got] == [3, 4, 5, 6, 7]            # the last buffer_steps only
    assert {t for t, _, _ in got} == {b"kv"}
    assert [b.events[0].block_hashes for _, _, b in got] == \
        [[Engine.hashes(A)[i % 4]] for i in range(3, 8)]
    assert [s for _, s, _ in _replay(pub.replay_endpoint, 6)] == [6, 7]
    assert _replay(pub.replay_endpoint, 8) == []
    deadline = time.monotonic() + 10      # the server counts a replay after its reply
    while pub.num_replays < 3:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert pub.num_replays == 3


def test_full_queue_drops_then_clears(publisher, monkeypatch):
    """A stalled publisher thread never blocks the engine: batches beyond the queue are
    dropped and counted; the next accepted batch starts with AllBlocksCleared and tells
    the engine (True) to announce its blocks again."""
    entered, release = threading.Event(), threading.Event()
    real = kv_events.to_wire

    def stalled(record, encoding):
        entered.set()
        assert release.wait(20)
        return real(record, encoding)
    pub = publisher(max_queue_size=2)
    router = Router(pub)
    base = router.last_sync
    while pub.num_batches <= base:                  # let the sync batches go out first
        time.sleep(0.01)
    monkeypatch.setattr(kv_events, "to_wire", stalled)
    try:
        assert pub.on_kv_events([Engine.stored(A, 0, 1)]) is False      # taken, stuck
        assert entered.wait(10)
        assert pub.on_kv_events([Engine.stored(A, 1, 2)]) is False      # queued
        assert pub.on_kv_events([Engine.stored(A, 2, 3)]) is False      # queued: full
        t0 = time.perf_counter()
        for _ in range(3):
            assert pub.on_kv_events([Engine.stored(A, 3, 4), Engine.stored(B, 2, 3)]) is False
        assert time.perf_counter() - t0 < 0.5                           # never blocked
        assert (pub.num_dropped_batches, pub.num_dropped_events) == (3, 6)
        release.set()
        deadline = time.monotonic() + 10
        while pub.num_batches < base + 4:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert pub.on_kv_events([Engine.stored(C, 0, 1)]) is True       # announce again
        assert pub.on_kv_events([Engine.stored(C, 1, 2)]) is False
        router.receive_until(base + 5)
    finally:
        release.set()
        router.close()
    resumed = router.batches[-2].events
    assert isinstance(resumed[0], AllBlocksCleared) and len(resumed) == 2
    assert router.view() == {"GPU": set(Engine.hashes(C)[:2])}
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry()
    reg.register(pub)
    assert reg.get_sample_value("kvctl_kv_event_batches_total", {"outcome": "dropped"}) == 3
    assert reg.get_sample_value("kvctl_kv_events_total", {"outcome": "dropped"}) == 6
    assert reg.get_sample_value("kvctl_kv_event_batches_total", {"outcome": "published"}) == \
        pub.num_batches


def test_close_flushes_and_releases(publisher, sockdir):
    pub = publisher()
    router = Router(pub)
    base = router.last_sync
    try:
        for i in range(50):
            assert pub.on_kv_events([Engine.stored(A, i % 4, i % 4 + 1)]) is False
        pub.close()                                  # right away: the queue is flushed first
        assert not pub._thread.is_alive() and pub.is_closed
        router.receive_until(base + 50)
    finally:
        router.close()
    assert pub.on_kv_events([Engine.stored(A, 0, 1)]) is False      # closed: ignored
    pub.close()                                                     # twice is fine
    again = KVEventPublisher(pub.endpoint, replay_endpoint=pub.replay_endpoint)
    again.close()                                   # both addresses were released
    names = {t.name for t in threading.enumerate()}
    assert "kvctl-kv-events" not in names


def _one_block_through(pub, bound=None) -> None:
    router = Router(pub, bound=bound)
    try:
        Engine().step(pub, [Engine.stored(A, 0, 1)])
        router.receive_until(router.last_sync + 1)
        assert router.view() == {"GPU": set(Engine.hashes(A)[:1])}
    finally:
        router.close()


def test_tcp_bind_connect_and_errors(sockdir):
    # a wildcard binds (here an ephemeral port, the bound address given back) ...
    pub = KVEventPublisher("tcp://127.0.0.1:*", topic="kv")
    try:
        assert pub.endpoint.startswith("tcp://127.0.0.1:") and not pub.endpoint.endswith("*")
        _one_block_through(pub)
    finally:
        pub.close()
    # ... a plain host:port connects: the router binds, the node dials out
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    port = sub.bind_to_random_port("tcp://127.0.0.1")
    pub = KVEventPublisher(f"tcp://127.0.0.1:{port}", topic="kv")
    try:
        assert pub.endpoint == f"tcp://127.0.0.1:{port}"
        _one_block_through(pub, bound=(ctx, sub))
    finally:
        pub.close()
    with pytest.raises(OSError, match=f"kv_events.endpoint ipc://{sockdir}/no/pub: "):
        KVEventPublisher(f"ipc://{sockdir}/no/pub")
    with pytest.raises(OSError, match=f"kv_events.replay_endpoint ipc://{sockdir}/no/replay: "):
        KVEventPublisher(f"ipc://{sockdir}/pub", replay_endpoint=f"ipc://{sockdir}/no/replay")
    assert "kvctl-kv-events" not in {t.name for t in threading.enumerate()}


def test_records_check_themselves():
    with pytest.raises(ValueError, match="carries 7 tokens"):
        ev.BlockStored([1, 2], None, list(range(7)), 4)
    with pytest.raises(ValueError, match="medium"):
        ev.BlockRemoved([1], "gpu")
    with pytest.raises(ValueError, match="no KV-events medium"):
        ev.medium_of("evicted")
    assert [ev.medium_of(t) for t in ("gpu", "host", "parked", "swapped")] == \
        ["GPU", "CPU", "CPU", "CPU"]


# computed with cbor2 6.3.0: sha256(cbor2.dumps((parent, tuple(tokens), None), canonical=True)),
# the first parent sha256(cbor2.dumps(seed, canonical=True)), as vllm.utils.hashing.sha256_cbor
VECTORS = [
    ("vllm-none-hash", list(range(1, 65)), 16,
     [8866452693264111234, 807986237951177663, 10877177626832001922, 9529223106315998201]),
    ("10", list(range(1, 65)), 64, [6157663189479258408]),
    ("0", [151644, 872, 198, 9064] * 8, 16, [2704961473837516303, 14549713370374854394]),
]


@pytest.mark.parametrize("seed, tokens, block_size, want", VECTORS)
def test_block_hashes_are_vllms_sha256_cbor(seed, tokens, block_size, want):
    digests = block_hash.prefix_block_hashes(tokens + [5], block_size, seed=seed)   # partial: skipped
    assert [block_hash.external_hash(d) for d in digests] == want
    parent = None
    for i, d in enumerate(digests):
        parent = ref_digest(parent, tokens[i * block_size:(i + 1) * block_size], seed)
        assert d == parent
    # continuing from a parent gives the same chain as hashing the whole prefix
    assert block_hash.prefix_block_hashes(tokens[block_size:], block_size, digests[0], seed) == digests[1:]


def test_config_section():
    cfg = load_config(env={})
    assert cfg.kv_events.enabled is False and cfg.kv_events.endpoint == "tcp://*:5557"
    cfg = load_config(overrides={"kv_events.enabled": "true", "kv_events.encoding": "array",
                                 "kv_events.replay_endpoint": "tcp://*:5558"},
                      env={"KVCTL_KV_EVENTS_TOPIC": "kv@node1"})
    assert (cfg.kv_events.enabled, cfg.kv_events.encoding.value, cfg.kv_events.topic) == \
        (True, "array", "kv@node1")
    for key, value, want in [("endpoint", "localhost:5557", "ZeroMQ endpoint"),
                             ("replay_endpoint", "tcp://*:5557", "must differ"),
                             ("buffer_steps", "0", "buffer_steps"),
                             ("max_queue_size", "-1", "max_queue_size"),
                             ("hwm", "-1", "hwm"), ("encoding", "json", "kv_events.encoding")]:
        with pytest.raises(ValueError, match=want):
            load_config(overrides={f"kv_events.{key}": value}, env={})


def test_daemon_hands_its_publisher_to_the_engine(sockdir):
    from controller.server import Daemon
    from tests.controller.fakes import FakeEngine

    class SinkEngine(FakeEngine):
        sink = None

        def set_kv_event_sink(self, sink) -> None:
            self.sink = sink
    cfg = load_config(overrides={"server.socket": f"{sockdir}/kvctl.sock",
                                 "engine.model": "random:tiny", "kv_events.enabled": "true",
                                 "kv_events.endpoint": f"ipc://{sockdir}/events",
                                 "kv_events.topic": "kv"}, env={})
    eng = SinkEngine(token_interval_s=0.005)
    dm = Daemon(cfg, engine=eng)
    dm.start()
    try:
        assert eng.sink == dm.kv_events.on_kv_events
        _one_block_through(dm.kv_events)
        assert dm.metrics.registry.get_sample_value(
            "kvctl_kv_event_batches_total", {"outcome": "published"}) >= 2
    finally:
        dm.stop(grace_s=1)
    assert dm.kv_events.is_closed
    assert "kvctl-kv-events" not in {t.name for t in threading.enumerate()}


def test_a_bad_record_clears_instead_of_stopping_the_publisher(publisher, caplog):
    pub = publisher()
    router = Router(pub)
    try:
        Engine().step(pub, [Engine.stored(A, 0, 1)])
        assert pub.on_kv_events(["not a record"]) is False
        Engine().step(pub, [Engine.stored(C, 0, 1)])
        router.receive_until(router.last_sync + 3)
    finally:
        router.close()
    assert [type(e).__name__ for e in router.batches[-2].events] == ["AllBlocksCleared"]
    assert router.view() == {"GPU": set(Engine.hashes(C)[:1])}
    assert "not encodable" in caplog.text


def test_stream_rebuilds_the_engines_own_index(publisher):
    """A real engine (tiny random model) with prefix reuse, a session, moves (offload,
    quantize, fetch), eviction and cached blocks given back under pressure: the index a
    subscriber rebuilds from the stream equals the engine's own, medium by medium."""
    from engine.actions import Evict, Fetch, Offload, Quantize
    from engine.api import FinishEvent, Request, SamplingParams
    from engine.engine import Engine as RealEngine
    from engine.engine import EngineConfig

    pub = publisher()
    router = Router(pub)
    e = RealEngine(EngineConfig(model="random:tiny", device="cpu", dtype="float32",
                                block_size=4, kv_budget_bytes=256 << 10, page_bytes=4096,
                                max_batch_tokens=64, observe_window=4))       # 64 blocks
    sent = []

    def sink(records):
        sent.append(len(records))
        return pub.on_kv_events(records)
    e.set_kv_event_sink(sink)
    base = router.last_sync
    sp = SamplingParams(max_tokens=6, ignore_eos=True)

    def run(ids, session=None):
        evs = list(e.generate(Request(prompt_ids=ids, sampling=sp, session_id=session)))
        return next(x for x in evs if isinstance(x, FinishEvent))

    try:
        prompt = [(7 * i) % 500 + 3 for i in range(40)]
        first = run(prompt, "chat")                          # a session's first turn
        second = run(prompt + first.token_ids + [5, 6, 7, 8, 9], "chat")
        assert second.cached_tokens > 0
        run(prompt[:30] + [1, 2, 3])                         # shares a prefix, then cached
        hid = "session/chat"
        n = len(e.store.seqs[hid].blocks)
        e.handle.apply(Offload(hid, (2, 3, 4)))
        e.handle.apply(Quantize(hid, (5, 6), 8))
        e.handle.apply(Fetch(hid, (3,)))
        e.handle.apply(Evict(hid, (7, 8)))
        assert n > 9
        e.step()                                             # events of the moves flushed
        router.receive_until(base + len(sent))
        assert router.view() == e.store.prefix.view() and router.view()
        # room needed: cached blocks are given back (removed events)
        for k in range(3):                                   # 26 blocks each, then cached
            run([(11 * i + k) % 500 + 1 for i in range(100)])
        e.step()
        assert e.store.prefix.evicted_cached > 0
        router.receive_until(base + len(sent))
        assert router.view() == e.store.prefix.view()
        assert e.drop_session("chat")
        e.step()
        router.receive_until(base + len(sent))
        assert router.view() == e.store.prefix.view()
    finally:
        router.close()
        e.stop()
