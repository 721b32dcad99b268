"""Applying the controller's actions on the engine thread: a candidate (the actions of
one strategy on one sequence) takes effect whole or not at all.

Reversible actions (decode mode, fill format, offload, fetch, park, restore) record how
to undo themselves; an irreversible one (quantize: precision is gone; evict without
park: the bytes are gone) may only come last, and validates everything before it
changes anything. So when any action of a candidate is refused, the ones before it are
undone and the sequence is exactly as it was: no "top-k decode set, offload refused"
half-moves that lose accuracy and free nothing.
"""
from __future__ import annotations

import time
from typing import Callable

from engine import moves
from engine.actions import (Action, ActionError, ActionResult, DropSession, Evict, Fetch,
                            Offload, Quantize, Restore, SetDecodeMode)
from engine.store import ARENA_OF, GPU, HOST, PARKED, KVStore

Undo = Callable[[], None]


def is_irreversible(a: Action) -> bool:
    return isinstance(a, (Quantize, DropSession)) or (isinstance(a, Evict) and not a.park)


def check_candidate(actions: tuple[Action, ...]) -> None:
    if not actions:
        raise ActionError("a candidate needs at least one action")
    if len({a.seq_id for a in actions}) != 1:
        raise ActionError("a candidate's actions must all act on one sequence")
    if any(is_irreversible(a) for a in actions[:-1]):
        raise ActionError("an irreversible action (quantize, evict) may only be a "
                          "candidate's last: nothing after it could be undone")


def apply_candidate(store: KVStore, actions: tuple[Action, ...],
                    note: Callable[[str, str], None]) -> list[ActionResult]:
    """Apply ``actions`` in order, all or nothing; raises ActionError (state unchanged)."""
    check_candidate(actions)
    undo: list[Undo] = []
    results: list[ActionResult] = []
    store.pinned.clear()
    try:
        for a in actions:
            t0 = time.perf_counter()
            freed, what, inverse = _apply(store, a)
            undo.append(inverse)
            results.append(ActionResult(a, True, freed, what,
                                        seconds=time.perf_counter() - t0))
    except Exception as err:
        for inverse in reversed(undo):
            inverse()
        if isinstance(err, ActionError):
            raise
        raise ActionError(f"{type(err).__name__} while applying {type(a).__name__}: "
                          f"{err}") from err
    finally:
        store.pinned.clear()
    for r in results:
        note(r.action.seq_id, r.message)
    return results


def _blocks(store: KVStore, seq_id: str, indices) -> list:
    return moves.target_blocks(store, seq_id, indices)


def _apply(store: KVStore, a: Action) -> tuple[dict[str, int], str, Undo]:
    if isinstance(a, Quantize):
        fmt = moves.check_format(a.bits, a.v_bits, a.fp8)
        freed = moves.quantize(store, a.seq_id, a.blocks, fmt)
        return {GPU: freed}, f"quantize {len(a.blocks)} blocks -> {fmt.name}", _nothing
    if isinstance(a, SetDecodeMode):
        kv = store.seqs.get(a.seq_id)
        old = (kv.decode_mode, kv.top_k) if kv is not None else None
        moves.set_decode_mode(store, a.seq_id, a.mode, a.top_k)

        def back() -> None:
            kv.decode_mode, kv.top_k = old
        return {}, f"decode mode -> {a.mode}" + (f" (k={a.top_k})" if a.mode == "topk"
                                                  else ""), back
    if isinstance(a, Offload):
        plain, shared = _split(store, _blocks(store, a.seq_id, a.blocks))
        freed = moves.offload(store, a.seq_id, a.blocks)
        return freed, f"offload {len(a.blocks)} blocks", \
            lambda: (_raw_fetch(store, plain), _repoint(store, shared))
    if isinstance(a, Fetch):
        plain, shared = _split(store, _blocks(store, a.seq_id, a.blocks))
        freed = moves.fetch(store, a.seq_id, a.blocks)
        return freed, f"fetch {len(a.blocks)} blocks", \
            lambda: (_raw_offload(store, plain), _repoint(store, shared))
    if isinstance(a, Evict):
        plain, shared = _split(store, _blocks(store, a.seq_id, a.blocks))
        before = [(b, b.tier, b.summary) for b in plain]
        freed = moves.evict(store, a.seq_id, a.blocks, a.park)
        what = f"{'park' if a.park else 'evict'} {len(a.blocks)} blocks"
        return freed, what, (lambda: (_unpark(store, before), _repoint(store, shared))) \
            if a.park else _nothing
    if isinstance(a, Restore):
        plain, shared = _split(store, _blocks(store, a.seq_id, a.blocks))
        freed = moves.restore(store, a.seq_id, a.blocks)
        return freed, f"restore {len(a.blocks)} blocks", \
            lambda: (_raw_park(store, plain), _repoint(store, shared))
    raise ActionError(f"unknown action {a!r}")


def _nothing() -> None:
    """The undo of an irreversible action, which is always a candidate's last: never run
    after a later refusal, since nothing comes after it."""


def _split(store: KVStore, blocks: list) -> tuple[list, list]:
    """Blocks a move will free the slots of, and shared ones (copied: their old slot
    stays, held by the other sequences) with where they were."""
    plain, shared = [], []
    for b in blocks:
        if store.is_shared(b):
            shared.append((b, b.tier, b.offset, b.summary))
            store.pinned.add(store.slot_key(b))   # an undo names it: compaction keeps it
        else:
            plain.append(b)
    return plain, shared


def _repoint(store: KVStore, shared: list) -> None:
    """Undo of a move of shared blocks: the copy goes, the block names its shared slot
    again (still held by the others, so still there)."""
    for b, tier, offset, summary in shared:
        if b.offset >= 0 and (b.tier, b.offset) != (tier, offset):
            store.release_slot(ARENA_OF[b.tier], b.offset, store.geom.slot_bytes(b.fmt),
                               keep=False)
        store.ref((ARENA_OF[tier], offset))
        b.tier, b.offset, b.summary = tier, offset, summary


# Undo steps move bytes back without the checks of a fresh action: they return blocks to
# where they just were, into the slots the action itself freed (shared blocks: _repoint).
def _raw_fetch(store: KVStore, blocks: list) -> None:
    moves._move(store, sorted(blocks, key=lambda b: b.index), HOST, GPU, GPU)
    for b in blocks:
        b.summary = None


def _raw_offload(store: KVStore, blocks: list) -> None:
    for b, summary in zip(blocks, moves.key_summaries(store, blocks)):
        b.summary = summary
    moves._move(store, sorted(blocks, key=lambda b: b.index), GPU, HOST, HOST)


def _unpark(store: KVStore, before: list) -> None:
    was_gpu = sorted((b for b, tier, _ in before if tier == GPU), key=lambda b: b.index)
    if was_gpu:
        moves._move(store, was_gpu, HOST, GPU, GPU)
    for b, tier, summary in before:
        b.tier, b.summary = tier, summary


def _raw_park(store: KVStore, blocks: list) -> None:
    moves._move(store, sorted(blocks, key=lambda b: b.index), GPU, HOST, PARKED)
