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


# a run longer than this is copied as several pieces (one program row each): the grid's
# second dimension is sized by the longest piece
RUN_PIECE = 64 << 10


def run_pieces(runs, num_layers: int, src_row: int, dst_row: int):
    """Byte runs ``(src_off, dst_off, nbytes)`` of every row (layer) of two [rows, row
    bytes] arenas as flat (src offsets, dst offsets, sizes) int64 tensors, each piece at
    most ``RUN_PIECE`` bytes; None where an offset or size is not a multiple of 8."""
    so, do, nb = [], [], []
    for s, d, n in runs:
        if (s | d | n) % 8:
            return None
        for a in range(0, n, RUN_PIECE):
            so.append(s + a)
            do.append(d + a)
            nb.append(min(RUN_PIECE, n - a))
    if src_row % 8 or dst_row % 8:
        return None
    rows = torch.arange(num_layers, dtype=torch.int64)[:, None]
    so_t, do_t, nb_t = (torch.tensor(x, dtype=torch.int64)[None] for x in (so, do, nb))
    return ((rows * src_row + so_t).flatten(), (rows * dst_row + do_t).flatten(),
            nb_t.expand(num_layers, -1).flatten())


def copy_slots(src: torch.Tensor, dst: torch.Tensor, moves) -> None:
    """Copy slots ``(src_off, dst_off, nbytes)`` of every row between two arenas' (or
    within one arena's) [layers, row bytes] data, adjacent slots merged into runs (PCIe
    wants large transfers): in one launch on CUDA (``copy_runs``), a copy a run where
    there are a few runs (a copy each launches no more than the kernel) or that path does
    not apply. Queued on the stream: the caller synchronizes where it must."""
    runs: list[list[int]] = []
    for s, d, n in sorted(moves):
        if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
            runs[-1][2] += n
        else:
            runs.append([s, d, n])
    if len(runs) <= 4 or not copy_runs(src, dst, runs, src.shape[0]):
        for s, d, n in runs:
            dst[:, d:d + n].copy_(src[:, s:s + n], non_blocking=True)


def copy_runs(src: torch.Tensor, dst: torch.Tensor, runs, num_layers: int) -> bool:
    """Copy byte runs ``(src_off, dst_off, nbytes)`` of every row between two arenas'
    [layers, row bytes] data, in one launch on CUDA (either side may be pinned host
    memory, which the device addresses directly). False, copying nothing, where that
    path does not apply (no CUDA side, unpinned host memory, unaligned offsets): the
    caller copies run by run. Moving a paused sequence's ~2,000 scattered runs one
    copy each took ~0.6 s for 2 GB on an H100 (docs/BENCHMARKS.md, fourteenth session)."""
    dev = dst.device if dst.is_cuda else src.device if src.is_cuda else None
    if dev is None or not runs:
        return False
    for t in (src, dst):
        if not t.is_cuda and not t.is_pinned():
            return False
    src_flat, dst_flat = _flat(src), _flat(dst)
    if src_flat is None or dst_flat is None:
        return False
    pieces = run_pieces(runs, num_layers, src.stride(0), dst.stride(0))
    if pieces is None:
        return False
    from engine.kernels.gather_triton import gather_slots_triton
    # through pinned memory: a copy from pageable memory waits for the stream first
    so, do, nb = (t.pin_memory().to(dev, non_blocking=True) for t in pieces)
    gather_slots_triton(src_flat, so, dst_flat, do, nb, min(RUN_PIECE, max(n for *_, n in runs)))
    return True


def _flat(data: torch.Tensor) -> torch.Tensor | None:
    """The 1-D uint8 storage behind a [rows, row bytes] view of it (rows back to back),
    or None when the view is not laid out that way."""
    if data.dim() != 2 or data.dtype != torch.uint8 or data.stride(1) != 1:
        return None
    n = data.stride(0) * data.shape[0]
    base = data.as_strided((n,), (1,))
    return base if base.data_ptr() % 8 == 0 else None
