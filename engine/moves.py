"""How blocks change format or place: the mechanics behind the controller's actions.

Each function validates everything first and raises ``ActionError`` without touching
state when the action is illegal; then it moves bytes and updates the block table.
"""
from __future__ import annotations

import os

import torch

from engine.actions import ActionError
from engine.kernels.gather import copy_slots
from engine.kernels.slots import read_blocks, write_blocks
from engine.layout import FULL, KVFormat
from engine.plan import ints_on, on_device
from engine.store import EVICTED, GPU, HOST, PARKED, SWAPPED, Block, KVStore

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


def check_format(bits: int, v_bits: int | None, fp8: bool = False) -> KVFormat:
    vb = bits if v_bits is None else v_bits
    for b in (bits, vb):
        if b not in (8, 4, 2):
            raise ActionError(f"bits must be 8, 4 or 2, got {b}")
    if fp8 and 8 not in (bits, vb):
        raise ActionError(f"fp8 needs 8-bit keys or values, got {bits} and {vb} bits")
    return KVFormat(bits, vb, fp8)


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
        # full > int8 > fp8 > int4 > int2, keys and values each (KVFormat.precision_rank)
        if any(old < new for old, new in zip(b.fmt.precision_rank(), fmt.precision_rank())):
            raise ActionError(f"{seq_id}: block {b.index} is {b.fmt.name}; raising it to "
                              f"{fmt.name} cannot bring back lost precision")
    _check_written(store, seq_id, blocks)
    todo = [b for b in blocks if b.fmt != fmt]
    _check_convertible(store, todo, fmt)
    freed = 0
    for i in range(0, len(todo), BATCH):
        freed += _convert(store, todo[i:i + BATCH], fmt)
    return freed


def _check_written(store: KVStore, seq_id: str, blocks: list[Block]) -> None:
    """Only blocks whose every row is written may change format or place: a prompt block
    that chunked prefill has not reached yet (or reached part-way) is still being written."""
    T = store.block_size
    for b in blocks:
        if b.num_tokens < T:
            raise ActionError(f"{seq_id}: block {b.index} is not fully written "
                              f"({b.num_tokens} of {T} tokens); only full blocks can move")


def _check_convertible(store: KVStore, blocks: list[Block], fmt: KVFormat) -> None:
    """Raise ActionError, changing nothing, unless every batch of ``_convert`` finds its
    slots: the allocator's steps are replayed on a copy first, so a quantize never stops
    half-way with some batches converted."""
    if not blocks:
        return
    new_slot = store.geom.slot_bytes(fmt)
    store.make_room(GPU, {new_slot: min(len(blocks), BATCH)})  # cached prefixes go first
    if store.arenas[GPU].alloc.can_allocate(new_slot, len(blocks)):
        # every new slot fits beside the old ones: each batch allocates first and only
        # frees after, so none can fail. The common case (a filled block to its sequence's
        # fill format, every few steps of a decode): the copy below walks the allocator's
        # free lists (at batch 8 / 32K on an H100 host, two copies in 10 profiled steps
        # took 19 ms under cProfile, part of the 29 ms a step the int4 engine spent
        # outside its 23.6 ms replay, 2026-12-06)
        return
    sim = store.arenas[GPU].alloc.clone()
    skip = store.compaction_skip(GPU)
    fake = {id(b): b.offset for b in blocks}
    for i in range(0, len(blocks), BATCH):
        by_fmt: dict[KVFormat, list[Block]] = {}
        for b in blocks[i:i + BATCH]:
            by_fmt.setdefault(b.fmt, []).append(b)
        for old_fmt, group in by_fmt.items():
            old_slot = store.geom.slot_bytes(old_fmt)
            if not sim.can_allocate(new_slot, len(group)):
                if any(store.is_shared(b) for b in group):   # copy on write: no room
                    raise ActionError("no room on the GPU tier for copies of these shared "
                                      "blocks in the new format")
                for b in group:
                    sim.free(fake[id(b)], old_slot)
                while sim.pages_short(new_slot, len(group)):   # as _convert will
                    page = sim.evacuation_page(skip)
                    if page is None:
                        break
                    for old, new, _ in sim.evacuate(page):
                        fake.update({k: new for k, o in fake.items() if o == old})
                if not sim.can_allocate(new_slot, len(group)):
                    raise ActionError("the GPU arena is too fragmented to re-store these "
                                      "blocks; free or move other blocks first")
                for b in group:
                    fake[id(b)] = sim.allocate(new_slot)
            else:
                new = [sim.allocate(new_slot) for _ in group]
                for b, o in zip(group, new):
                    if not store.is_shared(b):
                        sim.free(fake[id(b)], old_slot)
                    fake[id(b)] = o


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
        offs = ints_on(arena.device, [b.offset for b in group])
        olds = [b.offset for b in group]
        nshared = sum(store.is_shared(b) for b in group)   # copies: they free nothing
        if alloc.can_allocate(new_slot, len(group)):
            new = [alloc.allocate(new_slot) for _ in group]
            run = _fused(arena, store, fmt) if old_fmt.is_full else None
            if run is not None:
                # one launch, no staging copy (the new slots are beside the old ones)
                run(arena.data, offs, ints_on(arena.device, new), store.geom, fmt)
            else:
                k, v = read_blocks(arena.data, offs, store.geom, old_fmt, torch.float32)
                _write(store, new, fmt, k, v, group)
            for b, o, was in zip(group, new, olds):
                b.offset, b.fmt = o, fmt
                store.moved_slot(b, GPU, was, old_slot)   # shared: copy on write
        else:
            # no room for the new slots beside the old ones: free first (their bytes are
            # in k, v), move other slots out of half-empty pages if that is still not
            # enough, then allocate; if there is still no room, put the blocks back as
            # they were (never for shared blocks: ``_check_convertible`` refused those).
            # Their index entries are out of the slot map meanwhile: the freed slots may
            # be other blocks' new ones.
            k, v = read_blocks(arena.data, offs, store.geom, old_fmt, torch.float32)
            entries = store.prefix.detach([(GPU, was) for was in olds])
            for b in group:
                alloc.free(b.offset, old_slot)
                b.offset = -1
            store.compact_until(GPU, lambda: alloc.pages_short(new_slot, len(group)))
            if not alloc.can_allocate(new_slot, len(group)):
                back = [alloc.allocate(old_slot) for _ in group]
                _write(store, back, old_fmt, k, v, group)
                for b, o in zip(group, back):
                    b.offset = o
                store.prefix.attach([(e, (GPU, o), b.tier, b.fmt, None)
                                     for e, b, o in zip(entries, group, back)])
                raise ActionError("the GPU arena is too fragmented to re-store these blocks; "
                                  "free or move other blocks first")
            new = [alloc.allocate(new_slot) for _ in group]
            _write(store, new, fmt, k, v, group)
            for b, o in zip(group, new):
                b.offset, b.fmt = o, fmt
            store.prefix.attach([(e, (GPU, o), b.tier, fmt, None)
                                 for e, b, o in zip(entries, group, new)])
        freed += ((old_slot - new_slot) * (len(group) - nshared)
                  - new_slot * nshared) * store.num_layers
    return freed


# The Triton slot conversion (engine/kernels/quantize_slots_triton.py) for quantizing
# full-precision blocks on CUDA: byte-exact against the torch path in the interpreter,
# not yet run on a GPU, so off unless KVCTL_FUSED_QUANT=1
FUSED_QUANT = os.environ.get("KVCTL_FUSED_QUANT", "0") == "1"


def _fused(arena, store: KVStore, fmt: KVFormat):
    """The slot conversion to ``fmt`` where it runs (CUDA, KVCTL_FUSED_QUANT=1), or None
    (the torch path: read_blocks, then write_blocks)."""
    if not FUSED_QUANT or arena.device.type != "cuda":
        return None
    from engine.kernels import quantize_slots_triton as q
    return q.quantize_slots if q.supported(store.geom, fmt) else None


def _write(store: KVStore, offsets: list[int], fmt: KVFormat, k, v,
           blocks: list[Block]) -> None:
    arena = store.arenas[GPU]
    offs = ints_on(arena.device, offsets)
    # the sequence's first block holds the attention sink: its keys get sink-aware
    # rounding. Decided here, on the host: without such a block (a block that just filled)
    # no flags go; with one they go to the device queued, and are not read back there
    first = [b.index == 0 for b in blocks]
    anchor = on_device(torch.tensor(first), arena.device) if any(first) else None
    write_blocks(arena.data, offs, store.geom, fmt, k, v, anchor)


def fill_candidates(store: KVStore, seq_id: str) -> list[int]:
    """Full, non-newest, full-precision GPU blocks of a sequence, for its fill format
    (its own: a block it shares with others stays as it is, since converting it would
    copy it and free nothing)."""
    s = store.seqs[seq_id]
    T = store.block_size
    # the engine asks every step for every such sequence: the format's code first (one
    # attribute: most blocks are converted already)
    return [b.index for b in s.blocks[:-1]
            if b.fmt.code == 0 and b.tier == GPU and b.num_tokens == T
            and not store.is_shared(b)]


# -- eviction, parking, offload ----------------------------------------------------------

def _copy_runs(src, src_offs: list[int], dst, dst_offs: list[int], sizes: list[int]) -> None:
    """Copy slots between arenas, all layers at once (``copy_slots``), and wait for
    the copy."""
    copy_slots(src.data, dst.data, zip(src_offs, dst_offs, sizes))
    if src.device.type == "cuda" or dst.device.type == "cuda":
        torch.cuda.current_stream().synchronize()


def _check_movable(store: KVStore, seq_id: str, blocks: list[Block], what: str,
                   allowed: tuple[str, ...], protect_sinks: bool) -> None:
    s = store.seqs[seq_id]
    for b in blocks:
        if b.tier in (GPU, HOST) and b.num_tokens < store.block_size \
                and b.index != len(s.blocks) - 1:
            raise ActionError(f"{seq_id}: block {b.index} is not fully written "
                              f"({b.num_tokens} of {store.block_size} tokens); only full "
                              "blocks can move")
        if b.index == len(s.blocks) - 1:
            raise ActionError(f"{seq_id}: block {b.index} is the newest block; new tokens "
                              f"are written there, it cannot be {what}")
        if protect_sinks and b.index < store.num_sink_blocks:
            raise ActionError(f"{seq_id}: block {b.index} holds the attention sink; it "
                              f"cannot be {what}")
        if b.tier not in allowed:
            raise ActionError(f"{seq_id}: block {b.index} is {b.tier}; only "
                              f"{' or '.join(allowed)} blocks can be {what}")


def _host(store: KVStore):
    if not store.has_host():
        raise ActionError("this engine has no host tier (host_budget_bytes is 0)")
    return store.arenas[HOST]


def _room(arena, blocks: list[Block], store: KVStore, where: str) -> None:
    need: dict[int, int] = {}
    for b in blocks:
        slot = store.geom.slot_bytes(b.fmt)
        need[slot] = need.get(slot, 0) + 1
    # sizes are checked one class at a time; a class's fresh pages reduce the others'
    if not store.make_room(arena.name, need):
        raise ActionError(f"not enough free {where} memory for {len(blocks)} blocks")


def _move(store: KVStore, blocks: list[Block], src_name: str, dst_name: str,
          new_tier: str) -> int:
    """Copy blocks from one arena to the other, free the source slots."""
    src, dst = store.arenas[src_name], store.arenas[dst_name]
    sizes = [store.geom.slot_bytes(b.fmt) for b in blocks]
    # allocate destination slots in index order so a sequence's run stays contiguous
    dst_offs = [dst.alloc.allocate(n) for n in sizes]
    _copy_runs(src, [b.offset for b in blocks], dst, dst_offs, sizes)
    for b, o, n in zip(blocks, dst_offs, sizes):
        was = b.offset
        b.offset, b.tier = o, new_tier
        store.moved_slot(b, src_name, was, n)     # shared: copy on write
    return sum(sizes) * store.num_layers


def key_summary(store: KVStore, b: Block) -> torch.Tensor:
    """Per-channel key min/max of a GPU block, all layers: [L, H, 2, D] fp32 (Quest)."""
    return key_summaries(store, [b])[0]


def key_summaries(store: KVStore, blocks: list[Block]) -> list[torch.Tensor]:
    """``key_summary`` of each block, read a format at a time in one pass (an offload of
    N blocks was N reads of one block each: ~12 kernels a block on a GPU)."""
    arena = store.arenas[GPU]
    out: list[torch.Tensor | None] = [None] * len(blocks)
    by_fmt: dict[KVFormat, list[int]] = {}
    for i, b in enumerate(blocks):
        by_fmt.setdefault(b.fmt, []).append(i)
    for fmt, idx in by_fmt.items():
        offs = ints_on(arena.device, [blocks[i].offset for i in idx])
        k, _ = read_blocks(arena.data, offs, store.geom, fmt, torch.float32)  # [L,n,H,T,D]
        if all(blocks[i].num_tokens == store.block_size for i in idx):   # (moves: always)
            summ = torch.stack([k.amin(3), k.amax(3)], 3)                  # [L,n,H,2,D]
            for j, i in enumerate(idx):
                out[i] = summ[:, j]
            continue
        for j, i in enumerate(idx):
            kj = k[:, j, :, :blocks[i].num_tokens]
            out[i] = torch.stack([kj.amin(2), kj.amax(2)], 2)
    return out


def evict(store: KVStore, seq_id: str, indices, park: bool) -> dict[str, int]:
    """Drop blocks from attention; with ``park`` keep a host copy for ``restore``."""
    blocks = target_blocks(store, seq_id, indices)
    _check_movable(store, seq_id, blocks, "evicted", (GPU, HOST), protect_sinks=True)
    on_gpu = [b for b in blocks if b.tier == GPU]
    if park:
        _room(_host(store), on_gpu, store, "host")
        moved = _move(store, sorted(on_gpu, key=lambda b: b.index), GPU, HOST, PARKED)
        for b in blocks:
            b.tier, b.summary = PARKED, None
        return {GPU: moved, HOST: -moved}
    freed = {GPU: 0, HOST: 0}
    for b in blocks:
        tier = GPU if b.tier == GPU else HOST
        if not store.is_shared(b):       # a shared block stays for its other holders
            freed[tier] += store.block_bytes(b.fmt)
        store._release(b, keep=False)
        b.tier, b.summary = EVICTED, None
    return freed


def restore(store: KVStore, seq_id: str, indices) -> dict[str, int]:
    """Parked blocks back into attention on the GPU tier."""
    blocks = target_blocks(store, seq_id, indices)
    for b in blocks:
        if b.tier != PARKED:
            raise ActionError(f"{seq_id}: block {b.index} is {b.tier}, not parked"
                              + ("; evicted without park cannot come back"
                                 if b.tier == EVICTED else ""))
    _room(store.arenas[GPU], blocks, store, "GPU")
    moved = _move(store, sorted(blocks, key=lambda b: b.index), HOST, GPU, GPU)
    return {GPU: -moved, HOST: moved}


def offload(store: KVStore, seq_id: str, indices) -> dict[str, int]:
    """GPU blocks to the host tier; key summaries stay on the device for top-k."""
    blocks = target_blocks(store, seq_id, indices)
    _check_movable(store, seq_id, blocks, "offloaded", (GPU,), protect_sinks=False)
    _room(_host(store), blocks, store, "host")
    s = store.seqs[seq_id]
    if s.decode_mode == "exact":
        per_layer = sum(store.geom.slot_bytes(b.fmt) for b in store.host_blocks(seq_id)
                        + blocks)
        if per_layer > store.staging_half:
            raise ActionError(
                f"{seq_id}: exact decode would stream {per_layer} bytes per layer, more "
                f"than the staging buffer ({store.staging_half}); use top-k decode "
                "(SetDecodeMode) or a larger staging area")
    blocks = sorted(blocks, key=lambda b: b.index)
    for b, summary in zip(blocks, key_summaries(store, blocks)):
        b.summary = summary
    moved = _move(store, blocks, GPU, HOST, HOST)
    return {GPU: moved, HOST: -moved}


def fetch(store: KVStore, seq_id: str, indices) -> dict[str, int]:
    """Offloaded blocks back to the GPU tier for good."""
    blocks = target_blocks(store, seq_id, indices)
    for b in blocks:
        if b.tier != HOST:
            raise ActionError(f"{seq_id}: block {b.index} is {b.tier}, not offloaded")
    _room(store.arenas[GPU], blocks, store, "GPU")
    moved = _move(store, sorted(blocks, key=lambda b: b.index), HOST, GPU, GPU)
    for b in blocks:
        b.summary = None
    return {GPU: -moved, HOST: moved}


def set_decode_mode(store: KVStore, seq_id: str, mode: str, top_k: int) -> None:
    if seq_id not in store.seqs:
        raise ActionError(f"unknown sequence {seq_id!r} (finished, or never admitted)")
    if mode not in ("exact", "topk"):
        raise ActionError(f"decode mode must be 'exact' or 'topk', got {mode!r}")
    if mode == "topk" and top_k < 1:
        raise ActionError("top-k decode needs top_k >= 1")
    full_slot = store.geom.slot_bytes(FULL)
    if mode == "topk" and top_k * full_slot > store.staging_half:
        raise ActionError(f"top_k {top_k} blocks exceed the staging buffer "
                          f"({store.staging_half // full_slot} blocks)")
    if mode == "exact":
        per_layer = sum(store.geom.slot_bytes(b.fmt) for b in store.host_blocks(seq_id))
        if per_layer > store.staging_half:
            raise ActionError(f"{seq_id}: its offloaded blocks ({per_layer} bytes per "
                              f"layer) exceed the staging buffer ({store.staging_half})")
    s = store.seqs[seq_id]
    s.decode_mode, s.top_k = mode, top_k if mode == "topk" else 0


# -- preemption: the engine's own moves, never a policy's --------------------------------

def _swappable(store: KVStore, seq_id: str) -> list[Block]:
    """The blocks a swap-out moves: every GPU block holding a slot (tail included)."""
    return [b for b in store.seqs[seq_id].blocks if b.tier == GPU and b.offset >= 0]


def swap_out(store: KVStore, seq_id: str) -> list[int]:
    """Every GPU block of a preempted sequence (tail included) to the host tier, as
    ``swapped``; returns their indices. Raises ActionError, changing nothing, when the
    host tier cannot hold them."""
    blocks = _swappable(store, seq_id)
    if blocks:
        _room(_host(store), blocks, store, "host")
        _move(store, blocks, GPU, HOST, SWAPPED)
    return [b.index for b in blocks]


def check_swap_out(store: KVStore, seq_id: str) -> None:
    """ActionError unless the host tier has room for every GPU block of ``seq_id``."""
    blocks = _swappable(store, seq_id)
    if not blocks:
        raise ActionError(f"{seq_id} holds no GPU blocks to swap out")
    _room(_host(store), blocks, store, "host")


def can_swap_in(store: KVStore, seq_id: str, indices: list[int], growth_blocks: int) -> bool:
    """Room on the GPU tier for a preempted sequence's swapped blocks plus
    ``growth_blocks`` new full-precision blocks."""
    s = store.seqs[seq_id]
    need: dict[int, int] = {}
    for i in indices:
        slot = store.geom.slot_bytes(s.blocks[i].fmt)
        need[slot] = need.get(slot, 0) + 1
    full = store.geom.slot_bytes(FULL)
    need[full] = need.get(full, 0) + growth_blocks
    return store.make_room(GPU, need)


def swap_in(store: KVStore, seq_id: str, indices: list[int]) -> None:
    """The swapped blocks back on the GPU tier (check ``can_swap_in`` first)."""
    s = store.seqs[seq_id]
    blocks = sorted((s.blocks[i] for i in indices), key=lambda b: b.index)
    if blocks:
        _move(store, blocks, HOST, GPU, GPU)
