"""The Triton 2-bit fit against quant.fit_groups (clip grid + least-squares steps): over
value groups, weighted key groups and constant groups, at group lengths 16-64 and row
counts off the program's tile, its error per group is the reference's (the same
candidate, up to ties in the last bits of a sum), and so are nearly all codes."""
import pytest
import torch

from engine.kernels.quant import LS_ITERS, fit_groups, key_weights
from tests.kernels.kernel_cases import DEVICES, kernel_module, seed_of


def _err(g, w, c, s, z):
    e = c * s + z - g
    return (w * e * e).sum(-1)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("n,rows,weighted,md", [
    (32, 45, False, torch.float16), (32, 70, True, torch.float16),
    (128, 21, False, torch.float16),
    (16, 33, False, torch.bfloat16), (64, 9, True, torch.bfloat16)])
def test_fit2_matches_the_reference_fit(request, device, n, rows, weighted, md):
    kernel_module(device)
    from engine.kernels.fit_triton import fit2
    gen = torch.Generator().manual_seed(seed_of(request))
    g = torch.randn(rows, n, generator=gen) * torch.rand(rows, 1, generator=gen) * 3
    g[::7] += torch.randn(rows, n, generator=gen)[::7] ** 3        # heavy tails
    g[3] = 0.25                                                    # a constant group
    w = key_weights(g) if weighted else None
    c, s, z = fit2(g.to(device), md, None if w is None else w.to(device))
    c, s, z = c.cpu(), s.cpu(), z.cpu()
    rc, rs, rz = fit_groups(g, 2, md, clip=True, ls_iters=LS_ITERS, w=w)
    ww = torch.ones_like(g) if w is None else w
    got, want = _err(g, ww, c, s, z), _err(g, ww, rc, rs, rz)
    assert c.shape == g.shape and s.shape == (rows, 1) and z.shape == (rows, 1)
    assert ((c >= 0) & (c <= 3) & (c == c.round())).all()
    # scale and zero are meta-rounded, as the stored meta will be
    assert torch.equal(s, s.to(md).float()) and torch.equal(z, z.to(md).float())
    assert torch.all(got <= want * (1 + 1e-4) + 1e-6), (got - want).max()
    assert (c == rc).float().mean() >= 0.97
    assert float(got[3]) == 0.0


@pytest.mark.cuda
def test_fit_groups_on_cuda_takes_the_kernel_and_keeps_its_errors(request):
    """On a GPU quant.fit_groups dispatches 2-bit refined fits to the kernel: same
    shapes, errors at most the torch path's (run on the CPU)."""
    kernel_module("cuda")
    gen = torch.Generator().manual_seed(seed_of(request))
    g = torch.randn(64, 8, 4, 32, generator=gen)
    c, s, z = fit_groups(g.cuda(), 2, torch.float16, clip=True, ls_iters=LS_ITERS)
    rc, rs, rz = fit_groups(g, 2, torch.float16, clip=True, ls_iters=LS_ITERS)
    one = torch.ones_like(g)
    assert torch.all(_err(g, one, c.cpu(), s.cpu(), z.cpu())
                     <= _err(g, one, rc, rs, rz) * (1 + 1e-4) + 1e-6)
