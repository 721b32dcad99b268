"""The slab allocator: exact accounting, pages come back, no double use."""
import random

import pytest

from engine.arena import OutOfBlocks, SlabAllocator

SIZES = [4096, 1536, 768, 1024, 96]


@pytest.mark.parametrize("seed", range(5))
def test_random_alloc_free_keeps_exact_accounting(seed):
    rng = random.Random(seed)
    a = SlabAllocator(64 * 4096, 4096)
    live: dict[int, int] = {}
    for _ in range(3000):
        if live and rng.random() < 0.45:
            off = rng.choice(list(live))
            a.free(off, live.pop(off))
        else:
            size = rng.choice(SIZES)
            if a.can_allocate(size):
                off = a.allocate(size)
                # no two live slots overlap
                for o, s in live.items():
                    assert off + size <= o or o + s <= off
                live[off] = size
            else:
                with pytest.raises(OutOfBlocks):
                    a.allocate(size)
        assert a.used_slot_bytes == sum(live.values())
        assert a.num_slots == len(live)
        assert a.used_bytes <= a.capacity_bytes
    for off, size in list(live.items()):
        a.free(off, size)
    assert a.used_pages == 0 and a.used_slot_bytes == 0


def test_free_slots_counts_partial_pages_and_free_pages():
    a = SlabAllocator(4 * 4096, 4096)
    assert a.free_slots(1024) == 16
    a.allocate(1024)
    assert a.free_slots(1024) == 15
    assert a.free_slots(4096) == 3   # the partial page serves only 1024-byte slots


def test_double_free_and_wrong_size_are_errors():
    a = SlabAllocator(2 * 4096, 4096)
    off = a.allocate(1024)
    with pytest.raises(ValueError):
        a.free(off, 2048)
    a.free(off, 1024)
    with pytest.raises(ValueError):
        a.free(off, 1024)
