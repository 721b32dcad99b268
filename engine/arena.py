"""Byte arenas of KV slots and their slab allocator.

An arena is one ``[num_layers, arena_bytes]`` uint8 tensor allocated once (like vLLM's
preallocated KV pool): capacity is fixed, what moves is which bytes are in use. Slots
of different sizes (one size per block format) come from fixed-size pages, each page
serving one slot size (a slab allocator). Quantizing a block moves it to a smaller slot
and returns the old one, so pages fill up less and whole pages go back to the free list.

The allocator is plain Python bookkeeping of byte offsets, testable without tensors.
"""
from __future__ import annotations

import heapq

import torch

from engine.api import OutOfBlocks  # re-exported: defined torch-free for the daemon

__all__ = ["Arena", "OutOfBlocks", "SlabAllocator"]


class SlabAllocator:
    def __init__(self, capacity_bytes: int, page_bytes: int, reserve_pages: int = 0):
        if page_bytes <= 0 or page_bytes % 16:
            raise ValueError(f"page_bytes must be a positive multiple of 16, got {page_bytes}")
        self.page_bytes = page_bytes
        # reserved pages sit after the allocatable ones, outside every count (scratch)
        self.row_pages = capacity_bytes // page_bytes
        self.num_pages = self.row_pages - reserve_pages
        if self.num_pages < 1:
            raise ValueError(
                f"arena of {capacity_bytes} bytes per layer holds no page of {page_bytes} bytes"
                + (f" beside {reserve_pages} reserved" if reserve_pages else ""))
        self.reserved_base = self.num_pages * page_bytes
        self._free_pages: list[int] = list(range(self.num_pages - 1, -1, -1))
        self._page_slot: dict[int, int] = {}          # page -> slot size it serves
        self._page_free: dict[int, list[int]] = {}    # page -> free slot indices
        self._partial: dict[int, set[int]] = {}       # slot size -> pages with free slots
        self.used_slot_bytes = 0
        self.num_slots = 0

    def clone(self) -> SlabAllocator:
        """An independent copy (a quantize's dry run replays its steps on one): its
        containers copied one level down, ~10x cheaper than ``copy.deepcopy``."""
        c = object.__new__(SlabAllocator)
        c.__dict__.update(self.__dict__)
        c._free_pages = list(self._free_pages)
        c._page_slot = dict(self._page_slot)
        c._page_free = {p: list(f) for p, f in self._page_free.items()}
        c._partial = {s: set(ps) for s, ps in self._partial.items()}
        return c

    # -- queries ---------------------------------------------------------------------------
    @property
    def capacity_bytes(self) -> int:
        return self.num_pages * self.page_bytes

    @property
    def used_pages(self) -> int:
        return self.num_pages - len(self._free_pages)

    @property
    def used_bytes(self) -> int:
        return self.used_pages * self.page_bytes

    def slots_per_page(self, slot_bytes: int) -> int:
        n = self.page_bytes // slot_bytes
        if n < 1:
            raise ValueError(f"slot of {slot_bytes} bytes exceeds the page of {self.page_bytes}")
        return n

    def free_slots(self, slot_bytes: int) -> int:
        """How many slots of this size can still be allocated."""
        per = self.slots_per_page(slot_bytes)
        partial = sum(len(self._page_free[p]) for p in self._partial.get(slot_bytes, ()))
        return partial + per * len(self._free_pages)

    def can_allocate(self, slot_bytes: int, n: int = 1) -> bool:
        return self.free_slots(slot_bytes) >= n

    def fresh_pages(self, slot_bytes: int, n: int) -> int:
        """Pages n slots of this size fill when none of its pages has a free slot."""
        return -(-n // self.slots_per_page(slot_bytes))

    def pages_needed(self, slot_bytes: int, n: int) -> int:
        """Fresh pages that allocating n slots of this size would take."""
        partial = sum(len(self._page_free[p]) for p in self._partial.get(slot_bytes, ()))
        return self.fresh_pages(slot_bytes, max(0, n - partial))

    def pages_short(self, slot_bytes: int, n: int) -> int:
        """Fresh pages that allocating n slots of this size needs beyond the free ones."""
        return max(0, self.pages_needed(slot_bytes, n) - len(self._free_pages))

    # -- mutation --------------------------------------------------------------------------
    def allocate(self, slot_bytes: int) -> int:
        """Byte offset (within a layer row) of a new slot."""
        pages = self._partial.get(slot_bytes)
        if not pages:
            if not self._free_pages:
                raise OutOfBlocks(f"no free page for a {slot_bytes}-byte slot")
            page = self._free_pages.pop()
            per = self.slots_per_page(slot_bytes)
            self._page_slot[page] = slot_bytes
            self._page_free[page] = list(range(per - 1, -1, -1))
            pages = self._partial.setdefault(slot_bytes, set())
            pages.add(page)
        page = min(pages)  # fill low pages first: keeps runs contiguous, frees high pages
        free = self._page_free[page]
        idx = free.pop()
        if not free:
            pages.discard(page)
        self.used_slot_bytes += slot_bytes
        self.num_slots += 1
        return page * self.page_bytes + idx * slot_bytes

    def allocate_many(self, slot_bytes: int, n: int) -> list[int]:
        if not self.can_allocate(slot_bytes, n):
            raise OutOfBlocks(f"no room for {n} slots of {slot_bytes} bytes")
        return [self.allocate(slot_bytes) for _ in range(n)]

    def compactable_pages(self) -> int:
        """Pages that moving slots could give back at most: per slot size, its pages
        less the pages its used slots need."""
        pages: dict[int, int] = {}
        used: dict[int, int] = {}
        for p, slot in self._page_slot.items():
            pages[slot] = pages.get(slot, 0) + 1
            used[slot] = used.get(slot, 0) + self.slots_per_page(slot) - len(self._page_free[p])
        return sum(n - -(-used[sl] // self.slots_per_page(sl)) for sl, n in pages.items())

    def evacuation_page(self, skip=frozenset()) -> int | None:
        """The page whose slots are cheapest to move into free slots of other pages of
        its slot size (fewest used slots, and room for them elsewhere), so the page can
        be given back: None if no page can. Pages in ``skip`` stay."""
        best, best_used = None, None
        for slot, partial in self._partial.items():
            if not partial:
                continue
            per = self.slots_per_page(slot)
            room = sum(len(self._page_free[p]) for p in partial)
            for p in partial:
                if p in skip:
                    continue
                used = per - len(self._page_free[p])
                if used <= room - len(self._page_free[p]) and (
                        best_used is None or used < best_used):
                    best, best_used = p, used
        return best

    def evacuate(self, page: int) -> list[tuple[int, int, int]]:
        """Move every used slot of ``page`` into free slots of the fullest other pages of
        its size (bookkeeping only: the caller copies the bytes) and give the page back.
        Returns ``(old offset, new offset, slot bytes)`` per moved slot."""
        slot = self._page_slot[page]
        per = self.slots_per_page(slot)
        free_here = set(self._page_free[page])
        used = [i for i in range(per) if i not in free_here]
        partial = [p for p in self._partial.get(slot, ()) if p != page]
        if sum(len(self._page_free[p]) for p in partial) < len(used):
            raise ValueError(f"page {page}: no room for its {len(used)} slots elsewhere")
        # the fullest first; each has a free slot, so len(used) of them are enough (not
        # a sort of every partial page: compaction empties pages one at a time)
        others = heapq.nsmallest(len(used), partial,
                                 key=lambda p: (len(self._page_free[p]), p))
        out = []
        for i in used:
            dst = others[0]
            idx = self._page_free[dst].pop()
            if not self._page_free[dst]:
                self._partial[slot].discard(dst)
                others.pop(0)
            out.append((page * self.page_bytes + i * slot, dst * self.page_bytes + idx * slot,
                        slot))
        self._partial[slot].discard(page)
        del self._page_free[page], self._page_slot[page]
        self._free_pages.append(page)
        return out

    def free(self, offset: int, slot_bytes: int) -> None:
        page, rem = divmod(offset, self.page_bytes)
        if self._page_slot.get(page) != slot_bytes or rem % slot_bytes:
            raise ValueError(f"offset {offset} is not a {slot_bytes}-byte slot")
        idx = rem // slot_bytes
        free = self._page_free[page]
        if idx in free:
            raise ValueError(f"double free of slot at {offset}")
        free.append(idx)
        self.used_slot_bytes -= slot_bytes
        self.num_slots -= 1
        if len(free) == self.slots_per_page(slot_bytes):
            # whole page empty: give it back to every slot size
            self._partial[slot_bytes].discard(page)
            del self._page_free[page], self._page_slot[page]
            self._free_pages.append(page)
        else:
            self._partial.setdefault(slot_bytes, set()).add(page)


class Arena:
    """One tier's bytes: ``data [num_layers, bytes_per_layer]`` uint8 plus its allocator.

    A device arena may carry a *staging* area after the last layer: offloaded blocks
    are copied there, one layer at a time, for the decode kernel. The kernel takes one
    layer's row as ``row(layer)`` — a 1-D view from that layer's start to the end of the
    buffer — so slot offsets and staging offsets (``staging_base(layer) + x``) address
    the same allocation.
    """

    def __init__(self, name: str, num_layers: int, capacity_bytes: int, page_bytes: int,
                 device: torch.device, pin: bool = False, staging_bytes: int = 0,
                 reserve_pages: int = 0):
        per_layer = capacity_bytes // num_layers
        self.name = name
        self.num_layers = num_layers
        self.alloc = SlabAllocator(per_layer, page_bytes, reserve_pages)
        self.row_bytes = self.alloc.row_pages * page_bytes
        self.staging_bytes = staging_bytes // 32 * 32
        self.device = torch.device(device)
        # empty, not zeros: the OS maps pages lazily; we never read an unwritten slot
        self.flat = torch.empty(num_layers * self.row_bytes + self.staging_bytes,
                                dtype=torch.uint8, device=self.device,
                                pin_memory=pin and self.device.type == "cpu")
        self.data = self.flat[:num_layers * self.row_bytes].view(num_layers, self.row_bytes)
        self.staging = self.flat[num_layers * self.row_bytes:]

    @property
    def capacity_bytes(self) -> int:
        return self.alloc.capacity_bytes * self.num_layers

    @property
    def used_bytes(self) -> int:
        return self.alloc.used_bytes * self.num_layers

    @property
    def block_bytes(self) -> int:
        return self.alloc.used_slot_bytes * self.num_layers

    def row(self, layer: int) -> torch.Tensor:
        """1-D bytes from ``layer``'s row to the end (slots, then later rows, staging)."""
        return self.flat[layer * self.row_bytes:]

    def staging_base(self, layer: int) -> int:
        """Offset of the staging area relative to ``row(layer)``."""
        return (self.num_layers - layer) * self.row_bytes
