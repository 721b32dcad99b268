"""One step's plan: which rows of the packed batch belong to which sequence, where
their K/V go, and what each attends over. Built once per step, used by every layer
(slot offsets are the same in all layers), so per-layer work is pure tensor ops.
"""
from __future__ import annotations

import array

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from engine.kernels.slots import read_blocks
from engine.layout import FULL, BlockGeometry, KVFormat
from engine.staging import Stager, TopKSeq, staging_need
from engine.store import GPU, HOST, KVStore


ACCUMULATE = 256  # prompt queries whose attention seeds the heavy-hitter scores
OBSERVE_ELEMS = 1 << 24  # prompt-time score temporaries at once (fp32 elements: 64 MiB)
OBSERVE_ELEMS_CUDA = 1 << 27  # on a GPU (512 MiB): the 8 kv heads of an 8B shape over
# 30K keys two at a time instead of 32 query heads one at a time (~20 launches each)


@dataclass
class PrefillSeg:
    seq_id: str
    start: int                  # first row in the packed batch
    length: int
    positions: torch.Tensor     # [n] absolute positions of the chunk's tokens
    plain_causal: bool          # keys are exactly this chunk (first chunk, no holes)
    observe: int = 0            # last-W-queries observation window (SnapKV) on this chunk
    # the GPU blocks' slot offsets [N] (device) and their formats, known on the host:
    # (format, the blocks' indices in offsets, or None when all of them are in it)
    offsets: torch.Tensor | None = None
    formats: list[tuple[KVFormat, torch.Tensor | None]] = field(default_factory=list)
    # offloaded blocks: host offsets [N] and their formats, the same way (host tensors)
    host: tuple[torch.Tensor, list[tuple[KVFormat, torch.Tensor | None]]] | None = None
    token_idx: torch.Tensor | None = None   # [M] valid rows of the flattened blocks
    kpos: torch.Tensor | None = None        # [M] their positions
    # the keys are the sequence's earlier tokens in order, this chunk's last: the mask
    # (key position <= query position) is causal aligned to the bottom right, and
    # attention need not build it (no offloaded block, whose keys come after the chunk's)
    tail_causal: bool = False
    block_of_key: torch.Tensor | None = None  # [M] logical block of each key
    num_logical: int = 0


@dataclass
class DecodeBatch:
    """The decode rows of a step: rows 0 .. Bd-1 of the packed batch (prefill chunks
    follow them), with their block tables."""

    seq_ids: list[str]
    offsets: torch.Tensor       # [Bd, NB] int64 (logical block index = table column)
    kbits: torch.Tensor         # [Bd, NB] int32 key codes (KVFormat.k_code)
    vbits: torch.Tensor
    ntok: torch.Tensor          # [Bd, NB] int32; 0 = not attended (hole / other tier)
    stage_mask: torch.Tensor | None = None  # [Bd, NB] offsets relative to the staging buffer
    stager: Stager | None = None
    fmt: KVFormat | None = None  # the one format of every block in the table, if only one
    groups: object | None = None  # FormatGroups of a mixed table, for the CUDA kernel
    lengths: torch.Tensor | None = None   # [Bd] int32: each row's own columns (its blocks)


@dataclass
class StepPlan:
    store: KVStore
    input_ids: torch.Tensor     # [1, N]
    position_ids: torch.Tensor  # [1, N]
    write_idx: torch.Tensor     # [N * H * D] element index of each new key in the store view
    v_shift: int                # element distance from a full slot's keys to its values
    decode: DecodeBatch | None
    prefills: list[PrefillSeg]
    num_layers: int
    partials: list = field(default_factory=list)  # per layer (m, l) [Bd, Hq, NB]
    layer_cache: dict = field(default_factory=dict)  # table-only facts the layers share
    observed: dict[str, torch.Tensor] = field(default_factory=dict)  # seq -> [NB]
    accumulated: dict[str, torch.Tensor] = field(default_factory=dict)  # seq -> [NB]
    distinct: dict[str, torch.Tensor] = field(default_factory=dict)  # seq -> [NB] KeyDiff
    shares: torch.Tensor | None = None  # block_shares, when computed already (CUDA graphs)

    @property
    def geom(self):
        return self.store.geom

    @property
    def num_decode(self) -> int:
        return 0 if self.decode is None else len(self.decode.seq_ids)

    def arena_row(self, layer: int) -> torch.Tensor:
        return self.store.arenas[GPU].row(layer)

    def decode_table(self, layer: int, q: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """This layer's block table: staged (offloaded) blocks made ready first."""
        d = self.decode
        if d.stager is None or not d.stager.active:
            return d.offsets, d.kbits, d.vbits, d.ntok
        st = d.stager
        base = self.store.arenas[GPU].staging_base(layer)
        st.ready(layer)
        offs = d.offsets + d.stage_mask * (base + (layer % 2) * self.store.staging_half)
        ntok = d.ntok
        if st.topk:
            ntok = ntok.clone()
            st.select_topk(layer, q, offs, ntok, base)
        return offs, d.kbits, d.vbits, ntok

    def decode_done(self, layer: int) -> None:
        if self.decode.stager is not None:
            self.decode.stager.done(layer)

    # -- per layer ------------------------------------------------------------------------
    def write_kv(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        typed = self.arena_row(layer).view(self.geom.store_dtype)
        if typed.is_cuda:       # one launch for both (two index_copy_ launches otherwise)
            from engine.kernels.write_kv_triton import write_kv_triton
            write_kv_triton(typed, self.write_idx, self.v_shift, k, v)
            return
        typed.index_copy_(0, self.write_idx, k.reshape(-1).to(typed.dtype))
        typed.index_copy_(0, self.write_idx + self.v_shift, v.reshape(-1).to(typed.dtype))

    def gather_prefix(self, layer: int, seg: PrefillSeg):
        """Stored K/V a prefill chunk attends over: [H, M, D] x2 and positions [M].
        The blocks' formats are known on the host: no device sync per layer."""
        H, D = self.geom.num_kv_heads, self.geom.head_dim
        parts = []
        groups = [(self.arena_row(layer), seg.offsets, seg.formats)]
        if seg.host is not None:
            groups.append((self.store.arenas[HOST].data[layer], *seg.host))
        for row, offs, formats in groups:
            k, v = _read_formats(row, offs, formats, self.geom)
            parts.append((k.to(self.store.device), v.to(self.store.device)))
        k, v = parts[0] if len(parts) == 1 else (torch.cat([p[0] for p in parts]),
                                                  torch.cat([p[1] for p in parts]))
        k = k.permute(1, 0, 2, 3).reshape(H, -1, D)
        v = v.permute(1, 0, 2, 3).reshape(H, -1, D)
        return k.index_select(1, seg.token_idx), v.index_select(1, seg.token_idx), seg.kpos

    def reset_forward(self) -> None:
        """Forget what a forward over this plan recorded (partials, per-layer facts,
        shares), before running it again: a graph's replay, a failed compiled step."""
        self.partials.clear()
        self.layer_cache = {}
        self.shares = None

    def record_partials(self, layer: int, m: torch.Tensor, l: torch.Tensor) -> None:
        """Per-block softmax partials [Bd, Hq, NB] of one layer; turned into shares once
        per step (``block_shares``), not per layer."""
        self.partials.append((m, l))

    def block_shares(self) -> torch.Tensor | None:
        """Each block's share of attention, mean over layers and query heads: [Bd, NB]."""
        if self.shares is not None:
            return self.shares
        if not self.partials:
            return None
        m = torch.stack([p[0] for p in self.partials])                  # [L, Bd, Hq, NB]
        l = torch.stack([p[1] for p in self.partials])
        gmax = m.amax(-1, keepdim=True)
        gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
        w = torch.exp(m - gmax) * l
        return (w / w.sum(-1, keepdim=True).clamp_min(1e-30)).mean((0, 2))

    def record_observation(self, layer: int, seg: PrefillSeg, q: torch.Tensor,
                           k: torch.Tensor, kpos: torch.Tensor, scale: float) -> None:
        """Prompt-time scores per logical block, from the final prefill chunk's queries
        q [Hq, n, D] over all keys k [H, M, D] (query head h reads kv head h // (Hq / H)):
        the last ``seg.observe`` queries' attention (SnapKV, Li et al. 2024) and the
        accumulated attention of the chunk's last ``ACCUMULATE`` queries (H2O's
        heavy-hitter score, Zhang et al. 2023), and
        how far each block's keys stand from the sequence's mean key (KeyDiff, Park et
        al. 2025: per head the largest ``-cos(key, mean key)`` among the block's keys,
        summed over heads and layers): a query-agnostic score that finds what a later
        question may look for where the prompt's own queries did not look (the passkey's
        block ranked 1st-3rd of 32-64 blocks after the sink in every prompt probed;
        docs/BENCHMARKS.md). Per kv head, with its query heads together (K read once,
        not copied per query head; a query head's KeyDiff term is its kv head's), as
        many kv heads at a time as keep their temporaries under OBSERVE_ELEMS elements
        (OBSERVE_ELEMS_CUDA on a GPU; all of them for short prompts)."""
        n = min(q.shape[1], ACCUMULATE)
        Hq, H, M, D = q.shape[0], k.shape[0], k.shape[1], k.shape[2]
        g = Hq // H
        qpos = seg.positions[-n:]
        win = torch.zeros(M, device=k.device)
        acc = torch.zeros(M, device=k.device)
        dist = torch.zeros(seg.num_logical, device=k.device)
        idx = seg.block_of_key.view(1, -1)
        future = kpos.view(1, -1) > qpos.view(-1, 1)                       # [n, M]
        # per kv head: its query heads' scores and their softmax (g x n x M each) and
        # k's fp32 copy (M x D)
        cap = OBSERVE_ELEMS_CUDA if k.is_cuda else OBSERVE_ELEMS
        per = max(1, min(H, cap // max(1, M * (2 * g * n + D))))
        qg = q[:, -n:].reshape(H, g * n, D)           # query heads of kv head h together
        for h in range(0, H, per):
            kh = k[h:h + per].float()                                      # [h, M, D]
            s = torch.matmul(qg[h:h + per].float(), kh.transpose(1, 2))    # [h, g n, M]
            s = s.view(-1, g, n, M).mul_(scale).masked_fill_(future, float("-inf"))
            p = torch.softmax(s, -1)
            acc += p.sum((0, 1, 2))
            win += p[:, :, -seg.observe:].sum((0, 1, 2))
            away = -F.cosine_similarity(kh, kh.mean(1, keepdim=True), dim=-1)   # [h, M]
            dist += torch.full((away.shape[0], seg.num_logical), -1.0, device=k.device
                               ).scatter_reduce_(1, idx.expand_as(away), away, "amax"
                                                 ).sum(0).mul_(g)
        prev = self.distinct.get(seg.seq_id)
        self.distinct[seg.seq_id] = dist if prev is None else prev + dist
        for store, per_key in ((self.observed, win), (self.accumulated, acc)):
            per_block = torch.zeros(seg.num_logical, device=k.device).index_add_(
                0, seg.block_of_key, per_key)
            prev = store.get(seg.seq_id)
            store[seg.seq_id] = per_block if prev is None else prev + per_block


def _read_formats(row: torch.Tensor, offs: torch.Tensor,
                  formats: list[tuple[KVFormat, torch.Tensor | None]], geom: BlockGeometry
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense k, v [N, H, T, D] of the blocks at ``offs`` in ``row``, one read per format."""
    if len(formats) == 1:
        return read_blocks(row, offs, geom, formats[0][0], geom.store_dtype)
    N, H, T, D = offs.numel(), geom.num_kv_heads, geom.block_size, geom.head_dim
    k = torch.empty(N, H, T, D, dtype=geom.store_dtype, device=row.device)
    v = torch.empty_like(k)
    for fmt, idx in formats:
        kk, vv = read_blocks(row, offs.index_select(0, idx), geom, fmt, geom.store_dtype)
        k.index_copy_(0, idx, kk)
        v.index_copy_(0, idx, vv)
    return k, v


def _by_format(blocks, device) -> list[tuple[KVFormat, torch.Tensor | None]]:
    """(format, indices of its blocks) of a list of blocks; one format: [(fmt, None)]."""
    at: dict[KVFormat, list[int]] = {}
    for j, b in enumerate(blocks):
        at.setdefault(b.fmt, []).append(j)
    if len(at) <= 1:
        return [(f, None) for f in at] or [(FULL, None)]
    return [(f, torch.tensor(js, dtype=torch.int64, device=device)) for f, js in at.items()]


_CODES = {torch.int64: "q", torch.int32: "i"}


def ints(xs, dtype=torch.int64) -> torch.Tensor:
    """A CPU tensor of Python ints through an ``array`` buffer: 3.5x faster than
    ``torch.tensor(list)`` for the ~2K-entry tables a decode step builds."""
    if not xs:
        return torch.zeros(0, dtype=dtype)
    return torch.frombuffer(array.array(_CODES[dtype], xs), dtype=dtype)


def ints_on(device: torch.device, xs, dtype=torch.int64) -> torch.Tensor:
    """``ints(xs)`` on ``device``. On CUDA through pinned memory and a copy queued on the
    stream: ``torch.tensor(xs, device='cuda')`` copies from pageable memory and waits for
    the GPU, so a host-side step between two steps (a move, a mixed sampling batch) would
    stall until the step launched ahead had finished."""
    return on_device(ints(xs, dtype), device)


def on_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor ``t`` on ``device``; on CUDA through pinned memory, queued (a copy from
    pageable memory waits for the GPU first: ``ints_on``)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Row:
    """A sequence's decode-table entries over its written prefix (full blocks, none on the
    host tier), kept on its SeqKV between steps: ``_table`` copies them and walks only the
    blocks after them (the tail being written). Valid while the sequence's version is
    the one it was built at (a block's place, format or tier changed: Block.__setattr__)
    and the prefix holds the same block objects (blocks leave only from the end)."""

    __slots__ = ("version", "blocks", "offs", "kb", "vb", "nt", "fmts", "attended")

    def __init__(self, version: int) -> None:
        self.version = version
        self.blocks: list = []
        self.offs = array.array("q")
        self.kb = array.array("i")
        self.vb = array.array("i")
        self.nt = array.array("i")
        self.fmts: set = set()
        self.attended: list = []


def _row(kv, T: int) -> _Row:
    """``kv``'s cached row, rebuilt if stale, extended over blocks written since."""
    c = kv.table_row
    blocks = kv.blocks
    # blocks leave a sequence's list only from its end (unreserve, a session's unmatched
    # tail): the prefix is intact while its last block is still in its place
    p = len(c.blocks) if c is not None else 0
    if c is not None and (c.version != kv.version or len(blocks) < p
                          or (p and blocks[p - 1] is not c.blocks[-1])):
        c = None
    if c is None:
        c = kv.table_row = _Row(kv.version)
    p, n = len(c.blocks), len(blocks)
    while p < n:
        b = blocks[p]
        # (a block made without its sequence, ``kv``, would change unseen: not kept)
        if b.num_tokens != T or b.tier == HOST or b.index != p or b.kv is not kv:
            break
        if b.tier == GPU:
            f = b.fmt
            c.offs.append(b.offset)
            c.kb.append(f.k_code)
            c.vb.append(f.v_code)
            c.nt.append(T)
            c.fmts.add(f)
            c.attended.append((p, f))
        else:                       # parked, evicted: a hole
            c.offs.append(0)
            c.kb.append(0)
            c.vb.append(0)
            c.nt.append(0)
        c.blocks.append(b)
        p += 1
    return c


def _table(store: KVStore, seq_ids: list[str], device) -> DecodeBatch:
    """Logical block tables of these sequences (column = logical block index): GPU
    blocks attended in place, offloaded ones staged per layer, holes elsewhere.

    Built from Python lists with one tensor per field: element-wise writes into a
    tensor cost microseconds each, which at 32K tokens (1000 blocks) was 40 ms a step.
    """
    lengths = [len(store.seqs[s].blocks) for s in seq_ids]
    nb = max(max(lengths), 1)
    B = len(seq_ids)
    # one flat array per field (row i at i * nb): a nested list costs a Python list per
    # row to build and torch.tensor walks it row by row; arrays take a cached row's
    # entries as one copy and become tensors without a conversion an element
    offs = array.array("q", bytes(8 * B * nb))
    kb, vb, nt = (array.array("i", bytes(4 * B * nb)) for _ in range(3))
    staged = None
    stager = Stager(store, store.num_layers)
    fmts = set()  # formats in the table: one lets the kernel compile it in
    cuda = torch.device(device).type == "cuda"
    attended: list[list] = [[] for _ in range(B)]  # (column, format) per row, for CUDA only
    cur = 0  # next free byte of each staging buffer
    T = store.block_size
    for i, sid in enumerate(seq_ids):
        kv = store.seqs[sid]
        base = i * nb
        host = []
        last = None
        # the written prefix from the sequence's cached row (a block's entries change
        # only with a move or a fill conversion; at 44 x 500 blocks walking every block
        # was ~10 ms of a step's host work on the 2-core box), then the tail block by block
        row = _row(kv, T)
        p = len(row.blocks)
        if p:
            offs[base:base + p] = row.offs
            kb[base:base + p] = row.kb
            vb[base:base + p] = row.vb
            nt[base:base + p] = row.nt
            fmts |= row.fmts
            if cuda:
                attended[i] = list(row.attended)
        for b in kv.blocks[p:] if p else kv.blocks:
            if b.tier == GPU and b.num_tokens > 0:
                offs[base + b.index] = b.offset
            elif b.tier == HOST:
                host.append(b)
            else:
                continue
            f = b.fmt
            j = base + b.index
            kb[j] = f.k_code
            vb[j] = f.v_code
            nt[j] = b.num_tokens
            if f is not last:       # runs of one format: hash it once a run, not a block
                fmts.add(f)
                last = f
            if cuda:
                attended[i].append((b.index, f))
        if not host:
            continue
        if kv.decode_mode == "topk":
            for b in host:
                nt[base + b.index] = 0  # attended only if picked, per layer
            # a CUDA graph's host-side plan (device 'cpu', store on CUDA) runs nothing:
            # its graph keeps its own summaries
            runs = torch.device(device).type == store.device.type
            summ = torch.stack([b.summary for b in host]) if runs else None
            sizes = [store.geom.slot_bytes(b.fmt) for b in host]
            t = TopKSeq(i, host, summ, min(kv.top_k, len(host)), cur, max_slot=max(sizes),
                        sizes=sizes)
            if cuda:
                t.to_device(device)
            stager.topk.append(t)
            cur += staging_need(store, sid)
            continue
        if staged is None:
            staged = [0] * (B * nb)
        for b in host:
            n = store.geom.slot_bytes(b.fmt)
            stager.runs.append((b.offset, cur, n))
            offs[base + b.index] = cur
            staged[base + b.index] = 1
            cur += n
    assert cur <= store.staging_half, "the scheduler admits only what staging holds"
    stager.runs = _merge(stager.runs)
    t = [torch.frombuffer(x, dtype=dt).view(B, nb).to(device, non_blocking=True)
         for x, dt in ((offs, torch.int64), (kb, torch.int32), (vb, torch.int32),
                       (nt, torch.int32))]
    t.append(torch.zeros(B, nb, dtype=torch.int64, device=device) if staged is None else
             ints(staged).view(B, nb).to(device, non_blocking=True))
    groups = None
    if len(fmts) > 1 and cuda:
        from engine.kernels.paged_decode_triton import FormatGroups
        groups = FormatGroups.from_rows(attended, nb, device)
    return DecodeBatch(seq_ids, *t[:4], stage_mask=t[4], stager=stager,
                       fmt=next(iter(fmts)) if len(fmts) == 1 else None, groups=groups,
                       lengths=ints(lengths, torch.int32).to(device, non_blocking=True))


def _merge(runs: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    out: list[list[int]] = []
    for h, s, n in runs:
        if out and out[-1][0] + out[-1][2] == h and out[-1][1] + out[-1][2] == s:
            out[-1][2] += n
        else:
            out.append([h, s, n])
    return [tuple(r) for r in out]


def build_plan(store: KVStore, decode_ids: list[tuple[str, int]],
               prefill_chunks: list[tuple[str, list[int], int]], num_layers: int,
               device: torch.device) -> StepPlan:
    """decode_ids: (seq, token) pairs; prefill_chunks: (seq, tokens, observe_window).

    Room must already be reserved (store.reserve); this advances sequence lengths.
    """
    geom = store.geom
    H, D, esize = geom.num_kv_heads, geom.head_dim, geom.store_elem
    T = geom.block_size
    ids: list[int] = []
    pos: list[int] = []
    w_offs: list[int] = []
    w_rows: list[int] = []
    pre: list[PrefillSeg] = []
    for sid, tok in decode_ids:
        ids.append(tok)
        pos.append(store.seqs[sid].num_tokens)
        o, r = store.write_targets(sid, 1)
        w_offs += o
        w_rows += r
    for sid, toks, observe in prefill_chunks:
        s = store.seqs[sid]
        p0 = s.num_tokens
        start = len(ids)
        ids += toks
        pos += range(p0, p0 + len(toks))
        o, r = store.write_targets(sid, len(toks))
        w_offs += o
        w_rows += r
        blocks = [b for b in s.blocks if b.tier == GPU and b.num_tokens > 0]
        host = [b for b in s.blocks if b.tier == HOST and b.num_tokens > 0]
        plain = p0 == 0  # a first chunk attends to itself only
        seg = PrefillSeg(sid, start, len(toks),
                         torch.arange(p0, p0 + len(toks), device=device), plain,
                         observe=min(observe, len(toks)), num_logical=len(s.blocks))
        tok_idx, kpos, kblk = [], [], []
        for j, b in enumerate(blocks + host):
            tok_idx += range(j * T, j * T + b.num_tokens)
            kpos += range(b.index * T, b.index * T + b.num_tokens)
            kblk += [b.index] * b.num_tokens
        seg.offsets = torch.tensor([b.offset for b in blocks], dtype=torch.int64, device=device)
        seg.formats = _by_format(blocks, device)
        if host:
            seg.host = (torch.tensor([b.offset for b in host], dtype=torch.int64),
                        _by_format(host, torch.device("cpu")))
        seg.tail_causal = (not plain and not host and len(kpos) >= len(toks)
                           and kpos[-len(toks)] == p0 and kpos[-1] == p0 + len(toks) - 1)
        seg.token_idx = torch.tensor(tok_idx, dtype=torch.int64, device=device)
        seg.kpos = torch.tensor(kpos, dtype=torch.int64, device=device)
        seg.block_of_key = torch.tensor(kblk, dtype=torch.int64, device=device)
        pre.append(seg)
    sec = geom.sections(FULL)
    offs_t = ints(w_offs) // esize + sec["k"][0] // esize
    rows_t = ints(w_rows)
    # [H, T, D] slot layout: element (h, t, d) at h*T*D + t*D + d
    widx = (offs_t + rows_t * D).view(-1, 1, 1) + torch.arange(H).view(1, H, 1) * (T * D) \
        + torch.arange(D).view(1, 1, D)
    decode = None
    if decode_ids:
        decode = _table(store, [s for s, _ in decode_ids], device)
    return StepPlan(
        store=store,
        input_ids=ints(ids).view(1, -1).to(device),
        position_ids=ints(pos).view(1, -1).to(device),
        write_idx=widx.reshape(-1).to(device),
        v_shift=(sec["v"][0] - sec["k"][0]) // esize,
        decode=decode, prefills=pre, num_layers=num_layers)
