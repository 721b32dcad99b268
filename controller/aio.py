"""The daemon's event loop and the hand-over of engine events to it.

The gRPC server is `grpc.aio`: one thread runs an asyncio loop that serves every RPC.
With the sync server each open stream held a thread that woke once per token, and each
sent message took three GIL hand-offs (handler thread, gRPC's polling thread, handler
again). At the end of an engine step 64 streams meant ~200 threads' worth of wake-ups
queued for the GIL, and a GetStatus arriving then waited behind all of them
(docs/BENCHMARKS.md, "Daemon: GetStatus under load").

The engine emits events from its own thread, one per sequence per step. ``Outbox``
batches them: the first event since the last drain schedules one drain on the loop (one
wake-up of the loop), the rest of the step's events ride along with it.
"""
from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Coroutine


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop when it is installed, else asyncio's. Every streamed token costs
    the loop a few scheduled callbacks, futures and task steps (the Outbox's delivery, the
    stream's wake-up, the write's completion); uvloop runs them in C: the loop thread's CPU
    per token fell ~15% with it (docs/BENCHMARKS.md, "Daemon: GetStatus under load")."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class LoopThread:
    """An asyncio event loop on its own thread. ``run(coro)`` from any other thread."""

    def __init__(self, name: str) -> None:
        self.loop = new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def run(self, coro: Coroutine, timeout: float | None = None):
        """Run ``coro`` on the loop and wait for its result (never call from the loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def close(self, timeout: float = 10.0) -> None:
        """Cancel what is still pending on the loop, stop it and join its thread."""
        if not self.is_running:
            return
        self.run(_cancel_pending(), timeout)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self._thread.is_alive():
            self.loop.close()


async def _cancel_pending() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await asyncio.get_running_loop().shutdown_asyncgens()


class EventStream:
    """One generation's events, read on the loop. The engine thread calls ``put``."""

    __slots__ = ("_outbox", "_events", "_waiter")

    def __init__(self, outbox: "Outbox") -> None:
        self._outbox = outbox
        self._events: list = []
        self._waiter: asyncio.Future | None = None

    def put(self, event) -> None:
        """Any thread: queue ``event`` for this stream (the engine's on_event callback)."""
        self._outbox.put(self, event)

    async def get_all(self) -> list:
        """Every event that arrived since the last call, in order; waits for at least one."""
        while not self._events:
            self._waiter = self._outbox.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        out, self._events = self._events, []
        return out

    def _deliver(self, event) -> None:          # on the loop
        self._events.append(event)
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)


class Outbox:
    """Engine thread -> event loop, one loop wake-up per engine step.

    The engine emits a step's events one sequence at a time, holding the GIL between
    them. Waking the loop on every event makes the loop and the engine trade the GIL
    per token (each wake-up is a write to the loop's self-pipe, which releases the GIL
    to the loop), and a GetStatus arriving then waits behind that whole exchange. So the
    first event of a burst schedules a look; the loop only looks again ``settle_s``
    later while events keep arriving, and delivers the whole burst once it has settled.
    Delivery hands out ``chunk`` events per loop iteration, so a request that arrives
    meanwhile is served between chunks instead of after every stream's write. Bursts
    are delivered first in, first out: a stream sees its events in the order put.
    One event per iteration measured a lower GetStatus p99 than two in each of five
    interleaved pairs on the 2-core box, at the same tokens/s (docs/BENCHMARKS.md).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, settle_s: float = 0.001,
                 chunk: int = 1) -> None:
        self.loop = loop
        self.settle_s = settle_s
        self.chunk = chunk
        self._lock = threading.Lock()
        self._pending: list[tuple[EventStream, object]] = []
        self._scheduled = False
        self._ready: collections.deque[tuple[EventStream, object]] = collections.deque()
        self._delivering = False                 # loop side: a _deliver is scheduled
        self.num_wakeups = 0                     # bursts delivered: how well events were batched

    def stream(self) -> EventStream:
        return EventStream(self)

    def put(self, stream: EventStream, event) -> None:
        """Any thread. Events of one stream are delivered in the order they were put."""
        with self._lock:
            self._pending.append((stream, event))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._settle, -1)
        except RuntimeError:                     # the loop is closed: the daemon has stopped
            pass

    def _settle(self, seen: int) -> None:        # on the loop
        with self._lock:
            n = len(self._pending)
            if n == seen:                        # nothing new since the last look: deliver
                batch, self._pending = self._pending, []
                self._scheduled = False
        if n != seen:                            # still arriving: the engine is mid-step
            self.loop.call_later(self.settle_s, self._settle, n)
            return
        self.num_wakeups += 1
        self._ready.extend(batch)
        if not self._delivering:
            self._delivering = True
            self._deliver()

    def _deliver(self) -> None:                  # on the loop
        ready = self._ready
        for _ in range(min(self.chunk, len(ready))):
            stream, event = ready.popleft()
            stream._deliver(event)
        if ready:
            self.loop.call_soon(self._deliver)
        else:
            self._delivering = False
