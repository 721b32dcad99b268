"""Slot gather (top-k pages): the Triton kernel against the torch reference."""
import pytest
import torch

from engine.kernels.gather import gather_slots_ref

# (number of slots, slot bytes): odd counts, sizes not a multiple of the program's chunk
CASES = [(1, 16), (3, 8192), (5, 9216), (7, 24576 + 16)]


def make(n, size, seed, device="cpu", pin=False):
    g = torch.Generator().manual_seed(seed)
    total = (n + 3) * size
    src = torch.randint(0, 256, (total,), generator=g, dtype=torch.uint8)
    if pin:
        src = src.pin_memory()
    perm = torch.randperm(n + 3, generator=g)[:n]
    src_off = (perm * size).to(torch.int64)
    dst_off = (torch.arange(n) * size).to(torch.int64).flip(0)  # reversed placement
    sizes = torch.full((n,), size, dtype=torch.int64)
    sizes[0] = size - 8 * (size // 16 > 1)                       # one shorter slot
    return src, src_off, dst_off, sizes


def expected(src, src_off, dst_off, sizes, dst_len):
    dst = torch.full((dst_len,), 7, dtype=torch.uint8)
    gather_slots_ref(src, src_off, dst, dst_off, sizes)
    return dst


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant")
@pytest.mark.parametrize("n, size", CASES)
def test_gather_kernel_interpreted(n, size):
    import triton

    from engine.kernels.gather_triton import WORDS, _gather_kernel
    src, so, do, sz = make(n, size, seed=n * 7 + size)
    want = expected(src, so, do, sz, n * size)
    got = torch.full((n * size,), 7, dtype=torch.uint8)
    _gather_kernel[(n, triton.cdiv(size // 8, WORDS))](
        src.view(torch.int64), got.view(torch.int64), so, do, sz, WORDS=WORDS)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("n, size", CASES)
def test_gather_from_pinned_host_on_cuda(n, size):
    from engine.kernels.gather_triton import gather_slots_triton
    src, so, do, sz = make(n, size, seed=n * 11 + size, pin=True)
    want = expected(src, so, do, sz, n * size)
    got = torch.full((n * size,), 7, dtype=torch.uint8, device="cuda")
    gather_slots_triton(src, so.cuda(), got, do.cuda(), sz.cuda(), size)
    assert torch.equal(got.cpu(), want)
