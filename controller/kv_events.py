"""KV events for cluster routers: the engine's block records (engine/api.py) published
in vLLM's KV-events wire format, so routers built for vLLM's stream (NVIDIA Dynamo's KV
router through its ZMQ relay, llm-d's KV-cache indexer) can route across kvctl nodes.

Wire format, as vllm/distributed/kv_events.py (vLLM main after PR #42892) publishes it:

* ZeroMQ PUB, one multipart message per engine step: ``[topic, seq, payload]``; ``seq``
  counts batches from 0 as an 8-byte big-endian integer, ``payload`` is msgpack of
  ``KVEventBatch = [ts, [event, ...], data_parallel_rank]`` (an array).
* Each event is a msgpack map tagged by its ``"type"``: ``BlockStored``, ``BlockRemoved``
  or ``AllBlocksCleared``; fields at their default are left out (``omit_defaults``).
  ``encoding = "array"`` writes every event as a positional array instead
  (``["BlockStored", block_hashes, parent_block_hash, token_ids, block_size, lora_id,
  medium, lora_name]``), as vLLM did before #42892, for consumers that only read that.
* Optional replay: a ROUTER socket. A client (DEALER) sends ``[b"", start_seq]``; it gets
  ``[b"", topic, seq, payload]`` for every buffered batch with ``seq >= start_seq``, then
  ``[b"", b"", (-1 as 8 signed bytes), b""]``.

Threads: the engine thread only calls ``on_kv_events``, which never blocks (a bounded
queue; a full queue drops the batch, counted and logged). One publisher thread owns both
sockets: it encodes, sends, keeps the replay buffer and answers replay requests. After a
drop, the next batch starts with ``AllBlocksCleared`` so that no router keeps blocks it
may have missed the removal of: their view of the node becomes a subset of the truth (a
missed reuse, never a wrong answer), and ``on_kv_events`` returns True once so the engine
can announce what it holds again.
"""
from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence

import msgspec
import zmq

import engine.api as ev
from controller.config import KVEventsEncoding as Encoding
from controller.config import KVEventsSection
from controller.kv_event_wire import EventBatch, to_wire

log = logging.getLogger("kvctl.kv_events")

END_SEQ = (-1).to_bytes(8, "big", signed=True)


def _binds(endpoint: str) -> bool:
    """vLLM's rule: bind a wildcard, IPC or in-process endpoint; connect to anything else
    (``tcp://router-host:5557``: the publisher dials out)."""
    return ("*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://")))


# ---------------------------------------------------------------- the publisher
class KVEventPublisher:
    """ZeroMQ PUB (+ optional replay ROUTER) on its own thread. ``on_kv_events`` is the sink
    the engine calls once per step; ``close()`` flushes what is queued and stops.

    ``endpoint``/``replay_endpoint`` may use port ``*`` (``tcp://127.0.0.1:*``): the
    attributes of the same names give the bound address after construction. Raises OSError
    when a socket cannot be bound or connected."""

    def __init__(self, endpoint: str = "tcp://*:5557", *, replay_endpoint: str = "",
                 topic: str = "", buffer_steps: int = 10_000, max_queue_size: int = 10_000,
                 hwm: int = 100_000, encoding: Encoding | str = Encoding.map,
                 data_parallel_rank: int = 0) -> None:
        self.endpoint, self.replay_endpoint = endpoint, replay_endpoint or None
        self.topic = topic
        self._topic = topic.encode()
        self._encoding = Encoding(encoding)
        self._dp_rank = data_parallel_rank
        self._hwm, self._buffer_steps = hwm, buffer_steps
        self._queue: queue.Queue = queue.Queue(maxsize=max_queue_size)
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        # the engine thread wakes the publisher through a pipe the zmq poller also watches;
        # the lock keeps a late wake-up from writing to a closed (or reused) descriptor
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        # counters: each has one writer (engine thread: dropped_*; publisher thread: the rest)
        self.num_batches = self.num_events = self.num_replays = 0
        self.num_dropped_batches = self.num_dropped_events = 0
        self._lost = False           # a batch was dropped since the last AllBlocksCleared
        self._closed = False
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="kvctl-kv-events", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._close_pipe()
            raise self._error

    # ------------------------------------------------------------ engine thread
    def on_kv_events(self, records: Sequence[ev.KVEvent]) -> bool:
        """Queue one engine step's records as one batch; never blocks. The list and its
        records are handed over (not copied): don't change them afterwards.

        Returns True when earlier batches were dropped and this batch therefore starts with
        ``AllBlocksCleared``: the engine should announce every block it holds (BlockStored)
        in its next call. False otherwise (also when this batch is dropped, or when the
        publisher is closed)."""
        if self._closed or not records:
            return False
        batch = [ev.AllBlocksCleared(), *records] if self._lost else records
        try:
            self._queue.put_nowait((time.time(), batch))
        except queue.Full:
            self.num_dropped_batches += 1
            self.num_dropped_events += len(records)
            if not self._lost:
                log.warning("KV events dropped: the publisher's queue is full; routers will be "
                            "told to forget this node's blocks once it drains",
                            extra={"kv": {"max_queue_size": self._queue.maxsize}})
            self._lost = True
            return False
        resync, self._lost = self._lost, False
        if resync:
            log.info("KV events resumed after drops; routers told AllBlocksCleared",
                        extra={"kv": {"dropped_batches": self.num_dropped_batches,
                                      "dropped_events": self.num_dropped_events}})
        self._wake()
        return resync

    def close(self, timeout: float = 5.0) -> None:
        """Publish what is queued, then close the sockets and stop the thread."""
        self._closed = True
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("KV events publisher did not stop in time",
                        extra={"kv": {"timeout_s": timeout}})
            return                       # the thread still polls the pipe: keep it open
        self._close_pipe()

    @property
    def is_closed(self) -> bool:
        return self._closed

    def _wake(self) -> None:
        with self._pipe_lock:
            if not self._pipe_open:
                return
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:      # the pipe is full: the publisher is awake anyway
                pass

    def _close_pipe(self) -> None:
        with self._pipe_lock:
            if self._pipe_open:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    # ------------------------------------------------------------ publisher thread
    def _open(self, ctx: zmq.Context) -> tuple[zmq.Socket, zmq.Socket | None]:
        pub = ctx.socket(zmq.PUB)
        pub.linger = 500                 # close(): half a second to hand over what is sent
        pub.sndhwm = self._hwm
        replay = None
        try:
            if _binds(self.endpoint):
                pub.bind(self.endpoint)
                self.endpoint = pub.last_endpoint.decode()
            else:
                pub.connect(self.endpoint)
            if self.replay_endpoint:
                replay = ctx.socket(zmq.ROUTER)
                replay.linger = 0
                replay.sndhwm = self._buffer_steps + 16   # a whole replay fits, never dropped
                replay.bind(self.replay_endpoint)
                self.replay_endpoint = replay.last_endpoint.decode()
        except zmq.ZMQError as e:
            for s in (pub, replay):
                if s is not None:
                    s.close(linger=0)
            what = "replay_endpoint" if replay is not None else "endpoint"
            raise OSError(f"kv_events.{what} {getattr(self, what)}: {e}") from None
        return pub, replay

    def _run(self) -> None:
        ctx = zmq.Context()
        try:
            pub, replay = self._open(ctx)
        except Exception as e:  # noqa: BLE001 (the constructor raises it)
            self._error = e
            ctx.term()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        if replay is not None:
            poller.register(replay, zmq.POLLIN)
        encoder = msgspec.msgpack.Encoder()
        try:
            while True:
                ready = dict(poller.poll())
                if self._wake_r in ready:
                    self._drain_pipe()
                self._publish_queued(pub, encoder)
                if replay is not None and replay in ready:
                    self._serve_replays(replay)
                if self._closed:
                    self._publish_queued(pub, encoder)   # what came in with the close
                    return
        except Exception:
            log.exception("KV events publisher failed; no more events from this node")
            self._closed = True
        finally:
            pub.close()
            if replay is not None:
                replay.close()
            ctx.term()

    def _drain_pipe(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _publish_queued(self, pub: zmq.Socket, encoder: msgspec.msgpack.Encoder) -> None:
        while True:
            try:
                ts, records = self._queue.get_nowait()
            except queue.Empty:
                return
            try:
                payload = encoder.encode(EventBatch(
                    ts, [to_wire(r, self._encoding) for r in records], self._dp_rank))
            except Exception:            # a bad record: no router keeps a view it cannot trust
                log.exception("KV event batch not encodable; sent AllBlocksCleared instead")
                payload = encoder.encode(EventBatch(
                    ts, [to_wire(ev.AllBlocksCleared(), self._encoding)], self._dp_rank))
            seq = self.num_batches
            pub.send_multipart((self._topic, seq.to_bytes(8, "big"), payload), copy=False)
            self._buffer.append((seq, payload))
            self.num_batches += 1
            self.num_events += len(records)

    def _serve_replays(self, replay: zmq.Socket) -> None:
        while True:
            try:
                frames = replay.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 3 or frames[1] or len(frames[2]) != 8:
                log.warning("malformed KV events replay request ignored",
                            extra={"kv": {"frames": len(frames)}})
                continue
            client, _, start = frames
            start_seq = int.from_bytes(start, "big")
            for seq, payload in self._buffer:
                if seq >= start_seq:
                    replay.send_multipart((client, b"", self._topic, seq.to_bytes(8, "big"),
                                           payload))
            replay.send_multipart((client, b"", b"", END_SEQ, b""))
            self.num_replays += 1

    # ------------------------------------------------------------ metrics
    def collect(self):
        """Prometheus collector: the daemon registers the publisher in its metrics registry."""
        from prometheus_client.core import CounterMetricFamily

        batches = CounterMetricFamily("kvctl_kv_event_batches",
                                      "KV event batches (one per engine step) by outcome",
                                      labels=["outcome"])
        events = CounterMetricFamily("kvctl_kv_events", "KV event records by outcome",
                                     labels=["outcome"])
        for m, published, dropped in ((batches, self.num_batches, self.num_dropped_batches),
                                      (events, self.num_events, self.num_dropped_events)):
            m.add_metric(["published"], published)
            m.add_metric(["dropped"], dropped)
            yield m
        yield CounterMetricFamily("kvctl_kv_event_replays", "KV event replay requests served",
                                  value=self.num_replays)


def publisher_from_config(cfg: KVEventsSection) -> KVEventPublisher:
    """The publisher ``[kv_events]`` describes (binds its sockets; OSError if it cannot)."""
    return KVEventPublisher(cfg.endpoint, replay_endpoint=cfg.replay_endpoint, topic=cfg.topic,
                            buffer_steps=cfg.buffer_steps, max_queue_size=cfg.max_queue_size,
                            hwm=cfg.hwm, encoding=cfg.encoding)
