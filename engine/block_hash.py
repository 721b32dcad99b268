"""Block hashes for prefix reuse and KV events: vLLM's ``sha256_cbor`` chain, so a router
that hashes prompts the way vLLM does (``--prefix-caching-hash-algo sha256_cbor``) computes
the same keys as kvctl.

``digest = sha256(cbor([parent_digest, [tokens...], null]))`` in canonical CBOR (RFC 8949
4.2.1), the first parent being ``sha256(cbor(seed))`` with seed ``"vllm-none-hash"``
(vLLM's default when PYTHONHASHSEED is unset; vllm/v1/core/kv_cache_utils.py). Chaining
uses the full 32-byte digest; events carry the unsigned 64-bit integer of its last 8 bytes
(big-endian), as vLLM's ``maybe_convert_block_hash``. Deterministic across processes and
machines; stdlib only. ~6.5 us per 32-token block here.
"""
from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence

DEFAULT_HASH_SEED = "vllm-none-hash"
_U64 = (1 << 64) - 1


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
