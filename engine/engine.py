"""The engine: a model, a paged KV store, a continuous-batching step loop.

Mechanism only. It admits requests while the KV budget has room, packs the decode
tokens of all running sequences with chunks of prefill into one varlen batch per step,
samples, streams events, and keeps attention statistics. It never decides what to
compress or move: the controller does, through ``EngineHandle`` (engine/handle.py).
"""
from __future__ import annotations

import itertools
import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from engine import attention, moves
from engine.actions import ActionError
from engine.api import Event, FinishEvent, Request
from engine.arena import OutOfBlocks
from engine.layout import FULL, BlockGeometry
from engine.models import load_model
from engine.plan import build_plan
from engine.sampler import make_generator, sample_batch
from engine.staging import staging_need
from engine.sequence import DECODE, FINISHED, PREFILL, WAITING, Sequence
from engine.stats import SeqStats, update_batch
from engine.store import GPU, KVStore

log = logging.getLogger("kvctl.engine")

CPU_DEFAULT_BUDGET = 2 << 30


@dataclass
class EngineConfig:
    model: str = "default"
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 32
    kv_budget_bytes: int | None = None     # device arena; default: fraction of free memory
    kv_budget_fraction: float = 0.9        # of free GPU memory after loading the model
    host_budget_bytes: int | None = None   # host arena (offload / parking); default 4 GiB
    max_batch_tokens: int = 1024           # tokens one step packs (decode + prefill chunks)
    max_running: int = 256
    num_threads: int | None = None         # CPU threads for torch (None: leave as is)
    thread_nice: int = 0                   # nice of the step thread (Linux; 0: unchanged)
    observe_window: int = 32               # SnapKV window over the prompt's last tokens
    stats_decay: float = 0.9
    value_group: int = 32
    page_bytes: int | None = None
    staging_bytes: int | None = None       # device buffer for streaming offloaded blocks
    num_sink_blocks: int = 1               # leading blocks eviction may not touch
    seed: int = 0

    def __post_init__(self) -> None:
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0 < self.kv_budget_fraction <= 1:
            raise ValueError("kv_budget_fraction must be in (0, 1]")
        if self.kv_budget_bytes is not None and self.kv_budget_bytes <= 0:
            raise ValueError("kv_budget_bytes must be positive")
        if not 0 <= self.thread_nice <= 19:
            raise ValueError(f"thread_nice must be in 0..19, got {self.thread_nice}")
        if self.max_batch_tokens < 1:
            raise ValueError("max_batch_tokens must be >= 1")


class Engine:
    def __init__(self, config: EngineConfig | None = None, **overrides):
        cfg = config or EngineConfig(**overrides)
        self.config = cfg
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        lm = load_model(cfg.model, cfg.device, cfg.dtype, seed=cfg.seed)
        self.model = attention.prepare_model(lm.model)
        self.tokenizer = lm.tokenizer
        self.model_name = lm.name
        self.device = lm.device
        self.dtype = lm.dtype
        mc = self.model.config
        self.num_layers = mc.num_hidden_layers
        self.max_positions = getattr(mc, "max_position_embeddings", 1 << 30)
        head_dim = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
        self.geom = BlockGeometry(cfg.block_size, mc.num_key_value_heads, head_dim,
                                  self.dtype, value_group=min(cfg.value_group, head_dim))
        self.store = KVStore(self.geom, self.num_layers, self.device, self._gpu_budget(),
                             self._host_budget(), cfg.page_bytes, cfg.staging_bytes,
                             cfg.num_sink_blocks)
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        self.eos_ids = set([eos] if isinstance(eos, int) else (eos or []))
        if self.tokenizer is not None and self.tokenizer.eos_token_id is not None:
            self.eos_ids.add(self.tokenizer.eos_token_id)

        self.lock = threading.RLock()
        self._wake = threading.Condition(self.lock)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.stats: dict[str, SeqStats] = {}
        self._ids = itertools.count(1)
        self.step_count = 0
        self.tokens_out = 0
        self._tok_window: deque[tuple[float, int]] = deque(maxlen=64)
        self._thread: threading.Thread | None = None
        self._stop = False
        # optional tap on every sampled row: (seq_ids, logits [n, V]); traces, tests
        self.on_logits: Callable[[list[str], torch.Tensor], None] | None = None
        from engine.handle import EngineHandle
        self.handle = EngineHandle(self)

    # -- budgets --------------------------------------------------------------------------
    def _gpu_budget(self) -> int:
        cfg = self.config
        if cfg.kv_budget_bytes is not None:
            return cfg.kv_budget_bytes
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * cfg.kv_budget_fraction)
        return CPU_DEFAULT_BUDGET

    def _host_budget(self) -> int:
        if self.config.host_budget_bytes is not None:
            return self.config.host_budget_bytes
        return 4 << 30

    # -- requests -------------------------------------------------------------------------
    def tokenize(self, req: Request) -> list[int]:
        if req.prompt_ids is not None:
            ids = [int(t) for t in req.prompt_ids]
            vocab = self.model.config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"token ids out of the vocabulary [0, {vocab}): {bad[:5]}")
            return ids
        if self.tokenizer is None:
            raise ValueError(f"model {self.model_name} has no tokenizer: give prompt_ids")
        if req.messages is not None:
            out = self.tokenizer.apply_chat_template(req.messages, add_generation_prompt=True,
                                                     tokenize=True)
            return list(out["input_ids"] if hasattr(out, "keys") else out)
        return self.tokenizer(req.prompt)["input_ids"]

    def submit(self, req: Request, on_event: Callable[[Event], None]) -> str:
        """Queue a request; events arrive on ``on_event`` from the engine thread."""
        ids = self.tokenize(req)
        if not ids:
            raise ValueError("empty prompt")
        if len(ids) >= self.max_positions:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the model's context of "
                             f"{self.max_positions}")
        need = self.store.estimate_bytes(len(ids) + 1)
        cap = self.store.arenas[GPU].capacity_bytes
        if need > cap:
            raise ValueError(f"prompt of {len(ids)} tokens needs {need} bytes of KV at full "
                             f"precision; the budget is {cap} bytes")
        with self.lock:
            sid = req.seq_id or f"seq-{next(self._ids)}"
            if sid in self.seqs:
                raise ValueError(f"sequence id {sid!r} is already in use")
            s = Sequence(sid, req, ids, on_event, make_generator(req.sampling, self.device))
            self.seqs[sid] = s
            self.waiting.append(s)
            self._wake.notify_all()
        return sid

    def cancel(self, seq_id: str) -> bool:
        with self.lock:
            s = self.seqs.get(seq_id)
            if s is None or s.state == FINISHED:
                return False
            self._finish(s, "cancelled")
            return True

    def generate(self, req: Request, timeout: float | None = None) -> Iterator[Event]:
        """Blocking iterator over a request's events (runs the loop inline if no thread)."""
        q: queue.Queue = queue.Queue()
        sid = self.submit(req, q.put)
        while True:
            if self._thread is None:
                while q.empty():
                    self.step()
            ev = q.get(timeout=timeout)
            yield ev
            if isinstance(ev, FinishEvent) and ev.seq_id == sid:
                return

    # -- loop -----------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="kvctl-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        with self.lock:
            self._stop = True
            self._wake.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

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
            with self.lock:
                if self._stop:
                    return
                if not self.waiting and not self.running:
                    self._wake.wait(0.5)
                    continue
            try:
                worked = self.step()
            except Exception:  # a bad step must not kill the daemon: fail its sequences
                log.exception("engine step failed; failing the sequences in it")
                with self.lock:
                    for s in list(self.running):
                        self._finish(s, "error", error="internal error in the engine step")
                continue
            if not worked:
                with self.lock:
                    self._wake.wait(0.05)  # stalled on memory: wait for the controller

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        alloc = self.store.arenas[GPU].alloc
        slot = self.geom.slot_bytes(FULL)
        while self.waiting and len(self.running) < self.config.max_running:
            s = max(self.waiting, key=lambda x: (x.priority, -x.arrival))
            # the whole prompt plus one block of growth must fit now
            if not alloc.can_allocate(slot, self.store.blocks_for(len(s.prompt_ids)) + 1):
                return
            self.waiting.remove(s)
            self.store.add_sequence(s.seq_id)
            self.store.reserve(s.seq_id, len(s.prompt_ids))
            self.stats[s.seq_id] = SeqStats(decay=self.config.stats_decay)
            s.state = PREFILL
            self.running.append(s)

    def step(self) -> bool:
        """One engine step; False when nothing could run (idle or stalled on memory)."""
        with self.lock:
            self._admit()
            decode: list[tuple[str, int]] = []
            dec_seqs: list[Sequence] = []
            staging_left = self.store.staging_half
            for s in self.running:
                if s.state != DECODE:
                    continue
                need = staging_need(self.store, s.seq_id)
                if need > staging_left:  # offloaded blocks of others fill staging now
                    s.stalled = True
                    continue
                staging_left -= need
                try:
                    self.store.reserve(s.seq_id, 1)
                except OutOfBlocks:
                    s.stalled = True
                    continue
                s.stalled = False
                decode.append((s.seq_id, s.output_ids[-1]))
                dec_seqs.append(s)
            budget = max(0, self.config.max_batch_tokens - len(decode))
            chunks: list[tuple[str, list[int], int]] = []
            pre_seqs: list[tuple[Sequence, bool]] = []
            for s in self.running:
                if s.state != PREFILL or budget == 0:
                    continue
                toks = s.prompt_ids[s.num_prefilled:s.num_prefilled + budget]
                last = s.num_prefilled + len(toks) == len(s.prompt_ids)
                chunks.append((s.seq_id, toks, self.config.observe_window if last else 0))
                pre_seqs.append((s, last))
                budget -= len(toks)
            if not decode and not chunks:
                return False
            plan = build_plan(self.store, decode, chunks, self.num_layers, self.device)
            # host copies: reading the device tensor row by row would sync once a row
            rows = list(plan.decode.row_list) if plan.decode is not None else []
            sampled = list(dec_seqs)
            for seg, (s, last) in zip(plan.prefills, pre_seqs):
                s.num_prefilled += seg.length
                if last:
                    rows.append(seg.start + seg.length - 1)
                    sampled.append(s)
            logits = attention.forward(self.model, plan.input_ids, plan.position_ids, plan,
                                       torch.tensor(rows, dtype=torch.long, device=self.device))
            if self.on_logits is not None and sampled:
                self.on_logits([s.seq_id for s in sampled], logits)
            self._update_stats(plan)
            self._fill_quantize()
            toks = sample_batch(logits, [s.sampling for s in sampled],
                                [s.generator for s in sampled])
            for s, t in zip(sampled, toks):
                if s.state == PREFILL:
                    s.state = DECODE
                self._on_token(s, t)
            self.step_count += 1
            self.tokens_out += len(toks)
            self._tok_window.append((time.monotonic(), len(toks)))
            return True

    def _update_stats(self, plan) -> None:
        shares = plan.block_shares()
        if shares is not None:
            sids = plan.decode.seq_ids
            update_batch([self.stats[sid] for sid in sids], shares.cpu(),
                         [len(self.store.seqs[sid].blocks) for sid in sids])
        for sid, scores in plan.observed.items():
            self.stats[sid].observe(scores.cpu(), plan.accumulated[sid].cpu())

    def _fill_quantize(self) -> None:
        """Blocks that filled in a sequence with a fill format take that format."""
        for s in self.running:
            kv = self.store.seqs.get(s.seq_id)
            if kv is None or kv.fill_format == FULL:
                continue
            idx = moves.fill_candidates(self.store, s.seq_id)
            if idx:
                try:
                    moves.quantize(self.store, s.seq_id, idx, kv.fill_format)
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

    def _finish(self, s: Sequence, reason: str, error: str = "") -> None:
        if s.state == FINISHED:
            return
        by_tier, by_fmt = ({}, {})
        if s.seq_id in self.store.seqs:
            by_tier, by_fmt = self.store.bytes_by(s.seq_id)
        if s.state == WAITING:
            self.waiting.remove(s)
        elif s in self.running:
            self.running.remove(s)
        s.state = FINISHED
        s.finish_reason = reason
        self.store.free_sequence(s.seq_id)
        self.stats.pop(s.seq_id, None)
        self.seqs.pop(s.seq_id, None)
        try:
            s.on_event(s.finish_event(reason, by_tier, by_fmt, error))
        except Exception:  # a broken consumer must not break the engine
            log.exception("event consumer of %s failed", s.seq_id)

    def tokens_per_s(self) -> float:
        w = self._tok_window
        if len(w) < 2:
            return 0.0
        dt = w[-1][0] - w[0][0]
        return sum(n for _, n in list(w)[1:]) / dt if dt > 0 else 0.0
