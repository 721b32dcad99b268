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
                 block_ntok: torch.Tensor, geom: BlockGeometry, dtype: torch.dtype
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense k, v ``[B, NB, H, T, D]`` of every table entry (holes left zero)."""
    B, NB = block_offsets.shape
    H, T, D = geom.num_kv_heads, geom.block_size, geom.head_dim
    valid = (block_ntok > 0).reshape(-1)
    kb, vb = block_kbits.reshape(-1), block_vbits.reshape(-1)
    offs = block_offsets.reshape(-1)
    dev = arena_row.device
    fmts = torch.unique(torch.stack([kb[valid], vb[valid]], 1), dim=0).tolist() \
        if bool(valid.any()) else []
    if len(fmts) == 1 and bool(valid.all()):
        k, v = read_blocks(arena_row, offs, geom, KVFormat(*fmts[0]), dtype)
        return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)
    k = torch.zeros(B * NB, H, T, D, dtype=dtype, device=dev)
    v = torch.zeros_like(k)
    for kbits, vbits in fmts:
        sel = torch.nonzero(valid & (kb == kbits) & (vb == vbits)).squeeze(1)
        kk, vv = read_blocks(arena_row, offs[sel], geom, KVFormat(kbits, vbits), dtype)
        k[sel], v[sel] = kk, vv
    return k.reshape(B, NB, H, T, D), v.reshape(B, NB, H, T, D)


def paged_decode_ref(q: torch.Tensor, arena_row: torch.Tensor, block_offsets: torch.Tensor,
                     block_kbits: torch.Tensor, block_vbits: torch.Tensor,
                     block_ntok: torch.Tensor, geom: BlockGeometry, sm_scale: float
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
                        geom, torch.float32)                               # [B, NB, H, T, D]
    qf = q.float().reshape(B, H, g, D)
    s = torch.einsum("bhgd,bnhtd->bhgnt", qf, k) * sm_scale                # [B, H, g, NB, T]
    tok = torch.arange(T, device=q.device)
    mask = tok.view(1, 1, T) < block_ntok.view(B, NB, 1)                   # [B, NB, T]
    s = s.masked_fill(~mask.view(B, 1, 1, NB, T), float("-inf"))
    # tokens past ntok are unwritten arena bytes (maybe NaN): 0 * NaN would poison pv
    v = v.masked_fill(~mask.view(B, NB, 1, T, 1), 0.0)
    m = s.amax(-1)                                                         # [B, H, g, NB]
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(s - m_safe.unsqueeze(-1))
    l = p.sum(-1)                                                          # [B, H, g, NB]
    gmax = m.amax(-1, keepdim=True)                                        # [B, H, g, 1]
    gmax = torch.where(torch.isfinite(gmax), gmax, torch.zeros_like(gmax))
    w = torch.exp(m_safe - gmax) * (l > 0)                                 # block weights
    denom = (w * l).sum(-1, keepdim=True).clamp_min(1e-30)
    pv = torch.einsum("bhgnt,bnhtd->bhgnd", p, v)                          # [B, H, g, NB, D]
    out = (pv * (w / denom).unsqueeze(-1)).sum(-2)
    return (out.reshape(B, Hq, D).to(q.dtype), m.reshape(B, Hq, NB),
            l.reshape(B, Hq, NB))


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
                            block_ntok, geom, sm_scale)
