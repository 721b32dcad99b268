"""KV events: what the engine tells cluster routers about the blocks it holds.

The engine hands a list of these records to its sink once per step
(``sink(records)``, see controller/kv_events.py); the daemon turns them into vLLM's KV
events wire format. Plain data, stdlib only: no torch, no msgspec.

Semantics follow vLLM's block pool (vllm/v1/core/block_pool.py):

* ``BlockStored`` when full blocks become present in a medium: their cumulative hashes in
  prefix order, the hash of the block before the first one (None at the start of a
  sequence), and the tokens of exactly those blocks (``len(block_hashes) * block_size``).
* ``BlockRemoved`` when the last copy of a block leaves a medium.
* ``AllBlocksCleared`` when the engine forgets everything (reset).

A block that moves between tiers is removed from one medium and stored on the other; a
block shared by several sequences is stored once and removed once (when its last
reference goes). The newest, partial block of a sequence is never announced.

Media, in vLLM's spelling (``MEDIUM_GPU``/``MEDIUM_CPU`` in vllm/distributed/kv_events.py):
kvctl's ``gpu`` tier is ``"GPU"``; ``host``, ``parked`` and ``swapped`` all live in host
memory and are ``"CPU"``; ``evicted`` blocks are gone and have no medium (remove them).

Block hashes are vLLM's ``sha256_cbor`` hashes (``--prefix-caching-hash-algo sha256_cbor``):
``digest = sha256(cbor((parent_digest, tuple(tokens), None)))`` with canonical CBOR, the
first parent being ``sha256(cbor(seed))``, seed ``"vllm-none-hash"`` (vLLM's default when
PYTHONHASHSEED is unset; routers configured with vLLM's seed compute the same keys).
The 64-bit integer on the wire is the digest's last 8 bytes, big-endian, as vLLM's
``maybe_convert_block_hash`` does with ``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``. Chaining
uses the full 32-byte digest, never the 64-bit integer.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU"
MEDIUM_OF_TIER = {"gpu": MEDIUM_GPU, "host": MEDIUM_CPU, "parked": MEDIUM_CPU,
                  "swapped": MEDIUM_CPU}
MEDIA = (MEDIUM_GPU, MEDIUM_CPU)

DEFAULT_HASH_SEED = "vllm-none-hash"
_U64 = (1 << 64) - 1


def medium_of(tier: str) -> str:
    """The KV-events medium of a kvctl tier; ValueError for ``evicted`` (no medium)."""
    try:
        return MEDIUM_OF_TIER[tier]
    except KeyError:
        raise ValueError(f"tier {tier!r} has no KV-events medium; known: "
                         f"{', '.join(MEDIUM_OF_TIER)} (evicted blocks are removed)") from None


def _check_medium(medium: str) -> None:
    if medium not in MEDIA:
        raise ValueError(f"medium must be one of {', '.join(MEDIA)}, got {medium!r}")


@dataclass(frozen=True, slots=True)
class BlockStored:
    block_hashes: list[int]          # cumulative hashes (external 64-bit form), prefix order
    parent_block_hash: int | None    # hash of the block before block_hashes[0]; None at start
    token_ids: list[int]             # the tokens of exactly these blocks
    block_size: int
    medium: str = MEDIUM_GPU

    def __post_init__(self) -> None:
        _check_medium(self.medium)
        if not self.block_hashes:
            raise ValueError("BlockStored needs at least one block hash")
        if self.block_size < 1 or len(self.token_ids) != len(self.block_hashes) * self.block_size:
            raise ValueError(f"BlockStored of {len(self.block_hashes)} blocks of "
                             f"{self.block_size} tokens carries {len(self.token_ids)} tokens")


@dataclass(frozen=True, slots=True)
class BlockRemoved:
    block_hashes: list[int]
    medium: str = MEDIUM_GPU

    def __post_init__(self) -> None:
        _check_medium(self.medium)
        if not self.block_hashes:
            raise ValueError("BlockRemoved needs at least one block hash")


@dataclass(frozen=True, slots=True)
class AllBlocksCleared:
    pass


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


# ---------------------------------------------------------------- hashing
def _cbor_head(major: int, n: int) -> bytes:
    """A canonical CBOR item head (RFC 8949 4.2.1: the shortest argument encoding)."""
    if n < 24:
        return bytes((major << 5 | n,))
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes((major << 5 | info,)) + n.to_bytes(size, "big")
    raise ValueError(f"{n} does not fit a CBOR head")


# token ids repeat a lot: one head per distinct id, built once
@functools.lru_cache(maxsize=1 << 16)
def _cbor_uint(n: int) -> bytes:
    if n < 0:
        raise ValueError(f"token ids are non-negative, got {n}")
    return _cbor_head(0, n)


@functools.lru_cache(maxsize=8)
def none_hash(seed: str = DEFAULT_HASH_SEED) -> bytes:
    """The parent digest of a sequence's first block: sha256 of the CBOR text ``seed``."""
    raw = seed.encode()
    return hashlib.sha256(_cbor_head(3, len(raw)) + raw).digest()


def hash_block_tokens(parent: bytes | None, token_ids: Sequence[int],
                      seed: str = DEFAULT_HASH_SEED) -> bytes:
    """The 32-byte digest of one full block: sha256(cbor([parent, tokens, null]))."""
    parent = parent or none_hash(seed)
    return hashlib.sha256(b"".join((
        b"\x83", _cbor_head(2, len(parent)), parent,
        _cbor_head(4, len(token_ids)), *map(_cbor_uint, token_ids),
        b"\xf6"))).digest()


def prefix_block_hashes(token_ids: Sequence[int], block_size: int, parent: bytes | None = None,
                        seed: str = DEFAULT_HASH_SEED) -> list[bytes]:
    """Digests of every full block of ``token_ids`` (a trailing partial block is skipped),
    chained from ``parent`` (the digest of the block before ``token_ids[0]``; None at the
    start of a sequence)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    out: list[bytes] = []
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        parent = hash_block_tokens(parent, token_ids[start:start + block_size], seed)
        out.append(parent)
    return out


def external_hash(digest: bytes) -> int:
    """The unsigned 64-bit form a digest takes in events: its last 8 bytes, big-endian."""
    return int.from_bytes(digest, "big") & _U64
