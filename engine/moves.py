"""How blocks change format or place: the mechanics behind the controller's actions.

Each function validates everything first and raises ``ActionError`` without touching
state when the action is illegal; then it moves bytes and updates the block table.
"""
from __future__ import annotations

import torch

from engine.actions import ActionError
from engine.kernels.slots import read_blocks, write_blocks
from engine.layout import FULL, KVFormat
from engine.store import GPU, Block, KVStore

BATCH = 64  # blocks converted per batch: bounds the dense staging memory


def target_blocks(store: KVStore, seq_id: str, indices) -> list[Block]:
    s = store.seqs.get(seq_id)
    if s is None:
        raise ActionError(f"unknown sequence {seq_id!r} (finished, or never admitted)")
    idx = list(indices)
    if not idx:
        raise ActionError("no blocks given")
    if len(set(idx)) != len(idx):
        raise ActionError(f"duplicate block indices in {idx}")
    bad = [i for i in idx if not 0 <= i < len(s.blocks)]
    if bad:
        raise ActionError(f"{seq_id}: blocks {bad} out of range [0, {len(s.blocks)})")
    return [s.blocks[i] for i in idx]


def check_format(bits: int, v_bits: int | None) -> KVFormat:
    vb = bits if v_bits is None else v_bits
    for b in (bits, vb):
        if b not in (8, 4, 2):
            raise ActionError(f"bits must be 8, 4 or 2, got {b}")
    return KVFormat(bits, vb)


def quantize(store: KVStore, seq_id: str, indices, fmt: KVFormat) -> int:
    """Re-store blocks in ``fmt``; returns bytes freed in the GPU tier."""
    blocks = target_blocks(store, seq_id, indices)
    s = store.seqs[seq_id]
    for b in blocks:
        if b.index == len(s.blocks) - 1:
            raise ActionError(f"{seq_id}: block {b.index} is the newest block; it stays at "
                              "full precision (residual window)")
        if b.tier != GPU:
            raise ActionError(f"{seq_id}: block {b.index} is {b.tier}, not on the GPU tier")
        for old, new in ((b.fmt.k_bits, fmt.k_bits), (b.fmt.v_bits, fmt.v_bits)):
            if old and old < new:
                raise ActionError(f"{seq_id}: block {b.index} is {b.fmt.name}; raising it to "
                                  f"{fmt.name} cannot bring back lost precision")
    todo = [b for b in blocks if b.fmt != fmt]
    freed = 0
    for i in range(0, len(todo), BATCH):
        freed += _convert(store, todo[i:i + BATCH], fmt)
    return freed


def _convert(store: KVStore, blocks: list[Block], fmt: KVFormat) -> int:
    arena = store.arenas[GPU]
    alloc = arena.alloc
    new_slot = store.geom.slot_bytes(fmt)
    freed = 0
    # group by current format: read_blocks reads one format at a time
    by_fmt: dict[KVFormat, list[Block]] = {}
    for b in blocks:
        by_fmt.setdefault(b.fmt, []).append(b)
    for old_fmt, group in by_fmt.items():
        old_slot = store.geom.slot_bytes(old_fmt)
        offs = torch.tensor([b.offset for b in group], dtype=torch.int64, device=arena.device)
        k, v = read_blocks(arena.data, offs, store.geom, old_fmt, torch.float32)  # [L, n, H, T, D]
        if alloc.can_allocate(new_slot, len(group)):
            new = [alloc.allocate(new_slot) for _ in group]
            for b in group:
                alloc.free(b.offset, old_slot)
        else:
            # no room for the new slots beside the old ones: free first, then allocate;
            # if fragmentation still leaves no room, put the blocks back as they were
            for b in group:
                alloc.free(b.offset, old_slot)
            if not alloc.can_allocate(new_slot, len(group)):
                back = [alloc.allocate(old_slot) for _ in group]
                _write(store, back, old_fmt, k, v)
                for b, o in zip(group, back):
                    b.offset = o
                raise ActionError("the GPU arena is too fragmented to re-store these blocks; "
                                  "free or move other blocks first")
            new = [alloc.allocate(new_slot) for _ in group]
        _write(store, new, fmt, k, v)
        for b, o in zip(group, new):
            b.offset, b.fmt = o, fmt
        freed += (old_slot - new_slot) * store.num_layers * len(group)
    return freed


def _write(store: KVStore, offsets: list[int], fmt: KVFormat, k, v) -> None:
    arena = store.arenas[GPU]
    offs = torch.tensor(offsets, dtype=torch.int64, device=arena.device)
    write_blocks(arena.data, offs, store.geom, fmt, k, v)


def fill_candidates(store: KVStore, seq_id: str) -> list[int]:
    """Full, non-newest, full-precision GPU blocks of a sequence with a fill format."""
    s = store.seqs[seq_id]
    if s.fill_format == FULL:
        return []
    T = store.block_size
    return [b.index for b in s.blocks[:-1]
            if b.tier == GPU and b.fmt == FULL and b.num_tokens == T]
