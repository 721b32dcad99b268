"""The kvctl.v1.Kvctl servicer for the `grpc.aio` server. Handlers raise the project's
exceptions; the interceptor in controller/errors.py turns them into status codes.

Every handler is a coroutine on the daemon's one event loop (controller/aio.py). Work
that can block (the engine's lock is held for a whole engine step: snapshots, submit,
cancel, tokenizing) runs on the worker pool, never on the loop: the loop must stay free
to stream tokens and answer GetStatus.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from controller import convert
from controller.aio import EventStream, Outbox
from controller.errors import (CapacityExceeded, Draining, GenerationFailed, UnknownSequence,
                               UnknownSession)
from engine.api import Overloaded
from controller.policy import Controller, DecisionLog, Decision, PolicyState
from engine.api import FinishEvent, TokenEvent
from kvctl_proto.kvctl.v1 import kvctl_pb2 as pb
from kvctl_proto.kvctl.v1 import kvctl_pb2_grpc

log = logging.getLogger("kvctl.server")
VERSION = "0.1.0"
WATCH_QUEUE = 1024    # decisions a watcher may have unsent before it misses some


def off_loop(method):
    """A handler whose body may block: run it on the worker pool, not the event loop."""
    @functools.wraps(method)
    async def handler(self, request, context):
        return await self.blocking(method, self, request, context)
    return handler


@dataclass
class InFlight:
    seq_id: str
    stream: EventStream
    started: float = field(default_factory=time.monotonic)
    shutdown_cancelled: bool = False
    finished: threading.Event = field(default_factory=threading.Event)


class KvctlService(kvctl_pb2_grpc.KvctlServicer):
    def __init__(self, engine, telemetry, policy: PolicyState, decisions: DecisionLog,
                 metrics=None, log_prompts: bool = False,
                 pool: ThreadPoolExecutor | None = None, max_watchers: int = 64) -> None:
        self.engine = engine
        self.telemetry = telemetry
        self.policy = policy
        self.decisions = decisions
        self.controller = Controller(policy, decisions, getattr(engine, "handle", None))
        self.metrics = metrics
        self.log_prompts = log_prompts
        self.started_at = time.monotonic()
        self._draining = threading.Event()
        self._lock = threading.Lock()
        self._inflight: dict[str, InFlight] = {}
        self._status_cache: tuple | None = None
        self.pool = pool if pool is not None else ThreadPoolExecutor(16, "kvctl-work")
        self._outbox: Outbox | None = None
        self.max_watchers = max_watchers
        self._num_watchers = 0
        self._watch_feeds: dict[int, object] = {}

    async def blocking(self, fn, *args):
        """``fn(*args)`` on the worker pool, awaited from the loop."""
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(fn, *args))

    def _outbox_here(self) -> Outbox:
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        return self._outbox

    # ------------------------------------------------------------ lifecycle
    @property
    def draining(self) -> bool:
        return self._draining.is_set()

    @property
    def num_inflight(self) -> int:
        with self._lock:
            return len(self._inflight)

    def inflight_ids(self) -> set[str]:
        with self._lock:
            return set(self._inflight)

    def begin_drain(self) -> None:
        self._draining.set()
        with self._lock:
            feeds = list(self._watch_feeds.values())
        for feed in feeds:              # wake every watcher: its stream ends
            feed(None)

    def drain(self, grace_s: float) -> int:
        """Stop admitting, wait up to ``grace_s`` for in-flight generations, then cancel
        the rest (their streams end UNAVAILABLE). Returns how many were cancelled."""
        self.begin_drain()
        deadline = time.monotonic() + grace_s
        while self.num_inflight and time.monotonic() < deadline:
            time.sleep(0.05)
        with self._lock:
            rest = list(self._inflight.values())
        for f in rest:
            f.shutdown_cancelled = True
            self.engine.cancel(f.seq_id)
        for f in rest:
            f.finished.wait(timeout=5)
        return len(rest)

    def _admit(self) -> None:
        if self._draining.is_set():
            raise Draining("kvctl is shutting down and admits no new requests; "
                           "retry on another node or after the restart")

    # ------------------------------------------------------------ helpers
    def _budget(self, snap, view=None) -> int:
        return Controller.budget_of(snap, view or self.policy.view()) if snap is not None else 0

    def _snapshot(self):
        return self.engine.handle.snapshot()

    def _find(self, seq_id: str):
        if not seq_id:
            raise ValueError("seq_id is required")
        for v in self._snapshot().sequences:
            if v.seq_id == seq_id and v.state != "finished":
                return v
        raise UnknownSequence(seq_id)

    def _tokenize(self, req) -> list[int]:
        """The request's token ids, computed once (the engine gets them as they are).
        Runs on a pool thread: the engine gives each thread its own tokenizer."""
        return self.engine.tokenize(req)     # ValueError (e.g. no tokenizer) -> INVALID_ARGUMENT

    def _check_capacity(self, num_prompt: int, max_tokens: int,
                        kv_format: str | None = None) -> None:
        """Refuse up front what can never run here: beyond the model's context
        (INVALID_ARGUMENT, on any node) or beyond this node's KV memory whatever moves
        (RESOURCE_EXHAUSTED)."""
        snap = self.telemetry.latest().snapshot
        if snap is None or "gpu" not in snap.tiers:
            return
        if snap.max_positions and num_prompt >= snap.max_positions:
            raise ValueError(f"prompt of {num_prompt} tokens exceeds the model's context of "
                             f"{snap.max_positions}")
        est = self.engine.handle.estimate_bytes
        gpu_cap = snap.tiers["gpu"].capacity_bytes
        need_prompt = self.engine.handle.admission_bytes(num_prompt, kv_format)
        if need_prompt > gpu_cap:
            raise CapacityExceeded(
                f"the prompt's {num_prompt} tokens need {need_prompt} B of KV "
                f"({kv_format or 'at full precision'}) to prefill; this node's GPU tier "
                f"holds {gpu_cap} B. Shorten the prompt or use a node with more memory")
        host = snap.tiers.get("host")
        room = gpu_cap + (host.capacity_bytes if host else 0)
        need = est(num_prompt + max_tokens, "full")
        if need > room:
            raise CapacityExceeded(
                f"{num_prompt} prompt + {max_tokens} new tokens need {need} B of KV at full "
                f"precision; this node holds at most {room} B (GPU + host tiers). Lower "
                "max_tokens or use a node with more memory")

    # ------------------------------------------------------------ generation
    async def Generate(self, request, context):
        self._admit()
        req = convert.request_from_proto(request)
        ids = await self.blocking(self._tokenize, req)
        num_prompt = len(ids)
        self._check_capacity(num_prompt, req.sampling.max_tokens, req.kv_format)
        stream = self._outbox_here().stream()
        seq_id = await self._submit(req, stream, ids)
        flight = InFlight(seq_id, stream)
        with self._lock:
            self._inflight[seq_id] = flight
        log.info("generate", extra={"kv": {
            "seq_id": seq_id, "prompt_tokens": num_prompt, "max_tokens": req.sampling.max_tokens,
            "priority": req.priority, "strategy": req.strategy,
            **({"session_id": req.session_id} if req.session_id else {}),
            **({"prompt": req.prompt or req.messages} if self.log_prompts else {})}})
        if req.strategy:
            self.policy.pin(seq_id, req.strategy)
        done = False
        # messages go out as bytes (Generate is registered with an identity serializer,
        # controller.server.add_to_server): each token's is made by one refilled message
        encode = convert.TokenEncoder()
        observe = self.metrics.token_times.observe if self.metrics is not None else None
        write = context.write
        monotonic = time.monotonic
        try:
            await write(convert.started_to_proto(seq_id, num_prompt or 0).SerializeToString())
            last = monotonic()
            while not done:
                for ev in await stream.get_all():
                    if isinstance(ev, TokenEvent):
                        if observe is not None:
                            now = monotonic()
                            observe(now - last)
                            last = now
                        await write(encode(ev))
                    elif isinstance(ev, FinishEvent):
                        done = True
                        await self._finished(flight, ev, context)
                        break
        finally:
            with self._lock:
                self._inflight.pop(seq_id, None)
            self.policy.unpin(seq_id)
            if not done:                 # the client hung up (the RPC was cancelled): free its blocks
                self.pool.submit(self.engine.cancel, seq_id)
                _log_hang_up(seq_id, "client hung up during the stream")
            flight.finished.set()

    async def _submit(self, req, stream: EventStream, ids: list[int]) -> str:
        fut = asyncio.get_running_loop().run_in_executor(
            self.pool, functools.partial(self.engine.submit, req, stream.put, prompt_ids=ids))
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:   # the client left while the engine took the request
            def cancel_late(f) -> None:
                if not f.cancelled() and f.exception() is None:
                    self.pool.submit(self.engine.cancel, f.result())
                    _log_hang_up(f.result(), "client hung up while the request was submitted")
            fut.add_done_callback(cancel_late)
            raise

    async def _finished(self, flight: InFlight, ev: FinishEvent, context) -> None:
        if flight.shutdown_cancelled:
            raise Draining(f"kvctl shut down: sequence {flight.seq_id} was cancelled after "
                           f"{ev.num_generated} tokens when the drain grace period ran out; "
                           "retry on another node")
        secs = time.monotonic() - flight.started
        if self.metrics is not None:
            self.metrics.on_finish(ev.reason)
        log.info("finished", extra={"kv": {
            "seq_id": flight.seq_id, "reason": ev.reason, "generated": ev.num_generated,
            "seconds": round(secs, 3),
            **({"cached_tokens": ev.cached_tokens} if ev.cached_tokens else {}),
            **({"error": ev.error} if ev.error else {})}})
        await context.write(convert.finish_to_proto(ev, secs).SerializeToString())
        if ev.reason == "error":         # the final message is out; the status tells it too
            raise GenerationFailed(f"sequence {flight.seq_id} failed in the engine: "
                                   f"{ev.error or 'no detail given'}")

    @off_loop
    def Cancel(self, request, context):
        if not request.seq_id:
            raise ValueError("seq_id is required")
        with self._lock:
            known = request.seq_id in self._inflight
        if not known:
            self._find(request.seq_id)
        ok = bool(self.engine.cancel(request.seq_id))
        return pb.CancelResponse(seq_id=request.seq_id, cancelled=ok)

    # ------------------------------------------------------------ status
    async def GetStatus(self, request, context) -> bytes:
        """The NodeStatus, already serialized: served with an identity response serializer
        (``controller.server.add_to_server``). On the loop: the telemetry thread has built and serialized
        this sample's status, so the call appends the two per-call fields to those bytes
        (a later field wins when protobuf parses concatenated messages). A fresh sample
        reads the engine: off the loop."""
        if request.fresh:   # new NVML/psutil readings and the newest engine snapshot; reads only
            sample = await self.blocking(self.telemetry.sample_now, False)
        else:
            sample = self.telemetry.latest()
        raw = self._cached_status(sample)
        if raw is None:
            raw = (await self.blocking(self._status_entry, sample))[3]
        live = pb.NodeStatus(uptime_s=time.monotonic() - self.started_at, draining=self.draining)
        return raw + live.SerializeToString()

    def _cached_status(self, sample) -> bytes | None:
        cached = self._status_cache
        if cached is not None and cached[0] is sample and cached[1] == self.policy.view():
            return cached[3]
        return None

    def status_of(self, sample) -> pb.NodeStatus:
        """NodeStatus of one telemetry sample, built (and serialized) once per (sample,
        policy): building it walks every sequence's blocks, too slow to repeat on every
        call under load. The telemetry thread warms it. Not cheap: off the event loop."""
        return self._status_entry(sample)[2]

    def _status_entry(self, sample) -> tuple:
        """(sample, policy view, NodeStatus, its bytes), cached."""
        view = self.policy.view()
        cached = self._status_cache
        if cached is not None and cached[0] is sample and cached[1] == view:
            return cached
        msg = convert.status_to_proto(
            sample, view, self._budget(sample.snapshot, view), self.telemetry.mode,
            0.0, False, VERSION, getattr(self.engine, "model_name", ""),
            self.controller.loop.predictor)
        entry = (sample, view, msg, msg.SerializeToString())
        self._status_cache = entry
        return entry

    @off_loop
    def ListSequences(self, request, context):
        pins = self.policy.view().pins
        seqs = [v for v in self._snapshot().sequences if v.state != "finished"
                and (not request.state or v.state == request.state)]
        return pb.ListSequencesResponse(
            sequences=[convert.sequence_to_proto(v, pins.get(v.seq_id)) for v in seqs])

    @off_loop
    def GetSequence(self, request, context):
        v = self._find(request.seq_id)
        return convert.sequence_to_proto(v, self.policy.view().pins.get(v.seq_id), with_blocks=True)

    # ------------------------------------------------------------ policy
    @off_loop
    def GetPolicy(self, request, context):
        view = self.policy.view()
        out = convert.policy_to_proto(view)
        out.budget_bytes = self._budget(self.telemetry.latest().snapshot, view)
        return out

    @off_loop
    def SetPolicy(self, request, context):
        self._admit()
        f = {k: getattr(request, k) for k in ("profile", "budget_bytes", "high_watermark",
                                              "low_watermark") if request.HasField(k)}
        if not f:
            raise ValueError("SetPolicy changes nothing: set at least one of profile, "
                             "budget_bytes, high_watermark, low_watermark")
        view = self.policy.update(**f)
        in_force = self._budget(self.telemetry.latest().snapshot, view)
        reason = "operator set " + ", ".join(f"{k}={v}" for k, v in f.items())
        if view.budget_bytes and in_force < view.budget_bytes:
            reason += (f"; the budget exceeds this node's GPU tier, so the budget in force "
                       f"is {in_force} B")
        self.decisions.record(Decision(kind="policy", profile=view.profile, reason=reason))
        out = convert.policy_to_proto(view)
        out.budget_bytes = in_force
        return out

    @off_loop
    def Pin(self, request, context):
        self._admit()
        with self._lock:
            known = request.seq_id in self._inflight
        if not known:
            self._find(request.seq_id)
        prev = self.policy.pin(request.seq_id, request.strategy)
        self.decisions.record(Decision(kind="pin", seq_id=request.seq_id, action=request.strategy,
                                       reason="operator pinned the sequence",
                                       profile=self.policy.view().profile))
        return pb.PinResponse(seq_id=request.seq_id, strategy=request.strategy, previous=prev or "")

    @off_loop
    def Unpin(self, request, context):
        self._admit()
        if not request.seq_id:
            raise ValueError("seq_id is required")
        prev = self.policy.unpin(request.seq_id)
        if prev is None:
            raise UnknownSequence(request.seq_id) if not self._is_live(request.seq_id) else \
                ValueError(f"sequence {request.seq_id!r} is not pinned")
        self.decisions.record(Decision(kind="unpin", seq_id=request.seq_id, action=prev,
                                       reason="operator unpinned the sequence",
                                       profile=self.policy.view().profile))
        return pb.PinResponse(seq_id=request.seq_id, strategy="", previous=prev)

    def _is_live(self, seq_id: str) -> bool:
        try:
            self._find(seq_id)
            return True
        except UnknownSequence:
            return False

    # ------------------------------------------------------------ decisions, capacity
    async def WatchDecisions(self, request, context):
        """Decisions as they are made. Fed by the event loop: the recording thread hands
        each decision to the loop, which queues it for this stream (bounded: a watcher
        that reads too slowly is told how many it missed, never blocks the policy)."""
        with self._lock:
            if self._num_watchers >= self.max_watchers:
                raise Overloaded(f"{self._num_watchers} decision watchers are open (the "
                                 f"limit is server.max_watchers = {self.max_watchers}); "
                                 "close one or retry later", retry_after_s=5.0)
            self._num_watchers += 1
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        dropped = 0

        def put(d) -> None:                        # on the loop
            nonlocal dropped
            if d is not None and q.qsize() >= WATCH_QUEUE:
                dropped += 1
            else:
                q.put_nowait(d)

        def feed(d) -> None:                       # the recording thread
            try:
                loop.call_soon_threadsafe(put, d)
            except RuntimeError:                   # the loop is closed: daemon stopped
                pass
        token = self.decisions.subscribe(feed)
        with self._lock:
            self._watch_feeds[token] = feed
        try:
            for d in self.decisions.recent(request.history) if request.history else []:
                await context.write(convert.decision_to_proto(d))
            while not self.draining:     # the client leaving cancels this coroutine
                d = await q.get()
                if d is None:            # the daemon is draining
                    break
                if dropped:
                    await context.write(convert.decision_to_proto(Decision(
                        kind="dropped", reason=f"{dropped} decisions were not sent: this "
                        "watcher read too slowly (WatchDecisions history has the recent ones)")))
                    dropped = 0
                await context.write(convert.decision_to_proto(d))
        finally:
            self.decisions.unsubscribe(token)
            with self._lock:
                self._watch_feeds.pop(token, None)
                self._num_watchers -= 1

    @off_loop
    def EstimateCapacity(self, request, context):
        ids = list(request.prompt_ids.ids) if request.HasField("prompt_ids") else None
        session_id = request.session_id or None
        if session_id is not None:
            convert.check_session_id(session_id)
            if ids is None:
                raise ValueError("session_id is used with prompt_ids: give the prompt's ids "
                                 "to count the session's KV this node holds already")
        num_tokens = request.num_tokens
        if ids is not None:
            if not ids:
                raise ValueError("prompt_ids is empty")
            if num_tokens == 0:          # the prompt alone
                num_tokens = len(ids)
            elif num_tokens < len(ids):
                raise ValueError(f"num_tokens ({num_tokens}) counts the prompt and the new "
                                 f"tokens: at least the {len(ids)} prompt ids")
        if num_tokens < 1:
            raise ValueError("num_tokens must be >= 1 (prompt + max new tokens)")
        fmt = request.format or "full"
        if len(fmt) > 16:                # the message echoes it: keep it short
            raise ValueError(f"unknown KV format {fmt[:16]!r}... ({len(fmt)} characters); "
                             "use full, int8, int4, int2 or kXvY")
        est = self.engine.handle.estimate_bytes
        need = est(num_tokens, fmt)
        context_len = getattr(self.engine, "max_positions", None)
        too_long = context_len is not None and num_tokens > context_len
        reused = 0
        if ids is not None and not too_long:
            # cache-aware: the blocks it would share are not allocated again; those that
            # would newly count as used on the GPU tier (cached, offloaded) still are
            reuse = self.engine.handle.prefix_reuse(ids, session_id)
            reused = reuse.num_tokens
            if reused:
                need = est(num_tokens - reused, fmt) + reuse.gpu_bytes
        snap = self.telemetry.latest().snapshot
        view = self.policy.view()
        budget = self._budget(snap, view)
        # the controller's measure of the budget: the blocks' exact bytes
        used = snap.tiers["gpu"].block_bytes if snap is not None and "gpu" in snap.tiers else 0
        free = max(0, int(budget * view.high_watermark) - used)
        rate = snap.tokens_per_s if snap is not None else 0.0
        ok = need <= free and not self.draining and not too_long
        reusing = f" ({reused} of {len(ids)} prompt tokens reused)" if ids is not None else ""
        if too_long:                     # no move or wait ever makes it fit
            reason = f"never fits: exceeds the model's context of {context_len} tokens"
        elif self.draining:
            reason = "node is draining for shutdown"
        elif ok:
            reason = f"fits: {need} B needed{reusing}, {free} B free under the high watermark"
        else:
            reason = (f"does not fit now: {need} B needed{reusing}, {free} B free under the "
                      f"high watermark ({view.high_watermark:.0%} of {budget} B)")
        computed = num_tokens - reused   # reused tokens are not computed again
        return pb.EstimateCapacityResponse(
            can_admit=ok, bytes_needed=need, bytes_free=free, budget_bytes=budget, reason=reason,
            predicted_seconds=computed / rate if rate > 0 else 0.0, tokens_per_s=rate,
            reused_tokens=reused)

    # ------------------------------------------------------------ sessions
    @off_loop
    def ListSessions(self, request, context):
        snap = self._snapshot()
        since = max(0.0, time.time() - snap.time)    # an idle engine publishes no new one
        return pb.ListSessionsResponse(
            sessions=[convert.session_to_proto(d, since) for d in snap.sessions])

    @off_loop
    def DropSession(self, request, context):
        self._admit()
        sid = request.session_id
        if not sid:
            raise ValueError("session_id is required")
        convert.check_session_id(sid)
        before = next((d for d in self._snapshot().sessions if d["session_id"] == sid), None)
        if not self.engine.drop_session(sid):     # the engine's writer does it: blocks
            raise UnknownSession(sid)
        kept = ""
        if before is not None and before["num_tokens"]:
            kept = (f": {before['num_tokens']} tokens of KV kept, "
                    f"{sum(before['bytes_by_tier'].values())} B")
        self.decisions.record(Decision(kind="drop_session",
                                       seq_id=before.get("seq_id", "") if before else "",
                                       action="drop",
                                       reason=f"operator dropped session {sid!r}{kept}",
                                       profile=self.policy.view().profile))
        return pb.DropSessionResponse(session_id=sid, dropped=True)


def _log_hang_up(seq_id: str, reason: str) -> None:
    log.info("cancelled", extra={"kv": {"seq_id": seq_id, "reason": reason}})

