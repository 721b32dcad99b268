"""Gather of KV slots from host memory into the device's staging area (top-k pages).

``gather_slots(src, src_offsets, dst, dst_offsets, nbytes)`` copies ``nbytes[j]`` bytes
from ``src`` at ``src_offsets[j]`` to ``dst`` at ``dst_offsets[j]``, for each j. On CUDA
the Triton kernel reads pinned host memory directly over PCIe (unified addressing), so
the offsets can be computed on the device (the top-k picks) and nothing waits for the
CPU; elsewhere the torch reference does the same copies.

Offsets and sizes are multiples of 8 bytes (slots are 16-byte aligned).
"""
from __future__ import annotations

import torch


def gather_slots_ref(src: torch.Tensor, src_offsets: torch.Tensor, dst: torch.Tensor,
                     dst_offsets: torch.Tensor, nbytes: torch.Tensor) -> None:
    """src, dst: 1-D uint8; offsets/nbytes: [n] int64 (any device)."""
    for s, d, n in zip(src_offsets.tolist(), dst_offsets.tolist(), nbytes.tolist()):
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)


def gather_slots(src, src_offsets, dst, dst_offsets, nbytes, max_bytes: int) -> None:
    if dst.is_cuda:
        from engine.kernels.gather_triton import gather_slots_triton
        gather_slots_triton(src, src_offsets, dst, dst_offsets, nbytes, max_bytes)
    else:
        gather_slots_ref(src, src_offsets, dst, dst_offsets, nbytes)
