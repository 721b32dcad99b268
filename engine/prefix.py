"""Prefix reuse: full blocks indexed by the hash of the tokens up to and through them.

Block ``i`` of a sequence holds the K/V of token positions ``[i*T, (i+1)*T)``, and
those K/V depend on every token before them, so a full block is named by a cumulative
hash: ``h_i = H(h_{i-1}, tokens of block i)`` (vLLM's block hash). Two sequences whose
first ``n`` blocks have the same hashes can share those blocks' slots.

The index maps a hash to one slot (arena, byte offset) that holds it, in whatever format
and tier the block is now: a reused block keeps the format and tier it is in. Slots are
reference-counted by the store (engine/store.py); the index itself holds a slot only
when no sequence does any more (a *cached* entry, kept in LRU order and given back when
an allocation needs the room). A sequence that moves a block it holds alone carries the
index entry with it (quantized, offloaded: the entry now names the new slot); one that
moves a shared block gets its own copy (copy on write) and the entry stays with the
shared slot.

``PrefixIndex`` is bookkeeping only (no tensors): the store calls it. It also records
the KV events cluster routers consume (engine/api.py: stored / removed / cleared, the
tier as ``medium``) until the engine hands them to its sink once a step; an index
rebuilt from those events equals this one (hash -> medium).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.api import AllBlocksCleared, BlockRemoved, BlockStored, medium_of
from engine.block_hash import external_hash, prefix_block_hashes


def block_digests(token_ids, block_size: int, start: int = 0, parent: bytes | None = None,
                  upto: int | None = None) -> list[bytes]:
    """Digests of the full blocks ``start, start+1, ...`` of ``token_ids`` (its first
    ``upto`` tokens when given), chained from ``parent`` (block ``start - 1``'s digest;
    None at the start): vLLM's ``sha256_cbor`` chain (engine/block_hash.py)."""
    n = len(token_ids) if upto is None else max(0, min(upto, len(token_ids)))
    return prefix_block_hashes(token_ids[start * block_size:n // block_size * block_size],
                               block_size, parent)


ATTENDED = ("gpu", "host")   # tiers whose blocks a new request can attend (reusable)


def key_of(digest: bytes) -> int:
    """The index key (and the hash KV events carry) of a block digest."""
    return external_hash(digest)


@dataclass
class Entry:
    hash: int
    parent: int | None            # the previous block's hash (None for block 0)
    tokens: tuple[int, ...]
    key: tuple[str, int]          # (arena, byte offset) of the slot holding it
    tier: str                     # 'gpu' or 'host' (attended tiers only)
    fmt: object                   # KVFormat
    summary: object = None        # key min/max of a host block (top-k), for reusers
    cached: bool = False          # held by the index alone (no sequence holds the slot)


@dataclass
class PrefixIndex:
    block_size: int
    record_events: bool = False
    by_hash: dict[int, Entry] = field(default_factory=dict)
    by_key: dict[tuple[str, int], Entry] = field(default_factory=dict)
    lru: OrderedDict = field(default_factory=OrderedDict)   # hash -> Entry (cached only)
    events: list = field(default_factory=list)
    # counters (status and metrics)
    hit_tokens: int = 0
    queried_tokens: int = 0
    evicted_cached: int = 0

    # -- queries ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.by_hash)

    def match(self, hashes: list[int], lossy_from=frozenset()) -> list[Entry]:
        """The leading entries of ``hashes``: full-precision blocks, and quantized ones
        only in slots of ``lossy_from`` (a session's own KV: a request never inherits
        another's lossy blocks)."""
        out = []
        for h in hashes:
            e = self.by_hash.get(h)
            if e is None or not (e.fmt.is_full or e.key in lossy_from):
                break
            out.append(e)
        return out

    def view(self) -> dict[str, set[int]]:
        """Medium -> hashes held (what a router rebuilds from the events)."""
        out: dict[str, set[int]] = {}
        for e in self.by_hash.values():
            out.setdefault(medium_of(e.tier), set()).add(e.hash)
        return out

    def cached_on(self, arena: str) -> int:
        return sum(1 for e in self.lru.values() if e.key[0] == arena)

    # -- changes ---------------------------------------------------------------------------
    def add(self, h: int, parent: int | None, tokens, key: tuple[str, int], tier: str, fmt) -> bool:
        """Index a slot under ``h``; False (nothing changes) if ``h`` is indexed already
        (another copy of the same prefix) or the slot is."""
        if h in self.by_hash or key in self.by_key:
            return False
        e = Entry(h, parent, tuple(tokens), key, tier, fmt)
        self.by_hash[h] = self.by_key[key] = e
        self._event("stored", e)
        return True

    def retarget(self, old: tuple[str, int], new: tuple[str, int], tier: str, fmt,
                 summary=None) -> None:
        """The block indexed at slot ``old`` now lives at ``new`` (its sole holder moved
        it): quantized, offloaded or fetched."""
        self.retarget_many([(old, new, tier, fmt, summary)])

    def retarget_many(self, moves) -> None:
        """Several blocks moved at once, ``(old, new, tier, fmt, summary)`` each. A new
        slot may be another moved block's old one (a group freed, then allocated again
        in the same pages), so every old entry is taken out before any is put back."""
        taken = self.detach([m[0] for m in moves])
        self.attach([(e,) + tuple(m[1:]) for e, m in zip(taken, moves)])

    def detach(self, keys) -> list:
        """Take the entries of slots ``keys`` out of the slot map (None where a slot is
        not indexed), for ``attach`` once their blocks have new slots: in between, the
        old slots may be reused by other blocks."""
        return [self.by_key.pop(k, None) for k in keys]

    def attach(self, moves) -> None:
        """``(entry or None, new key, tier, fmt, summary)`` per detached entry."""
        for e, new, tier, fmt, summary in moves:
            if e is not None:
                self._move(e, new, tier, fmt, summary)

    def _move(self, e: Entry, new: tuple[str, int], tier: str, fmt, summary) -> None:
        if tier not in ATTENDED:     # parked, swapped: not attended, so not reusable
            self._drop(e)
            return
        moved_medium = medium_of(tier) != medium_of(e.tier)
        if moved_medium:
            self._event("removed", e)
        e.key, e.tier, e.fmt, e.summary = new, tier, fmt, summary
        self.by_key[new] = e
        if moved_medium:
            self._event("stored", e)

    def rekey(self, where: dict) -> None:
        """Slots moved within their arena (compaction): same block, same tier and
        format, a new offset; no event (the medium is unchanged)."""
        taken = [(self.by_key.pop(old, None), new) for old, new in where.items()]
        for e, new in taken:
            if e is not None:
                e.key = new
                self.by_key[new] = e

    def forget_slot(self, key: tuple[str, int]) -> None:
        e = self.by_key.get(key)
        if e is not None:
            self.by_key.pop(key)
            self._drop(e)

    def cache(self, key: tuple[str, int]) -> bool:
        """The last sequence let go of slot ``key``: keep it as a cached entry if it is
        indexed (True: the index holds it now), else False (free it)."""
        e = self.by_key.get(key)
        if e is None:
            return False
        e.cached = True
        self.lru[e.hash] = e
        self.lru.move_to_end(e.hash)
        return True

    def take(self, e: Entry) -> None:
        """A sequence holds a cached entry's slot again."""
        if e.cached:
            e.cached = False
            self.lru.pop(e.hash, None)

    def pop_lru(self, arena: str) -> Entry | None:
        """The least recently cached entry on ``arena``, removed from the index (the
        caller frees its slot)."""
        for h, e in self.lru.items():
            if e.key[0] == arena:
                del self.lru[h]
                self.by_key.pop(e.key, None)
                self._drop(e)
                self.evicted_cached += 1
                return e
        return None

    def drain_events(self) -> list:
        out, self.events = self.events, []
        return out

    # -- internals -------------------------------------------------------------------------
    def _drop(self, e: Entry) -> None:
        self.by_hash.pop(e.hash, None)
        self.lru.pop(e.hash, None)
        self._event("removed", e)

    def _event(self, kind: str, e: Entry) -> None:
        if not self.record_events:
            return
        if kind == "stored":
            self.events.append(BlockStored([e.hash], e.parent, list(e.tokens),
                                           self.block_size, medium_of(e.tier)))
        else:
            self.events.append(BlockRemoved([e.hash], medium_of(e.tier)))

    def reannounce(self) -> None:
        """After the sink lost events: everything held, from a clean slate."""
        self.events = [AllBlocksCleared()]
        rec, self.record_events = self.record_events, True
        for e in self.by_hash.values():
            self._event("stored", e)
        self.record_events = rec
