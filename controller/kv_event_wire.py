"""vLLM's KV events wire schema (vllm/distributed/kv_events.py, main after PR #42892) and
the one conversion from the engine's records (engine/api.py) to it.

``EventBatch`` is positional: ``[ts, events, data_parallel_rank]``. Events are tagged maps
(``{"type": "BlockStored", ...}``) with fields at their default left out; the ``Array*``
structs are the positional events of vLLM before #42892 (``encoding = "array"``).
"""
from __future__ import annotations

from typing import Any

import msgspec

import engine.api as ev
from controller.config import KVEventsEncoding as Encoding


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[Any]
    data_parallel_rank: int | None = None


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """Base of the events: a map with the class name under ``"type"``."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    event_version: int = 1
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


class KVEventBatch(EventBatch):
    events: list[BlockStored | BlockRemoved | AllBlocksCleared]


class _ArrayEvent(msgspec.Struct, array_like=True, omit_defaults=True, gc=False, tag=True):
    """Base of the positional events of vLLM before #42892: ``[type, field, ...]``."""


class ArrayBlockStored(_ArrayEvent, tag="BlockStored"):
    block_hashes: list[int]
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None


class ArrayBlockRemoved(_ArrayEvent, tag="BlockRemoved"):
    block_hashes: list[int]
    medium: str | None


class ArrayAllBlocksCleared(_ArrayEvent, tag="AllBlocksCleared"):
    pass


# what vLLM fills in for a model whose layers are all full attention (one cache group)
_GROUP, _KIND = 0, "full_attention"


def to_wire(record: ev.KVEvent, encoding: Encoding = Encoding.map) -> msgspec.Struct:
    """One engine record as the struct that goes on the wire."""
    if isinstance(record, ev.BlockStored):
        if encoding is Encoding.array:
            return ArrayBlockStored(record.block_hashes, record.parent_block_hash,
                                    record.token_ids, record.block_size, None, record.medium, None)
        return BlockStored(record.block_hashes, record.parent_block_hash, record.token_ids,
                           record.block_size, None, record.medium, None,
                           group_idx=_GROUP, kv_cache_spec_kind=_KIND)
    if isinstance(record, ev.BlockRemoved):
        if encoding is Encoding.array:
            return ArrayBlockRemoved(record.block_hashes, record.medium)
        return BlockRemoved(record.block_hashes, record.medium, group_idx=_GROUP)
    if isinstance(record, ev.AllBlocksCleared):
        return ArrayAllBlocksCleared() if encoding is Encoding.array else AllBlocksCleared()
    raise TypeError(f"not a KV event record: {record!r}")

