"""Paged decode attention over mixed-format KV blocks, with per-block softmax partials.

One query token per sequence attends over its block table. Blocks may be full precision
or quantized (per block ``k_bits`` / ``v_bits``), GQA maps query head ``h`` to kv head
``h // (Hq // H)``. Alongside the output it returns, per (sequence, query head, block),
the block's max logit ``m`` and sum of ``exp(logit - m)`` — the flash-decoding partials,
from which each block's exact share of attention mass follows (engine/stats.py).

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
        code = (block_kbits.reshape(-1) * 16 + block_vbits.reshape(-1))[valid]
        codes = torch.unique(code).tolist()
        if len(codes) <= 1:
            fmt = KVFormat(*divmod(codes[0], 16)) if codes else KVFormat()
    if fmt is not None:
        # holes' offsets are unspecified: read slot 0 for them instead (masked anyway)
        offs = torch.where(block_ntok.reshape(-1) > 0, offs, torch.zeros_like(offs))
        k, v = read_blocks(arena_row, offs, geom, fmt, dtype)
        return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)
    code = block_kbits.reshape(-1) * 16 + block_vbits.reshape(-1)
    k = torch.zeros(B * NB, H, T, D, dtype=dtype, device=arena_row.device)
    v = torch.zeros_like(k)
    for c in codes:
        sel = torch.nonzero(valid & (code == c)).squeeze(1)
        kk, vv = read_blocks(arena_row, offs[sel], geom, KVFormat(*divmod(c, 16)), dtype)
        k[sel], v[sel] = kk, vv
    return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)


def paged_decode_ref(q: torch.Tensor, arena_row: torch.Tensor, block_offsets: torch.Tensor,
                     block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                     block_ntok: torch.Tensor, geom: BlockGeometry, sm_scale: float,
                     fmt: KVFormat | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Decode attention of one token per sequence over its paged KV.

    q:             [B, Hq, D]        query after RoPE
    arena_row:     [bytes] uint8     one layer of the arena
    block_offsets: [B, NB] int64     slot byte offsets (ignored where ntok == 0)
    block_kbits:   [B, NB] int32     0 (full precision), 8, 4 or 2
    block_vbits:   [B, NB] int32
    block_ntok:    [B, NB] int32     valid tokens per block (0 = hole)
    returns out [B, Hq, D] (q.dtype), block_max / block_sumexp [B, Hq, NB] fp32
    """
    B, Hq, D = q.shape
    NB = block_offsets.shape[1]
    H, T = geom.num_kv_heads, geom.block_size
    g = Hq // H
    k, v = gather_dense(arena_row, block_offsets, block_kbits, block_vbits, block_ntok,
                        geom, torch.float32, fmt)                          # [B, NB, H, T, D]
    # batched over (sequence, block, kv head) in the blocks' own layout: no transposed
    # copies of K or V
    qf = q.float().reshape(B, 1, H, g, D)
    s = torch.matmul(qf, k.transpose(-1, -2)) * sm_scale                  # [B, NB, H, g, T]
    tok = torch.arange(T, device=q.device)
    mask = tok.view(1, 1, T) < block_ntok.view(B, NB, 1)                   # [B, NB, T]
    s.masked_fill_(~mask.view(B, NB, 1, 1, T), float("-inf"))
    # rows past ntok are unwritten arena bytes (maybe NaN), and 0 * NaN would poison
    # p @ v: zero them in the (few) entries that have any
    part = torch.nonzero(block_ntok < T)
    if part.numel():
        bi, ni = part[:, 0], part[:, 1]
        v[bi, ni] = v[bi, ni].masked_fill(~mask[bi, ni].view(-1, 1, T, 1), 0.0)
    m = s.amax(-1)                                                         # [B, NB, H, g]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe.unsqueeze(-1))
    l = p.sum(-1)                                                          # [B, NB, H, g]
    gmax = m.amax(1, keepdim=True)                                         # [B, 1, H, g]
    gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    w = torch.exp(m_safe - gmax) * (l > 0)                                 # block weights
    denom = (w * l).sum(1, keepdim=True).clamp_min(1e-30)
    pv = torch.matmul(p, v)                                                # [B, NB, H, g, D]
    out = (pv * (w / denom).unsqueeze(-1)).sum(1)                          # [B, H, g, D]
    return (out.reshape(B, Hq, D).to(q.dtype), m.permute(0, 2, 3, 1).reshape(B, Hq, NB),
            l.permute(0, 2, 3, 1).reshape(B, Hq, NB))


def _pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def triton_supports(geom: BlockGeometry) -> bool:
    """Geometries the Triton kernel is built for (others take the reference)."""
    return (_pow2(geom.block_size) and geom.block_size >= 16 and _pow2(geom.head_dim)
            and geom.head_dim >= 16 and _pow2(geom.value_group))


def paged_decode(q, arena_row, block_offsets, block_kbits, block_vbits, block_ntok, geom,
                 sm_scale, fmt: KVFormat | None = None):
    """Dispatch: the Triton kernel on CUDA for the geometries it supports, else the
    reference. ``fmt``: a promise that every attended block has this format (the caller
    knows it from its block list; no device sync here): the kernel compiles it in."""
    if q.is_cuda and triton_supports(geom):
        from engine.kernels.paged_decode_triton import paged_decode_triton
        return paged_decode_triton(q, arena_row, block_offsets, block_kbits, block_vbits,
                                   block_ntok, geom, sm_scale, fmt=fmt)
    return paged_decode_ref(q, arena_row, block_offsets, block_kbits, block_vbits,
                            block_ntok, geom, sm_scale, fmt)
