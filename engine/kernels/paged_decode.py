"""Paged decode attention over mixed-format KV blocks, with per-block softmax partials.

One query token per sequence attends over its block table. Blocks may be full precision
or quantized (per block key / value codes, ``KVFormat.k_code`` / ``v_code``), GQA maps
query head ``h`` to kv head ``h // (Hq // H)``. Alongside the output it returns, per
(sequence, query head, block), the block's max logit ``m`` and sum of ``exp(logit - m)`` —
the flash-decoding partials, from which each block's exact share of attention mass
follows (engine/stats.py).

Block table entries with ``ntok == 0`` are holes (evicted blocks): skipped, partials
``(-inf, 0)``.

This file holds the torch reference (the CPU path and the tests' oracle).
"""
from __future__ import annotations

import torch

from engine.layout import BlockGeometry, KVFormat
from engine.kernels.slots import read_blocks


def gather_dense(arena_row: torch.Tensor, block_offsets: torch.Tensor,
                 block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                 block_ntok: torch.Tensor, geom: BlockGeometry, dtype: torch.dtype,
                 fmt: KVFormat | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense k, v ``[B, NB, H, T, D]`` of every table entry.

    Entries that are holes hold whatever their offset points at: callers mask them by
    ``ntok`` (scores to -inf, values to 0). With one format among the valid entries
    (``fmt``, or found here) all entries are read in one gather.
    """
    B, NB = block_offsets.shape
    H, T, D = geom.num_kv_heads, geom.block_size, geom.head_dim
    offs = block_offsets.reshape(-1)
    if fmt is None:
        valid = (block_ntok > 0).reshape(-1)
        code = table_codes(block_kbits, block_vbits).reshape(-1)
        codes = torch.unique(code[valid]).tolist()
        if len(codes) <= 1:
            fmt = KVFormat.from_code(codes[0]) if codes else KVFormat()
    if fmt is not None:
        # holes' offsets are unspecified: read slot 0 for them instead (masked anyway)
        offs = torch.where(block_ntok.reshape(-1) > 0, offs, torch.zeros_like(offs))
        k, v = read_blocks(arena_row, offs, geom, fmt, dtype)
        return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)
    k = torch.zeros(B * NB, H, T, D, dtype=dtype, device=arena_row.device)
    v = torch.zeros_like(k)
    for c in codes:
        sel = torch.nonzero(valid & (code == c)).squeeze(1)
        kk, vv = read_blocks(arena_row, offs[sel], geom, KVFormat.from_code(c), dtype)
        k[sel], v[sel] = kk, vv
    return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)


def table_codes(block_kbits: torch.Tensor, block_vbits: torch.Tensor) -> torch.Tensor:
    """Each table entry's format as one int (``KVFormat.code``; holes hold junk)."""
    return block_kbits * 32 + block_vbits


def paged_decode_ref(q: torch.Tensor, arena_row: torch.Tensor, block_offsets: torch.Tensor,
                     block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                     block_ntok: torch.Tensor, geom: BlockGeometry, sm_scale: float,
                     fmt: KVFormat | None = None, cache: dict | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode attention of one token per sequence over its paged KV.

    q:             [B, Hq, D]        query after RoPE
    arena_row:     [bytes] uint8     one layer of the arena
    block_offsets: [B, NB] int64     slot byte offsets (ignored where ntok == 0)
    block_kbits:   [B, NB] int32     key code: 0 (full precision), 8, 4 or 2 (int bits), or
                                     FP8_CODE (fp8 e4m3; KVFormat.k_code)
    block_vbits:   [B, NB] int32     value code (KVFormat.v_code)
    block_ntok:    [B, NB] int32     valid tokens per block (0 = hole)
    fmt:           the one format of every valid entry, when the caller knows it
    cache:         a dict that lives for one step: what depends only on the table (gather
                   indices, masks) is computed by the first layer and reused by the rest
    returns out [B, Hq, D] (q.dtype), block_max / block_sumexp [B, Hq, NB] fp32
    """
    B, Hq, D = q.shape
    NB = block_offsets.shape[1]
    H, T = geom.num_kv_heads, geom.block_size
    g = Hq // H
    tab = _table_facts(block_offsets, block_ntok, geom, fmt, cache)
    if tab.k_idx is not None:           # full precision: gather (block, head) tiles
        win = arena_row.view(geom.store_dtype).unfold(0, T * D, 1)
        k = win.index_select(0, tab.k_idx).view(B, H, NB * T, D).float()
        v = win.index_select(0, tab.v_idx).view(B, H, NB * T, D).float()
    else:
        k, v = gather_dense(arena_row, block_offsets, block_kbits, block_vbits, block_ntok,
                            geom, torch.float32, fmt)                     # [B, NB, H, T, D]
        k = k.transpose(1, 2).reshape(B, H, NB * T, D)
        v = v.transpose(1, 2).reshape(B, H, NB * T, D)
    # one matmul per (sequence, kv head) over all its tokens; few passes over the scores
    # (this is the CPU decode path: every op here runs once per layer per step)
    qf = (q.float() * sm_scale).reshape(B, H, g, D)
    s = torch.matmul(qf, k.transpose(-1, -2)).view(B, H, g, NB, T)
    s.masked_fill_(tab.masked, float("-inf"))
    # rows past ntok are unwritten arena bytes (maybe NaN), and 0 * NaN would poison
    # p @ v: zero them in the (few) entries that have any
    v5 = v.view(B, H, NB, T, D)
    for b, n, nt in tab.partial:
        v5[b, :, n, nt:] = 0.0
    m = s.amax(-1)                                                         # [B, H, g, NB]
    gmax = m.amax(-1, keepdim=True)                                        # [B, H, g, 1]
    gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    p = s.sub_(gmax.unsqueeze(-1)).exp_()          # exp(logit - global max), in place
    psum = p.sum(-1)                                                       # [B, H, g, NB]
    pv = torch.matmul(p.view(B, H, g, NB * T), v)                          # [B, H, g, D]
    out = pv / psum.sum(-1, keepdim=True).clamp_min(1e-30)
    # per block: l = sum exp(logit - m) = psum * exp(gmax - m); holes: m = -inf, l = 0
    l = torch.where(psum > 0, psum * torch.exp(gmax - m), torch.zeros_like(psum))
    return (out.reshape(B, Hq, D).to(q.dtype), m.reshape(B, Hq, NB), l.reshape(B, Hq, NB))


class _TableFacts:
    __slots__ = ("k_idx", "v_idx", "masked", "partial", "refs")


def _table_facts(block_offsets, block_ntok, geom, fmt, cache) -> _TableFacts:
    """What depends on the block table only (not on the layer): gather indices of
    full-precision tables in head-major order, the score mask, the partial entries."""
    key = ("facts", id(block_offsets), id(block_ntok), fmt)
    if cache is not None and key in cache:
        return cache[key]
    B, NB = block_offsets.shape
    H, T, D = geom.num_kv_heads, geom.block_size, geom.head_dim
    f = _TableFacts()
    f.refs = (block_offsets, block_ntok)   # keep the ids above alive while cached
    f.k_idx = f.v_idx = None
    if fmt is not None and fmt.is_full:
        esize = geom.store_elem
        sec = geom.sections(fmt)
        # holes' offsets are unspecified: read slot 0 for them instead (masked anyway)
        offs = torch.where(block_ntok > 0, block_offsets, torch.zeros_like(block_offsets))
        heads = torch.arange(H, device=offs.device).view(1, H, 1) * (T * D)
        base = (offs // esize).view(B, 1, NB) + heads                     # [B, H, NB]
        f.k_idx = (base + sec["k"][0] // esize).reshape(-1)
        f.v_idx = (base + sec["v"][0] // esize).reshape(-1)
    tok = torch.arange(T, device=block_ntok.device)
    f.masked = ~(tok.view(1, 1, T) < block_ntok.view(B, NB, 1)).view(B, 1, 1, NB, T)
    f.partial = [(b, n, int(block_ntok[b, n])) for b, n in
                 torch.nonzero(block_ntok < T).tolist()]
    if cache is not None:
        cache[key] = f
    return f


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def triton_supports(geom: BlockGeometry) -> bool:
    """Geometries the Triton kernel is built for (others take the reference)."""
    return (_pow2(geom.block_size) and geom.block_size >= 16 and _pow2(geom.head_dim)
            and geom.head_dim >= 16 and _pow2(geom.value_group))


def paged_decode(q, arena_row, block_offsets, block_kbits, block_vbits, block_ntok, geom,
                 sm_scale, fmt: KVFormat | None = None, cache: dict | None = None,
                 groups=None, row_len: torch.Tensor | None = None):
    """Dispatch: the Triton kernel on CUDA for the geometries it supports, else the
    reference. ``fmt``: a promise that every attended block has this format (the caller
    knows it from its block list; no device sync here): the kernel compiles it in.
    ``groups``: a mixed table's blocks grouped by format (FormatGroups, made by the caller
    on the host): the kernel then runs once per format. ``row_len`` ([B] int32): the
    columns each row holds (entries past them are holes): the kernel's splits share each
    row's own length (the reference needs no hint)."""
    if q.is_cuda and triton_supports(geom):
        from engine.kernels.paged_decode_triton import paged_decode_triton
        return paged_decode_triton(q, arena_row, block_offsets, block_kbits, block_vbits,
                                   block_ntok, geom, sm_scale, fmt=fmt, groups=groups,
                                   launch_cache=cache, row_len=row_len)
    return paged_decode_ref(q, arena_row, block_offsets, block_kbits, block_vbits,
                            block_ntok, geom, sm_scale, fmt, cache)
