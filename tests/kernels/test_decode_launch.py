"""The decode kernel's launch settings (engine/kernels/decode_launch.py): split plans,
per-format defaults and the per-step launch cache, without a kernel or a GPU."""
from __future__ import annotations

import pytest
import torch

from engine.kernels import decode_launch as dl
from engine.layout import KVFormat
from kernel_cases import all_formats

FORMATS = all_formats() + all_formats(fp8=True)


@pytest.mark.parametrize("B,H,NB", [(1, 1, 1), (1, 8, 1024), (8, 8, 4096), (3, 2, 37),
                                    (64, 8, 33), (2, 3, 1025)])
@pytest.mark.parametrize("nbi", [1, 2, 4])
@pytest.mark.parametrize("splits", [None, 1, 7, 10_000])
@pytest.mark.parametrize("resident", [None, 3])
def test_launch_config_covers_the_table_in_whole_iterations(B, H, NB, nbi, splits, resident):
    S, bps = dl.launch_config(B, H, NB, torch.device("cpu"), splits, nbi, resident)
    assert 1 <= S <= NB and bps % nbi == 0
    assert S * bps >= NB and (S - 1) * bps < NB          # every split has blocks
    if splits is None:
        assert S <= max(1, -(-NB // (dl.min_iters(NB) * nbi)))  # runs of min_iters iterations


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("cuda", [False, True])
def test_format_defaults(fmt, cuda):
    nbi, stages, regs = dl.format_defaults(fmt, cuda)
    assert nbi in (2, 4) and stages in (2, 3)
    assert regs is None or (cuda and regs in (128, 168))
    words = dl.default_word_codes(fmt, cuda)
    assert words == ("k" if cuda and fmt == KVFormat(8, 8) else False)   # int8 only
    assert dl.min_blocks_per_iter(fmt, 16, True) == (1 if fmt.is_full else 2)
    assert dl.min_blocks_per_iter(fmt, 32, True) == dl.min_blocks_per_iter(fmt, 16, False) == 1


class _FakeKernel:
    """Stands in for a JITFunction: ``fn[grid](...)`` "compiles" (counted) and returns a
    compiled kernel whose ``ck[grid](*all_args)`` launches are recorded."""

    class _Param:
        def __init__(self, name, default):
            self.name, self.default = name, default

    def __init__(self):
        import inspect
        self.params = [self._Param(n, inspect.Parameter.empty) for n in ("x", "n", "A")] + \
            [self._Param("B", 7)]
        self.jit_calls, self.direct = [], []

    def __getitem__(self, grid):
        def call(*args, **kw):
            self.jit_calls.append((grid, args, kw))
            outer = self

            class CK:
                def __getitem__(self, g):
                    return lambda *a: outer.direct.append((g, a))
            return CK()
        return call


def test_launch_cache_reuses_a_compiled_kernel_only_for_the_same_specialization():
    fn, cache = _FakeKernel(), {}
    x = torch.zeros(64, dtype=torch.float16)
    dl.launch(fn, (2, 1), (x, 5), dict(A=3), dict(num_warps=4), cache)
    dl.launch(fn, (2, 1), (x.clone(), 5), dict(A=3), dict(num_warps=4), cache)   # layer 2
    assert len(fn.jit_calls) == 1 and len(fn.direct) == 1
    g, args = fn.direct[0]
    assert g == (2, 1, 1) and args[1:] == (5, 3, 7)       # 3-d grid; runtime args, constexprs
    # anything that specializes differently goes through Triton again
    dl.launch(fn, (2, 1), (x, 6), dict(A=3), dict(num_warps=4), cache)            # a scalar
    dl.launch(fn, (2, 1), (x[1:], 5), dict(A=3), dict(num_warps=4), cache)        # alignment
    dl.launch(fn, (2, 1), (x.float(), 5), dict(A=3), dict(num_warps=4), cache)    # dtype
    dl.launch(fn, (2, 1), (x, 5), dict(A=4), dict(num_warps=4), cache)            # constexpr
    dl.launch(fn, (2, 1), (x, 5), dict(A=3), dict(num_warps=8), cache)            # option
    dl.launch(fn, (3, 1), (x, 5), dict(A=3), dict(num_warps=4), cache)            # grid
    assert len(fn.jit_calls) == 7 and len(fn.direct) == 1
    dl.launch(fn, (2, 1), (x, 5), dict(A=3), dict(num_warps=4), None)             # no cache
    assert len(fn.jit_calls) == 8


def test_launch_cache_keys_on_the_kernel_and_tensor_devices():
    """One cache serves every kernel of a step: a kernel never launches another kernel's
    compiled code, nor code compiled for tensors on another device."""
    decode, reduce, cache = _FakeKernel(), _FakeKernel(), {}
    x = torch.zeros(64, dtype=torch.float16)
    meta = torch.empty(64, dtype=torch.float16, device="meta")   # aligned, other device
    for _ in range(2):
        for fn, t in ((decode, x), (reduce, x), (decode, meta)):
            dl.launch(fn, (2, 1), (t, 5), dict(A=3), dict(num_warps=4), cache)
    # each (kernel, device) compiled once, then launched directly by its own kernel
    assert [a[0].device.type for _, a, _ in decode.jit_calls] == ["cpu", "meta"]
    assert [a[0].device.type for _, a, _ in reduce.jit_calls] == ["cpu"]
    assert [a[0].device.type for _, a in decode.direct] == ["cpu", "meta"]
    assert [a[0].device.type for _, a in reduce.direct] == ["cpu"]


