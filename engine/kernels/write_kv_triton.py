"""Triton write of a step's new keys and values into the arena: one launch a layer.

The torch path (``StepPlan.write_kv`` off CUDA) is two ``index_copy_`` calls, one for the
keys and one for the values; on a GPU each is a kernel launch of a few microseconds that
moves a few KiB, so at batch 1 the two launches cost more than the bytes. Here one program
writes ``BLOCK`` elements of both: element ``i`` of the flattened keys goes to arena
element ``idx[i]``, of the values to ``idx[i] + v_shift`` (engine/plan.py lays these out).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _write_kv_kernel(
    k_ptr,          # [n] new keys, flattened [N, H, D]
    v_ptr,          # [n] new values
    dst_ptr,        # the arena row, typed as its store dtype
    idx_ptr,        # [n] int64 element index of each key in dst
    v_shift,        # element distance from a key to its value
    n,
    BLOCK: tl.constexpr,
):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < n
    d = tl.load(idx_ptr + i, mask=m, other=0)
    k = tl.load(k_ptr + i, mask=m)
    v = tl.load(v_ptr + i, mask=m)
    tl.store(dst_ptr + d, k.to(dst_ptr.dtype.element_ty), mask=m)
    tl.store(dst_ptr + d + v_shift, v.to(dst_ptr.dtype.element_ty), mask=m)


def write_kv_triton(dst: torch.Tensor, idx: torch.Tensor, v_shift: int, k: torch.Tensor,
                    v: torch.Tensor) -> None:
    """``dst[idx] = k.flatten(); dst[idx + v_shift] = v.flatten()`` in one launch.

    dst: 1-D typed view of an arena row; idx: [n] int64 on dst's device; k, v: n elements
    each (any float dtype: converted to dst's)."""
    n = idx.numel()
    if k.numel() != n or v.numel() != n:
        raise ValueError(f"{k.numel()} keys and {v.numel()} values for {n} write indices")
    if idx.dtype != torch.int64 or dst.dim() != 1:
        raise ValueError("idx must be int64 and dst 1-D")
    if n == 0:
        return
    _write_kv_kernel[(triton.cdiv(n, BLOCK),)](k.contiguous(), v.contiguous(), dst, idx,
                                               v_shift, n, BLOCK=BLOCK)
