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


def _runs_case(seed, layers=3, src_row=4096, dst_row=8192 + 64):
    """Two [layers, row bytes] arenas and byte runs between them: odd counts, a run
    longer than a piece (RUN_PIECE shrunk to 256 B by the caller), runs back to back."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, 256, (layers, src_row), generator=g, dtype=torch.uint8)
    dst = torch.full((layers, dst_row), 7, dtype=torch.uint8)
    runs = [(0, 8192 - 1024, 1024), (1024, 64, 8), (2048, 4096, 16 * 37),
            (3072, 128, 8 * 13)]
    want = dst.clone()                  # each run of each layer copied on its own
    for s, d, n in runs:
        want[:, d:d + n] = src[:, s:s + n]
    return src, dst, runs, want


def test_runs_become_pieces_of_every_layer(monkeypatch):
    """A run list over all layers, split into pieces of at most RUN_PIECE bytes, copies
    what copying each run of each layer copies; unaligned runs are refused (the caller
    copies run by run)."""
    from engine.kernels import gather
    monkeypatch.setattr(gather, "RUN_PIECE", 256)
    src, dst, runs, want = _runs_case(3)
    so, do, nb = gather.run_pieces(runs, 3, src.stride(0), dst.stride(0))
    assert int(nb.max()) <= 256 and int(nb.sum()) == 3 * sum(n for *_, n in runs)
    got = dst.clone()
    gather_slots_ref(src.flatten(), so, got.view(-1), do, nb)
    assert torch.equal(got, want)
    assert gather.run_pieces([(4, 0, 8)], 3, 4096, 4096) is None
    assert gather.copy_runs(src, got, runs, 3) is False           # no CUDA side here


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter variant")
def test_run_pieces_through_the_kernel_interpreted(monkeypatch):
    import triton

    from engine.kernels import gather
    from engine.kernels.gather_triton import WORDS, _gather_kernel
    monkeypatch.setattr(gather, "RUN_PIECE", 256)
    src, dst, runs, want = _runs_case(5)
    so, do, nb = gather.run_pieces(runs, 3, src.stride(0), dst.stride(0))
    got = dst.clone()
    _gather_kernel[(so.numel(), triton.cdiv(256 // 8, WORDS))](
        src.view(-1).view(torch.int64), got.view(-1).view(torch.int64), so, do, nb,
        WORDS=WORDS)
    assert torch.equal(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("to_host", [True, False])
def test_copy_runs_between_device_and_pinned_host(monkeypatch, to_host):
    from engine.kernels import gather
    monkeypatch.setattr(gather, "RUN_PIECE", 256)
    src, dst, runs, want = _runs_case(7)
    src = src.cuda() if to_host else src.pin_memory()
    dst = dst.pin_memory() if to_host else dst.cuda()
    assert gather.copy_runs(src, dst, runs, 3)
    torch.cuda.synchronize()
    assert torch.equal(dst.cpu(), want)
