"""Triton copy of byte ranges between memories a CUDA device can address: device memory
and pinned host memory (unified addressing), either way: top-k pages gathered from host
into staging, and whole runs of slots moved between the arenas in one launch."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

WORDS = 1024  # 8-byte words per program: 8 KiB, enough loads in flight per SM


@triton.jit
def _gather_kernel(
    src_ptr,        # [src_words] int64: pinned host bytes (UVA) or device bytes
    dst_ptr,        # [dst_words] int64: device bytes or pinned host bytes (UVA)
    src_off_ptr,    # [n] int64 byte offsets
    dst_off_ptr,    # [n] int64 byte offsets
    nbytes_ptr,     # [n] int64
    WORDS: tl.constexpr,
):
    j = tl.program_id(0)
    c = tl.program_id(1)
    s = tl.load(src_off_ptr + j) // 8
    d = tl.load(dst_off_ptr + j) // 8
    n = tl.load(nbytes_ptr + j) // 8
    i = c * WORDS + tl.arange(0, WORDS)
    m = i < n
    x = tl.load(src_ptr + s + i, mask=m)
    tl.store(dst_ptr + d + i, x, mask=m)


class _HostPointer:
    """A pinned host buffer handed to Triton as a raw pointer (unified addressing: the
    device dereferences the host address over PCIe)."""

    def __init__(self, t: torch.Tensor):
        self._t = t
        self.dtype = torch.int64

    def data_ptr(self) -> int:
        return self._t.data_ptr()


def gather_slots_triton(src: torch.Tensor, src_offsets: torch.Tensor, dst: torch.Tensor,
                        dst_offsets: torch.Tensor, nbytes: torch.Tensor,
                        max_bytes: int, words: int = WORDS, num_warps: int = 4) -> None:
    """src, dst: 1-D uint8, one on a CUDA device and the other there too or in pinned
    host memory; offsets/nbytes [n] int64 on that device; ``max_bytes`` bounds nbytes
    (sets the grid without a sync)."""
    for name, t in (("src", src), ("dst", dst)):
        if t.dim() != 1 or t.dtype != torch.uint8 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 1-D uint8 tensor")
        if t.data_ptr() % 8:
            raise ValueError(f"{name} must be 8-byte aligned")
        if not t.is_cuda and not t.is_pinned():
            raise ValueError(f"{name} on the host must be pinned memory")
    device = dst.device if dst.is_cuda else src.device
    if not (src.is_cuda or dst.is_cuda):
        raise ValueError("src or dst must be on a CUDA device")
    for name, t in (("src_offsets", src_offsets), ("dst_offsets", dst_offsets),
                    ("nbytes", nbytes)):
        if t.dtype != torch.int64 or t.device != device or t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D int64 tensor on {device}")
    n = src_offsets.numel()
    if n == 0:
        return
    if max_bytes % 8:
        raise ValueError("max_bytes must be a multiple of 8")
    src_arg = _HostPointer(src) if src.device.type == "cpu" else src.view(torch.int64)
    dst_arg = _HostPointer(dst) if dst.device.type == "cpu" else dst.view(torch.int64)
    grid = (n, triton.cdiv(max_bytes // 8, words))
    _gather_kernel[grid](src_arg, dst_arg, src_offsets, dst_offsets, nbytes,
                         WORDS=words, num_warps=num_warps)
