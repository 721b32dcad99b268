"""The paged KV store: arenas per tier, per-sequence block tables, exact accounting.

Plain bookkeeping plus the tensors it owns. A sequence's block ``i`` holds token
positions ``[i*T, (i+1)*T)``; it keeps that index for life, so blocks can leave the
middle of a sequence (eviction) without disturbing any position (RoPE was applied
before storage). Each block has a format (engine/layout.py) and a tier:

* ``gpu``     — in the device arena (the CPU arena in CPU mode), attended directly;
* ``host``    — in the host arena (offloaded), attended after a fetch (issue 4);
* ``parked``  — evicted from attention but kept on host for ``Restore``;
* ``evicted`` — gone;
* ``swapped`` — on host while its sequence is preempted (the engine's, not a policy move).

The newest block of a sequence is always full precision (the residual window).

Slots may be shared (prefix reuse, engine/prefix.py): several sequences' blocks naming
the same (arena, offset). ``refs`` counts the holders of shared slots (a slot missing
from it has one holder). Every slot a sequence lets go of goes through ``release_slot``
or ``moved_slot``: a shared slot is only unreferenced (so a move of a shared block is a
copy on write), a slot the prefix index names is kept as a cached entry or follows its
block to its new slot, and the rest are freed. Allocations that find no room give back
cached entries first (``make_room``).
"""
from __future__ import annotations

import weakref
from dataclasses import InitVar, dataclass, field

import torch

from engine.arena import Arena, OutOfBlocks
from engine.kernels.gather import copy_slots
from engine.layout import FULL, BlockGeometry, KVFormat
from engine.prefix import Entry, PrefixIndex

GPU, HOST, PARKED, EVICTED, SWAPPED = "gpu", "host", "parked", "evicted", "swapped"
PAGE_SLOTS = 4            # full-precision slots in one default page
ARENA_OF = {GPU: GPU, HOST: HOST, PARKED: HOST, SWAPPED: HOST}  # tier -> arena holding it


# a block's fields whose change bumps its sequence's version (``num_tokens`` grows at the
# tail every token: the decode table reads it there each step; ``truncate`` bumps)
_VERSIONED = frozenset(("index", "fmt", "tier", "offset", "summary"))


@dataclass
class Block:
    index: int
    fmt: KVFormat = FULL
    tier: str = GPU
    offset: int = -1          # slot byte offset in its tier's arena (-1 when evicted)
    num_tokens: int = 0
    summary: torch.Tensor | None = None  # [L, H, 2, D] key min/max, kept on the device
                                         # while the block is on the host (Quest)
    # the sequence holding it (``kv``, held weakly: a sequence and its blocks would
    # otherwise be a cycle, freed with their summaries only by a full collection): a
    # change of place, format or tier bumps ``kv.version``, so what is derived from its
    # blocks (the decode table's row: engine/plan.py) is rebuilt exactly when it must
    # be, wherever the change is made
    seq: InitVar[SeqKV | None] = None

    def __post_init__(self, seq: SeqKV | None) -> None:
        object.__setattr__(self, "_kv", None if seq is None else weakref.ref(seq))
        if seq is not None and self.tier == HOST:
            seq.num_host += 1       # made on the host tier (a fork, a shared entry)

    @property
    def kv(self) -> SeqKV | None:
        r = self.__dict__.get("_kv")
        return None if r is None else r()

    def __setattr__(self, name: str, value) -> None:
        if name not in _VERSIONED:      # num_tokens, every token written: nothing to tell
            object.__setattr__(self, name, value)
            return
        r = self.__dict__.get("_kv")
        kv = None if r is None else r()
        if kv is not None and name == "tier":   # the sequence's host-block count follows
            kv.num_host += (value == HOST) - (self.__dict__.get("tier") == HOST)
        object.__setattr__(self, name, value)
        if kv is not None:
            kv.version += 1


@dataclass
class SeqKV:
    seq_id: str
    blocks: list[Block] = field(default_factory=list)
    num_tokens: int = 0       # tokens written (positions 0 .. num_tokens-1)
    decode_mode: str = "exact"    # over offloaded blocks: 'exact' (stream all) or 'topk'
    top_k: int = 0                # offloaded blocks fetched per layer in 'topk' mode
    version: int = 0              # bumped by any change to a block's place, format, tier
    # host-tier blocks among its blocks, kept by Block.__setattr__ (blocks are made by the
    # store with their sequence); at least the true count (a host block cut from the list
    # stays counted until ``host_blocks`` looks), so 0 means none
    num_host: int = 0
    table_row: object = field(default=None, repr=False, compare=False)  # engine/plan.py

    @property
    def tail(self) -> Block | None:
        return self.blocks[-1] if self.blocks else None


class KVStore:
    def __init__(self, geom: BlockGeometry, num_layers: int, device: torch.device,
                 gpu_bytes: int, host_bytes: int = 0, page_bytes: int | None = None,
                 staging_bytes: int | None = None, num_sink_blocks: int = 1,
                 scratch: bool = False, prefix_cache: bool = True):
        self.geom = geom
        self.num_layers = num_layers
        self._block_bytes: dict[KVFormat, int] = {}
        self.device = torch.device(device)
        full_slot = geom.slot_bytes(FULL)
        # pages of 4 full-precision slots: a page holds whole full blocks, a page of
        # smaller slots wastes under 7% in its tail (16-bit, head_dim 64), and a partly
        # filled page per slot size is a few blocks' worth, so pages track the bytes of
        # what they hold (1 MiB pages held 131% of a 1K-token sequence's bytes on the
        # default model). Transfers are not bounded by pages: adjacent slots are copied
        # as one run across page boundaries (kernels/gather.copy_slots)
        if page_bytes is None:
            page_bytes = full_slot * PAGE_SLOTS
        self.page_bytes = page_bytes
        if gpu_bytes < page_bytes * num_layers:
            raise ValueError(
                f"KV budget of {gpu_bytes} bytes is below one page per layer "
                f"({page_bytes * num_layers} bytes); raise the budget")
        if staging_bytes is None:  # room to stream offloaded blocks of one layer, x2
            staging_bytes = max(2 * page_bytes, min(256 << 20, gpu_bytes // 16))
        self.num_sink_blocks = num_sink_blocks
        self.arenas: dict[str, Arena] = {
            GPU: Arena(GPU, num_layers, gpu_bytes, page_bytes, self.device,
                       staging_bytes=staging_bytes, reserve_pages=int(scratch))}
        # ``scratch``: one page per layer outside the accounting, where padded rows of a
        # CUDA-graph step write and read (engine/cuda_graphs.py)
        self.scratch_offset = self.arenas[GPU].alloc.reserved_base if scratch else -1
        if host_bytes >= page_bytes * num_layers:
            self.arenas[HOST] = Arena(HOST, num_layers, host_bytes, page_bytes,
                                      torch.device("cpu"), pin=self.device.type == "cuda")
        self.seqs: dict[str, SeqKV] = {}
        self.refs: dict[tuple[str, int], int] = {}   # shared slot -> holders (>= 2)
        self.prefix = PrefixIndex(geom.block_size)
        self.prefix_cache = prefix_cache   # keep indexed blocks of finished sequences
        # slots an action in progress must find where they are (engine/apply.py: a move
        # of a shared block may be undone): compaction leaves their pages alone
        self.pinned: set[tuple[str, int]] = set()
        self.compactions = 0               # pages given back by moving slots (counters)
        self.compacted_slots = 0

    # -- sizes ----------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        return self.geom.block_size

    def block_bytes(self, fmt: KVFormat) -> int:
        """Exact bytes of one block in all layers (memoized: snapshots ask once a block)."""
        n = self._block_bytes.get(fmt)
        if n is None:
            n = self._block_bytes[fmt] = self.geom.slot_bytes(fmt) * self.num_layers
        return n

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.geom.block_size)

    def estimate_bytes(self, num_tokens: int, fmt: KVFormat = FULL) -> int:
        """Bytes ``num_tokens`` take in ``fmt`` (the tail block stays full precision)."""
        n = self.blocks_for(num_tokens)
        if n == 0:
            return 0
        return (n - 1) * self.block_bytes(fmt) + self.block_bytes(FULL)

    @property
    def staging_half(self) -> int:
        """Bytes of one staging buffer (two alternate between layers)."""
        return self.arenas[GPU].staging_bytes // 2

    def has_host(self) -> bool:
        return HOST in self.arenas

    def free_bytes(self, tier: str = GPU) -> int:
        a = self.arenas.get(tier)
        return a.capacity_bytes - a.used_bytes if a else 0

    # -- sequences ------------------------------------------------------------------------
    def add_sequence(self, seq_id: str) -> SeqKV:
        if seq_id in self.seqs:
            raise ValueError(f"sequence {seq_id!r} already exists")
        s = self.seqs[seq_id] = SeqKV(seq_id)
        return s

    def free_sequence(self, seq_id: str, keep: bool = True) -> None:
        """Let go of a sequence's blocks; ``keep``: indexed ones stay cached (prefix
        reuse) instead of being freed."""
        s = self.seqs.pop(seq_id, None)
        if s is None:
            return
        for b in s.blocks:
            self._release(b, keep)

    def fork(self, src_id: str, dst_id: str, share: bool = False) -> SeqKV:
        """A new sequence holding ``src_id``'s KV, every block in its format and tier:
        copied, or with ``share`` its full blocks shared (copy on write; the controller
        then leaves them alone, since moving one frees nothing) and the partly written
        tail copied (both sequences write into their own). Several continuations of one
        prefill; evaluations that compress each copy apart want copies."""
        if dst_id in self.seqs:
            raise ValueError(f"sequence {dst_id!r} already exists")
        src = self.seqs[src_id]
        T = self.geom.block_size
        copied = [b for b in src.blocks if b.offset >= 0
                  and (not share or b.num_tokens < T or b is src.tail)]
        need: dict[str, dict[int, int]] = {}
        for b in copied:
            sizes = need.setdefault(ARENA_OF[b.tier], {})
            slot = self.geom.slot_bytes(b.fmt)
            sizes[slot] = sizes.get(slot, 0) + 1
        for tier, sizes in need.items():
            if not self.make_room(tier, sizes):
                raise OutOfBlocks(f"no room in the {tier} tier to fork {src_id}")
        dst = SeqKV(dst_id, num_tokens=src.num_tokens, decode_mode=src.decode_mode,
                    top_k=src.top_k)
        for b in src.blocks:
            nb = Block(b.index, b.fmt, b.tier, -1, b.num_tokens,
                       None if b.summary is None else b.summary.clone(), seq=dst)
            if b.offset >= 0 and any(b is c for c in copied):
                arena = self.arenas[ARENA_OF[b.tier]]
                n = self.geom.slot_bytes(b.fmt)
                nb.offset = arena.alloc.allocate(n)
                arena.data[:, nb.offset:nb.offset + n].copy_(arena.data[:, b.offset:b.offset + n])
            elif b.offset >= 0:
                self.ref(self.slot_key(b))
                nb.offset = b.offset
            dst.blocks.append(nb)
        self.seqs[dst_id] = dst
        return dst

    def _release(self, b: Block, keep: bool = True) -> None:
        """A sequence lets go of its block (``keep``: an indexed block stays cached)."""
        if b.offset >= 0:
            self.release_slot(ARENA_OF[b.tier], b.offset, self.geom.slot_bytes(b.fmt), keep)
            b.offset = -1

    # -- shared slots and the prefix index ------------------------------------------------
    @staticmethod
    def slot_key(b: Block) -> tuple[str, int]:
        return ARENA_OF[b.tier], b.offset

    def is_shared(self, b: Block) -> bool:
        return b.offset >= 0 and (ARENA_OF.get(b.tier), b.offset) in self.refs

    def holders(self, b: Block) -> int:
        return self.refs.get(self.slot_key(b), 1) if b.offset >= 0 else 0

    def ref(self, key: tuple[str, int]) -> None:
        """One more holder of slot ``key`` (it has one already)."""
        self.refs[key] = self.refs.get(key, 1) + 1

    def _unref(self, key: tuple[str, int]) -> bool:
        """One holder fewer of slot ``key`` if it is shared (True: others still hold it)."""
        n = self.refs.get(key)
        if n is None:
            return False
        if n <= 2:
            del self.refs[key]
        else:
            self.refs[key] = n - 1
        return True

    def release_slot(self, arena: str, offset: int, slot_bytes: int, keep: bool = True) -> None:
        key = (arena, offset)
        if self._unref(key):              # others still hold it
            return
        if keep and self.prefix_cache and self.prefix.cache(key):
            return                        # the index holds it now, until the room is needed
        self.prefix.forget_slot(key)
        self.arenas[arena].alloc.free(offset, slot_bytes)

    def moved_slot(self, b: Block, old_arena: str, old_offset: int, old_slot: int) -> None:
        """``b`` now lives in its new slot; let go of the old one: unreferenced when it
        is shared (copy on write: the others keep it, and its index entry), else freed,
        its index entry following the block."""
        key = (old_arena, old_offset)
        if self._unref(key):
            return
        self.prefix.retarget(key, self.slot_key(b), b.tier, b.fmt, b.summary)
        self.arenas[old_arena].alloc.free(old_offset, old_slot)

    def share(self, seq_id: str, entries: list[Entry]) -> None:
        """Append the blocks of matched index entries to a new, empty sequence: the
        first ``len(entries)`` blocks, shared, in the format and tier they are in."""
        s = self.seqs[seq_id]
        if s.blocks:
            raise ValueError(f"{seq_id}: shared prefix blocks go into an empty sequence")
        T = self.geom.block_size
        for i, e in enumerate(entries):
            if e.cached:
                self.prefix.take(e)       # this sequence is its one holder now
            else:
                self.ref(e.key)
            s.blocks.append(Block(i, e.fmt, e.tier, e.key[1], T,
                                  None if e.summary is None else e.summary.clone(), seq=s))
        s.num_tokens = len(entries) * T

    def index_blocks(self, seq_id: str, start: int, hashes: list[int], tokens,
                     parent: int | None = None) -> int:
        """Index the sequence's full blocks ``start, start+1, ...`` under ``hashes``
        (``parent``: block ``start - 1``'s hash; ``tokens``: the ids at every position).
        Returns how many were newly indexed."""
        s = self.seqs.get(seq_id)
        if s is None:
            return 0
        T, added = self.geom.block_size, 0
        for i, h in enumerate(hashes, start):
            if i >= len(s.blocks):
                break
            b = s.blocks[i]
            if b.offset >= 0 and b.tier in (GPU, HOST) and b.num_tokens == T:
                added += self.prefix.add(h, parent, tokens[i * T:(i + 1) * T],
                                         self.slot_key(b), b.tier, b.fmt)
            parent = h
        return added

    def make_room(self, arena: str, need: dict[int, int]) -> bool:
        """Give back cached prefix blocks (least recently cached first) until slots of
        these sizes (slot bytes -> count) fit; whether they fit."""
        a = self.arenas.get(arena)
        if a is None:
            return False
        alloc = a.alloc
        short = lambda: sum(alloc.pages_needed(sl, n) for sl, n in need.items()) \
            - len(alloc._free_pages)  # noqa: E731
        while short() > 0:
            e = self.prefix.pop_lru(arena)
            if e is None:
                break
            alloc.free(e.key[1], self.geom.slot_bytes(e.fmt))
        if short() <= 0:
            return True
        if short() > alloc.compactable_pages():
            return False              # no compaction could make the room: move nothing
        return self.compact_until(arena, short)   # then move slots out of half-empty pages

    def room_short_bytes(self, arena: str, need: dict[int, int]) -> int:
        """Bytes (whole pages, all layers) slots of these sizes (slot bytes -> count)
        need beyond the free pages, the pages the cached prefix blocks would give back
        and those compaction could empty (at best): what moves must free before
        ``make_room`` can succeed (0: it may now). Page-exact where bytes are not: a
        format's first slots take a fresh page."""
        a = self.arenas.get(arena)
        if a is None:
            return 0
        alloc = a.alloc
        short = sum(alloc.pages_needed(sl, n) for sl, n in need.items()) \
            - len(alloc._free_pages)
        # cached blocks given back free their pages at best; compaction empties pages
        cached = self.prefix.cached_on(arena) // alloc.slots_per_page(self.geom.slot_bytes(FULL))
        short -= cached + alloc.compactable_pages()
        return max(0, short) * alloc.page_bytes * a.num_layers

    def compact_until(self, arena: str, short) -> bool:
        """Give back pages one at a time while ``short()`` (pages still missing) is
        positive; whether it reached 0. Re-checked after each page: emptying a page of
        the wanted size also uses up free slots counted on other pages."""
        self._evacuate_while(arena, lambda done: short() > 0)
        return short() <= 0

    def compact(self, arena: str, pages: int) -> int:
        """Give back up to ``pages`` pages of ``arena`` by moving the slots of the
        emptiest pages of each slot size into free slots of fuller pages of that size
        (bytes copied in every layer; every block, shared-slot count and index entry
        naming a moved slot follows it). Quantizing and freeing blocks one by one leaves
        pages partly used; this is what lets a full arena take slots of another size.
        Returns the pages given back (0: no page can be emptied)."""
        return self._evacuate_while(arena, lambda done: done < pages)

    def _evacuate_while(self, arena: str, more) -> int:
        """Evacuate pages while ``more(pages done)``; the bytes move page by page (in
        order: a slot may move twice), the blocks, shared-slot counts and index entries
        that name moved slots follow once at the end (one pass over every block, not
        one a page: at 49 sequences of 32K that pass was ~4 ms a page)."""
        a = self.arenas[arena]
        skip = self.compaction_skip(arena)
        where: dict[int, int] = {}      # a moved slot's offset before -> now
        before: dict[int, int] = {}     # now -> before
        done = 0
        try:
            while more(done):
                page = a.alloc.evacuation_page(skip)
                if page is None:
                    break
                moved = a.alloc.evacuate(page)
                copy_slots(a.data, a.data, moved)   # queued: the stream orders the pages
                for old, new, _ in moved:
                    first = before.pop(old, old)
                    where[first] = new
                    before[new] = first
                done += 1
                self.compactions += 1
                self.compacted_slots += len(moved)
        finally:   # what moved is followed even if a later page fails
            if where:
                self._relocate(a, where)
        return done

    def compaction_skip(self, arena: str) -> set[int]:
        """Pages compaction leaves alone: those holding a pinned slot."""
        pb = self.arenas[arena].alloc.page_bytes
        return {off // pb for ar, off in self.pinned if ar == arena}

    def _relocate(self, a: Arena, where: dict[int, int]) -> None:
        """Blocks, shared-slot counts and index entries at the offsets ``where`` names
        (before -> now, each slot once) follow their slots."""
        for kv in self.seqs.values():
            for b in kv.blocks:
                if b.offset in where and ARENA_OF.get(b.tier) == a.name:
                    b.offset = where[b.offset]
        taken = [(self.refs.pop((a.name, old), None), new) for old, new in where.items()]
        for n, new in taken:
            if n is not None:
                self.refs[(a.name, new)] = n
        self.prefix.rekey({(a.name, old): (a.name, new) for old, new in where.items()})

    def cached_bytes(self, arena: str = GPU) -> int:
        """Bytes of cached prefix blocks (held by the index alone) on ``arena``."""
        return sum(self.block_bytes(e.fmt) for e in self.prefix.lru.values()
                   if e.key[0] == arena)

    def reclaimable_bytes(self, arena: str = GPU) -> int:
        """Bytes (pages, all layers) that giving back every cached prefix block would
        free: pages holding only cached slots."""
        a = self.arenas.get(arena)
        if a is None or not self.prefix.lru:
            return 0
        alloc = a.alloc
        per_page: dict[int, int] = {}
        for e in self.prefix.lru.values():
            if e.key[0] == arena:
                p = e.key[1] // alloc.page_bytes
                per_page[p] = per_page.get(p, 0) + 1
        n = 0
        for p, c in per_page.items():
            slot = alloc._page_slot[p]
            if alloc.slots_per_page(slot) - len(alloc._page_free[p]) == c:
                n += 1
        return n * alloc.page_bytes * self.num_layers

    def held_slots(self, arena: str = GPU) -> int:
        """Slots of ``arena`` that sequences hold (cached prefix blocks aside)."""
        a = self.arenas.get(arena)
        return a.alloc.num_slots - self.prefix.cached_on(arena) if a else 0

    def clear_cache(self) -> None:
        """Give back every cached prefix block."""
        for e in list(self.prefix.lru.values()):
            self.prefix.pop_lru(e.key[0])
            self.arenas[e.key[0]].alloc.free(e.key[1], self.geom.slot_bytes(e.fmt))

    def _new_blocks_needed(self, s: SeqKV, n: int) -> int:
        return max(0, self.blocks_for(s.num_tokens + n) - len(s.blocks))

    def can_reserve(self, seq_id: str, n: int) -> bool:
        """Whether ``reserve(seq_id, n)`` would succeed now."""
        need = self._new_blocks_needed(self.seqs[seq_id], n)
        return need == 0 or self.make_room(GPU, {self.geom.slot_bytes(FULL): need})

    def reserve(self, seq_id: str, n: int) -> None:
        """Make room for ``n`` more tokens (full-precision slots). All or nothing."""
        s = self.seqs[seq_id]
        need = self._new_blocks_needed(s, n)
        if need == 0:
            return
        alloc = self.arenas[GPU].alloc
        slot = self.geom.slot_bytes(FULL)
        if not self.make_room(GPU, {slot: need}):
            raise OutOfBlocks(f"{seq_id}: no room for {need} more blocks")
        for _ in range(need):
            s.blocks.append(Block(index=len(s.blocks), offset=alloc.allocate(slot), seq=s))

    def write_targets(self, seq_id: str, n: int) -> tuple[list[int], list[int]]:
        """(slot offset, row in block) for the next ``n`` tokens; advances the length."""
        s = self.seqs[seq_id]
        T = self.geom.block_size
        offs, rows = [], []
        for p in range(s.num_tokens, s.num_tokens + n):
            b = s.blocks[p // T]
            if b.tier != GPU or not b.fmt.is_full:  # moves refuse unwritten blocks: a bug
                raise RuntimeError(f"{seq_id}: token {p} would be written into block "
                                   f"{b.index}, which is {b.tier}/{b.fmt.name}")
            offs.append(b.offset)
            rows.append(p % T)
            b.num_tokens = p % T + 1
        s.num_tokens += n
        return offs, rows

    def truncate(self, seq_id: str, num_tokens: int) -> None:
        """Forget tokens written at positions >= ``num_tokens`` (a step that failed after
        its plan advanced the lengths). Their blocks stay reserved."""
        s = self.seqs.get(seq_id)
        if s is None or num_tokens >= s.num_tokens:
            return
        T = self.geom.block_size
        for b in s.blocks[num_tokens // T:]:
            if b.tier == GPU:
                b.num_tokens = min(T, max(0, num_tokens - b.index * T))
        s.version += 1                # written blocks are partial again
        s.num_tokens = num_tokens

    def unreserve(self, seq_id: str) -> None:
        """Give back the blocks past the sequence's length (reserved for tokens that will
        not come: a step launched ahead whose sequence ended)."""
        s = self.seqs[seq_id]
        keep = self.blocks_for(s.num_tokens)
        while len(s.blocks) > keep:
            self._release(s.blocks.pop(), keep=False)

    # -- views ----------------------------------------------------------------------------
    def host_blocks(self, seq_id: str) -> list[Block]:
        # asked for every decoding sequence every step (staging_need), and mostly none:
        # the sequence's count says so without a walk over its blocks
        kv = self.seqs[seq_id]
        if not kv.num_host:
            return []
        out = [b for b in kv.blocks if b.tier == HOST]
        kv.num_host = len(out)
        return out

    def bytes_by(self, seq_id: str) -> tuple[dict[str, int], dict[str, int]]:
        by_tier: dict[str, int] = {}
        by_fmt: dict[str, int] = {}
        for b in self.seqs[seq_id].blocks:
            if b.offset < 0:
                continue
            nb = self.block_bytes(b.fmt)
            by_tier[b.tier] = by_tier.get(b.tier, 0) + nb
            by_fmt[b.fmt.name] = by_fmt.get(b.fmt.name, 0) + nb
        return by_tier, by_fmt
