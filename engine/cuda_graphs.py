"""Decode steps replayed as CUDA graphs.

A decode step of the eager runner launches ~30 kernels a layer from Python; at batch 1
on an 8B model that launch overhead, not the GPU, set the step time (45 ms against a
5.5 ms weight-read floor, issue 13). Here a decode-only step runs as one captured CUDA
graph: the whole model forward (transformers' modules with kvctl attention and the
paged decode kernel inside) reads static input buffers that each step fills with one
host-to-device copy from pinned memory.

A graph is captured per (batch bucket, table-width bucket, KV formats) the first time
such a step comes, into one memory pool shared by all graphs; padded rows write their
K/V into a scratch slot and attend over it. A step outside what graphs cover (prefill
chunks, offloaded blocks streamed through staging, more than MAX_FORMATS formats, a
graph whose capture failed) runs eager for that step and is counted (``num_eager``). A
table mixing formats replays a graph of its set of formats (one kernel launch per format
and layer, columns grouped on the device).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch

from engine import attention
from engine.layout import FULL, KVFormat
from engine.plan import DecodeBatch, StepPlan, build_plan, ints
from engine.staging import Stager, TopKSeq
from engine.store import GPU, HOST, KVStore

log = logging.getLogger("kvctl.engine.graphs")

BATCH_BUCKETS = (1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256)
MIN_WIDTH = 16          # table columns of the narrowest graph
# formats one graph's table may hold (a kernel launch each a layer, two formats a launch):
# the seven the policy writes (full, int8, fp8, int4, k8v4, k4v2, int2) and one more.
# At 4, a batch of adaptive sequences (their blocks in full, int8, int4, k4v2 and int2
# on a 2-core capacity run, 2026-12-06) ran every step eager, 4-5x a replay
MAX_FORMATS = 8
MAX_TOPK_GRAPHS = 4     # graphs with top-k rows kept (each holds its rows' key summaries)
# steps in a row a new set of top-k rows runs eager before its graph is captured. Each
# top-k offload makes a new set, and under pressure they come every few steps: on the
# headline's H100 run adaptive spent 21-22 s of ~90 capturing (0.2-3 s a capture, every
# sequence waiting), where an eager step costs a few times a replay (tens of ms)
TOPK_CAPTURE_AFTER = 4
# a graph of a larger batch bucket serves a smaller batch up to this many rows (or 4x the
# batch): a decode step's GEMMs at up to 64 rows read the weights, their cost
PAD_ROWS_MAX = 64


def _bucket(n: int, buckets) -> int | None:
    for b in buckets:
        if n <= b:
            return b
    return None


def _width(nb: int) -> int:
    w = MIN_WIDTH
    while w < nb:
        w *= 2
    return w


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    plan: StepPlan              # its tensors are the static buffers the graph reads
    flat: torch.Tensor          # [n] int64 device: every input, packed
    pinned: list                # two [n] int64 pinned host twins of ``flat``, in turn
    copied: list                # per twin: the event after its last copy (or None)
    pad: torch.Tensor           # [n] int64 host: the buffers of an all-padding batch
    views: dict                 # name -> (start, shape) in ``flat``
    logits: torch.Tensor        # [B, V] static output
    B: int
    NB: int
    # every other tensor the graph reads, allocated outside its pool: the graph holds
    # raw addresses, so one freed and reallocated is read as garbage (the logits rows,
    # referenced only by the capture's closure, once were: the second row's logits
    # came from other memory)
    inputs: dict
    topk: tuple = ()            # (row, entries, picks, slot) of each top-k sequence
    summ_src: list = field(default_factory=list)  # per top-k row: the summaries copied in


@dataclass
class GraphStats:
    num_graphs: int = 0
    num_replays: int = 0
    num_eager: int = 0          # decode-only steps that graphs could not take
    capture_seconds: float = 0.0
    capture_bytes: int = 0      # device memory the graph pool took
    eager_reasons: dict = field(default_factory=dict)
    # seconds an engine step took, decode-only steps that replayed a graph and those
    # that ran eager (moving averages; 0 until one ran): what losing the graphs costs
    # (the controller prices an exact offload, whose batch runs eager, with it)
    replay_step_s: float = 0.0
    eager_step_s: float = 0.0
    # decode-only steps with top-k rows (picks and gathers from host memory, replayed or
    # eager) apart, and how many such rows they had: what a top-k row adds to a step
    # (the controller prices a top-k offload with it)
    topk_step_s: float = 0.0
    topk_rows: float = 0.0

    def note_step(self, replayed: bool, seconds: float, topk_rows: int = 0,
                  alpha: float = 0.1) -> None:
        def ema(name: str, x: float) -> None:
            old = getattr(self, name)
            setattr(self, name, x if old == 0.0 else old + alpha * (x - old))
        if topk_rows:
            ema("topk_step_s", seconds)
            ema("topk_rows", float(topk_rows))
        else:
            ema("replay_step_s" if replayed else "eager_step_s", seconds)


class DecodeGraphs:
    def __init__(self, model, store: KVStore, num_layers: int, device: torch.device,
                 max_batch: int, compiled=None) -> None:
        self.model = model
        self.compiled = compiled      # attention.compile_model(model), captured instead
        self.store = store
        self.num_layers = num_layers
        self.device = device
        self.buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (
            _bucket(max_batch, BATCH_BUCKETS) or max_batch,)
        self.max_width = max(MIN_WIDTH, _width(store.blocks_for(
            getattr(model.config, "max_position_embeddings", 1 << 17))))
        self.graphs: dict[tuple, _Graph] = {}
        self.failed: dict[tuple, str] = {}   # keys whose capture raised: eager, with why
        self.start_width = 0          # table width of the graphs captured at start-up
        self._topk_seen: tuple = (None, 0)   # the last uncaptured top-k key, steps in a row
        self.pool = torch.cuda.graph_pool_handle()
        self.stats = GraphStats()
        if store.scratch_offset < 0:
            raise ValueError("CUDA graphs need the store's scratch page (KVStore(scratch=True))")
        self.scratch = store.scratch_offset  # padded rows write and read here

    def capture_at_start(self, tokens: int) -> None:
        """Capture the full-precision graph of every batch bucket for contexts up to
        ``tokens`` (its table-width bucket) now, so the first steps at each batch size
        do not stall on a capture. A capture that fails is logged and that key runs
        eager (as in ``run``). Time and pool memory go to ``stats`` (status shows them)."""
        if tokens <= 0:
            return
        width = min(self.max_width, _width(self.store.blocks_for(tokens) + 1))
        self.start_width = width      # narrower tables use these graphs (holes past them)
        t0 = time.perf_counter()
        for B in self.buckets:
            key = (B, width, (FULL,), ())
            if key not in self.graphs and key not in self.failed:
                self._try_capture(key)
        log.info("decode graphs captured at start-up", extra={"kv": {
            "graphs": len(self.graphs), "table_width": width, "context_tokens": tokens,
            "seconds": round(time.perf_counter() - t0, 3),
            "pool_bytes": self.stats.capture_bytes, "failed": len(self.failed)}})

    # -- which steps -----------------------------------------------------------------------
    def key(self, decode: list[tuple[str, int]]) -> tuple | str:
        """The graph for this decode-only step, or why it must run eager. A graph is
        keyed by (batch bucket, table-width bucket, the formats its table holds): a
        table of several formats (a sequence quantized in part: its newest block is
        always full precision) replays a graph that groups the columns by format on the
        device and launches the kernel once per format."""
        B = _bucket(len(decode), self.buckets)
        if B is None:
            return "batch beyond the largest graph"
        fmts: set[KVFormat] = set()
        nb = 1
        topk = []
        for row, (sid, _) in enumerate(decode):
            kv = self.store.seqs[sid]
            nb = max(nb, len(kv.blocks) + 1)
            host, hfmts = 0, set()
            last = None     # a sequence's blocks come in runs of one format: add it once
            for b in kv.blocks:
                if b.tier == GPU:
                    if b.fmt is not last:
                        fmts.add(b.fmt)
                        last = b.fmt
                elif b.tier == HOST:
                    host += 1
                    hfmts.add(b.fmt)
            if host:
                if kv.decode_mode != "topk":
                    return "offloaded blocks stream through staging"
                fmts |= hfmts
                # (row, offloaded blocks' bucket, picks, staging slot): the picks run on
                # the device, so the graph covers them
                topk.append((row, _width(host), min(kv.top_k, host),
                             max(self.store.geom.slot_bytes(f) for f in hfmts)))
        if len(fmts) > MAX_FORMATS:
            return f"more than {MAX_FORMATS} formats in one table"
        width = max(_width(nb), self.start_width)
        if width > self.max_width:
            return "table wider than the model's context"
        key = (B, width, tuple(sorted(fmts, key=lambda f: f.code)) or (FULL,), tuple(topk))
        if key not in self.graphs and key not in self.failed:
            # a graph of a wider table serves a narrower one (holes past its columns, as
            # the start-up graphs serve short contexts; per-row splits read each row's
            # own blocks): no capture (~0.5 s on an 8B model) for every width a batch
            # bucket passes through when long and short sequences come and go. A table of
            # three or more formats also replays a graph of more formats (the absent
            # formats' runs are empty: a launch each that reads nothing), so the sets of
            # formats a batch passes through as its sequences move do not each take a
            # capture; the fewest extra formats first, then the narrowest. Two formats
            # (a pinned format's steady state: old blocks in it, the newest full) keep
            # their own graph: one launch reads both runs of a row
            # A graph of a larger batch bucket serves a smaller batch the same way (its
            # rows past the batch are padding, as within a bucket): a decode step's
            # GEMMs read the weights whatever their rows, so 48 rows cost about what 8
            # do, where a capture holds every sequence (0.2-4 s on an 8B model: 16
            # captures as adaptive's batch shrank took 20 s of the headline's 91 s H100
            # run). Its own bucket first, then the smallest larger one; none past
            # PAD_ROWS_MAX rows beyond 4x the batch (there the padding rows' arithmetic
            # starts to show: 256 rows for 1 would run a GEMM's worth slower every step).
            mine = set(key[2])
            fits = [k for k in self.graphs
                    if B <= k[0] <= max(4 * B, PAD_ROWS_MAX) and k[1] >= width
                    and k[3] == key[3]
                    and (k[2] == key[2] or len(mine) > 2 and mine < set(k[2]))]
            if fits:
                key = min(fits, key=lambda k: (k[0], len(k[2]), k[1]))
        if key[3] and key not in self.graphs and key not in self.failed:
            seen = self._topk_seen[1] + 1 if self._topk_seen[0] == key else 1
            self._topk_seen = (key, seen)
            if seen < TOPK_CAPTURE_AFTER:
                return "new top-k rows (captured once they hold for a few steps)"
        return self.failed.get(key, key)

    def note_eager(self, why: str) -> None:
        self.stats.num_eager += 1
        self.stats.eager_reasons[why] = self.stats.eager_reasons.get(why, 0) + 1

    # -- replay ----------------------------------------------------------------------------
    def run(self, key: tuple, decode: list[tuple[str, int]], ids: torch.Tensor | None = None):
        """One decode step through the graph for ``key``; returns (plan, logits [n, V])
        where the plan carries this step's block shares (static tensors, valid until the
        next replay). None when the graph could not be captured: the step runs eager,
        and so does every later step of this key (``key`` says why).

        ``ids`` ([n] int64 on the device): the step's token ids, in place of the ones in
        ``decode``: tokens sampled by the step before, which the host has not read yet
        (the engine's overlapped steps). Replays are queued on the current stream, so a
        step may be launched while the one before still runs."""
        g = self.graphs.get(key) or self._try_capture(key)
        if g is None:
            return None
        host = build_plan(self.store, decode, [], self.num_layers, torch.device("cpu"))
        n, nb = len(decode), host.decode.offsets.shape[1]
        buf = g.pad.clone()
        for name, t in (("ids", host.input_ids[0]), ("pos", host.position_ids[0]),
                        ("widx", host.write_idx), ("len", host.decode.lengths)):
            s, _ = g.views[name]
            buf[s:s + t.numel()] = t
        for name, t in (("offs", host.decode.offsets), ("kb", host.decode.kbits),
                        ("vb", host.decode.vbits), ("nt", host.decode.ntok)):
            s, shape = g.views[name]
            view = buf[s:s + shape[0] * shape[1]].view(shape)
            view[:n] = 0
            view[:n, :nb] = t
        for i, t in enumerate(host.decode.stager.topk if g.topk else ()):
            self._fill_topk(g, i, t, buf)
        # two pinned twins in turn: the copy from the other may still be queued behind
        # a running replay; this one's last copy was queued a step earlier
        turn = self.stats.num_replays % 2
        if g.copied[turn] is not None:
            g.copied[turn].synchronize()
        g.pinned[turn].copy_(buf)
        g.flat.copy_(g.pinned[turn], non_blocking=True)
        g.copied[turn] = torch.cuda.Event()
        g.copied[turn].record()
        if ids is not None:
            s, _ = g.views["ids"]
            g.flat[s:s + n].copy_(ids)
        g.graph.replay()
        self.stats.num_replays += 1
        host.shares = g.plan.shares[:n, :nb]
        return host, g.logits[:n]

    def _fill_topk(self, g: _Graph, i: int, t, buf: torch.Tensor) -> None:
        """A top-k row's offloaded blocks into the graph's static table (entries past
        them keep no tokens: never picked) and their key summaries into its static
        summaries, copied only when the set changed (a move, not every step)."""
        for name, xs in t.facts().items():
            s, _ = g.views[f"{name}{i}"]
            buf[s:s + len(xs)] = ints(xs)
        src, blocks = g.summ_src[i], t.blocks
        if len(src) != len(blocks) or any(a is not b.summary for a, b in zip(src, blocks)):
            src = [b.summary for b in blocks]
            torch.stack(src, out=g.inputs[f"summ{i}"][:len(src)])
            g.summ_src[i] = src

    # -- capture ---------------------------------------------------------------------------
    def _try_capture(self, key: tuple) -> _Graph | None:
        """``_capture``, or None when it raises (out of memory, an op that cannot be
        captured): logged, and the key's steps run eager from then on, counted under
        ``failed[key]`` (a graph we cannot capture must not fail a step)."""
        if key[3]:      # drop the oldest graph with top-k rows past the cap
            old = [k for k in self.graphs if k[3]]
            for k in old[:max(0, len(old) + 1 - MAX_TOPK_GRAPHS)]:
                del self.graphs[k]
        try:
            return self._capture(*key)
        except Exception as e:
            log.exception("capturing a decode graph failed; its steps run eager")
            self.failed[key] = f"graph capture failed ({type(e).__name__})"
            torch.cuda.synchronize(self.device)
            return None

    def _capture(self, B: int, NB: int, fmts: tuple[KVFormat, ...], topk: tuple) -> _Graph:
        t0 = time.perf_counter()
        before = torch.cuda.memory_reserved(self.device)
        st, geom = self.store, self.store.geom
        H, D, T, esize = geom.num_kv_heads, geom.head_dim, geom.block_size, geom.store_elem
        sec = geom.sections(FULL)
        views, sizes = {}, [("ids", (B,)), ("pos", (B,)), ("widx", (B * H * D,)),
                            ("offs", (B, NB)), ("kb", (B, NB)), ("vb", (B, NB)),
                            ("nt", (B, NB)), ("len", (B,))]
        for i, (_, m, _, _) in enumerate(topk):   # a top-k row's offloaded blocks
            sizes += [(f"{name}{i}", (m,)) for name in ("host_off", "cols", "ntoks", "nbytes")]
        n = 0
        for name, shape in sizes:
            views[name] = (n, shape)
            n += math.prod(shape)
        # an all-padding batch: token 0 at position 0 writing into the scratch slot and
        # attending over its one row
        pad = torch.zeros(n, dtype=torch.int64)
        s, _ = views["widx"]
        k0 = self.scratch // esize + sec["k"][0] // esize
        pad[s:s + B * H * D] = (k0 + torch.arange(H).view(1, H, 1) * (T * D)
                                + torch.arange(D).view(1, 1, D)).expand(B, H, D).reshape(-1)
        s, _ = views["offs"]
        pad[s:s + B * NB].view(B, NB)[:, 0] = self.scratch
        fmt = fmts[0]
        for name, bits in (("kb", fmt.k_code), ("vb", fmt.v_code)):
            s, _ = views[name]
            pad[s:s + B * NB] = bits
        s, _ = views["nt"]
        pad[s:s + B * NB].view(B, NB)[:, 0] = 1
        s, _ = views["len"]
        pad[s:s + B] = 1
        for i, (_, m, _, _) in enumerate(topk):   # no tokens: never picked
            s, _ = views[f"cols{i}"]
            pad[s:s + m] = NB - 1
        flat = pad.to(self.device)
        pinned = [torch.empty(n, dtype=torch.int64).pin_memory() for _ in range(2)]

        def v(name):
            s, shape = views[name]
            t = flat[s:s + math.prod(shape)].view(shape)
            return t
        i32 = {name: torch.empty(B, NB, dtype=torch.int32, device=self.device)
               for name in ("kb", "vb", "nt")}
        i32["len"] = torch.empty(B, dtype=torch.int32, device=self.device)
        rows = torch.arange(B, device=self.device)
        inputs = {"rows": rows}
        stager = None
        if topk:
            L, H = self.num_layers, geom.num_kv_heads
            stager = Stager(st, L)
            inputs["stage"] = torch.zeros(B, NB, dtype=torch.int64, device=self.device)
            off = 0
            for i, (row, m, k, slot) in enumerate(topk):
                i32[f"ntoks{i}"] = torch.empty(m, dtype=torch.int32, device=self.device)
                inputs[f"summ{i}"] = torch.zeros(m, L, H, 2, D, device=self.device)
                stager.topk.append(TopKSeq(row, [], inputs[f"summ{i}"], k, off,
                                           host_off=v(f"host_off{i}"), nbytes=v(f"nbytes{i}"),
                                           cols=v(f"cols{i}"), ntoks=i32[f"ntoks{i}"],
                                           max_slot=slot))
                off += k * slot
        dec = DecodeBatch([""] * B, v("offs"), i32["kb"], i32["vb"], i32["nt"],
                          stage_mask=inputs.get("stage"), stager=stager,
                          fmt=fmt if len(fmts) == 1 else None, lengths=i32["len"])
        if len(fmts) > 1:
            from engine.kernels.paged_decode_triton import FormatGroups
        plan = StepPlan(st, v("ids").view(1, B), v("pos").view(1, B), v("widx"),
                        (sec["v"][0] - sec["k"][0]) // esize, dec, [], self.num_layers)

        def forward():
            # the int32 table columns come from the packed int64 buffer, inside the graph
            for name in i32:
                i32[name].copy_(v(name))
            if len(fmts) > 1:   # columns grouped by format on the device (a stable sort)
                dec.groups = FormatGroups.from_table(i32["kb"], i32["vb"], fmts, i32["nt"])
            plan.reset_forward()
            logits = attention.forward(self.model, plan.input_ids, plan.position_ids, plan,
                                       rows, self.compiled)
            return logits, plan.block_shares()   # the statistics' input, in the graph too

        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(2):        # compile the kernels, set up cuBLAS, outside capture
                forward()
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            logits, shares = forward()
        plan.shares = shares
        torch.cuda.synchronize(self.device)
        g = _Graph(graph, plan, flat, pinned, [None, None], pad, views, logits, B, NB,
                   {**inputs, **i32}, topk, [[] for _ in topk])
        self.graphs[(B, NB, fmts, topk)] = g
        dt = time.perf_counter() - t0
        grew = torch.cuda.memory_reserved(self.device) - before
        self.stats.num_graphs += 1
        self.stats.capture_seconds += dt
        self.stats.capture_bytes += max(0, grew)
        log.info("captured a decode graph", extra={"kv": {
            "batch": B, "table_width": NB, "formats": "+".join(f.name for f in fmts),
            "topk_rows": len(topk),
            "seconds": round(dt, 3),
            "pool_growth_bytes": grew}})
        return g

