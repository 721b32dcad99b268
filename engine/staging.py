"""Decoding over offloaded blocks: stream them into the device's staging area per layer.

* exact mode: every offloaded block of the sequence, for each layer, copied into one of
  two staging buffers (layers alternate), the copy for layer ``l + 2`` issued on a side
  stream as soon as layer ``l``'s kernel has read its buffer, so transfers overlap the
  compute of the layers between (CUDA). Host slots of a sequence offloaded together are
  contiguous, so adjacent blocks merge into large transfers.
* top-k mode (Quest, Tang et al. 2024): per-channel key min/max of each offloaded block
  stay on the device; per layer, the query bounds each block's best logit
  (``sum_d max(q_d kmin_d, q_d kmax_d)``), and only the top-k blocks are fetched.

On CPU the host tier is simulated (the same memory), but copies and accounting are real.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from engine.store import HOST, Block, KVStore


@dataclass
class TopKSeq:
    row: int                    # row in the decode batch
    blocks: list[Block]         # its offloaded blocks
    summary: torch.Tensor | None  # [n, L, H, 2, D] fp32 on the device (None: not run)
    k: int                      # blocks fetched per layer (at most n)
    stage_off: int              # its region in each staging buffer
    # device-side copies of the blocks' facts, so picks never round-trip to the CPU
    host_off: torch.Tensor | None = None   # [n] int64 slot offsets in a host layer row
    nbytes: torch.Tensor | None = None     # [n] int64 slot sizes
    cols: torch.Tensor | None = None       # [n] int64 logical block indices
    ntoks: torch.Tensor | None = None      # [n] int32
    max_slot: int = 0
    sizes: list[int] = field(default_factory=list)  # the blocks' slot bytes (host side)

    def facts(self) -> dict[str, list[int]]:
        """The blocks' host offsets, columns, tokens and slot bytes, as lists: what
        ``to_device`` copies, and what a CUDA graph's static table is filled with."""
        return {"host_off": [b.offset for b in self.blocks],
                "cols": [b.index for b in self.blocks],
                "ntoks": [b.num_tokens for b in self.blocks], "nbytes": self.sizes}

    def to_device(self, device) -> "TopKSeq":
        from engine.plan import ints_on   # plan imports this module
        for name, xs in self.facts().items():
            dt = torch.int32 if name == "ntoks" else torch.int64
            setattr(self, name, ints_on(torch.device(device), xs, dt))
        return self


@dataclass
class Stager:
    store: KVStore
    num_layers: int
    runs: list[tuple[int, int, int]] = field(default_factory=list)  # host off, stage off, n
    topk: list[TopKSeq] = field(default_factory=list)
    _events: dict = field(default_factory=dict)
    _stream: object = None

    @property
    def active(self) -> bool:
        return bool(self.runs or self.topk)

    def _half(self, layer: int) -> int:
        return (layer % 2) * self.store.staging_half

    def _copy_layer(self, layer: int) -> None:
        host = self.store.arenas[HOST]
        st = self.store.arenas["gpu"].staging
        base = self._half(layer)
        for h, s, n in self.runs:
            st[base + s:base + s + n].copy_(host.data[layer, h:h + n], non_blocking=True)

    def begin(self) -> None:
        """Before the forward: start streaming layers 0 and 1."""
        if not self.runs:
            return
        if self.store.device.type == "cuda":
            self._stream = torch.cuda.Stream(self.store.device)
            self._stream.wait_stream(torch.cuda.current_stream())
            for layer in range(min(2, self.num_layers)):
                self._issue(layer)

    def _issue(self, layer: int) -> None:
        with torch.cuda.stream(self._stream):
            self._copy_layer(layer)
            ev = torch.cuda.Event()
            ev.record(self._stream)
        self._events[layer] = ev

    def ready(self, layer: int) -> None:
        """Layer ``layer``'s exact-mode blocks are in its staging buffer after this."""
        if not self.runs:
            return
        if self._stream is None:
            self._copy_layer(layer)
        else:
            torch.cuda.current_stream().wait_event(self._events.pop(layer))

    def done(self, layer: int) -> None:
        """Layer's kernel is enqueued: its buffer may take layer + 2 once it has run."""
        if self._stream is None or layer + 2 >= self.num_layers:
            return
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream())
        self._stream.wait_event(ev)
        self._issue(layer + 2)

    @staticmethod
    def _bounds(t: TopKSeq, layer: int, q: torch.Tensor) -> torch.Tensor:
        """Quest's upper bound of each offloaded block's best logit: [n].

        ``sum_d max(q_d kmin_d, q_d kmax_d)`` is ``q+ . kmax + q- . kmin`` (q+ / q- the
        positive / negative parts of q): two small matmuls instead of an [n, H, g, D]
        temporary per layer (16 MiB a layer at 1,024 blocks)."""
        s = t.summary[:, layer]                                      # [n, H, 2, D]
        H, D = s.shape[1], s.shape[3]
        qq = q[t.row].float().view(H, -1, D)                         # [H, g, D]
        hi = torch.einsum("hgd,nhd->nhg", qq.clamp_min(0), s[:, :, 1])
        lo = torch.einsum("hgd,nhd->nhg", qq.clamp_max(0), s[:, :, 0])
        return (hi + lo).amax((1, 2))

    def _select_topk_device(self, layer: int, q: torch.Tensor, offsets: torch.Tensor,
                            ntok: torch.Tensor, stage_base: int) -> None:
        """CUDA: pick on the device, gather the picks from pinned host memory with one
        kernel (unified addressing), patch the table on the device: no CPU round trip."""
        from engine.kernels.gather import gather_slots
        host = self.store.arenas[HOST]
        st = self.store.arenas["gpu"].staging
        base = self._half(layer)
        row_start = layer * host.row_bytes
        for t in self.topk:
            # entries with no tokens pad a CUDA graph's static table: never picked
            bounds = self._bounds(t, layer, q).masked_fill(t.ntoks == 0, float("-inf"))
            pick = torch.topk(bounds, t.k).indices
            dst = base + t.stage_off + torch.arange(t.k, device=q.device) * t.max_slot
            gather_slots(host.flat, t.host_off[pick] + row_start, st, dst, t.nbytes[pick],
                         t.max_slot)
            cols = t.cols[pick]
            offsets[t.row, cols] = stage_base + dst
            ntok[t.row, cols] = t.ntoks[pick]

    def select_topk(self, layer: int, q: torch.Tensor, offsets: torch.Tensor,
                    ntok: torch.Tensor, stage_base: int) -> None:
        """Pick and fetch each top-k sequence's best offloaded blocks for this layer.

        q [Bd, Hq, D]; fills ``offsets`` / ``ntok`` [Bd, NB] columns of chosen blocks.
        """
        if not self.topk:
            return
        if self.store.device.type == "cuda":
            return self._select_topk_device(layer, q, offsets, ntok, stage_base)
        host = self.store.arenas[HOST]
        st = self.store.arenas["gpu"].staging
        base = self._half(layer)
        cols, offs, toks, dsts, srcs = [], [], [], [], []
        for t in self.topk:
            pick = torch.topk(self._bounds(t, layer, q), t.k).indices.tolist()
            cur = t.stage_off
            # host order, packed in staging in the same order: adjacent picks merge
            for i in sorted(pick, key=lambda i: t.blocks[i].offset):
                b = t.blocks[i]
                n = self.store.geom.slot_bytes(b.fmt)
                if srcs and srcs[-1][1] == b.offset and dsts[-1][1] == base + cur:
                    srcs[-1][1] += n
                    dsts[-1][1] += n
                else:
                    srcs.append([b.offset, b.offset + n])
                    dsts.append([base + cur, base + cur + n])
                cols.append((t.row, b.index))
                offs.append(stage_base + base + cur)
                toks.append(b.num_tokens)
                cur += n
        # one batched copy call and one scatter per table, not one launch per block
        torch._foreach_copy_([st[a:b] for a, b in dsts],
                             [host.data[layer, a:b] for a, b in srcs], non_blocking=True)
        r = torch.tensor([c[0] for c in cols])
        c = torch.tensor([c[1] for c in cols])
        dev = offsets.device
        offsets[r.to(dev), c.to(dev)] = torch.tensor(offs).to(dev, non_blocking=True)
        ntok[r.to(dev), c.to(dev)] = torch.tensor(toks, dtype=ntok.dtype).to(dev, non_blocking=True)


def staging_need(store: KVStore, seq_id: str) -> int:
    """Bytes per staging buffer a sequence's decode step needs."""
    s = store.seqs[seq_id]
    host = store.host_blocks(seq_id)
    if not host:
        return 0
    if s.decode_mode == "topk":
        return min(s.top_k, len(host)) * max(store.geom.slot_bytes(b.fmt) for b in host)
    return sum(store.geom.slot_bytes(b.fmt) for b in host)
