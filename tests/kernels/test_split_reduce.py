"""The split reduction against its torch reference, over split counts below, at and past
a tile, past the largest tile (a loop of tiles merged online); and on a GPU, no split
count compiles a kernel after ``warm_up``."""
import pytest
import torch

from tests.kernels.kernel_cases import DEVICES, kernel_module, seed_of


def _ref(pm, pl, pacc):
    gm = pm.amax(-1, keepdim=True)
    gm = torch.where(torch.isfinite(gm), gm, torch.zeros_like(gm))
    w = torch.where(pl > 0, torch.exp2(pm - gm), torch.zeros_like(pm))
    den = (w * pl).sum(-1, keepdim=True).clamp_min(1e-30)
    return (pacc * w[..., None]).sum(-2) / den


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("S", [1, 5, 32, 33, 97, 256, 300, 600])
def test_split_reduce_matches_reference_at_any_split_count(request, device, S):
    kernel_module(device)
    from engine.kernels.split_reduce_triton import reduce_splits
    g = torch.Generator().manual_seed(seed_of(request))
    B, Hq, D = 2, 3, 16
    pm = torch.randn(B, Hq, S, generator=g) * 4
    pl = torch.rand(B, Hq, S, generator=g) * 10
    pacc = torch.randn(B, Hq, S, D, generator=g)
    empty = torch.rand(B, Hq, S, generator=g) < 0.3       # splits that saw no token
    pm[empty], pl[empty], pacc[empty] = float("-inf"), 0.0, 0.0
    pm[1, 2], pl[1, 2], pacc[1, 2] = float("-inf"), 0.0, 0.0   # a row with none at all
    out = torch.empty(B, Hq, D, device=device)
    reduce_splits(pm.to(device), pl.to(device), pacc.to(device), out)
    want = _ref(pm, pl, pacc)
    assert torch.allclose(out.cpu(), want, atol=1e-5, rtol=1e-5)
    assert float(out[1, 2].abs().max()) == 0.0


@pytest.mark.cuda
def test_no_split_count_compiles_after_the_warm_up():
    """Split counts change every step (batch, table width, formats held): after
    ``warm_up`` none of them compiles a reduction kernel in the middle of a step."""
    kernel_module("cuda")
    from engine.kernels.jit_count import compiled_keys
    from engine.kernels.split_reduce_triton import reduce_splits, warm_up
    dev, D = torch.device("cuda"), 128
    warm_up(dev, D, torch.bfloat16)
    keys = compiled_keys()
    for S in (1, 3, 17, 64, 100, 131, 257, 530):
        pm = torch.randn(2, 4, S, device=dev)
        reduce_splits(pm, torch.rand_like(pm), torch.randn(2, 4, S, D, device=dev),
                      torch.empty(2, 4, D, device=dev, dtype=torch.bfloat16))
    assert not {k for k in compiled_keys() - keys if k[0] == "_reduce_splits_kernel"}


@pytest.mark.parametrize("device", DEVICES)
def test_engine_kernel_warm_up_runs_and_a_failure_is_only_logged(device, monkeypatch,
                                                                 caplog):
    """The engine's direct kernel warm-up (reduction tiles, format pairs, the top-k
    gather) runs on an empty arena; should one of them fail, it is logged and the rest
    of the warm-up still runs."""
    kernel_module(device)
    from engine.engine import Engine, EngineConfig
    from engine.kernels import split_reduce_triton
    from engine.layout import KVFormat
    e = Engine(EngineConfig(model="random:tiny", device=device, kv_budget_bytes=1 << 20,
                            host_budget_bytes=1 << 20))
    with caplog.at_level("WARNING"):
        e._warm_kernels([KVFormat.parse("int4")])
    assert "kernel warm-up incomplete" not in caplog.text
    monkeypatch.setattr(split_reduce_triton, "warm_up",
                        lambda *a: (_ for _ in ()).throw(RuntimeError("no compiler")))
    with caplog.at_level("WARNING"):
        e._warm_kernels([KVFormat.parse("int4")])
    assert "kernel warm-up incomplete: no compiler" in caplog.text
