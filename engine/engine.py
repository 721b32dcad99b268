"""The engine: a model, a paged KV store, a continuous-batching step loop.

Mechanism only. It admits requests while the KV store has room, packs the decode tokens
of all running sequences with chunks of prefill into one varlen batch per step
(schedule -> runner.run -> postprocess), samples, streams events and keeps attention
statistics. It never decides what to compress or move: the controller does, through
``EngineHandle`` (engine/handle.py).

One writer: the engine thread is the only code that changes engine state. Other threads
post commands (a request, a cancellation, the controller's candidates) to an inbox that
the engine thread drains between steps, and read the snapshot it publishes
(engine/snapshot.py). Without a running thread (tests, offline evaluation) the caller is
the writer: commands run at once, under the step lock.

Under memory pressure nothing accepted is lost: a sequence that cannot get a block
waits ("stalled", which the snapshot reports as pressure for the controller's moves);
one stalled for ``preempt_after_s`` makes the engine preempt the lowest-priority running
sequence (as vLLM does): its KV is swapped to the host tier, or dropped and recomputed
when the host cannot take it, and it resumes when room returns.
"""
from __future__ import annotations

import copy
import gc
import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, NamedTuple

import torch

from engine import apply as apply_mod
from engine import attention, moves, snapshot
from engine.actions import (ActionError, ActionResult, CandidateResult, DropSession, Evict,
                            Pause, SetFillFormat, parse_fill_format)
from engine.api import (EngineStopped, Event, FinishEvent, Overloaded, Request,
                        SamplingParams)
from engine.arena import OutOfBlocks
from engine.config import EngineConfig
from engine.kernels.jit_count import compiled_kernels
from engine.layout import FULL, BlockGeometry, KVFormat
from engine.models import load_model
from engine.offline import OfflineMixin
from engine.prefix import key_of
from engine.sessions import SessionsMixin
from engine.runner import Chunk, ModelRunner, StepOutput, is_oom
from engine.sampler import make_generator, sample_tokens
from engine.sequence import DECODE, FINISHED, HELD, IDLE, PREEMPTED, PREFILL, Sequence
from engine.staging import staging_need
from engine.stats import SeqStats
from engine.store import GPU, HOST, KVStore

log = logging.getLogger("kvctl.engine")


@dataclass
class _Sampled:
    """A step's tokens: drawn on the device (``tokens``), on their way to the host."""

    seqs: list[Sequence]        # the sequences they belong to, in row order
    tokens: torch.Tensor        # [R] int64 on the logits' device
    host: torch.Tensor          # [R] int64 host copy (pinned on CUDA), valid once ``ready``
    ready: object | None        # torch.cuda.Event after the copy, or None (CPU)

    def read(self) -> list[int]:
        if self.ready is not None:
            self.ready.synchronize()    # this step's tokens only: a step launched ahead runs on
        return self.host.tolist()


@dataclass
class _Ahead:
    """A decode step launched before the tokens of the step it follows were read."""

    out: StepOutput
    seqs: list[Sequence]        # its rows, in order
    dropped: set[str] = field(default_factory=set)   # rows whose sequence ended since

    @property
    def ids(self) -> set[str]:
        return {s.seq_id for s in self.seqs}

CPU_DEFAULT_BUDGET = 2 << 30
IDLE_RATE_S = 2.0          # tokens/s reads 0 once no token came for this long
STRUCTURAL_GAP_S = 0.005   # snapshots after structural changes: at most this often
# ... and at most this share of the engine thread's time: a snapshot walks every block of
# every sequence (49 sequences x 700 blocks: 21 ms on the 2-core box, heap frozen), and on
# the headline's H100 run adaptive (a move, admission or finish nearly every step) spent
# 6.1 s of 112 building them against pinned int4's 3.1 (docs/BENCHMARKS.md)
PUBLISH_SHARE = 0.1


class StepRecord(NamedTuple):
    """One engine step, as ``Laps.recent`` keeps it."""
    kind: str                   # 'prefill' (it wrote prompt chunks), 'decode' or 'idle'
    seconds: float
    rows: int                   # decode rows
    chunks: tuple               # per prompt chunk: (tokens written, the sequence's after)
    compiled: int               # Triton kernels compiled meanwhile
    start: float                # time.perf_counter() when it began
    parts: dict                 # seconds by part (Laps.lap names)
    replayed: bool              # its decode ran as a CUDA graph replay
    topk_rows: int              # decode rows over top-k pages


class Laps:
    """Seconds spent in each part of the engine's steps, and in steps with and without a
    prompt chunk (and how many), summed since start. A few clock reads a step; the
    snapshot carries a copy (EngineSnapshot.step_times). Apart (``compiles``, in the
    snapshot's ``graphs``): the steps that compiled Triton kernels, how many kernels, and
    those steps' whole seconds (engine/kernels/jit_count.py)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._t = 0.0
        self.compiles = {"kernel_compiles": 0, "compile_steps": 0, "compile_steps_s": 0.0}
        self._compiled = compiled_kernels()
        # the last steps one by one (StepRecord), for whoever profiles a run in this
        # process (not in the snapshot)
        self.recent: deque = deque(maxlen=1024)
        self._parts: dict[str, float] = {}

    def start(self) -> float:
        self._t = time.perf_counter()
        self._parts = {}
        return self._t

    def lap(self, name: str) -> None:
        t = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + t - self._t
        self._parts[name] = self._parts.get(name, 0.0) + t - self._t
        self._t = t

    def step(self, kind: str, t0: float, rows: int = 0, chunks: tuple = (),
             replayed: bool = False, topk_rows: int = 0) -> None:
        """A step of this kind ('prefill': it wrote prompt chunks; 'decode'; 'idle':
        nothing could run) that began at ``t0`` ended at the last lap."""
        self.seconds[f"{kind}_steps"] = self.seconds.get(f"{kind}_steps", 0) + 1
        self.seconds[f"{kind}_s"] = self.seconds.get(f"{kind}_s", 0.0) + self._t - t0
        n = compiled_kernels()
        if n > self._compiled:
            c = self.compiles
            c["kernel_compiles"] += n - self._compiled
            c["compile_steps"] += 1
            c["compile_steps_s"] += self._t - t0
        self.recent.append(StepRecord(kind, self._t - t0, rows, chunks, n - self._compiled,
                                      t0, self._parts, replayed, topk_rows))
        self._compiled = n


class Engine(OfflineMixin, SessionsMixin):
    def __init__(self, config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig(**overrides)
        self.config = cfg
        lm = load_model(cfg.model, cfg.device, cfg.dtype, seed=cfg.seed)
        if lm.device.type == "cpu" or cfg.num_threads:
            torch.set_num_threads(cfg.threads)
        self.model = attention.prepare_model(lm.model)
        self.tokenizer = lm.tokenizer        # the engine thread's; others get copies
        self.model_name = lm.name
        self.device = lm.device
        self.dtype = lm.dtype
        mc = self.model.config
        self.num_layers = mc.num_hidden_layers
        self.vocab_size = mc.vocab_size
        self.max_positions = getattr(mc, "max_position_embeddings", 1 << 30)
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        graphs = cfg.cuda_graphs and self.device.type == "cuda"
        self.geom = BlockGeometry(cfg.block_size, mc.num_key_value_heads, head_dim,
                                  self.dtype, value_group=min(cfg.value_group, head_dim))
        self.store = KVStore(self.geom, self.num_layers, self.device, self._gpu_budget(),
                             cfg.host_budget_bytes, cfg.page_bytes or None,
                             cfg.staging_bytes or None, cfg.num_sink_blocks,
                             scratch=graphs, prefix_cache=cfg.prefix_caching)
        self.store.prefix.record_events = cfg.kv_events
        self.runner = ModelRunner(self.model, self.store, self.num_layers, self.device,
                                  cuda_graphs=graphs, max_batch=cfg.max_running,
                                  compile_decode=cfg.compile_decode,
                                  capture_tokens=cfg.graph_capture_tokens)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        # engine-thread state
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.held: dict[str, Sequence] = {}
        self.idle: dict[str, Sequence] = {}      # sessions' KV between turns
        self.sessions: dict = {}                 # session id -> engine.sessions.Session
        self._expired_at = 0.0
        self._blocked_since = 0.0                # a waiting request found no room since
        self._unkept: set[str] = set()           # turns of sessions dropped while running
        self.num_sessions_dropped = 0            # idle sessions dropped for room
        # a sink for the KV events of each step (the daemon's publisher), or None
        self.on_kv_events: Callable[[list], None] | None = None
        self.seqs: dict[str, Sequence] = {}
        self.stats: dict[str, SeqStats] = {}
        self._deferred_stats = None   # CUDA: the last step's block shares (OfflineMixin._after)
        self._ahead: _Ahead | None = None   # a decode step launched before the last one's
        self.num_overlapped = 0             # tokens were read (``_launch_ahead``), and how many
        self._topk_rows = 0                 # the last scheduled step's top-k decode rows
        self.step_count = 0
        # seconds the engine thread spent in each part of its steps, since start: where
        # a slow step's time went (moves applied, admission, the model run, ...)
        self.laps = Laps()
        self.tokens_out = 0
        self.num_preemptions = 0
        self.num_paused = 0             # running sequences the controller paused (Pause)
        self.num_step_failures = 0
        self.num_oom_retries = 0
        self._token_cap = cfg.max_batch_tokens   # halved after an out-of-memory step
        self._tok_window: deque[tuple[float, int]] = deque(maxlen=64)
        self._dirty = True         # something changed since the last snapshot
        self._changed = True       # ... that readers must see at once (not just progress)
        self._published_at = 0.0
        self._build_s = 0.0           # the last snapshot build's seconds
        self._version = itertools.count(1)
        self._snapshot = None
        # cross-thread
        self._step_lock = threading.RLock()      # held by the writer through a step
        self._cv = threading.Condition()         # inbox + wake-ups
        self._inbox: deque[tuple[Callable[[], Any], Future]] = deque()
        self._ids_lock = threading.Lock()
        self._live: set[str] = set()             # ids submitted and not finished
        self._num_queued = 0                     # submitted, never admitted
        self._ids = itertools.count(1)
        self._tls = threading.local()
        self._thread: threading.Thread | None = None
        self._froze = False           # start() froze the heap (EngineConfig.gc_freeze)
        self._stop = False
        # optional tap on every sampled row: (seq_ids, logits [n, V]); traces, tests
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        from engine.handle import EngineHandle
        self.handle = EngineHandle(self)
        self._publish(force=True)

    # -- budgets --------------------------------------------------------------------------
    def _gpu_budget(self) -> int:
        cfg = self.config
        if cfg.kv_budget_bytes:
            return cfg.kv_budget_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * cfg.kv_budget_fraction)
        return CPU_DEFAULT_BUDGET

    # -- threads and commands -------------------------------------------------------------
    @property
    def threaded(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _on_engine_thread(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def post(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` as the writer: on the engine thread between steps, or at once (under
        the step lock) when no engine thread runs. The future holds its result."""
        fut: Future = Future()
        if not self.threaded:
            with self._step_lock:
                self._unlaunch_ahead()      # commands see every step run to its end
                _run_into(fn, fut)
                self._changed = True
            return fut
        with self._cv:
            if self._stop:
                raise EngineStopped("the engine is stopping")
            self._inbox.append((fn, fut))
            self._cv.notify_all()
        return fut

    def call(self, fn: Callable[[], Any], timeout: float | None = None) -> Any:
        """``post`` and wait for the result (never from the engine thread)."""
        if self._on_engine_thread():
            return fn()
        return self.post(fn).result(timeout)

    def _drain_inbox(self) -> None:
        with self._cv:
            items = list(self._inbox)
            self._inbox.clear()
        if not items:
            return
        done = []
        for fn, fut in items:
            res = Future()
            _run_into(fn, res)
            done.append((fut, res))
        self._changed = True
        self.laps.lap("moves")
        self._publish(force=True)      # readers see the outcome before the poster does
        self.laps.lap("moves_publish")  # (a lap of its own: it walks every block)
        for fut, res in done:
            if res.exception() is not None:
                fut.set_exception(res.exception())
            else:
                fut.set_result(res.result())

    # -- tokenization ---------------------------------------------------------------------
    def _tokenizer_here(self):
        """Fast tokenizers are not safe to share between threads ("Already borrowed"):
        each thread other than the writer gets its own copy, made once."""
        if self.tokenizer is None or self._on_engine_thread():
            return self.tokenizer
        tok = getattr(self._tls, "tokenizer", None)
        if tok is None:
            tok = self._tls.tokenizer = copy.deepcopy(self.tokenizer)
        return tok

    def tokenize(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            ids = [int(t) for t in req.prompt_ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(f"token ids out of the vocabulary [0, {self.vocab_size}): "
                                 f"{bad[:5]}")
            return ids
        tok = self._tokenizer_here()
        if tok is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: give prompt_ids")
        if req.messages is not None:
            out = tok.apply_chat_template(req.messages, add_generation_prompt=True,
                                          tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        return tok(req.prompt)["input_ids"]

    def check_prompt(self, num_tokens: int) -> None:
        """ValueError for a prompt this engine can never run."""
        if num_tokens == 0:
            raise ValueError("empty prompt")
        if num_tokens >= self.max_positions:
            raise ValueError(f"prompt of {num_tokens} tokens exceeds the model's context of "
                             f"{self.max_positions}")

    def prompt_fits(self, num_tokens: int, fmt: KVFormat = FULL) -> bool:
        """Whether the prompt's KV plus one block to grow into (what ``_admit`` needs
        room for at once) fits the GPU tier at all: prefill writes the whole prompt there
        before any move can run (at full precision, or in its fill format ``fmt``). By
        whole pages, as admission takes them: each slot size fills pages of its own, so
        a fill format's blocks and its full-precision chunk can fit an empty tier by
        bytes and never by pages (accepted on bytes, such a request waited forever)."""
        alloc = self.store.arenas[GPU].alloc
        slots = self._prompt_slots(self.store.blocks_for(num_tokens) + 1, fmt)
        return sum(alloc.fresh_pages(sl, n) for sl, n in slots.items()) <= alloc.num_pages

    def _admission_bytes(self, num_tokens: int, fmt: KVFormat = FULL) -> int:
        """Bytes ``_admit`` needs room for at once for a prompt: its blocks plus one to
        grow into, at full precision; with a fill format, those blocks in ``fmt`` plus
        one prefill chunk's at full precision (written full, then converted)."""
        slots = self._prompt_slots(self.store.blocks_for(num_tokens) + 1, fmt)
        return sum(sl * n for sl, n in slots.items()) * self.num_layers

    def _prompt_slots(self, blocks: int, fmt: KVFormat) -> dict[int, int]:
        """Slots (slot bytes -> count, a layer) a prompt of ``blocks`` blocks needs room
        for at once: all at full precision; with a fill format all in it plus a prefill
        chunk's at full precision (``max_batch_tokens``; it may start mid-block, and the
        block after it), written full and converted once full."""
        full = self.geom.slot_bytes(FULL)
        if fmt == FULL:
            return {full: blocks}
        chunk = min(blocks, self.store.blocks_for(self.config.max_batch_tokens) + 2)
        return {full: chunk, self.geom.slot_bytes(fmt): blocks}

    # -- requests -------------------------------------------------------------------------
    def submit(self, req: Request, on_event: Callable[[Event], None],
               prompt_ids: list[int] | None = None) -> str:
        """Queue a request; events arrive on ``on_event`` from the engine thread.
        ``prompt_ids``: the request's tokens when the caller has tokenized it already."""
        ids = list(prompt_ids) if prompt_ids is not None else self.tokenize(req)
        self.check_prompt(len(ids))
        fmt = parse_fill_format(req.kv_format)
        if not self.prompt_fits(len(ids), fmt):
            raise OutOfBlocks(f"prompt of {len(ids)} tokens needs "
                              f"{self._admission_bytes(len(ids), fmt)} bytes of KV "
                              f"({'full precision' if fmt == FULL else fmt.name}"
                              f"{'' if fmt == FULL else ' and a prefill chunk at full'}, in "
                              f"whole pages of each slot size); the GPU tier holds "
                              f"{self.store.arenas[GPU].capacity_bytes}")
        with self._ids_lock:
            if self._stop:
                raise EngineStopped("the engine is stopping")
            if self._num_queued >= self.config.max_waiting:
                raise Overloaded(f"{self._num_queued} requests are already waiting (the "
                                 f"limit is {self.config.max_waiting}); retry shortly",
                                 retry_after_s=1.0)
            sid = req.seq_id or self._new_id()
            if sid in self._live:
                raise ValueError(f"sequence id {sid!r} is already in use")
            self._live.add(sid)
            self._num_queued += 1
        s = Sequence(sid, req, ids, on_event, make_generator(req.sampling, self.device),
                     fill_format=fmt)
        try:
            self.post(lambda: self._enqueue(s))
        except EngineStopped:
            with self._ids_lock:
                self._live.discard(sid)
                self._num_queued -= 1
            raise
        return sid

    def _new_id(self) -> str:
        while True:
            sid = f"seq-{next(self._ids)}"
            if sid not in self._live:
                return sid

    def _enqueue(self, s: Sequence) -> None:
        self.seqs[s.seq_id] = s
        self.waiting.append(s)
        self._changed = True

    def cancel(self, seq_id: str) -> bool:
        """Ask for a live sequence to end with reason 'cancelled'; False if unknown or
        finished. Takes effect between steps (the finish event says when)."""
        with self._ids_lock:
            if seq_id not in self._live:
                return False
        try:
            self.post(lambda: self._cancel(seq_id))
        except EngineStopped:
            return False
        return True

    def _cancel(self, seq_id: str) -> None:
        s = self.seqs.get(seq_id)
        if s is not None and s.state != FINISHED:
            self._finish(s, "cancelled")

    def generate(self, req: Request, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over a request's events (runs the loop inline if no thread)."""
        q: queue.Queue = queue.Queue()
        sid = self.submit(req, q.put)
        while True:
            if not self.threaded:
                while q.empty():
                    self.step()
            ev = q.get(timeout=timeout)
            yield ev
            if isinstance(ev, FinishEvent) and ev.seq_id == sid:
                return

    # -- loop -----------------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread; on a GPU, warm up (``warm_up``) before returning."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="kvctl-engine", daemon=True)
        self._thread.start()
        if self.device.type == "cuda" and self.config.warmup_formats:
            t0 = time.perf_counter()
            n0 = compiled_kernels()
            try:
                self.warm_up(self.config.warmup_formats)
                log.info("warmed up", extra={"kv": {
                    "formats": list(self.config.warmup_formats),
                    "seconds": round(time.perf_counter() - t0, 3),
                    "kernels_compiled": compiled_kernels() - n0}})
            except Exception as err:    # serving without it only compiles later
                log.warning("warm-up skipped: %s", err)
        if self.config.gc_freeze:
            gc.collect()
            gc.freeze()
            self._froze = True

    def warm_up(self, formats, timeout_s: float = 120.0) -> None:
        """Short requests written in each of ``formats`` (a few blocks, a few tokens):
        first all at once (a decode table of every format: a kernel launch per format),
        then each alone (its blocks and the newest full-precision one in one launch, and
        that batch's CUDA graph). The kernels these steps need compile now rather than in
        the middle of a served step (on a fresh H100 the headline's adaptive run took
        1.4-4.3 s steps while writing its prompts; a second run on the same machine, with
        the first one's kernels in Triton's disk cache, did not; the compiles were not
        counted then: docs/BENCHMARKS.md). Their KV is given back afterwards, cached
        prefix blocks included. Needs the engine thread (``start``)."""
        if not self.threaded:
            raise RuntimeError("warm_up needs the engine thread: call start() first")
        T = self.store.block_size
        n = 4 * T + 3                 # four full blocks and a partial one

        def run(group, tag: str, first: int) -> None:
            events: queue.Queue = queue.Queue()
            # tokens of their own (no request reuses another's cached blocks)
            left = {self.submit(Request(
                prompt_ids=[(97 * (first + i) + 31 * j + 1) % (self.vocab_size - 1) + 1
                            for j in range(n)],
                kv_format=f, seq_id=f"warmup-{tag}-{i}",
                sampling=SamplingParams(max_tokens=4, ignore_eos=True)), events.put)
                for i, f in enumerate(group)}
            failed, deadline = [], time.monotonic() + timeout_s
            try:
                while left:
                    ev = events.get(timeout=max(0.0, deadline - time.monotonic()))
                    if isinstance(ev, FinishEvent):
                        left.discard(ev.seq_id)
                        if ev.reason == "error":
                            failed.append(ev.seq_id)
            except queue.Empty:
                for sid in left:
                    self.cancel(sid)
                raise TimeoutError(f"warm-up requests did not finish in {timeout_s} s") \
                    from None
            if failed:
                raise RuntimeError(f"warm-up requests failed: {failed}")
        formats = tuple(formats)
        if self.device.type == "cuda":
            self._warm_kernels([KVFormat.parse(f) for f in formats])
        run(formats, "all", 0)
        for i, f in enumerate(formats):
            run((f,), f, len(formats) + i)
        self.post(self.store.clear_cache).result(timeout_s)

    def _warm_kernels(self, formats: list[KVFormat]) -> None:
        """Kernels no warm-up request reaches, launched directly on the empty arena (their
        outputs dropped): every tile of the split reduction (its split count changes every
        step), each format beside full precision in one launch with either leading, and
        the top-k gather from pinned host memory. A failure here is logged; the requests'
        warm-up still runs."""
        from engine.kernels import paged_decode_triton, split_reduce_triton
        try:
            split_reduce_triton.warm_up(self.device, self.geom.head_dim, self.dtype)
            paged_decode_triton.warm_up_pairs(self.store.arenas[GPU].row(0), self.geom,
                                              self.model.config.num_attention_heads,
                                              self.dtype, formats)
            if HOST in self.store.arenas:
                from engine.kernels.gather import gather_slots
                z = torch.zeros(1, dtype=torch.int64, device=self.device)
                gather_slots(self.store.arenas[HOST].flat, z,
                             self.store.arenas[GPU].row(0)[:64], z, z + 64, 64)
        except Exception as err:
            log.warning("kernel warm-up incomplete: %s", err)

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        with self._step_lock:
            self._unlaunch_ahead()
        with self._cv:
            pending = list(self._inbox)
            self._inbox.clear()
        for _, fut in pending:
            if not fut.done():
                fut.set_exception(EngineStopped("the engine stopped"))
        if self._froze:               # what start froze may be collected again
            gc.unfreeze()
            self._froze = False

    def _loop(self) -> None:
        if self.config.thread_nice:
            # a lower CPU priority for the step thread only: where the engine computes on
            # the CPU, the server's threads (token writes, status calls) run first when they
            # have work (docs/BENCHMARKS.md: GetStatus p99 under 64 streams). Linux: a
            # thread id with PRIO_PROCESS sets that thread's nice.
            try:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), self.config.thread_nice)
            except (OSError, AttributeError) as e:
                log.warning("engine thread priority not lowered: %s", e)
        while True:
            with self._cv:
                if self._stop:
                    return
                idle = not self._inbox and not self.waiting and not self.running
            if idle:
                with self._step_lock:
                    self._publish(force=self._dirty)
                with self._cv:
                    if not self._inbox and not self._stop:
                        self._cv.wait(0.5)
                continue
            try:
                worked = self.step()
            except Exception:       # a bug outside the forward pass: keep the daemon up
                log.exception("engine step failed outside the model run")
                worked = False
            if not worked:
                with self._cv:
                    if not self._inbox and not self._stop:
                        self._cv.wait(0.05)   # stalled on memory: wait for a move

    def step(self) -> bool:
        """One engine step; False when nothing could run (idle or stalled on memory).

        Overlapped steps (``overlap_steps``): a decode step launched by the last call
        (``_launch_ahead``) is this call's step: its tokens are sampled and read now,
        and the inbox waits for the next call (no step is launched ahead while it holds
        anything, so commands still run between two steps that ran to the end)."""
        with self._step_lock:
            laps = self.laps
            t0 = laps.start()
            graphs = self.runner.graphs
            replays0 = graphs.stats.num_replays if graphs is not None else 0
            ahead, self._ahead = self._ahead, None
            rows = None
            if ahead is not None:
                dec_seqs = [s for s in ahead.seqs if s.seq_id not in ahead.dropped]
                if len(dec_seqs) < len(ahead.seqs):
                    rows = [i for i, s in enumerate(ahead.seqs)
                            if s.seq_id not in ahead.dropped]
                out, chunks, pre_seqs = ahead.out, [], []
                replayed = True     # only steps with a captured graph are launched ahead
            else:
                self._drain_inbox()
                laps.lap("moves")           # commands: the controller's moves, cancels
                self._admit()
                laps.lap("admit")
                work = self._schedule()
                laps.lap("schedule")
                if work is None:
                    self._apply_deferred_stats()
                    self._check_stalls()
                    self._after_step()
                    self._publish()
                    laps.lap("after")
                    laps.step("idle", t0)       # nothing could run (stalled on memory)
                    return False
                decode, dec_seqs, chunks, pre_seqs = work
                out = self._run(decode, dec_seqs, chunks, pre_seqs)
                replayed = graphs is not None and graphs.stats.num_replays > replays0
                laps.lap("launch")          # CUDA: the kernels queued, not yet run
            # on CUDA the forward is still running: the last step's statistics now
            self._apply_deferred_stats()
            laps.lap("stats")
            sampled = None
            if out is not None:
                try:
                    sampled = self._sample(out, dec_seqs, chunks, pre_seqs, rows)
                except Exception as err:   # their KV holds a token no event announced
                    self._fail_step(dec_seqs + pre_seqs, err, "after the model run")
            laps.lap("sample")              # CUDA: waits for the forward to end
            if sampled is not None:
                self._launch_ahead(dec_seqs, pre_seqs, sampled)
            laps.lap("launch")
            # on CUDA the forward is still running: a snapshot due now is built meanwhile
            # (it shows the step's lengths, not its tokens yet)
            self._publish()
            laps.lap("publish")
            if sampled is not None:
                try:
                    self._postprocess(dec_seqs, chunks, pre_seqs, sampled)
                except Exception as err:   # their KV holds a token no event announced
                    self._fail_step(dec_seqs + pre_seqs, err, "after the model run")
            laps.lap("post")
            self._check_stalls()
            self._after_step()
            laps.lap("after")
            if graphs is not None and dec_seqs and not chunks and out is not None:
                graphs.stats.note_step(replayed, time.perf_counter() - t0,
                                       self._topk_rows if ahead is None else 0)
            self._publish()
            laps.lap("publish")
            laps.step("prefill" if chunks else "decode", t0, len(dec_seqs),
                      tuple((len(c.token_ids), s.num_prefilled)
                            for c, s in zip(chunks, pre_seqs)), replayed,
                      self._topk_rows if ahead is None else 0)
            return True

    def _after_step(self) -> None:
        """Sessions past their TTL go (and the least recent idle one, when a waiting
        request found no room for ``preempt_after_s``); this step's KV events go to the
        sink."""
        if not self.waiting:
            self._blocked_since = 0.0
        if self.sessions:
            self._expire_sessions()
            now = time.monotonic()
            if self._blocked_since and now - self._blocked_since >= self.config.preempt_after_s \
                    and self._drop_lru_idle("a waiting request found no room"):
                self._blocked_since = now
        self._flush_events()

    def set_kv_event_sink(self, sink: Callable[[list], bool] | None) -> None:
        """Hand each step's KV events (engine/api.py records) to ``sink`` (the daemon's
        publisher, controller/kv_events.py); None stops recording them. Everything the
        index holds now is announced first."""
        def run():
            self.on_kv_events = sink
            self.store.prefix.record_events = sink is not None
            if sink is not None:
                self.store.prefix.reannounce()
            else:
                self.store.prefix.events = []
        self.call(run)

    def _flush_events(self) -> None:
        events = self.store.prefix.drain_events() if self.store.prefix.events else None
        if events and self.on_kv_events is not None:
            try:
                lost = self.on_kv_events(events)
            except Exception:   # a broken publisher must not break the engine
                log.exception("KV event sink failed; %d events lost", len(events))
                lost = True
            if lost:            # the stream restarts with AllBlocksCleared: say it all again
                self.store.prefix.reannounce()

    # -- schedule -------------------------------------------------------------------------
    def _next_waiting(self) -> Sequence:
        """The waiting sequence admitted next: highest priority, then earliest arrival
        (``_admit``; the snapshot names it, and its room is the pressure it shows)."""
        return max(self.waiting, key=lambda x: (x.priority, -x.arrival))

    def _admit(self) -> None:
        if any(s.stalled for s in self.running):
            return      # room that frees up goes to the sequences already running first
        while self.waiting and len(self.running) < self.config.max_running:
            s = self._next_waiting()
            if s.swapped:   # preempted by swapping: its blocks come back, +1 to grow
                if not moves.can_swap_in(self.store, s.seq_id, s.swapped, 1):
                    self._blocked_since = self._blocked_since or time.monotonic()
                    return
                moves.swap_in(self.store, s.seq_id, s.swapped)
                s.swapped = []
                if s.block_hashes:   # swapped blocks left the index: back in it
                    self.store.index_blocks(s.seq_id, 0, [key_of(d) for d in s.block_hashes],
                                            s.prompt_ids + s.output_ids)
                s.state = DECODE
                s.moves.append("resumed (swapped in)")
            else:           # the whole context plus one block of growth must fit now
                if not self._admit_fresh(s):   # (a prefix it shares from the index aside)
                    self._blocked_since = self._blocked_since or time.monotonic()
                    return
                self.stats[s.seq_id] = SeqStats(decay=self.config.stats_decay)
                if s.state == PREEMPTED:
                    s.moves.append("resumed (recomputing its KV)")
                s.state = PREFILL
            self._blocked_since = 0.0
            self.waiting.remove(s)
            self.running.append(s)
            self._changed = True
            if not s.admitted:
                s.admitted = True
                with self._ids_lock:
                    self._num_queued -= 1

    def _schedule(self):
        decode: list[tuple[str, int]] = []
        dec_seqs: list[Sequence] = []
        staging_left = self.store.staging_half
        topk: list[int] = []      # decode rows that stream top-k picks from host
        now = time.monotonic()
        running = self.running
        if any(s.deferred for s in running):    # staging went to others last step
            running = sorted(running, key=lambda x: not x.deferred)
        for s in running:
            if s.state != DECODE:
                continue
            need = staging_need(self.store, s.seq_id)
            # offloaded blocks stream through one step's staging: a sequence whose blocks
            # fit it alone but not beside the others' decodes next step, first. It was
            # a stall, which blocked every admission and showed the controller pressure
            # that more offloads then deepened (the headline's CPU run: 17 of 20 running
            # sequences stalled with 44% of the GPU tier free and 30 requests waiting)
            s.deferred = staging_left < need <= self.store.staging_half
            if s.deferred:
                continue
            room = need <= staging_left
            if room:
                try:
                    self.store.reserve(s.seq_id, 1)
                except OutOfBlocks:
                    room = False
            self._set_stalled(s, not room, now)
            if not room:      # no block to grow into, or its offloaded blocks exceed staging
                continue
            staging_left -= need
            if need and self.store.seqs[s.seq_id].decode_mode == "topk":
                topk.append(len(decode))
            decode.append((s.seq_id, s.output_ids[-1]))
            dec_seqs.append(s)
        self._topk_rows = len(topk)
        if topk:
            # top-k rows first: a CUDA graph is keyed by its top-k rows' places, so a
            # top-k sequence whose row moved (a sequence below it finished) took a new
            # capture (~0.2-3 s on an 8B model, every sequence waiting) where its graph
            # would serve again (21-22 s of captures in 90 s, the headline's H100 run)
            rest = set(range(len(decode))).difference(topk)
            order = topk + sorted(rest)
            decode = [decode[i] for i in order]
            dec_seqs = [dec_seqs[i] for i in order]
        cap = min(self.config.max_batch_tokens, self._token_cap)
        budget = max(0, cap - len(decode))
        cut = self.config.prefill_cut_tokens
        cut = self.config.max_batch_tokens // 4 if cut is None else cut
        chunks: list[Chunk] = []
        pre_seqs: list[Sequence] = []
        for s in self.running:
            if s.state != PREFILL or budget == 0:
                continue
            toks = s.context_ids[s.num_prefilled:s.num_prefilled + budget]
            if s.fill_format != FULL:   # its prompt's room is taken a chunk at a time
                toks = self._fit_chunk(s, toks)
                self._set_stalled(s, not toks, now)
                if not toks:
                    continue
            last = s.num_prefilled + len(toks) == len(s.context_ids)
            chunks.append(Chunk(s.seq_id, toks, self.config.observe_window if last else 0,
                                "last" if last else "none"))
            pre_seqs.append(s)
            budget -= len(toks)
            if last and cut and cap - budget >= cut:
                # the step already holds enough work to run efficiently: the next
                # prompt's chunk would only hold this one's first token back (its
                # tokens advance it no sooner than a step of its own would)
                break
        if not decode and not chunks:
            return None
        return decode, dec_seqs, chunks, pre_seqs

    def _set_stalled(self, s: Sequence, stalled: bool, now: float) -> None:
        """A sequence's stall (no room for its next token or chunk) begins or ends:
        readers see it at once (it is pressure for the controller)."""
        if stalled != s.stalled:
            s.stalled = stalled
            if stalled:
                s.stalled_since = now
            self._changed = True

    # -- run ------------------------------------------------------------------------------
    def _run(self, decode, dec_seqs, chunks, pre_seqs):
        """The forward pass. If it raises, every length it advanced is rolled back; an
        out-of-memory step is retried with fewer tokens, any other failure ends only the
        sequences that were in the step, with reason 'error'."""
        seqs = dec_seqs + pre_seqs
        try:
            out = self._guarded([s.seq_id for s in seqs], lambda: self.runner.run(decode, chunks))
            self._token_cap = min(self.config.max_batch_tokens, self._token_cap * 2)
            return out
        except Exception as err:
            if is_oom(err) and self._token_cap > 1:
                self._token_cap = max(1, self._token_cap // 2)
                self.num_oom_retries += 1
                log.warning("out of memory in a step of %d tokens; retrying with at most %d",
                            len(decode) + sum(len(c.token_ids) for c in chunks),
                            self._token_cap)
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                return None
            self._fail_step(seqs, err, "in the model run")
            return None

    def _fail_step(self, seqs: list[Sequence], err: Exception, where: str) -> None:
        """End the sequences of a step that failed with reason 'error' (the others run
        on); the daemon's log has the traceback."""
        self.num_step_failures += 1
        log.error("engine step failed %s; ending the %d sequences in it", where, len(seqs),
                  exc_info=err)
        for s in seqs:
            self._finish(s, "error", error=f"internal error in the engine step: "
                                           f"{type(err).__name__}")

    def _sample(self, out, dec_seqs, chunks, pre_seqs, rows=None) -> _Sampled:
        """The step's tokens, drawn on the device and copied to pinned host memory
        without waiting (``_postprocess`` reads them), and its attention statistics
        started. ``rows``: the logits rows still wanted (a step launched ahead whose
        sequences partly ended since)."""
        sampled = list(dec_seqs) + [s for c, s in zip(chunks, pre_seqs) if c.logits == "last"]
        logits = out.logits if rows is None else out.logits[rows]
        if self.on_logits is not None and sampled:
            self.on_logits([s.seq_id for s in sampled], logits)
        self._after(out.plan, defer=self.device.type == "cuda", rows=rows)
        toks = sample_tokens(logits, [s.sampling for s in sampled],
                             [s.generator for s in sampled])
        if not toks.is_cuda:
            return _Sampled(sampled, toks, toks, None)
        host = torch.empty(toks.shape, dtype=toks.dtype, pin_memory=True)
        host.copy_(toks, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return _Sampled(sampled, toks, host, ready)

    def _launch_ahead(self, dec_seqs, pre_seqs, sampled: _Sampled) -> None:
        """Launch the next decode step now, fed the tokens just sampled on the device, so
        that the GPU runs it while the host reads and streams this step's tokens and
        builds the next plan (vLLM's async scheduling). Only in a steady decode: every
        running sequence in this step, none about to end by length, nothing waiting to
        be admitted or in the inbox, a captured graph for the step (or ``overlap_steps =
        "on"``: eager, the tokens read first). A sequence that ends on this step's token
        gives its row back (``_drop_ahead``)."""
        mode, graphs = self.config.overlap_steps, self.runner.graphs
        if mode == "off" or (graphs is None and mode != "on") or pre_seqs or not dec_seqs:
            return
        if self.on_logits is not None or self._inbox or len(dec_seqs) != len(self.running) \
                or (self.waiting and len(self.running) < self.config.max_running):
            return
        for s in dec_seqs:
            if s.state != DECODE or s.stalled or len(s.output_ids) + 1 >= s.sampling.max_tokens \
                    or len(s.prompt_ids) + len(s.output_ids) + 1 >= self.max_positions \
                    or staging_need(self.store, s.seq_id):
                return
        try:
            for s in dec_seqs:
                self.store.reserve(s.seq_id, 1)
        except OutOfBlocks:
            return              # the next step schedules as usual (and stalls if it must)
        ids = [s.seq_id for s in dec_seqs]
        try:
            if graphs is not None:
                decode = [(sid, 0) for sid in ids]
                key = graphs.key(decode)
                if key not in graphs.graphs:
                    return      # eager steps need their tokens on the host: not ahead
                res = self._guarded(ids, lambda: graphs.run(key, decode, ids=sampled.tokens))
                out = StepOutput(*res)
            else:
                decode = list(zip(ids, sampled.tokens.tolist()))
                out = self._guarded(ids, lambda: self.runner.run(decode, []))
        except Exception:   # rolled back: the next step runs it the usual way
            log.exception("a decode step launched ahead failed; it runs again in order")
            return
        self._ahead = _Ahead(out, list(dec_seqs))
        self.num_overlapped += 1

    def _drop_ahead(self, s: Sequence) -> None:
        """``s`` leaves the running set while a step launched ahead holds a row of it:
        that row's token is never read and the position it wrote is given back."""
        a = self._ahead
        if a is None or s.seq_id in a.dropped or s.seq_id not in a.ids:
            return
        a.dropped.add(s.seq_id)
        kv = self.store.seqs.get(s.seq_id)
        if kv is not None:
            self.store.truncate(s.seq_id, kv.num_tokens - 1)
            self.store.unreserve(s.seq_id)
        if len(a.dropped) == len(a.seqs):
            self._ahead = None

    def _unlaunch_ahead(self) -> None:
        """Forget the step launched ahead (its GPU work is queued before anything that
        comes after): every sequence as if it never ran. For commands run at once
        between two ``step`` calls (no engine thread) and for ``stop``."""
        a = self._ahead
        if a is not None:
            for s in list(a.seqs):
                self._drop_ahead(s)
        self._ahead = None

    def _postprocess(self, dec_seqs, chunks, pre_seqs, sampled: _Sampled) -> None:
        for c, s in zip(chunks, pre_seqs):
            s.num_prefilled += len(c.token_ids)
        self._index_filled(dec_seqs + pre_seqs)
        self._fill_quantize()
        toks = sampled.read()
        for s, t in zip(sampled.seqs, toks):
            if s.state == PREFILL:
                s.state = DECODE
                self._changed = True
            self._on_token(s, t)
        self.step_count += 1
        self._dirty = True
        self.tokens_out += len(toks)
        self._tok_window.append((time.monotonic(), len(toks)))

    def _fill_quantize(self) -> None:
        """Blocks that filled in a sequence with a fill format take that format (a
        prompt's too, chunk by chunk, so it never holds more than about a chunk at full
        precision)."""
        for s in self.running:
            if s.fill_format == FULL or s.state not in (DECODE, PREFILL) \
                    or s.seq_id not in self.store.seqs:
                continue
            idx = moves.fill_candidates(self.store, s.seq_id)
            if idx:
                try:
                    moves.quantize(self.store, s.seq_id, idx, s.fill_format)
                except ActionError as err:  # no room to convert now: try next step
                    log.debug("fill quantization of %s deferred: %s", s.seq_id, err)

    def _on_token(self, s: Sequence, t: int) -> None:
        hit = s.add_token(t, self.tokenizer)
        p = s.sampling
        reason = ""
        if hit or (t in self.eos_ids and not p.ignore_eos):
            reason = "stop"
        elif len(s.output_ids) >= p.max_tokens or \
                len(s.prompt_ids) + len(s.output_ids) >= self.max_positions:
            reason = "length"
        if reason and not hit:
            s.flush_text(self.tokenizer)
        try:
            s.emit_token(final=bool(reason))
        except Exception:  # a broken consumer must not break the engine
            log.exception("event consumer of %s failed; cancelling it", s.seq_id)
            reason = "cancelled"
        if reason:
            self._finish(s, reason)

    # -- pressure -------------------------------------------------------------------------
    def _check_stalls(self) -> None:
        """A sequence stalled for ``preempt_after_s`` (the controller's moves did not make
        room in time) preempts the lowest-priority running sequence, newest first."""
        stalled = [s for s in self.running if s.stalled]
        if not stalled:
            return
        now = time.monotonic()
        if now - min(s.stalled_since for s in stalled) < self.config.preempt_after_s:
            return
        if any(self._has_room_alone(s) for s in stalled):
            return          # sequences finished in this step: their blocks are free now
        if self._drop_lru_idle("a running sequence found no room"):
            for s in stalled:   # idle sessions go before any running sequence
                s.stalled_since = now
            return
        if len(self.running) == 1:
            # alone and still no room: nothing else holds GPU blocks to give back
            s = self.running[0]
            s.moves.append("stopped: the GPU tier holds no more of its KV")
            self._finish(s, "length")
            return
        victim = min(self.running, key=lambda x: (x.priority, -x.arrival))
        self.preempt(victim)
        for s in self.running:
            if s.stalled:
                s.stalled_since = now

    def _least_chunk(self, s: Sequence) -> int:
        """Tokens of the least prefill chunk a prompt written a chunk at a time (a lossy
        fill format) takes before it stalls: an eighth of a step's budget (a block at
        least), or what is left of the prompt."""
        least = max(self.store.block_size, self.config.max_batch_tokens // 8)
        return min(len(s.context_ids) - s.num_prefilled, least)

    def _fit_chunk(self, s: Sequence, toks: list[int]) -> list[int]:
        """The longest head of ``toks`` (halving, whole blocks) whose room is reserved
        now, down to ``_least_chunk``; [] when even that has none (the prompt stalls).
        Stalled for a whole step's chunk instead, an H100 headline run put 28 decoding
        sequences on top-k pages to free the 1 GiB of one 8,192-token chunk, and every
        later step ran eager at ~140 ms (docs/BENCHMARKS.md, thirteenth session)."""
        least, T, n = self._least_chunk(s), self.store.block_size, len(toks)
        while True:
            try:
                self.store.reserve(s.seq_id, n)
                return toks[:n]
            except OutOfBlocks:
                if n <= least:
                    return []
                n = max(least, n // 2 // T * T)

    def _has_room_alone(self, s: Sequence) -> bool:
        """Whether a decoding sequence's next token fits now with no other sequence in
        the step: a block to write into and staging for its offloaded blocks (for a
        prompt written a chunk at a time, its least chunk). Its ``stalled`` flag is from
        this step's schedule, before finishes freed blocks."""
        if s.state == PREFILL:
            return self.store.can_reserve(s.seq_id, self._least_chunk(s))
        return (staging_need(self.store, s.seq_id) <= self.store.staging_half
                and self.store.can_reserve(s.seq_id, 1))

    def preempt(self, s: Sequence, paused: bool = False) -> str:
        """Take a running sequence off the GPU until there is room again: its KV swapped
        to the host tier (exact), or dropped and recomputed from its tokens when the
        host cannot hold it (or it is still in prefill). Returns 'swap' or 'recompute'.
        ``paused`` (the controller's Pause): swap or raise ActionError, nothing changed;
        counted in ``num_paused``, not as a preemption."""
        if paused:
            moves.check_swap_out(self.store, s.seq_id)
        mode = "recompute"
        self._drop_ahead(s)
        if s.state == DECODE and self.store.has_host():
            try:
                s.swapped = moves.swap_out(self.store, s.seq_id)
                mode = "swap"
            except ActionError:
                pass
        if mode == "recompute":
            self.store.free_sequence(s.seq_id)
            self.stats.pop(s.seq_id, None)
            s.context_ids = s.prompt_ids + s.output_ids
            s.num_prefilled = 0
            s.swapped = []
        self.running.remove(s)
        s.state, s.stalled = PREEMPTED, False
        if paused:
            self.num_paused += 1
        else:
            s.num_preemptions += 1
            self.num_preemptions += 1
        what = "paused (swapped out)" if paused else f"preempted ({mode})"
        s.moves.append(what)
        self.waiting.appendleft(s)
        self._changed = True
        log.info("%s %s to make room", what, s.seq_id)
        return mode

    # -- finish ---------------------------------------------------------------------------
    def _finish(self, s: Sequence, reason: str, error: str = "") -> None:
        if s.state == FINISHED:
            return
        self._drop_ahead(s)
        by_tier, by_fmt = ({}, {})
        if s.seq_id in self.store.seqs:
            by_tier, by_fmt = self.store.bytes_by(s.seq_id)
        if s in self.waiting:
            self.waiting.remove(s)
        elif s in self.running:
            self.running.remove(s)
        self.held.pop(s.seq_id, None)
        kept = False
        if s.request.session_id:         # a turn of a session: its KV may stay, idle
            kept = s.state == DECODE and self._keep_session(s, reason)
            if not kept:
                self._session_done(s.request.session_id, s.seq_id)
            self._unkept.discard(s.seq_id)
        s.state = FINISHED
        s.finish_reason = reason
        if not kept:
            self.store.free_sequence(s.seq_id)
            self.stats.pop(s.seq_id, None)
        self.seqs.pop(s.seq_id, None)
        self._changed = True
        with self._ids_lock:
            self._live.discard(s.seq_id)
            if not s.admitted:
                self._num_queued -= 1
                s.admitted = True
        try:
            s.on_event(s.finish_event(reason, by_tier, by_fmt, error))
        except Exception:  # a broken consumer must not break the engine
            log.exception("event consumer of %s failed", s.seq_id)

    # -- candidates (the controller's moves) ----------------------------------------------
    def apply_candidates(self, candidates) -> list[CandidateResult]:
        """Engine thread: each candidate whole or not at all, in order."""
        out = []
        for actions in candidates:
            actions = tuple(actions)
            res = CandidateResult(actions)
            try:
                # a fill format is no move (any state before the end, no blocks change):
                # checked first, set once the candidate's moves are applied
                fills = self._fill_formats([a for a in actions if isinstance(a, SetFillFormat)])
                moved = tuple(a for a in actions if not isinstance(a, SetFillFormat))
                for sid in {a.seq_id for a in moved}:
                    self._check_movable_seq(sid)
                if any(isinstance(a, DropSession) for a in moved):
                    res.results = [self._apply_drop(moved)]
                elif any(isinstance(a, Pause) for a in moved):
                    res.results = [self._apply_pause(moved)]
                elif moved:
                    res.results = apply_mod.apply_candidate(self.store, moved, self._note)
                    for sid in {a.seq_id for a in moved if isinstance(a, Evict)}:
                        self._rebase_stats(sid)
                for a, s, fmt in fills:
                    s.fill_format = fmt
                    self._note(a.seq_id, f"fill format -> {fmt.name}")
                    res.results.append(ActionResult(a, True, {}, f"fill format -> {fmt.name}"))
            except ActionError as err:
                res.error = str(err)
            out.append(res)
        self._changed = True
        return out

    def _rebase_stats(self, sid: str) -> None:
        """After an eviction: the statistics describe the blocks still attended."""
        st, kv = self.stats.get(sid), self.store.seqs.get(sid)
        if st is not None and kv is not None:
            st.rebase([b.index for b in kv.blocks if b.tier in (GPU, HOST)])

    def _apply_drop(self, actions) -> ActionResult:
        a = actions[0]
        if len(actions) != 1:
            raise ActionError("DropSession is a candidate of its own")
        if a.seq_id not in self.idle:
            raise ActionError(f"{a.seq_id} is not an idle session")
        by_tier, _ = self.store.bytes_by(a.seq_id)
        sess_id = self.idle[a.seq_id].request.session_id
        self._drop_idle(a.seq_id)
        self.sessions.pop(sess_id, None)
        self.num_sessions_dropped += 1
        return ActionResult(a, True, by_tier, f"drop session {sess_id}")

    def _apply_pause(self, actions) -> ActionResult:
        a = actions[0]
        if len(actions) != 1:
            raise ActionError("Pause is a candidate of its own")
        s = self.seqs.get(a.seq_id)       # an idle session's sequence is not in seqs
        if s is None or s.state != DECODE or s not in self.running:
            state = s.state if s is not None else "an idle session"
            raise ActionError(f"{a.seq_id} is {state}: only a decoding sequence can be "
                              "paused")
        if len(self.running) < 2:
            raise ActionError(f"{a.seq_id} runs alone: pausing it frees room for nothing "
                              "that runs")
        by_tier, _ = self.store.bytes_by(a.seq_id)
        self.preempt(s, paused=True)
        return ActionResult(a, True, {GPU: by_tier.get(GPU, 0)},
                            f"paused: {by_tier.get(GPU, 0)} B swapped to host")

    def _fill_formats(self, actions) -> list[tuple]:
        """(action, sequence, format) of each SetFillFormat, or ActionError: the format
        a sequence's blocks take as they fill, in any state before its end (one still
        waiting is admitted at that format's bytes, as a request's ``kv_format`` is)."""
        out = []
        for a in actions:
            s = self.seqs.get(a.seq_id) or self.idle.get(a.seq_id)
            if s is None or s.state == FINISHED:
                raise ActionError(f"unknown sequence {a.seq_id!r} (finished, or never "
                                  "submitted)")
            out.append((a, s, FULL if a.bits == 0 and not a.v_bits
                        else moves.check_format(a.bits, a.v_bits, a.fp8)))
        return out

    def _check_movable_seq(self, seq_id: str) -> None:
        s = self.seqs.get(seq_id) or self.idle.get(seq_id)
        if s is None or seq_id not in self.store.seqs:
            raise ActionError(f"unknown sequence {seq_id!r} (finished, or never admitted)")
        if s.state not in (DECODE, HELD, IDLE):
            raise ActionError(f"{seq_id} is {s.state}: only sequences past their prompt "
                              "(decoding) can be moved")

    def _note(self, seq_id: str, what: str) -> None:
        s = self.seqs.get(seq_id) or self.idle.get(seq_id)
        if s is not None:
            s.moves.append(what)

    # -- snapshots ------------------------------------------------------------------------
    def _publish(self, force: bool = False) -> None:
        """A new snapshot for readers: after a structural change (admission, state change,
        finish, preemption, a move) at the end of the step, unless one was published in
        the last STRUCTURAL_GAP_S; else at most every ``snapshot_interval_s`` while steps
        only make progress; either way, building them takes at most PUBLISH_SHARE of the
        engine thread's time. Building one walks every block of every sequence (~5 ms at
        64 sequences x 33 blocks on the H100 host), so it must not happen every step."""
        now = time.monotonic()
        since = now - self._published_at
        # the last build's cost, spread so building takes at most PUBLISH_SHARE of the time
        spread = self._build_s * (1.0 / PUBLISH_SHARE - 1.0)
        if not force and not (self._changed and since >= max(STRUCTURAL_GAP_S, spread)) \
                and not (self._dirty and since >= max(self.config.snapshot_interval_s,
                                                      spread)):
            return
        self._snapshot = snapshot.build(self, next(self._version))
        self._published_at = time.monotonic()
        self._build_s = self._published_at - now
        self._dirty = self._changed = False

    def snapshot(self):
        """The newest published snapshot (never waits for a step). Without an engine
        thread the caller is the writer: the snapshot is built now."""
        if not self.threaded:
            with self._step_lock:
                self._publish(force=True)
        return self._snapshot

    def tokens_per_s(self) -> float:
        w = self._tok_window
        if len(w) < 2 or time.monotonic() - w[-1][0] > IDLE_RATE_S:
            return 0.0
        dt = w[-1][0] - w[0][0]
        return sum(n for _, n in list(w)[1:]) / dt if dt > 0 else 0.0



def _run_into(fn: Callable[[], Any], fut: Future) -> None:
    try:
        fut.set_result(fn())
    except BaseException as e:      # delivered to whoever posted it
        fut.set_exception(e)
